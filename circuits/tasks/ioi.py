"""IOI prompt pairs: indirect object identification (Wang et al. 2022, arXiv:2211.00593).

Clean prompt (ABBA order): "When Mary and John went to the store, John gave a drink to"
-> correct answer " Mary" (the indirect object, IO), wrong answer " John" (the subject, S).
The BABA order introduces the two names the other way round ("When John and Mary ...").

Corrupted prompt: the second mention of the subject (S2) is replaced by a third name C:
"When Mary and John went to the store, Alice gave a drink to". Both candidate names are still
in the context, but nothing is repeated, so the prompt no longer says which of them is the
indirect object; the clean logit difference (IO - S) falls to about zero. This is the "ABC"
corruption of the IOI circuit-discovery work that followed the paper (EAP-IG, Hanna et al.
2024, flips S2 to a random name); the IOI paper's own p_ABC replaces all three mentions with
three fresh names. Only S2 changes here, so clean and corrupted differ at one position and a
patching sweep over positions reads cleanly.

Every prompt of a set has the same token length and the same layout, no padding: names,
places and objects must each be one token (with their leading space) for the tokenizer at
hand. The default name, place and object lists are filtered to those; lists the caller passes
are checked and refused with the offending entries named.
"""

from __future__ import annotations

import json
import random
import re
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .base import PromptPairs, check_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ioi_prompts", "ioi_names", "ioi_templates", "single_token_words", "check_task", "PromptPairs"]

SLOT = re.compile(r"(\[IO\]|\[S\]|\[PLACE\]|\[OBJECT\])")
ORDERS = ("mixed", "ABBA", "BABA")


@lru_cache(maxsize=None)
def _shipped() -> dict:
    data = json.loads(resources.files("interp.data").joinpath("ioi_templates.json").read_text())
    text = resources.files("interp.data").joinpath("ioi_names.txt").read_text()
    data["names"] = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return data


def ioi_names() -> list[str]:
    """The shipped name list (data/ioi_names.txt), before any tokenizer filtering."""
    return list(_shipped()["names"])


def ioi_templates() -> list[str]:
    """The shipped templates (data/ioi_templates.json), ABBA order, with [IO] [S] [PLACE] [OBJECT] slots."""
    return list(_shipped()["templates"])


def _word_id(tokenizer, word: str) -> Optional[int]:
    """The id of " word" if it is exactly one token that decodes back to the word (not an unknown token)."""
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    if len(ids) != 1 or tokenizer.decode(ids).strip() != word.strip():
        return None
    return ids[0]


