"""Metrics on logits for patching: logit difference, answer probability, KL to a reference run.

A metric (the `Metric` protocol) maps logits of a prompt set to a scalar (the mean over
prompts), so it can be handed to our sweeps, to ablation, EAP and faithfulness, and to
TransformerLens's `get_act_patch_*` alike; a plain function or lambda on logits is one. Metrics
that read only the final position say so with `last_position_only = True`; the sweeps then ask
the model for the last position's logits alone, which saves the unembedding of every other
position (and padded batches can be read at each prompt's last real token).
"""

from __future__ import annotations

from typing import Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Metric(Protocol):
    """A callable from logits Float[Tensor, "batch pos d_vocab"] to a scalar Float[Tensor, ""].

    Optional attributes the toolkit reads: `last_position_only` (bool; the metric reads only the
    final position, so it may be handed logits [batch, 1, d_vocab], and a right-padded batch is
    read at each prompt's last real token) and `name` (str, for tables; see `metric_name`).
    A metric that needs more than logits (tokens, a reference run) binds it when it is built,
    as `LogitDiff(answer_tokens)` does.
    """

    def __call__(self, logits: Tensor) -> Tensor:
        """logits: Float[Tensor, "batch pos d_vocab"] (or "batch 1 d_vocab"); returns Float[Tensor, ""]."""
        ...


# How to batch prompts of unequal length where padding cannot be read correctly.
BATCH_BY_LENGTH = "group the prompts by token length (key each by len(model.to_tokens(p)[0])) and make one call per group"


def last_real_tokens(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """Each prompt's last real token, Long[Tensor, "prompt"], for a right-padded mask; None when nothing is padded.

    Right padding (real tokens first, as `model.to_tokens` pads a list) is the only padding
    patching reads correctly: with causal attention no real token sees the pads after it, so
    every real position computes what the prompt alone computes. Any other mask is refused.
    """
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    right = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    bad = (mask != right).any(dim=1).nonzero()
    if len(bad):
        row = int(bad[0])
        raise ValueError(
            f"attention_mask row {row} is {mask[row].int().tolist()}: only right padding (real tokens first, then "
            "pads) can be patched, since a prompt's positions must line up with its run alone. Pad on the right "
            f"(tokenizer.padding_side = 'right', as model.to_tokens does), or {BATCH_BY_LENGTH}"
        )
    return lengths - 1


def require_last_position(metric: Metric, last: Optional[Tensor], where: str) -> None:
    """Refuse a padded batch unless the metric reads only the final position (`last_position_only`).

    With padding the final position is a pad for the shorter prompts; a last-position metric is
    handed logits [prompt, 1, d_vocab] taken at each prompt's own last real token instead.
    """
    if last is not None and not getattr(metric, "last_position_only", False):
        raise ValueError(
            f"{where}: the batch is padded (its attention_mask has zeros) and the metric "
            f"{metric_name(metric)!r} does not say it reads only the final position. Padded batches are read at "
            "each prompt's last real token: give the metric `last_position_only = True` (it then receives logits "
            f"[prompt, 1, d_vocab] at those tokens), or {BATCH_BY_LENGTH}"
        )


def keep_last(last: Tensor, start: int = 0, copies: int = 1) -> Tensor:
    """HF's `logits_to_keep` that keeps each row's last real token: Long[Tensor, "copies*prompt 1"].

    For a forward from position `start` of `copies` stacked copies of the prompts (copy-major rows).
    """
    return (last - start).repeat(copies)[:, None]


def _answers(answer_tokens: Tensor) -> Tensor:
    answer_tokens = torch.as_tensor(answer_tokens)
    if answer_tokens.ndim == 1:
        answer_tokens = answer_tokens[:, None]
    if answer_tokens.ndim != 2:
        raise ValueError(f"answer_tokens must be [prompts] or [prompts, answers], got shape {tuple(answer_tokens.shape)}")
    return answer_tokens.long()


def accumulate(x: Tensor) -> Tensor:
    """x in at least float32 for sums and softmaxes; float64 stays float64 (so float64 references stay exact)."""
    return x if x.dtype == torch.float64 else x.float()


def _check_rows(logits: Tensor, answers: Tensor) -> None:
    if logits.shape[0] != answers.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} prompts but answer_tokens has {answers.shape[0]} rows")


