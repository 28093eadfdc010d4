"""Head ablation, single-head sweeps and attention calibration: one import path for all three.

    from interp.heads.ablation import ablate_heads, single_head_ablation, LMLoss
    with ablate_heads(model, heads=[(3, 1), (7, 4)], how="uniform"):
        logits = model(tokens)          # or model.generate(...)
    df = single_head_ablation(model, tokens, LMLoss, how="mean", reference=other_tokens)

Each job lives in its own module; this one re-exports their public names, as notebooks and the
docs use them:

- `interp.heads.ablate`: `ablate_heads` and the hooks behind it. The four ways to remove a head
  are the `AblationKind`s zero, mean, resample and uniform (strings are accepted everywhere);
  see that module's docstring for what each does.
- `interp.heads.sweeps`: `single_head_ablation`, every head ablated alone, several per forward:
  by default stacked as per-row kernel head gates and started at the ablated layer
  (`interp.heads.stacked`: `stacked_head_ablation`), or with hooks on full forwards
  (`backend="eager"`).
- `interp.heads.calibration`: attention calibration (ACT, Yu et al. 2024), which re-weights
  attention to non-initial sinks: `calibrate_pattern`, `calibrate_heads`, `act_search`, `act_calibrate`.
- `interp.heads.loss`: `lm_loss` and `LMLoss`, and how a metric of tokens becomes an
  `interp.metrics.Metric` (a callable of logits) once its tokens are bound (`metric_for`).
"""

from __future__ import annotations

from ..metrics import Metric
from .ablate import (
    HOWS,
    AblationKind,
    Head,
    ablate_heads,
    ablation_hooks,
    all_heads,
    check_heads,
    head_mask,
    reference_z,
    replacements,
)
from .calibration import ACT_BETA, ACT_THRESHOLD, act_calibrate, act_search, calibrate_heads, calibrate_pattern, calibration_hooks
from .loss import HeadMetric, LMLoss, TokenBoundMetric, TokenMetric, lm_loss, metric_for
from .stacked import stacked_head_ablation
from .sweeps import SWEEP_BACKENDS, batched_sweep, single_head_ablation

__all__ = [
    "ACT_BETA",
    "ACT_THRESHOLD",
    "HOWS",
    "SWEEP_BACKENDS",
    "AblationKind",
    "Head",
    "HeadMetric",
    "LMLoss",
    "Metric",
    "TokenBoundMetric",
    "TokenMetric",
    "ablate_heads",
    "ablation_hooks",
    "act_calibrate",
    "act_search",
    "all_heads",
    "batched_sweep",
    "calibrate_heads",
    "calibrate_pattern",
    "calibration_hooks",
    "check_heads",
    "head_mask",
    "lm_loss",
    "metric_for",
    "reference_z",
    "replacements",
    "single_head_ablation",
    "stacked_head_ablation",
]
