"""PatchResult: a sweep's metric per patch index, with its baselines and a tidy table."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor


@dataclass
class PatchResult:
    """A sweep's metric per patch index, shaped like TransformerLens's `get_act_patch_*` output.

    values: Float[Tensor, "layer pos"] | Float[Tensor, "layer head"] | Float[Tensor, "layer pos head"]
    (a pattern by position: Float[Tensor, "layer head pos"]), with axis names `axes`.
    `clean_metric` and `corrupted_metric` are the unpatched runs; `normalized` maps corrupted to 0
    and clean to 1. `method`: "exact", "attribution" or "path".
    """

    values: Tensor
    component: str
    axes: tuple[str, ...]
    direction: str
    metric_name: str
    clean_metric: float
    corrupted_metric: float
    tokens: list[str] = field(default_factory=list)
    method: str = "exact"

    @property
    def normalized(self) -> Tensor:
        """(values - corrupted) / (clean - corrupted), same shape as `values`; NaN when the two runs score the same."""
        gap = self.clean_metric - self.corrupted_metric
        if gap == 0:
            return torch.full_like(self.values, float("nan"))
        return (self.values - self.corrupted_metric) / gap

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per patch index with columns (layer, [pos], [head], metric, normalized)."""
        index = torch.cartesian_prod(*[torch.arange(n) for n in self.values.shape]).reshape(-1, self.values.ndim)
        df = pd.DataFrame(index.numpy(), columns=list(self.axes))
        df["metric"] = self.values.reshape(-1).numpy()
        df["normalized"] = self.normalized.reshape(-1).numpy()
        df.attrs.update(component=self.component, metric_name=self.metric_name, direction=self.direction,
                        method=self.method, tokens=list(self.tokens))
        return df
