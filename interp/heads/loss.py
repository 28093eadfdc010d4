"""The LM loss as a `Metric`, and how the head experiments turn any metric into one for a token set.

The toolkit has one metric protocol, `interp.metrics.Metric`: a callable of logits. The head
experiments (ablation sweeps, importance, ACT) score next-token prediction, which needs the tokens
as well, and they run several token sets (each prompt alone, a calibration and a held-out set). So
they bind the tokens first: `metric_for(metric, tokens, attention_mask)` is the `Metric` of those
tokens. `metric` is one of three forms (a `HeadMetric`):

- a class whose instances bind tokens (`LMLoss`, marked `binds_tokens`): built per token set;
- a `Metric` of logits alone, such as `interp.metrics.LogitDiff(answer_tokens)`: a callable with
  one required positional parameter (`metric(logits)`), used as it is (its tokens, answers or
  reference run are bound when it is built, so it fits one prompt batch);
- the older form `metric(logits, tokens[, attention_mask]) -> scalar` (`lm_loss`, or your own):
  two required positional parameters, and a third, optional one for the mask.

The form is read from the callable's signature (`inspect.signature`); anything else (not
callable, a class that does not bind tokens, three or more required parameters, a required
keyword-only parameter, a signature Python cannot read) is refused with a `TypeError`.
A metric that reads only the final position says so with `last_position_only = True`
(`interp.metrics`): the sweeps then form only each prompt's last-position logits.
"""

from __future__ import annotations

import inspect
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
# What the head experiments accept as `metric`: a token-binding class, a Metric of logits alone
# (e.g. `LogitDiff(answer_tokens)`), or the older metric(logits, tokens[, attention_mask]).
HeadMetric = Union[TokenBoundMetric, Metric, TokenMetric]

_FORMS = ("a class marked `binds_tokens` (LMLoss), a Metric of logits alone (metric(logits), e.g. "
          "interp.metrics.LogitDiff(answer_tokens)), or metric(logits, tokens[, attention_mask]) (lm_loss)")


class BoundTokenMetric:
    """The older form `metric(logits, tokens[, attention_mask])` with its tokens bound: a `Metric`.

    Carries the function's `last_position_only` and `name` when it has them.
    """

    def __init__(self, metric: TokenMetric, tokens: Tensor, attention_mask: Optional[Tensor] = None):
        self.metric = metric
        self.tokens = tokens
        self.attention_mask = attention_mask
        self.last_position_only = bool(getattr(metric, "last_position_only", False))
        self.name = getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__))

    def __call__(self, logits: Tensor) -> Tensor:
        if self.attention_mask is None:
            return self.metric(logits, self.tokens)
        return self.metric(logits, self.tokens, self.attention_mask)


def _describe(metric: object) -> str:
    return getattr(metric, "__qualname__", None) or f"a {type(metric).__name__} instance"


def metric_form(metric: object) -> str:
    """Which `HeadMetric` form `metric` is: "binds_tokens", "logits" or "tokens"; TypeError for anything else.

    Read from the signature: one required positional parameter is a `Metric` of logits alone, two
    are the older metric(logits, tokens[, attention_mask]).
    """
    if isinstance(metric, type):
        if getattr(metric, "binds_tokens", False):
            return "binds_tokens"
        raise TypeError(f"metric {metric.__name__} is a class that does not bind tokens (no `binds_tokens = True`): "
                        f"pass an instance (e.g. {metric.__name__}(answer_tokens)). The metric must be {_FORMS}")
    if not callable(metric):
        raise TypeError(f"metric must be callable, got {type(metric).__name__}: pass {_FORMS}")
    try:
        sig = inspect.signature(metric)
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot read the signature of metric {_describe(metric)} ({e}), so its form is unknown: "
                        f"wrap it in a def or lambda with named parameters. The metric must be {_FORMS}") from None
    params = list(sig.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    keyword_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
    if keyword_only:
        raise TypeError(f"metric {_describe(metric)}{sig} has required keyword-only parameters {keyword_only}, which the "
                        f"sweeps never pass. The metric must be {_FORMS}")
    if len(required) == 1:
        return "logits"
    if len(required) == 2:
        return "tokens"
    raise TypeError(f"metric {_describe(metric)}{sig} has {len(required)} required positional parameters {required}; "
                    f"the sweeps call it with logits alone (1) or with (logits, tokens) (2, and the attention mask as "
                    f"an optional third). The metric must be {_FORMS}")


def sweep_metric(metric: HeadMetric, tokens: Tensor, attention_mask: Optional[Tensor],
                 where: str) -> tuple[Metric, Optional[Tensor]]:
    """The bound metric a sweep reads its copies with, and the positions it reads.

    With a padded batch (some 0 in `attention_mask`), `LMLoss` and metric(logits, tokens,
    attention_mask) get the mask, so pad positions stay out of the loss; a metric of logits alone
    must read only the final position (`last_position_only`), or it is refused as patching refuses
    it (`interp.metrics.require_last_position`). Returns (metric, last): `last` is each prompt's last
    real token, Long[Tensor, "prompt"], for a last-position metric on a padded batch (the sweeps
    then unembed only there: `interp.metrics.keep_last`), else None.
    """
    from ..metrics import last_real_tokens, require_last_position

    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    measure = metric_for(metric, tokens, attention_mask if padded else None)
    reads_last = bool(getattr(measure, "last_position_only", False))
    logits_only = metric_form(metric) == "logits"
    last = last_real_tokens(attention_mask) if padded and (reads_last or logits_only) else None
    if logits_only:
        require_last_position(metric, last, where)
    return measure, (last if reads_last else None)


def require_per_set_metric(metric: HeadMetric, where: str) -> None:
    """Refuse a `Metric` of logits alone where the tokens scored are not the batch it was built for.

    `gate_gradients` scores each prompt alone and `act_calibrate` a held-out set as well: a metric
    such as `LogitDiff(answer_tokens)` holds the answers of one batch and would read them against
    other prompts. TypeError otherwise as `metric_form`.
    """
    if metric_form(metric) == "logits":
        raise TypeError(
            f"{where} scores other token sets than one prompt batch (each prompt alone, or a held-out set), so its "
            f"metric must be built per token set: LMLoss, or metric(logits, tokens) that reads the answers of the tokens "
            f"it is given. {_describe(metric)} is a metric of logits alone, bound to one batch; it fits "
            "single_head_ablation, or wrap it per set as metric(logits, tokens).")


def metric_for(metric: HeadMetric, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Metric:
    """The `Metric` (callable of logits) that `metric` gives for `tokens` (see the module docstring).

    A class marked `binds_tokens` is instantiated (with the mask when one is given); a `Metric` of
    logits alone is returned as it is (it was built for its prompt batch; tokens and mask are not
    passed to it); the older form is called as `metric(logits, tokens)`, or
    `metric(logits, tokens, attention_mask)` when a mask is given. TypeError for anything else
    (`metric_form`).
    """
    form = metric_form(metric)
    if form == "binds_tokens":
        return metric(tokens) if attention_mask is None else metric(tokens, attention_mask)
    if form == "logits":
        return metric
    if attention_mask is not None:
        try:
            inspect.signature(metric).bind(None, None, None)
        except TypeError:
            raise TypeError(f"metric {_describe(metric)}{inspect.signature(metric)} takes (logits, tokens) but an "
                            "attention_mask is given: add a third, optional parameter for it "
                            "(metric(logits, tokens, attention_mask=None), as lm_loss does)") from None
    return BoundTokenMetric(metric, tokens, attention_mask)
