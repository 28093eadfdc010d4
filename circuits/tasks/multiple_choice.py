"""Multiple-choice answer-letter selection (Lieberum et al. 2023, "Does Circuit Analysis
Interpretability Scale? Evidence from Multiple Choice Capabilities in Chinchilla", arXiv:2307.09458).

Clean prompt: a question, options "A. ..", "B. ..", "C. ..", "D. ..", one per line, then
"Answer:"; correct answer the letter of the right option (" B"). Corrupted prompt: the same
question and options with the right option swapped with another one, so the same tokens sit in
other places (the same token length) and the right letter changes; wrong answer = the corrupted
prompt's letter. The metric is the logit difference between the two letters.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .base import PromptPairs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LETTERS = "ABCD"
# (question, right answer, three wrong answers): easy general knowledge.
QUESTIONS = [
    ("What color is the sky on a clear day?", "blue", ["green", "red", "black"]),
    ("How many legs does a dog have?", "four", ["two", "six", "eight"]),
    ("What do bees make?", "honey", ["milk", "silk", "wool"]),
    ("Which animal says moo?", "cow", ["cat", "dog", "duck"]),
    ("What is frozen water called?", "ice", ["steam", "sand", "salt"]),
    ("Which planet do we live on?", "Earth", ["Mars", "Venus", "Jupiter"]),
    ("What is the opposite of hot?", "cold", ["warm", "big", "fast"]),
    ("How many days are in a week?", "seven", ["five", "ten", "three"]),
    ("What do you use to see?", "eyes", ["ears", "feet", "hands"]),
    ("Which season is the coldest?", "winter", ["summer", "spring", "autumn"]),
    ("What color is grass?", "green", ["blue", "purple", "orange"]),
    ("Which animal can fly?", "bird", ["fish", "horse", "snake"]),
]


def format_question(question: str, options: Sequence[str]) -> str:
    lines = [f"Question: {question}"] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)] + ["Answer:"]
    return "\n".join(lines)


def multiple_choice_prompts(tokenizer: PreTrainedTokenizerBase, n: int, seed: int = 0, questions: Optional[Sequence] = None) -> PromptPairs:
    """`n` pairs (questions cycled, option orders drawn from `seed`); all prompts share one token length
    per question, so the set is built from the questions whose prompts have the most common length."""
    questions = list(QUESTIONS if questions is None else questions)
    letter_ids = []
    for L in LETTERS:
        ids = tokenizer.encode(" " + L, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the answer letter ' {L}' is not one token for this tokenizer ({ids})")
        letter_ids.append(ids[0])
    rng = random.Random(seed)
    enc = lambda s: tokenizer(s, add_special_tokens=True)["input_ids"]
    items = []
    for i in range(n * 4):
        q, right, wrong = questions[i % len(questions)]
        opts = [right] + list(wrong)
        rng.shuffle(opts)
        a = opts.index(right)
        b = rng.choice([j for j in range(4) if j != a])
        copts = list(opts)
        copts[a], copts[b] = copts[b], copts[a]
        clean, corrupt = format_question(q, opts), format_question(q, copts)
        ci, ki = enc(clean), enc(corrupt)
        if len(ci) == len(ki):
            items.append((clean, corrupt, ci, ki, letter_ids[a], letter_ids[b]))
    if not items:
        raise ValueError("no question gives clean and corrupted prompts of equal token length for this tokenizer")
    from collections import Counter
    length = Counter(len(it[2]) for it in items).most_common(1)[0][0]
    items = [it for it in items if len(it[2]) == length][:n]
    return PromptPairs(torch.tensor([it[2] for it in items]), torch.tensor([it[3] for it in items]),
                       torch.tensor([[it[4], it[5]] for it in items]), [it[0] for it in items], [it[1] for it in items],
                       d_vocab=len(tokenizer), name="multiple_choice")
