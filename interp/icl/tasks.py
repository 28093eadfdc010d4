"""In-context-learning tasks and their prompts, as in Todd et al. 2024 ("Function Vectors in Large
Language Models", ICLR 2024).

    tasks = load_tasks()                                  # data/icl_tasks.json
    prompts = make_prompts(model, tasks["antonym"], n_prompts=8, n_shots=10, seed=0)
    prompts = make_prompts(model, tasks["antonym"], 8, 10, seed=0, shuffled=True)   # labels permuted

A prompt is "Q: x1\\nA: y1\\n\\nQ: x2\\nA: y2\\n\\n...Q: xq\\nA:" and its answer is the first token of
" yq" (the word as it follows "A:"). Shuffled prompts permute the demonstrations' labels among
themselves (the x -> y mapping is broken; the query and its answer are unchanged): the corrupted
prompts of the paper's indirect-effect measurement.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Optional, Sequence

from ..hooks import HookedModel

Pair = tuple[str, str]


@dataclass(frozen=True)
class ICLTask:
    """A named list of (input, output) word pairs."""

    name: str
    pairs: tuple[Pair, ...]
    description: str = ""

    def map_outputs(self, fn: Callable[[str], str], name: str) -> "ICLTask":
        """A composed task: the same inputs, each output passed through `fn` (e.g. antonym then capitalise)."""
        return ICLTask(name, tuple((x, fn(y)) for x, y in self.pairs), f"{self.description}, then {name}")


@dataclass(frozen=True)
class ICLPrompt:
    """One prompt: its text, the query's answer (a word) and that answer's first token id."""

    text: str
    query: str
    answer: str
    answer_id: int
    n_shots: int
    shuffled: bool


def load_tasks(path: Optional[str] = None) -> dict[str, ICLTask]:
    """The shipped tasks {name: ICLTask} (data/icl_tasks.json), or those of a JSON file of the same form."""
    raw = json.loads(open(path).read() if path else resources.files("interp.data").joinpath("icl_tasks.json").read_text())
    return {name: ICLTask(name, tuple((str(x), str(y)) for x, y in spec["pairs"]), spec.get("description", ""))
            for name, spec in raw["tasks"].items()}


def format_prompt(demos: Sequence[Pair], query: str) -> str:
    """'Q: x1\\nA: y1\\n\\n...Q: query\\nA:' (no demonstrations: the zero-shot 'Q: query\\nA:')."""
    return "".join(f"Q: {x}\nA: {y}\n\n" for x, y in demos) + f"Q: {query}\nA:"


def answer_id(model: HookedModel, answer: str) -> int:
    """The first token of ' answer', as the answer follows 'A:'."""
    ids = model.require_tokenizer()(" " + answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} tokenizes to nothing")
    return int(ids[0])


def make_prompts(
    model: HookedModel, task: ICLTask, n_prompts: int, n_shots: int, seed: int = 0, shuffled: bool = False
) -> list[ICLPrompt]:
    """`n_prompts` prompts of `n_shots` random demonstrations and a query not among them.

    shuffled: permute the demonstrations' outputs (a derangement where possible), keeping the query.
    The same seed gives the same demonstrations and queries with and without shuffling.
    """
    if n_shots + 1 > len(task.pairs):
        raise ValueError(f"task {task.name!r} has {len(task.pairs)} pairs; {n_shots} shots and a query need {n_shots + 1}")
    rng = random.Random(seed)
    out = []
    for i in range(n_prompts):
        chosen = rng.sample(task.pairs, n_shots + 1)
        demos, (query, answer) = list(chosen[:-1]), chosen[-1]
        labels = [y for _, y in demos]
        if shuffled:
            labels = derangement(labels, random.Random(f"{seed}-{i}"))
        demos = [(x, y) for (x, _), y in zip(demos, labels)]
        out.append(ICLPrompt(format_prompt(demos, query), query, answer, answer_id(model, answer), n_shots, shuffled))
    return out


def derangement(items: list[str], rng: random.Random) -> list[str]:
    """A permutation of `items` moving every item when one exists (tries a few times, then any shuffle)."""
    if len(items) < 2:
        return list(items)
    for _ in range(100):
        perm = items[:]
        rng.shuffle(perm)
        if all(a != b for a, b in zip(perm, items)):
            return perm
    return perm
