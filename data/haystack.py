"""Seeded needle-in-a-haystack prompts: filler prose made here, a needle at a chosen depth.

No corpus is downloaded. The filler is sentences drawn from small word lists and templates
with `random.Random(seed)`, so a (seed, n_tokens, depth) triple always gives the same token ids.

    task = passkey_task(seed=3)                  # needle " The special magic number is 48213." ...
    hay = build_haystack(tok, 2048, 0.5, task.needle, task.question, seed=3, answer=task.answer)
    hay.input_ids        # exactly 2048 token ids: [prefix] filler[:cut] needle filler[cut:] question
    hay.answer_span      # (start, end): token indices of the answer inside the needle

The layout follows Wu et al.'s NIAH set-up (needle inserted at a sentence boundary of the
haystack, the question after the haystack) with the answer primed at the end of the question
("... The special magic number is"), which SmolLM2 needs (docs/metrics.md, retrieval score). Every piece is
tokenized on its own (each starting with a space) and the ids are concatenated, so the needle's
token positions are exact by construction, not found afterwards by matching as in Wu et al.'s
`find_needle_idx`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional

ADJECTIVES = (
    "quiet old bright narrow green small distant warm wooden busy gentle tall quick pale heavy "
    "calm crowded simple careful patient silver"
).split()
NOUNS = (
    "river garden teacher window village market letter mountain kitchen bridge farmer painter "
    "library station forest lantern harbor meadow baker sailor orchard wagon chapel student"
).split()
VERBS = "watched crossed painted visited found carried opened followed described admired".split()
PLACES = "the square|the old mill|the coast|the hills|the town hall|the valley|the station|the lake".split("|")
TIMES = "in the morning|after lunch|at dusk|before the rain|on Sunday|during the fair|late at night".split("|")
TEMPLATES = (
    "The {a} {n} {v} the {a2} {n2} {t}.",
    "A {a} {n} lived near {p} and {v} the {n2} every day.",
    "{T}, the {n} {v} a {a} {n2} by {p}.",
    "Nobody knew why the {a} {n} {v} the {n2} near {p}.",
    "The {n} and the {n2} walked to {p} {t}.",
    "It was {a} at {p}, and the {n} {v} the {a2} {n2}.",
)


def filler_sentences(seed: int) -> Iterator[str]:
    """An endless, seeded stream of filler sentences, each starting with a space."""
    rng = random.Random(seed)
    while True:
        t = rng.choice(TIMES)
        yield " " + rng.choice(TEMPLATES).format(
            a=rng.choice(ADJECTIVES), a2=rng.choice(ADJECTIVES), n=rng.choice(NOUNS), n2=rng.choice(NOUNS),
            v=rng.choice(VERBS), p=rng.choice(PLACES), t=t, T=t[0].upper() + t[1:],
        )


@dataclass(frozen=True)
class PasskeyTask:
    needle: str  # the sentence inserted into the haystack
    question: str  # appended after the haystack; ends with the primed answer prefix
    answer: str  # the passkey, a substring of the needle


def passkey_task(seed: int, digits: int = 5) -> PasskeyTask:
    """A random passkey needle (SmolLM2 retrieves a 5-digit passkey when primed; docs/metrics.md)."""
    rng = random.Random(f"passkey-{seed}")
    answer = str(rng.randrange(10 ** (digits - 1), 10**digits))
    return PasskeyTask(
        needle=f" The special magic number is {answer}.",
        question=" What is the special magic number? The special magic number is",
        answer=answer,
    )


@dataclass(frozen=True)
class Haystack:
    """One NIAH prompt. Spans are [start, end) token indices into `input_ids`."""

    input_ids: list[int]
    needle_span: tuple[int, int]  # the whole needle sentence
    answer_span: tuple[int, int]  # the tokens of `answer` inside the needle (Wu et al.'s `real_needle`)
    depth: float  # as asked
    actual_depth: float  # where the needle landed: its start / the filler length (sentence boundary)
    answer: str
    seed: int

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer itself prepends one (Gemma), else nothing (SmolLM2)."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and with_special[:1] == [bos] else []


def _answer_span(tokenizer, needle: str, answer: str) -> tuple[int, int]:
    """Token indices (within the needle's own ids) of the tokens that cover `answer`."""
    at = needle.find(answer)
    if at < 0:
        raise ValueError(f"answer {answer!r} does not occur in the needle {needle!r}")
    offsets = tokenizer(needle, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    covering = [i for i, (s, e) in enumerate(offsets) if s < at + len(answer) and e > at and e > s]
    return covering[0], covering[-1] + 1


def build_haystack(
    tokenizer,
    n_tokens: int,
    depth: float,
    needle: str,
    question: str,
    seed: int,
    answer: Optional[str] = None,
) -> Haystack:
    """A prompt of exactly `n_tokens` tokens with `needle` at relative `depth` of the filler.

    depth 0 puts the needle first, 1 right before the question; in between it goes to the
    sentence boundary nearest depth * (filler length). The filler is trimmed to length by cutting
    tokens off the front of its first sentence (the haystack reads as an excerpt), so every
    boundary after it is a real sentence end. `answer` (default: the whole needle) picks the
    needle tokens that count as the needle in the retrieval score.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1] (0 = start of the haystack, 1 = end), got {depth}")
    prefix, needle_ids, question_ids = _prefix(tokenizer), _ids(tokenizer, needle), _ids(tokenizer, question)
    budget = n_tokens - len(prefix) - len(needle_ids) - len(question_ids)
    if budget < 0:
        raise ValueError(
            f"n_tokens={n_tokens} is shorter than prefix + needle + question "
            f"({len(prefix)} + {len(needle_ids)} + {len(question_ids)} tokens); ask for more tokens"
        )
    sentences: list[list[int]] = []
    total = 0
    stream = filler_sentences(seed)
    while total < budget:
        sentences.append(_ids(tokenizer, next(stream)))
        total += len(sentences[-1])
    extra = total - budget  # < the last sentence's length, which may exceed the first's
    while sentences and extra >= len(sentences[0]):
        extra -= len(sentences.pop(0))
    if sentences:
        sentences[0] = sentences[0][extra:]  # left-trim to the exact budget
    filler = [t for s in sentences for t in s]
    boundaries, at = [0], 0
    for s in sentences:
        at += len(s)
        boundaries.append(at)
    cut = min(boundaries, key=lambda b: (abs(b - depth * budget), b))
    ids = prefix + filler[:cut] + needle_ids + filler[cut:] + question_ids
    start = len(prefix) + cut
    a0, a1 = _answer_span(tokenizer, needle, answer) if answer is not None else (0, len(needle_ids))
    return Haystack(
        input_ids=ids,
        needle_span=(start, start + len(needle_ids)),
        answer_span=(start + a0, start + a1),
        depth=depth,
        actual_depth=cut / budget if budget else 0.0,
        answer=answer if answer is not None else needle.strip(),
        seed=seed,
    )
