"""Single-head sweeps: intervene on every head alone, several heads per forward.

`batched_sweep` repeats the prompt batch once per head of a chunk and gives each copy a head mask
with only its head set, so `batch_heads` interventions share one full forward (hooks).
`single_head_ablation` sweeps ablations (`interp.heads.ablate`): by default stacked per layer as
per-row kernel head gates, each forward starting at the ablated layer from a clean run's residual
stream (`interp.heads.stacked`); `backend="eager"` runs them through `batched_sweep`'s hooks (the
oracle of the tests). `interp.heads.calibration.act_search` sweeps ACT.

`metric` is any `interp.heads.loss.HeadMetric`: `LMLoss`, a `Metric` of logits alone such as
`interp.metrics.LogitDiff(answer_tokens)`, or `metric(logits, tokens[, attention_mask])`. A metric
with `last_position_only = True` reads each prompt at its last real token in a right-padded batch
(logits [batch, 1, d_vocab]); the stacked backend also unembeds only that position.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import pandas as pd
import torch
from torch import Tensor

from ..hooks import HookedModel, HookSpec, Input
from ..metrics import keep_last
from .ablate import AblationKind, Head, ablation_hooks, all_heads, replacements
from .loss import HeadMetric, metric_form, sweep_metric
from .stacked import stacked_head_ablation

SWEEP_BACKENDS = ("stacked", "eager")
EAGER_BATCH_HEADS = 8


def batched_sweep(
    model: HookedModel,
    tokens: Tensor,
    metric: HeadMetric,
    heads: Sequence[Head],
    batch_heads: int,
    hooks_for: Callable[[Tensor, int], HookSpec],
    attention_mask: Optional[Tensor] = None,
) -> tuple[float, list[tuple[Head, float]]]:
    """Run `batch_heads` single-head interventions per forward: the prompt batch is repeated and
    copy j gets a head mask with only head j set. hooks_for(mask [k*B, L, H], k) builds the hooks.

    tokens: Long[Tensor, "batch pos"], already checked (`model.prepare_inputs`). The metric is
    read on each copy's logits with the tokens bound (`interp.heads.loss.sweep_metric`: with padding, the mask reaches
    `LMLoss` and token metrics, and a logits-only metric must be last-position; the mask also
    goes to the forward). In a right-padded batch a metric with
    `last_position_only` is handed each prompt's logits at its last real token [batch, 1, d_vocab]
    (HF's `logits_to_keep`, `interp.metrics.keep_last`, as patching does); otherwise (and always
    when nothing is padded) the full logits.
    Returns the clean metric and [(head, metric)].
    """
    if batch_heads < 1:
        raise ValueError(f"batch_heads must be >= 1, got {batch_heads}")
    measure, last = sweep_metric(metric, tokens, attention_mask, "batched_sweep")

    def kept(copies: int) -> dict:
        return {} if last is None else {"logits_to_keep": keep_last(last, 0, copies)}

    B = tokens.shape[0]
    with torch.no_grad():
        clean = float(measure(model(tokens, attention_mask=attention_mask, **kept(1))))
    out = []
    for start in range(0, len(heads), batch_heads):
        chunk = heads[start : start + batch_heads]
        k = len(chunk)
        mask = torch.zeros(k * B, model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool, device=model.device)
        for j, (l, h) in enumerate(chunk):
            mask[j * B : (j + 1) * B, l, h] = True
        big_mask = attention_mask.repeat(k, 1) if attention_mask is not None else None
        with torch.no_grad(), model.hooks(fwd_hooks=hooks_for(mask, k)):
            logits = model(tokens.repeat(k, 1), attention_mask=big_mask, **kept(k))
        out += [((l, h), float(measure(logits[j * B : (j + 1) * B]))) for j, (l, h) in enumerate(chunk)]
    return clean, out


def single_head_ablation(
    model: HookedModel,
    tokens: Input,
    metric: HeadMetric,
    how: Union[str, AblationKind] = "zero",
    batch_heads: Optional[int] = None,
    reference: Optional[Input] = None,
    heads: Optional[Sequence[Head]] = None,
    attention_mask: Optional[Tensor] = None,
    reference_mask: Optional[Tensor] = None,
    per_position: bool = False,
    backend: str = "stacked",
) -> pd.DataFrame:
    """Ablate each head alone and measure `metric` on the logits (a scalar over the prompt batch).

    metric: `LMLoss` (or any class that binds tokens), a `Metric` of logits alone such as
    `interp.metrics.LogitDiff(answer_tokens)` (built for these prompts), or `metric(logits, tokens)`
    such as `lm_loss` (`interp.heads.loss.metric_for`). A metric with `last_position_only = True`
    reads each prompt at its last real token in a right-padded `attention_mask`, and the stacked
    backend unembeds only that position.
    backend: "stacked" (default) runs the ablations of a layer as per-row kernel head gates
    [copies*batch, head], from that layer on, from one clean run's residual stream
    (`interp.heads.stacked`); "eager" runs full forwards with hooks (`batched_sweep`). Both give
    the same numbers (to float rounding). batch_heads: ablations per forward (None: every head of
    a layer for "stacked", within a logits budget; 8 for "eager"); the prompt batch is repeated
    that many times and each copy removes its own head. Returns one row per (layer, head) with
    columns layer, head, metric, delta (= metric - clean metric), how.
    """
    if backend not in SWEEP_BACKENDS:
        raise ValueError(f"backend must be one of {SWEEP_BACKENDS}, got {backend!r}")
    metric_form(metric)  # a metric of no known form is refused before any forward
    kind = AblationKind.parse(how)
    tokens, attention_mask = model.prepare_inputs(tokens, attention_mask)
    heads = all_heads(model, heads)
    B = tokens.shape[0]
    repl = replacements(model, kind, sorted({l for l, _ in heads}), reference, reference_mask, per_position)
    if backend == "stacked":
        clean, results = stacked_head_ablation(model, tokens, metric, kind, heads, repl, batch_heads, attention_mask)
    else:

        def hooks_for(mask: Tensor, k: int) -> HookSpec:
            # a reference batch matched to the prompts is tiled like the prompts
            tiled = {l: (r.repeat(k, 1, 1, 1) if r.shape[0] == B and B > 1 else r) for l, r in repl.items()}
            return ablation_hooks(model, mask, kind, tiled)

        per_forward = EAGER_BATCH_HEADS if batch_heads is None else batch_heads
        clean, results = batched_sweep(model, tokens, metric, heads, per_forward, hooks_for, attention_mask)
    rows = [{"layer": l, "head": h, "metric": m, "delta": m - clean, "how": kind.value} for (l, h), m in results]
    return pd.DataFrame(rows, columns=["layer", "head", "metric", "delta", "how"])
