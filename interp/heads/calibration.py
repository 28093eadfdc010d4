"""Attention calibration (ACT; Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks").

In each calibrated head, the non-initial sinks of the input (keys k > 0 whose Gu et al. alpha,
`kernels.spec.sink_alpha`, exceeds a threshold) keep a share `beta` of the attention they get,
and each row gives the rest back to its other keys. `act_search` tries every head alone on a
calibration set (several heads per forward, `interp.heads.sweeps.batched_sweep`); `act_calibrate`
keeps the heads that help and applies them together on a calibration and a held-out set.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..hook_points import get_act_name
from ..hooks import HookedModel, HookSpec, Input
from ..kernels.spec import sink_alpha
from .ablate import Head, all_heads, head_mask
from .loss import HeadMetric, LMLoss, metric_for, require_per_set_metric
from .sweeps import batched_sweep

ACT_BETA = 0.4
ACT_THRESHOLD = 0.1


def calibrate_pattern(pattern: Tensor, sel: Tensor, beta: float = ACT_BETA, threshold: float = ACT_THRESHOLD) -> Tensor:
    """ACT (Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks"), per input.

    pattern: Float[Tensor, "batch head q k"] of a full causal forward (q == k).
    sel: Bool[Tensor, "batch_or_1 head"], the heads to calibrate.
    In each selected head, keys k > 0 with alpha(k) = sum_i A[i, k] / (T - k) > threshold (the
    non-initial sinks of this input) keep `beta` of the attention they get; each row gives the
    removed mass back to its other keys in proportion to their attention (the first token
    included, as in GATECH-EIC/ACT), so rows still sum to 1. A row with no other key is left as is.
    Unlike ACT's code, which drops the first index it finds, the first token is excluded by position.
    """
    b, H, q, k = pattern.shape
    if q != k:
        raise ValueError(
            f"attention calibration needs the full pattern of a forward without KV cache (q == k), got {tuple(pattern.shape)}"
        )
    p = pattern.float()
    alpha = sink_alpha(p.sum(-2))  # [b, H, k], Gu's denominator T - k
    sinks = (alpha > threshold) & sel.to(p.device)[:, :, None]
    sinks[..., 0] = False
    cols = sinks[:, :, None, :]  # [b, H, 1, k]
    removed = (p * cols).sum(-1, keepdim=True) * (1 - beta)
    pool = p.masked_fill(cols, 0.0)
    pool_sum = pool.sum(-1, keepdim=True)
    share = torch.where(pool_sum > 0, pool / pool_sum.clamp_min(1e-30), torch.zeros_like(pool))
    new = torch.where(cols, p * beta, p) + removed * share
    new = torch.where(pool_sum > 0, new, p)
    return new.to(pattern.dtype)


def calibration_hooks(model: HookedModel, mask: Tensor, beta: float = ACT_BETA, threshold: float = ACT_THRESHOLD) -> HookSpec:
    """Pattern-edit hooks applying `calibrate_pattern` where mask [1 or batch, n_layers, n_heads] is True."""
    if mask.ndim == 2:
        mask = mask[None]
    hooks = []
    for layer in range(model.cfg.n_layers):
        sel = mask[:, layer]
        if bool(sel.any()):
            hooks.append((get_act_name("pattern", layer),
                          lambda p, hook, sel=sel: calibrate_pattern(p, sel, beta, threshold)))
    return hooks


@contextlib.contextmanager
def calibrate_heads(model: HookedModel, heads: Sequence[Head], beta: float = ACT_BETA,
                    threshold: float = ACT_THRESHOLD) -> Iterator[HookedModel]:
    """ACT on `heads` for the duration of the `with` block (full forwards only; those layers run eager)."""
    with model.hooks(fwd_hooks=calibration_hooks(model, head_mask(model, heads), beta, threshold)):
        yield model


def act_search(
    model: HookedModel,
    tokens: Input,
    metric: HeadMetric = LMLoss,
    heads: Optional[Sequence[Head]] = None,
    beta: float = ACT_BETA,
    threshold: float = ACT_THRESHOLD,
    batch_heads: int = 8,
    attention_mask: Optional[Tensor] = None,
) -> pd.DataFrame:
    """Calibrate each head alone on a calibration set: one row per (layer, head) with metric and delta.

    metric: `LMLoss` (default) or any class that binds tokens, or `metric(logits, tokens)` such as `lm_loss`.
    """
    tokens, attention_mask = model.prepare_inputs(tokens, attention_mask)
    heads = all_heads(model, heads)
    clean, results = batched_sweep(
        model, tokens, metric, heads, batch_heads, lambda mask, k: calibration_hooks(model, mask, beta, threshold), attention_mask
    )
    return pd.DataFrame([{"layer": l, "head": h, "metric": m, "delta": m - clean} for (l, h), m in results],
                        columns=["layer", "head", "metric", "delta"])


@torch.no_grad()
def act_calibrate(
    model: HookedModel,
    calibration: Input,
    held_out: Input,
    metric: HeadMetric = LMLoss,
    lower_is_better: bool = True,
    beta: float = ACT_BETA,
    threshold: float = ACT_THRESHOLD,
    max_heads: Optional[int] = None,
    batch_heads: int = 8,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pick ACT heads on `calibration` (each head that improves the metric alone, best first, at
    most `max_heads`) and apply them together on both sets.

    Returns (search: per-head frame from `act_search`, summary: one row per set with columns
    set, n_heads, clean, calibrated, delta).
    """
    require_per_set_metric(metric, "act_calibrate")
    cal_tokens, _ = model.prepare_inputs(calibration, None)
    held_tokens, _ = model.prepare_inputs(held_out, None)
    search = act_search(model, cal_tokens, metric, None, beta, threshold, batch_heads)
    gain = search.delta if lower_is_better else -search.delta
    chosen = search[gain < 0].assign(gain=gain[gain < 0]).sort_values("gain")
    if max_heads is not None:
        chosen = chosen.head(max_heads)
    heads = [(int(l), int(h)) for l, h in zip(chosen.layer, chosen["head"])]
    rows = []
    for name, toks in (("calibration", cal_tokens), ("held_out", held_tokens)):
        measure = metric_for(metric, toks)
        clean = float(measure(model(toks)))
        with calibrate_heads(model, heads, beta, threshold):
            cal = float(measure(model(toks)))
        rows.append({"set": name, "n_heads": len(heads), "clean": clean, "calibrated": cal, "delta": cal - clean})
    return search, pd.DataFrame(rows)
