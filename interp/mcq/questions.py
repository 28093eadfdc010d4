"""Multiple-choice questions, their cyclic permutations and prompts.

A question has 4 options (letters A-D). Cyclic shift s shows original option (i + s) % n at letter
i, so over the n shifts every option sits once at every letter and the right answer visits every
letter once (Zheng et al. 2024, "Large Language Models Are Not Robust Multiple Choice Selectors",
arXiv:2309.03882, use the same cyclic permutations for PriDe and for permutation consistency).

The prompt (the format of `interp.circuits.tasks.multiple_choice`):

    Question: What color is grass?
    A. blue
    B. green
    C. purple
    D. orange
    Answer:

and the model's choice is the letter token (" A" .. " D") with the highest next-token logit.

    questions = load_questions()                       # data/mcq_questions.json, 120 questions
    prompts = build_prompts(questions)                 # every cyclic shift of every question
    letter_ids(tokenizer)                              # [4] token ids, each checked to be one token
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional, Sequence

DATA_FILE = "mcq_questions.json"


@dataclass(frozen=True)
class Question:
    """One question: its text, its options (in the stored order) and the index of the right one."""

    question: str
    options: tuple[str, ...]
    answer: int
    topic: str = ""

    def __post_init__(self) -> None:
        if len(self.options) < 2:
            raise ValueError(f"a question needs at least 2 options, got {len(self.options)}: {self.question!r}")
        if not 0 <= self.answer < len(self.options):
            raise ValueError(f"answer index {self.answer} is out of range for {len(self.options)} options: {self.question!r}")
        if len(set(self.options)) != len(self.options):
            raise ValueError(f"options repeat: {self.options} ({self.question!r})")

    def shifted(self, shift: int) -> tuple[tuple[str, ...], int]:
        """(options shown at letters 0..n-1, the letter of the right answer) under cyclic shift `shift`."""
        n = len(self.options)
        return tuple(self.options[(i + shift) % n] for i in range(n)), (self.answer - shift) % n


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt and which tokens are the answer letters.

    letters: the option labels as written in the prompt ("A".."D"); answer_prefix: what precedes a
    letter when the model writes it after the prompt (" ": the model answers " B" after "Answer:").
    """

    letters: tuple[str, ...] = ("A", "B", "C", "D")
    question_prefix: str = "Question: "
    answer_line: str = "Answer:"
    answer_prefix: str = " "

    def render(self, question: str, options: Sequence[str]) -> str:
        if len(options) != len(self.letters):
            raise ValueError(f"{len(options)} options for {len(self.letters)} letters {self.letters}")
        lines = [self.question_prefix + question] + [f"{L}. {o}" for L, o in zip(self.letters, options)] + [self.answer_line]
        return "\n".join(lines)

    def answer_tokens(self) -> list[str]:
        """The strings the model writes for each letter (" A", ...)."""
        return [self.answer_prefix + L for L in self.letters]


@dataclass
class PromptSet:
    """Every cyclic shift of a list of questions, flattened question-major: row q * n_shifts + s.

    prompts: the texts; question / shift / gold: Long-like lists [n_rows] (gold = the right letter's
    index under that shift); n_questions, n_options.
    """

    prompts: list[str]
    question: list[int]
    shift: list[int]
    gold: list[int]
    n_questions: int
    n_options: int
    fmt: PromptFormat = field(default_factory=PromptFormat)

    def __len__(self) -> int:
        return len(self.prompts)


def parse_questions(items: Sequence[dict[str, Any]]) -> list[Question]:
    """Questions from dicts with question, options, answer (and optional topic)."""
    out = []
    for k, it in enumerate(items):
        missing = {"question", "options", "answer"} - set(it)
        if missing:
            raise ValueError(f"question {k} lacks {sorted(missing)}: {it}")
        out.append(Question(str(it["question"]), tuple(str(o) for o in it["options"]), int(it["answer"]), str(it.get("topic", ""))))
    return out


def load_questions(path: Optional[str] = None, topics: Optional[Sequence[str]] = None) -> list[Question]:
    """The shipped questions (data/mcq_questions.json, installed as interp.data) or those in the JSON file at `path`.

    The file holds {"questions": [{"question", "options", "answer", "topic"}, ...]}. `topics` keeps
    only those topics (the shipped ones: knowledge, arithmetic, meaning).
    """
    if path is None:
        text = resources.files("interp.data").joinpath(DATA_FILE).read_text()
    else:
        with open(path) as f:
            text = f.read()
    data = json.loads(text)
    questions = parse_questions(data["questions"] if isinstance(data, dict) else data)
    if topics is not None:
        known = {q.topic for q in questions}
        unknown = set(topics) - known
        if unknown:
            raise ValueError(f"unknown topics {sorted(unknown)}; the file has {sorted(known)}")
        questions = [q for q in questions if q.topic in set(topics)]
    return questions


def build_prompts(questions: Sequence[Question], fmt: Optional[PromptFormat] = None, shifts: Optional[Sequence[int]] = None) -> PromptSet:
    """Every cyclic shift (or the listed `shifts`) of every question as prompts (see `PromptSet`)."""
    fmt = fmt or PromptFormat()
    if not questions:
        raise ValueError("no questions")
    n = len(fmt.letters)
    bad = [q.question for q in questions if len(q.options) != n]
    if bad:
        raise ValueError(f"{len(bad)} questions do not have {n} options (the format's letters {fmt.letters}): {bad[:3]}")
    shifts = list(range(n)) if shifts is None else [int(s) % n for s in shifts]
    ps = PromptSet([], [], [], [], len(questions), n, fmt)
    for qi, q in enumerate(questions):
        for s in shifts:
            options, gold = q.shifted(s)
            ps.prompts.append(fmt.render(q.question, options))
            ps.question.append(qi)
            ps.shift.append(s)
            ps.gold.append(gold)
    return ps


def letter_ids(tokenizer: Any, fmt: Optional[PromptFormat] = None) -> list[int]:
    """The token id of each answer letter (" A" ...), checked to be exactly one token and distinct."""
    fmt = fmt or PromptFormat()
    ids = []
    for s in fmt.answer_tokens():
        enc = tokenizer.encode(s, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"the answer letter {s!r} is {len(enc)} tokens {enc} for this tokenizer, not one; "
                             "choose letters (PromptFormat.letters / answer_prefix) that are single tokens")
        ids.append(enc[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer letters {fmt.answer_tokens()} share token ids {ids}")
    return ids
