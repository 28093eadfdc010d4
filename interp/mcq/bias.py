"""Position-bias metrics over cyclic permutations, and PriDe debiasing.

Zheng et al. 2024, "Large Language Models Are Not Robust Multiple Choice Selectors"
(arXiv:2309.03882, ICLR 2024):

- selection rate of letter i: the share of prompts on which the model picks letter i. Over all
  cyclic shifts the right answer sits equally often at every letter, so an unbiased model picks
  each letter at a rate of 1/n.
- recall of letter i: the accuracy on the prompts whose right answer is at letter i. RStd is the
  (population) standard deviation of these recalls over the letters: 0 for a model without
  position bias, whatever its accuracy.
- permutation consistency: the share of questions whose chosen *content* (option text) is the
  same under every cyclic shift.
- PriDe: the observed letter distribution factorises as
  P_obs(d_i | q, x^I) = Z^-1 P_prior(d_i | q) P_debiased(o_{f_I(i)} | q, x). Over all cyclic
  shifts every option sits once at every letter, so averaging log P_obs over the shifts at a
  fixed letter cancels the content term:
      P_prior(d_i | q) = softmax_i( mean_s log P_obs(d_i | q, x^s) )       (their eq. 4)
  the task prior is the mean of these over a small share of the questions (the estimation set),
  and every other question is answered by
      argmax_i  log P_obs(d_i | q, x) - log P_prior(d_i).
  `average="prob"` instead averages the probabilities over shifts (a plain mean, not the paper's).

A `LetterTable` holds logits [question, shift, letter] with the right letter and the shift of each
cell. Every metric takes one; numbers are fractions in [0, 1] (the paper prints RStd x 100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

AVERAGES = ("log", "prob")


@dataclass
class LetterTable:
    """logits: Float[Tensor, "question shift letter"]; gold, shift: Long[Tensor, "question shift"]."""

    logits: Tensor
    gold: Tensor
    shift: Tensor

    def __post_init__(self) -> None:
        if self.logits.ndim != 3:
            raise ValueError(f"logits must be [question, shift, letter], got shape {tuple(self.logits.shape)}")
        q, s, n = self.logits.shape
        for name in ("gold", "shift"):
            t = getattr(self, name)
            if tuple(t.shape) != (q, s):
                raise ValueError(f"{name} must be [question, shift] = [{q}, {s}], got {tuple(t.shape)}")
        if int(self.gold.min()) < 0 or int(self.gold.max()) >= n:
            raise ValueError(f"gold letters must lie in 0..{n - 1}")

    @property
    def n_letters(self) -> int:
        return self.logits.shape[-1]

    @classmethod
    def from_prompts(cls, prompts, logits: Tensor) -> "LetterTable":
        """From a `PromptSet` (rows question-major, the same shifts for every question) and its letter logits [row, letter]."""
        q, rows = prompts.n_questions, len(prompts)
        if logits.shape[0] != rows or rows % q:
            raise ValueError(f"{logits.shape[0]} logit rows for a prompt set of {rows} rows and {q} questions")
        s = rows // q
        shift = torch.tensor(prompts.shift).view(q, s)
        if not bool((shift == shift[:1]).all()) or torch.tensor(prompts.question).view(q, s).sub(torch.arange(q)[:, None]).any():
            raise ValueError("the prompt set is not question-major with the same shifts for every question")
        return cls(logits.float().view(q, s, -1), torch.tensor(prompts.gold).view(q, s), shift)

    def subset(self, questions: Sequence[int]) -> "LetterTable":
        idx = torch.as_tensor(list(questions), dtype=torch.long)
        return LetterTable(self.logits[idx], self.gold[idx], self.shift[idx])

    def log_probs(self) -> Tensor:
        """Float[Tensor, "question shift letter"]: log-softmax over the letters."""
        return self.logits.log_softmax(-1)

    def predictions(self) -> Tensor:
        """Long[Tensor, "question shift"]: the chosen letter."""
        return self.logits.argmax(-1)


# ---------------------------------------------------------------------------- metrics
def selection_rates(pred: Tensor, n_letters: int) -> Tensor:
    """Float[Tensor, "letter"]: share of prompts on which each letter is chosen. pred: Long[Tensor, "..."]."""
    return torch.bincount(pred.reshape(-1), minlength=n_letters).double() / pred.numel()


def recalls(pred: Tensor, gold: Tensor, n_letters: int) -> Tensor:
    """Float[Tensor, "letter"]: accuracy on the prompts whose right answer is at each letter (NaN where none is)."""
    pred, gold = pred.reshape(-1), gold.reshape(-1)
    hit = torch.bincount(gold[pred == gold], minlength=n_letters).double()
    total = torch.bincount(gold, minlength=n_letters).double()
    return torch.where(total > 0, hit / total.clamp(min=1), torch.full_like(total, math.nan))


def rstd(pred: Tensor, gold: Tensor, n_letters: int) -> float:
    """Standard deviation (population, over the letters that are ever right) of the per-letter recalls (Zheng et al. 2024)."""
    r = recalls(pred, gold, n_letters)
    return float(np.std(r[~r.isnan()].numpy()))


def consistency(pred: Tensor, shift: Tensor, n_letters: int) -> float:
    """Share of questions whose chosen content is the same under every shift. pred, shift: Long[Tensor, "question shift"]."""
    content = (pred + shift) % n_letters  # index of the chosen option in the stored order
    return float((content == content[:, :1]).all(1).double().mean())


@dataclass
class BiasSummary:
    """The metrics of one set of predictions: accuracy, RStd, consistency, selection rates and recalls per letter."""

    accuracy: float
    rstd: float
    consistency: float
    selection: list[float]
    recall: list[float]
    n_questions: int
    n_prompts: int

    def favoured(self) -> int:
        """The letter chosen most often."""
        return int(np.argmax(self.selection))

    def row(self, letters: Sequence[str] = "ABCD") -> dict:
        """A flat dict for a table (fractions)."""
        out = dict(accuracy=self.accuracy, rstd=self.rstd, consistency=self.consistency)
        out.update({f"sel_{L}": v for L, v in zip(letters, self.selection)})
        out.update({f"recall_{L}": v for L, v in zip(letters, self.recall)})
        return out


def summarize(table: LetterTable, pred: Optional[Tensor] = None) -> BiasSummary:
    """The metrics of `pred` (default: the table's argmax letters) against the table's right letters."""
    pred = table.predictions() if pred is None else pred
    n = table.n_letters
    return BiasSummary(
        accuracy=float((pred == table.gold).double().mean()),
        rstd=rstd(pred, table.gold, n),
        consistency=consistency(pred, table.shift, n),
        selection=selection_rates(pred, n).tolist(),
        recall=recalls(pred, table.gold, n).tolist(),
        n_questions=table.logits.shape[0],
        n_prompts=pred.numel(),
    )


# ---------------------------------------------------------------------------- PriDe
def question_priors(table: LetterTable, average: str = "log") -> Tensor:
    """Float[Tensor, "question letter"]: each question's prior over the letters from all its cyclic shifts.

    average="log" (the paper's eq. 4): softmax of the mean over shifts of the letter log-probabilities;
    "prob": the mean over shifts of the letter probabilities.
    """
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    n = table.n_letters
    shifts = table.shift
    full = torch.stack([torch.sort(s).values for s in shifts])
    if table.logits.shape[1] != n or not bool((full == torch.arange(n)).all()):
        raise ValueError(f"the prior needs every cyclic shift (0..{n - 1}) of each estimation question, got shifts {shifts[0].tolist()}")
    logp = table.log_probs()
    if average == "log":
        return logp.mean(1).softmax(-1)
    return logp.exp().mean(1)


def estimate_prior(table: LetterTable, average: str = "log") -> Tensor:
    """Float[Tensor, "letter"]: the task prior, the mean of the questions' priors (sums to 1)."""
    return question_priors(table, average).mean(0)


def debias(logits: Tensor, prior: Tensor) -> Tensor:
    """Float[Tensor, "... letter"]: log P_obs - log prior (argmax = the debiased answer; not normalised)."""
    if prior.shape[-1] != logits.shape[-1]:
        raise ValueError(f"prior over {prior.shape[-1]} letters for logits over {logits.shape[-1]}")
    return logits.log_softmax(-1) - prior.to(logits).log()


def estimation_split(n_questions: int, share: float = 0.05, seed: int = 0) -> tuple[list[int], list[int]]:
    """(estimation questions, held-out questions): ceil(share * n) drawn with `seed` (at least 1, leaving at least 1)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    if n_questions < 2:
        raise ValueError(f"PriDe needs at least 2 questions (one to estimate the prior, one to test), got {n_questions}")
    k = min(max(1, math.ceil(share * n_questions)), n_questions - 1)
    perm = torch.randperm(n_questions, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[:k]), sorted(perm[k:])


@dataclass
class PrideResult:
    """PriDe on one table: the prior, the split, and the metrics on the held-out questions before and after."""

    prior: list[float]
    estimation: list[int]
    held_out: list[int]
    before: BiasSummary
    after: BiasSummary
    average: str = "log"
    notes: dict = field(default_factory=dict)


def pride(table: LetterTable, share: float = 0.05, seed: int = 0, average: str = "log",
          estimation: Optional[Sequence[int]] = None) -> PrideResult:
    """PriDe (Zheng et al. 2024): the prior from every cyclic shift of `share` of the questions (or the
    listed `estimation` questions), then the held-out questions' metrics (all their shifts) before and after debiasing."""
    q = table.logits.shape[0]
    if estimation is None:
        est, held = estimation_split(q, share, seed)
    else:
        est = sorted(int(i) for i in estimation)
        held = [i for i in range(q) if i not in set(est)]
        if not est or not held:
            raise ValueError("the estimation questions must be a non-empty proper subset of the questions")
    prior = estimate_prior(table.subset(est), average)
    test = table.subset(held)
    after = debias(test.logits, prior).argmax(-1)
    return PrideResult(prior.tolist(), est, held, summarize(test), summarize(test, after), average)
