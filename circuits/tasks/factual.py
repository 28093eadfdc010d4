"""Factual recall: "The capital of France is" -> " Paris" (subject -> attribute; Meng et al. 2022,
"Locating and Editing Factual Associations in GPT", arXiv:2202.05262; Geva et al. 2023).

Clean prompt: a template filled with a subject; correct answer its attribute. Corrupted prompt:
the same template with another subject of the same relation; wrong answer = that subject's
attribute. So the logit difference reads "which of the two attributes", and patching shows
where the subject's attribute is recalled. Subjects and attributes must be one token each (with
a leading space) for every prompt to have the same length; the fact list is filtered to those.
Pass `model=` to keep only the facts the model gets right (its top-1 next token is the attribute).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Optional

import torch

from .base import PromptPairs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from interp.hooks import HookedModel

# (relation template, [(subject, attribute), ...]); {} is the subject slot.
FACTS = {
    "The capital of {} is": [
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
        ("Russia", "Moscow"), ("England", "London"), ("Egypt", "Cairo"), ("China", "Beijing"), ("Greece", "Athens"),
        ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Poland", "Warsaw"),
        ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Thailand", "Bangkok"), ("Cuba", "Havana"),
        ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Turkey", "Ankara"),
    ],
    "The official language of {} is": [
        ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"), ("Japan", "Japanese"),
        ("Russia", "Russian"), ("China", "Chinese"), ("Greece", "Greek"), ("Portugal", "Portuguese"), ("Poland", "Polish"),
        ("Sweden", "Swedish"), ("Finland", "Finnish"), ("Turkey", "Turkish"), ("Brazil", "Portuguese"), ("Mexico", "Spanish"),
    ],
}


def _one(tokenizer, word: str) -> Optional[int]:
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def factual_facts(
    tokenizer: PreTrainedTokenizerBase, model: Optional[HookedModel] = None, facts: Optional[dict] = None
) -> list[tuple[str, str, str]]:
    """(template, subject, attribute) triples usable with this tokenizer (and, with `model`, known to it)."""
    facts = FACTS if facts is None else facts
    out = []
    for template, pairs in facts.items():
        for s, a in pairs:
            if _one(tokenizer, s) is not None and _one(tokenizer, a) is not None:
                out.append((template, s, a))
    if model is not None and out:
        prompts = [t.format(s) for t, s, _ in out]
        toks, mask = model.to_tokens_and_mask(prompts)
        with torch.no_grad():
            logits = model(toks, attention_mask=mask)
        last = mask.sum(1) - 1
        top = logits[torch.arange(len(out)), last].argmax(-1).tolist()
        out = [f for f, t in zip(out, top) if t == _one(tokenizer, f[2])]
    return out


def factual_prompts(tokenizer: PreTrainedTokenizerBase, n: int, seed: int = 0, model: Optional[HookedModel] = None,
                    relation: str = "The capital of {} is",
                    facts: Optional[dict] = None) -> PromptPairs:
    """`n` pairs of one relation (subjects sampled with replacement from the usable facts), deterministic in `seed`.

    The corrupted subject of each pair has a different attribute. `relation` is a key of `facts`
    (default: the shipped FACTS).
    """
    facts = FACTS if facts is None else facts
    if relation not in facts:
        raise ValueError(f"unknown relation {relation!r}; known: {list(facts)}")
    usable = [(s, a) for t, s, a in factual_facts(tokenizer, model, {relation: facts[relation]})]
    if len({a for _, a in usable}) < 2:
        raise ValueError(f"fewer than two usable facts with different attributes for {relation!r} with this tokenizer"
                         + (" and model" if model is not None else "") + f" ({usable}): pass facts={{relation: [(subject, attribute), ...]}}")
    rng = random.Random(seed)
    rows, crow, ans, texts, ctexts = [], [], [], [], []
    enc = lambda s: tokenizer(s, add_special_tokens=True)["input_ids"]
    for _ in range(n):
        s, a = rng.choice(usable)
        cs, ca = rng.choice([f for f in usable if f[1] != a])
        rows.append(enc(relation.format(s)))
        crow.append(enc(relation.format(cs)))
        ans.append([_one(tokenizer, a), _one(tokenizer, ca)])
        texts.append(relation.format(s))
        ctexts.append(relation.format(cs))
    if len({len(r) for r in rows + crow}) != 1:
        raise ValueError(f"prompts of {relation!r} tokenize to different lengths: a subject is not one token in context")
    return PromptPairs(torch.tensor(rows), torch.tensor(crow), torch.tensor(ans), texts, ctexts,
                       d_vocab=len(tokenizer), name="factual")
