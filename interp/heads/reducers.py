"""Reducers: read hooks that shrink an activation inside the forward and keep only a statistic.

The head analyses need per-key attention mass (sinks) and per-token norms (extreme tokens),
never the full [batch, head, q, k] patterns. A reducer hook computes its statistic and returns
None, so nothing of size T x T outlives the layer that made it.

`collect_col_sums` is the one place the sink code gets its column sums from; a fused kernel
that streams the same statistic can stand in for it (any `ColSumSource` with its signature).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..hook_points import HookPoint
from ..hooks import HookedModel

# (model, tokens [batch, pos]) -> per-key column sums [batch, layer, head, pos] (fp32)
ColSumSource = Callable[[HookedModel, Tensor], Tensor]


@torch.no_grad()
def reduce_per_layer(
    model: HookedModel,
    tokens: Tensor,
    hook: str,
    reduce: Callable[[Tensor], Tensor],
    layers: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
) -> Tensor:
    """Run the model once with a read hook on `blocks.{l}.{hook}` that keeps `reduce(activation)`.

    Returns the statistics stacked along a new leading axis: [layer, *reduce's shape].
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    out: dict[int, Tensor] = {}

    def keep(x: Tensor, hook: HookPoint) -> None:
        out[hook.layer()] = reduce(x)

    names = [f"blocks.{l}.{hook}" for l in layers]
    for n in names:
        model.add_hook(n, keep, edits=False)
    try:
        model(tokens, attention_mask=attention_mask)
    finally:
        for n in names:
            model.remove_hook(n, keep)
    missing = [l for l in layers if l not in out]
    if missing:
        raise RuntimeError(f"hook {hook!r} did not fire at layers {missing}")
    return torch.stack([out[l] for l in layers])


def col_sums_of_pattern(pattern: Tensor) -> Tensor:
    """Float[Tensor, "batch head q k"] -> Float[Tensor, "batch head k"]: sum_i A[i, k] in fp32.

    The causal mask already makes A[i, k] = 0 for i < k, so this is the sum over queries i >= k.
    """
    return pattern.float().sum(dim=-2)


def collect_col_sums(model: HookedModel, tokens: Tensor, layers: Optional[Sequence[int]] = None) -> Tensor:
    """Per-key attention received, summed over queries: Float[Tensor, "batch layer head pos"] (fp32).

    Reduced inside each layer's `attn.hook_pattern` (which runs that layer on the eager path);
    no pattern is stored.
    """
    sums = reduce_per_layer(model, tokens, "attn.hook_pattern", col_sums_of_pattern, layers)
    return sums.permute(1, 0, 2, 3).contiguous()  # [layer, batch, head, k] -> [batch, layer, head, k]
