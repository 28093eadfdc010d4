"""Pruning: keep only the edges that lie on a path from ``input`` to ``logits`` inside the chosen set.

An edge into a node that reaches nothing changes nothing, so it is dropped, as is an edge out of a
node nothing feeds (Hanna et al. 2024, arXiv:2403.17806, section 3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..graph import Graph


def prune(graph: Graph, keep: Tensor) -> Tensor:
    """Keep only edges on an input -> logits path within `keep` (Bool[Tensor, "receiver node"]); same shape."""
    keep = keep & graph.mask
    feeds = graph.feeds
    n_nodes = len(graph.nodes)
    n_receivers = len(graph.receivers)
    while True:
        # forward: nodes reachable from input (receivers are in forward order)
        reach = torch.zeros(n_nodes, dtype=torch.bool)
        reach[0] = True
        for r in range(n_receivers):
            if feeds[r] and bool((keep[r] & reach).any()):
                reach[feeds[r]] = True
        # backward: nodes that reach logits
        useful = torch.zeros(n_nodes, dtype=torch.bool)
        useful |= keep[-1]
        for r in range(n_receivers - 2, -1, -1):
            if any(bool(useful[i]) for i in feeds[r]):
                useful |= keep[r]
        new = keep & reach[None, :]
        alive_rec = torch.tensor([r == n_receivers - 1 or any(bool(useful[i]) for i in feeds[r]) for r in range(n_receivers)])
        new &= alive_rec[:, None]
        if torch.equal(new, keep):
            return keep
        keep = new
