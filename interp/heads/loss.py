"""The LM loss as a `Metric`, and how the head experiments turn any metric of tokens into one.

The toolkit has one metric protocol, `interp.metrics.Metric`: a callable of logits. The head
experiments (ablation sweeps, importance, ACT) score next-token prediction, which needs the tokens
as well, and they run several token sets (each prompt alone, a calibration and a held-out set). So
they bind the tokens first: `metric_for(metric, tokens, attention_mask)` is the `Metric` of those
tokens. `metric` is either a class whose instances bind tokens (`LMLoss`, marked `binds_tokens`),
or the older form `metric(logits, tokens[, attention_mask]) -> scalar` (`lm_loss`, or your own),
which stays accepted everywhere.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional, Protocol, Union

import torch
from torch import Tensor

from ..metrics import Metric


def lm_loss(logits: Tensor, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Mean next-token cross-entropy (nats) over the prompt, in fp32 or wider; padding left out when a mask is given.

    logits: Float[Tensor, "batch pos d_vocab"]; tokens: Long[Tensor, "batch pos"]; attention_mask:
    [batch, pos] of 0/1 or None. Returns a scalar tensor.
    """
    logp = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)
    if attention_mask is None:
        return nll.mean()
    keep = attention_mask[:, 1:].to(nll.device, nll.dtype)
    return (nll * keep).sum() / keep.sum()


class LMLoss:
    """`lm_loss` of fixed tokens, as a `Metric`: `LMLoss(tokens)(logits)` == `lm_loss(logits, tokens)`.

    The class itself is what the head experiments take as their default metric: they build one
    per token set (`metric_for`).
    """

    binds_tokens: ClassVar[bool] = True
    last_position_only: ClassVar[bool] = False
    name: ClassVar[str] = "lm_loss"

    def __init__(self, tokens: Tensor, attention_mask: Optional[Tensor] = None):
        self.tokens = tokens
        self.attention_mask = attention_mask

    def __call__(self, logits: Tensor) -> Tensor:
        return lm_loss(logits, self.tokens, self.attention_mask)


class TokenBoundMetric(Protocol):
    """A metric class whose instances bind tokens: `cls(tokens, attention_mask)` is a `Metric` (e.g. `LMLoss`)."""

    binds_tokens: ClassVar[bool]

    def __call__(self, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Metric: ...


# metric(logits, tokens[, attention_mask]) -> scalar: the form the head experiments took first.
TokenMetric = Callable[..., Tensor]
# What the head experiments accept as `metric`.
HeadMetric = Union[TokenBoundMetric, TokenMetric]


def metric_for(metric: HeadMetric, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Metric:
    """The `Metric` (callable of logits) that `metric` gives for `tokens` (see the module docstring).

    A class marked `binds_tokens` is instantiated (with the mask when one is given); the older
    form is called as `metric(logits, tokens)`, or `metric(logits, tokens, attention_mask)` when
    a mask is given.
    """
    if isinstance(metric, type) and getattr(metric, "binds_tokens", False):
        return metric(tokens) if attention_mask is None else metric(tokens, attention_mask)
    if attention_mask is None:
        return lambda logits: metric(logits, tokens)
    return lambda logits: metric(logits, tokens, attention_mask)