def single_token_words(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[str]:
    """The words that are one token with a leading space (" Mary") for this tokenizer, one per id."""
    out, seen = [], set()
    for w in words:
        i = _word_id(tokenizer, w)
        if i is not None and i not in seen:
            out.append(w)
            seen.add(i)
    return out


def _words(tokenizer, given: Optional[Sequence[str]], default: str, kind: str, need: int) -> list[str]:
    if given is None:
        words = single_token_words(tokenizer, _shipped()[default])
        if len(words) < need:
            raise ValueError(
                f"only {len(words)} of the shipped {kind} are one token for this tokenizer ({words}); "
                f"pass {default}=[...] with at least {need} words that each tokenize to one token after a space"
            )
        return words
    bad = [w for w in given if _word_id(tokenizer, w) is None]
    if bad:
        raise ValueError(
            f"these {kind} are not one token (with a leading space) for this tokenizer: {bad}. "
            f"Every {kind[:-1]} must be a single token so that all prompts have the same length."
        )
    ids = [_word_id(tokenizer, w) for w in given]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the {kind} {list(given)} contain duplicates (as tokens)")
    if len(given) < need:
        raise ValueError(f"need at least {need} {kind}, got {len(given)}: {list(given)}")
    return list(given)


def _parse(template: str) -> list[str]:
    """Split a template into text pieces and slot markers; check its slots."""
    parts = SLOT.split(template)
    slots = parts[1::2]
    if slots.count("[IO]") != 1 or slots.count("[S]") != 2:
        raise ValueError(
            f"an IOI template needs exactly one [IO] and two [S] slots (ABBA order), got {slots} in {template!r}"
        )
    if any(t in template.replace("[IO]", "").replace("[S]", "").replace("[PLACE]", "").replace("[OBJECT]", "") for t in "[]"):
        raise ValueError(f"unknown slot in template {template!r}: the slots are [IO], [S], [PLACE], [OBJECT]")
    for i in range(1, len(parts), 2):
        if not parts[i - 1].endswith(" "):
            raise ValueError(
                f"slot {parts[i]} in {template!r} must follow a space, so that it is filled by one ' Word' token"
            )
    return parts


def _roles(parts: list[str], order: str) -> list[str]:
    """Slot roles in order of appearance: IO, S1, S2, PLACE, OBJECT; BABA swaps IO and S1."""
    roles, s_seen = [], 0
    for p in parts[1::2]:
        if p == "[S]":
            s_seen += 1
            roles.append(f"S{s_seen}")
        else:
            roles.append(p.strip("[]"))
    if order == "BABA":
        i, j = roles.index("IO"), roles.index("S1")
        roles[i], roles[j] = roles[j], roles[i]
    return roles


def _fill(parts: list[str], roles: list[str], values: dict[str, str]) -> tuple[str, dict[str, int]]:
    """The prompt text and, per role, the character offset just after its word."""
    text, ends = parts[0], {}
    for role, after in zip(roles, parts[2::2]):
        text += values[role]
        ends[role] = len(text)
        text += after
    return text.rstrip(), ends


def _encode(tokenizer, text: str) -> list[int]:
    # The same call HookedModel.to_tokens makes, so BOS follows the tokenizer's convention.
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def ioi_prompts(
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    seed: int = 0,
    templates: Optional[Sequence[str]] = None,
    names: Optional[Sequence[str]] = None,
    places: Optional[Sequence[str]] = None,
    objects: Optional[Sequence[str]] = None,
    order: str = "mixed",
) -> PromptPairs:
    """`n` IOI clean/corrupted prompt pairs for `tokenizer` (or a HookedModel's), deterministic in `seed`.

    templates: ABBA-order strings with one [IO], two [S] and optional [PLACE] / [OBJECT] slots
        (default: the first shipped template, "When [IO] and [S] went to the [PLACE], [S] gave a
        [OBJECT] to", so every prompt has the same layout). Prompt i uses templates[i % len].
    names, places, objects: words that must each be one token after a space (default: the
        shipped lists, filtered to those that are).
    order: "ABBA", "BABA", or "mixed" (even prompts ABBA, odd prompts BABA).

    Returns PromptPairs with answer_tokens [n, 2] = (" IO", " S") and positions "IO", "S1", "S2",
    "END" (the last position, where the answer is read). Raises ValueError when prompts would
    differ in length or a word is not a single token.
    """
    from interp.hooks import HookedModel

    if isinstance(tokenizer, HookedModel):  # a model stands for its tokenizer
        tokenizer = tokenizer.require_tokenizer()
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    templates = [ioi_templates()[0]] if templates is None else list(templates)
    if not templates:
        raise ValueError("templates is empty: pass at least one template")
    parsed = [_parse(t) for t in templates]
    uses = {s for p in parsed for s in p[1::2]}
    names = _words(tokenizer, names, "names", "names", 3)
    places = _words(tokenizer, places, "places", "places", 1) if "[PLACE]" in uses else []
    objects = _words(tokenizer, objects, "objects", "objects", 1) if "[OBJECT]" in uses else []

    rng = random.Random(seed)
    clean_rows, corrupt_rows, answers, clean_text, corrupt_text = [], [], [], [], []
    pos = {k: [] for k in ("IO", "S1", "S2", "END")}
    lengths: dict[int, int] = {}
    for i in range(n):
        t = i % len(templates)
        parts = parsed[t]
        o = order if order != "mixed" else ("ABBA" if i % 2 == 0 else "BABA")
        roles = _roles(parts, o)
        io, s, c = rng.sample(names, 3)
        # The template supplies the space before each slot, so " Mary" is one token.
        values = {"IO": io, "S1": s, "S2": s,
                  "PLACE": rng.choice(places) if places else "", "OBJECT": rng.choice(objects) if objects else ""}
        clean, ends = _fill(parts, roles, values)
        corrupt, _ = _fill(parts, roles, {**values, "S2": c})
        ids, cids = _encode(tokenizer, clean), _encode(tokenizer, corrupt)
        where = {r: len(_encode(tokenizer, clean[: ends[r]])) - 1 for r in ("IO", "S1", "S2")}
        want = {"IO": _word_id(tokenizer, io), "S1": _word_id(tokenizer, s), "S2": _word_id(tokenizer, s)}
        if any(where[r] >= len(ids) or ids[where[r]] != want[r] for r in where):
            raise ValueError(f"a name does not stay one token inside the prompt {clean!r} (tokens {ids})")
        expected = list(ids)
        expected[where["S2"]] = _word_id(tokenizer, c)
        if cids != expected:
            raise ValueError(
                f"the corrupted prompt {corrupt!r} does not tokenize like its clean prompt {clean!r} with S2 "
                f"replaced: {cids} vs {expected}"
            )
        lengths.setdefault(t, len(ids))
        if len(ids) != lengths[t]:
            raise ValueError(
                f"template {templates[t]!r} gives prompts of different token lengths ({lengths[t]} and {len(ids)}, "
                f"e.g. {clean!r}); every word must be a single token"
            )
        clean_rows.append(ids)
        corrupt_rows.append(cids)
        answers.append([want["IO"], want["S1"]])
        clean_text.append(clean)
        corrupt_text.append(corrupt)
        for r in ("IO", "S1", "S2"):
            pos[r].append(where[r])
        pos["END"].append(len(ids) - 1)
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{templates[t]!r} -> {k} tokens" for t, k in lengths.items())
        raise ValueError(
            f"the templates give prompts of different token lengths ({detail}); a prompt set needs one length "
            "(no padding), so pass templates of equal token length, or build one set per template"
        )
    return PromptPairs(
        clean_tokens=torch.tensor(clean_rows, dtype=torch.long),
        corrupted_tokens=torch.tensor(corrupt_rows, dtype=torch.long),
        answer_tokens=torch.tensor(answers, dtype=torch.long),
        clean_prompts=clean_text,
        corrupted_prompts=corrupt_text,
        positions={k: torch.tensor(v, dtype=torch.long) for k, v in pos.items()},
        d_vocab=len(tokenizer),
        name="ioi",
    )
