"""Greater-than on years (Hanna, Liu & Variengien 2023, "How does GPT-2 compute greater-than?",
arXiv:2305.00586).

Clean: "The war lasted from the year 17YY to the year 17" -- the model should continue with a
year greater than 17YY. Corrupted: the start year is 1701 ("01" years: nothing is smaller), the
paper's corruption.

Tokenizers differ: GPT-2 writes "32" as one token, SmolLM2 (and Llama-3-style tokenizers) split
numbers into single digits. This module builds prompts whose start year is written digit by
digit when the tokenizer does so, and reads the *tens digit* the model predicts next: with
start year 17{t}{u}, tens digits above t continue with a later year, below t with an earlier one.
Metric (the paper's probability difference, at the tens digit): sum of p(digit) over digits
> t minus over digits < t, mean over prompts. `answer_tokens` are (t + 1, t - 1) for the
logit-difference view. Needs a tokenizer that writes each digit as one token after "17".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, Union

import torch
from torch import Tensor

from .base import PromptPairs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE = "The war lasted from the year 17{yy} to the year 17"
NOUNS = ("war", "deal", "reign", "expedition", "drought", "strike", "siege", "feud")


@dataclass
class GreaterThanPairs(PromptPairs):
    """PromptPairs with the start year's tens digit per prompt (`tens`, Long[Tensor, "n"]) and the
    ten digit token ids (`digit_ids`, Long[Tensor, "10"])."""

    tens: Tensor = None
    digit_ids: Tensor = None

    def _like(self, sub: PromptPairs, tens: Tensor) -> "GreaterThanPairs":
        return GreaterThanPairs(**{k: getattr(sub, k) for k in PromptPairs.__dataclass_fields__}, tens=tens, digit_ids=self.digit_ids)

    def __getitem__(self, index) -> "GreaterThanPairs":
        idx = torch.arange(len(self))[index].reshape(-1)
        return self._like(PromptPairs.__getitem__(self, index), self.tens[idx])

    def to(self, device: Union[str, torch.device]) -> "GreaterThanPairs":
        return self._like(PromptPairs.to(self, device), self.tens)

    def prob_diff(self, logits: Tensor) -> Tensor:
        """Per prompt: p(tens digit > t) - p(tens digit < t) at the final position: Float[Tensor, "n"]."""
        if logits.ndim == 3:
            logits = logits[:, -1]
        p = logits.float().softmax(-1)[:, self.digit_ids.to(logits.device)]  # [n, 10]
        d = torch.arange(10, device=logits.device)[None]
        t = self.tens.to(logits.device)[:, None]
        return (p * (d > t)).sum(-1) - (p * (d < t)).sum(-1)

    def metric(self, logits: Tensor) -> Tensor:
        return self.prob_diff(logits).mean()


def greater_than_prompts(tokenizer: PreTrainedTokenizerBase, n: int, seed: int = 0, nouns: Sequence[str] = NOUNS) -> GreaterThanPairs:
    """`n` greater-than pairs, start years 1720-1789 (tens digit 2-8), deterministic in `seed`.

    nouns: event words for "The {noun} lasted ..."; those that are not one token are dropped.
    """
    digit_ids = []
    for d in range(10):
        ids = tokenizer.encode(str(d), add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the digit {d} is not one token for this tokenizer ({ids}); greater_than_prompts needs single-digit tokens")
        digit_ids.append(ids[0])
    nouns = [w for w in nouns if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]
    if not nouns:
        raise ValueError("none of the nouns is one token (with a leading space) for this tokenizer: pass nouns=[...]")
    rng = random.Random(seed)
    rows, crow, texts, ctexts, tens = [], [], [], [], []
    enc = lambda s: tokenizer(s, add_special_tokens=True)["input_ids"]
    for i in range(n):
        t, u = rng.randint(2, 8), rng.randint(0, 9)
        noun = nouns[i % len(nouns)]
        text = TEMPLATE.replace("war", noun).format(yy=f"{t}{u}")
        ctext = TEMPLATE.replace("war", noun).format(yy="01")
        a, b = enc(text), enc(ctext)
        if len(a) != len(b):
            raise ValueError(f"{text!r} and {ctext!r} tokenize to different lengths ({len(a)} vs {len(b)}): the tokenizer "
                             "does not write years digit by digit; this task needs it to")
        rows.append(a)
        crow.append(b)
        texts.append(text)
        ctexts.append(ctext)
        tens.append(t)
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"prompts have different token lengths {sorted(lengths)}: pass nouns that are each one token")
    tens_t = torch.tensor(tens)
    ids = torch.tensor(digit_ids)
    answers = torch.stack([ids[tens_t + 1], ids[tens_t - 1]], 1)
    return GreaterThanPairs(torch.tensor(rows), torch.tensor(crow), answers, texts, ctexts, d_vocab=len(tokenizer),
                            name="greater_than", tens=tens_t, digit_ids=ids)
