"""Head importance by gradient (Michel et al. 2019, "Are Sixteen Heads Really Better than One?").

Each query head's output z (``attn.hook_z``) is multiplied by a gate xi_h = 1. The importance is

    I_h = E_x | dL(x) / d xi_h |

with the absolute value taken per prompt (one gate per prompt and head, so a batch gives every
prompt its own gradient in one backward pass), gradients in fp32, then normalised per layer by
the l2 norm over that layer's heads (as `run_bertology.py`, the reference port, does).
L is next-token cross-entropy by default (`LMLoss`), or any metric of tokens (`interp.heads.loss`:
a class that binds tokens, or `metric(logits, tokens[, attention_mask]) -> scalar`).

The pruning curve removes the least important heads (layer-normalised scores, ranked over the
whole model) in steps of 10% of all heads, zero-ablating them, and records the metric.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..hook_points import HookPoint
from ..hooks import HookedModel, Input
from .ablate import Head, ablate_heads
from .loss import HeadMetric, LMLoss, metric_for, require_per_set_metric

# Added to each layer's l2 norm before dividing, so a layer whose heads all score 0 gives 0, not NaN.
NORM_EPS = 1e-20


def gate_gradients(
    model: HookedModel,
    tokens: Tensor,
    metric: HeadMetric = LMLoss,
    attention_mask: Optional[Tensor] = None,
) -> Tensor:
    """dL(x)/d xi_h for each prompt x: Float[Tensor, "batch layer head"] (fp32).

    The gate multiplies z in fp32, so the gradient is accumulated in fp32 whatever the model's dtype.
    """
    require_per_set_metric(metric, "gate_gradients")
    c = model.cfg
    gates = torch.ones(tokens.shape[0], c.n_layers, c.n_heads, dtype=torch.float32, device=model.device, requires_grad=True)

    def gate(z: Tensor, hook: HookPoint) -> Tensor:
        g = gates[:, hook.layer()]  # [batch, head]
        return (z.float() * g[:, None, :, None]).to(z.dtype)

    with torch.enable_grad(), model.hooks(fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), gate)]):
        logits = model(tokens, attention_mask=attention_mask)
        # a sum of per-prompt losses: each prompt's gates get that prompt's own gradient
        loss = sum(
            metric_for(metric, tokens[b : b + 1], None if attention_mask is None else attention_mask[b : b + 1])(logits[b : b + 1])
            for b in range(tokens.shape[0])
        )
        (grad,) = torch.autograd.grad(loss, gates)
    return grad


def head_importance_scores(
    model: HookedModel,
    tokens: Input,
    metric: HeadMetric = LMLoss,
    batch_size: int = 4,
    attention_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(raw, normalised) importance, each Float[Tensor, "layer head"].

    raw = mean over prompts of |dL/d xi_h|; normalised = raw / ||raw[layer]||_2.
    """
    tokens, attention_mask = model.prepare_inputs(tokens, attention_mask)
    total = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.float32, device=model.device)
    for i in range(0, tokens.shape[0], batch_size):
        mask = attention_mask[i : i + batch_size] if attention_mask is not None else None
        total += gate_gradients(model, tokens[i : i + batch_size], metric, mask).abs().sum(0)
    raw = total / tokens.shape[0]
    return raw, normalise_per_layer(raw)


def normalise_per_layer(raw: Tensor) -> Tensor:
    """Michel et al.'s layer normalisation: raw / ||raw[layer]||_2, Float[Tensor, "layer head"] in raw's dtype."""
    return raw / (raw.pow(2).sum(-1, keepdim=True).sqrt() + NORM_EPS)


def head_importance(
    model: HookedModel,
    tokens: Input,
    metric: HeadMetric = LMLoss,
    batch_size: int = 4,
    attention_mask: Optional[Tensor] = None,
) -> pd.DataFrame:
    """One row per (layer, head): importance (layer-normalised), importance_raw, rank (0 = most important)."""
    raw, norm = head_importance_scores(model, tokens, metric, batch_size, attention_mask)
    L, H = raw.shape
    df = pd.DataFrame(
        {
            "layer": [l for l in range(L) for _ in range(H)],
            "head": [h for _ in range(L) for h in range(H)],
            "importance": norm.flatten().tolist(),
            "importance_raw": raw.flatten().tolist(),
        }
    )
    df["rank"] = df.importance.rank(ascending=False, method="first").astype(int) - 1
    return df


def pruning_order(importance: pd.DataFrame) -> list[Head]:
    """Heads from least to most important (ties broken by layer, then head)."""
    ordered = importance.sort_values(["importance", "layer", "head"], kind="stable")
    return [(int(l), int(h)) for l, h in zip(ordered.layer, ordered["head"])]


@torch.no_grad()
def _metric_with_pruned(model: HookedModel, tokens: Tensor, metric: HeadMetric, pruned: Sequence[Head],
                        attention_mask: Optional[Tensor]) -> float:
    with ablate_heads(model, pruned, how="zero"):
        logits = model(tokens, attention_mask=attention_mask)
    return float(metric_for(metric, tokens, attention_mask)(logits))


def pruning_curve(
    model: HookedModel,
    tokens: Input,
    metric: HeadMetric = LMLoss,
    importance: Optional[pd.DataFrame] = None,
    step: float = 0.1,
    max_share: float = 1.0,
    recompute: bool = False,
    attention_mask: Optional[Tensor] = None,
    batch_size: int = 4,
) -> pd.DataFrame:
    """Metric against the share of heads pruned, least important first, in steps of `step`.

    importance: a `head_importance` frame (computed on `tokens` if None).
    recompute: re-estimate importance among the surviving heads after every step, as
    `run_bertology.py::mask_heads` does; otherwise one ranking is used throughout.
    Returns DataFrame(share_pruned, n_pruned, metric).
    """
    tokens, attention_mask = model.prepare_inputs(tokens, attention_mask)
    if not 0 < step <= 1:
        raise ValueError(f"step must be a share in (0, 1], got {step}")
    n_total = model.cfg.n_layers * model.cfg.n_heads
    if importance is None:
        importance = head_importance(model, tokens, metric, batch_size, attention_mask)
    order = pruning_order(importance)
    pruned: list[Head] = []
    rows = []
    n_steps = int(round(max_share / step))
    for s in range(n_steps + 1):
        n = min(n_total, int(round(s * step * n_total)))
        if recompute and n > len(pruned):
            with ablate_heads(model, pruned, how="zero"):
                imp = head_importance(model, tokens, metric, batch_size, attention_mask)
            done = set(pruned)
            order = pruned + [hd for hd in pruning_order(imp) if hd not in done]
        pruned = order[:n]
        rows.append({"share_pruned": n / n_total, "n_pruned": n,
                     "metric": _metric_with_pruned(model, tokens, metric, pruned, attention_mask)})
    return pd.DataFrame(rows, columns=["share_pruned", "n_pruned", "metric"])