class LogitDiff:
    """logit[correct] - logit[wrong] at the last position, mean over prompts.

    answer_tokens: Int[Tensor, "prompt 2"] as (correct, wrong).
    """

    last_position_only = True
    name = "logit_diff"

    def __init__(self, answer_tokens: Tensor) -> None:
        self.answers = _answers(answer_tokens)
        if self.answers.shape[1] != 2:
            raise ValueError(f"logit difference needs (correct, wrong) answer pairs, got shape {tuple(self.answers.shape)}")

    def per_prompt(self, logits: Tensor) -> Tensor:
        """Float[Tensor, "prompt"] from logits Float[Tensor, "prompt pos d_vocab"]."""
        _check_rows(logits, self.answers)
        picked = logits[:, -1].gather(-1, self.answers.to(logits.device))
        return accumulate(picked[:, 0] - picked[:, 1])

    def __call__(self, logits: Tensor) -> Tensor:
        return self.per_prompt(logits).mean()


class AnswerProb:
    """Probability of the correct answer (first column) at the last position, mean over prompts."""

    last_position_only = True
    name = "answer_prob"

    def __init__(self, answer_tokens: Tensor) -> None:
        self.answers = _answers(answer_tokens)

    def per_prompt(self, logits: Tensor) -> Tensor:
        """The correct answer's probability per prompt."""
        _check_rows(logits, self.answers)
        probs = accumulate(logits[:, -1]).softmax(-1)
        return probs.gather(-1, self.answers[:, :1].to(logits.device))[:, 0]

    def __call__(self, logits: Tensor) -> Tensor:
        return self.per_prompt(logits).mean()


class KLToReference:
    """KL(reference || patched) of the next-token distributions at the last position, mean over prompts.

    With the clean run as reference, the clean run scores 0 and the corrupted run the largest value.
    """

    last_position_only = True
    name = "kl_to_clean"

    def __init__(self, reference_logits: Tensor) -> None:
        self.reference = accumulate(reference_logits[:, -1]).log_softmax(-1)

    def per_prompt(self, logits: Tensor) -> Tensor:
        """KL(reference || patched) per prompt."""
        if logits.shape[0] != self.reference.shape[0]:
            raise ValueError(f"logits have {logits.shape[0]} prompts but the reference has {self.reference.shape[0]}")
        logp = accumulate(logits[:, -1]).log_softmax(-1)
        ref = self.reference.to(logp.device)
        return (ref.exp() * (ref - logp)).sum(-1)

    def __call__(self, logits: Tensor) -> Tensor:
        return self.per_prompt(logits).mean()


def make_metric(
    metric: Union[str, Metric],
    answer_tokens: Optional[Tensor] = None,
    clean_logits: Optional[Tensor] = None,
) -> Metric:
    """A metric from its name ("logit_diff", "prob", "kl") or a callable on logits, returned as is.

    "logit_diff" and "prob" need `answer_tokens` ((correct, wrong) per prompt); "kl" needs the
    reference (clean) run's logits.
    """
    if callable(metric):
        return metric
    if metric in ("logit_diff", "prob") and answer_tokens is None:
        raise ValueError(f"metric {metric!r} needs answer_tokens")
    if metric == "logit_diff":
        return LogitDiff(answer_tokens)
    if metric == "prob":
        return AnswerProb(answer_tokens)
    if metric == "kl":
        return KLToReference(clean_logits)
    raise ValueError(f"unknown metric {metric!r}: use 'logit_diff', 'prob', 'kl' or a callable on logits")


def metric_name(metric: Metric) -> str:
    """The metric's `name`, else its function name, else its class name."""
    return getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__))
