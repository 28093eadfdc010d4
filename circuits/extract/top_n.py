"""Top-n extraction: the n edges with the largest |score|, then pruned to the edges on an input ->
logits path inside the chosen set (Hanna et al. 2024, arXiv:2403.17806, section 3)."""

from __future__ import annotations

import torch

from ..circuit import Circuit
from ..eap import EdgeScores
from .base import check_size
from .prune import prune


def top_n(scores: EdgeScores, n: int, model: str = "", prune_dangling: bool = True) -> Circuit:
    """The n edges with the largest |score| (pruned to input -> logits paths unless told not to)."""
    g = scores.graph
    check_size(g, n)
    s = scores.scores.abs().masked_fill(~g.mask, -1.0).flatten()
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep[s.topk(n).indices] = True
    keep = keep.view_as(g.mask)
    if prune_dangling:
        keep = prune(g, keep)
    return Circuit.from_mask(g, keep, scores.scores, model, {"method": scores.method, "extraction": f"top_n({n})"})
