"""Greedy extraction: start from ``logits``; repeatedly add the highest-|score| edge whose downstream
node is already in the circuit, until n edges are chosen; then prune (Hanna et al. 2024,
arXiv:2403.17806, section 3).

Every chosen edge already reaches the logits, so pruning drops only the edges out of nodes that
nothing chosen feeds from ``input``: such a node reads the corrupted residual stream and writes
its corrupted output, so dropping its edges leaves the circuit's patched run, hence its
faithfulness, unchanged.
"""

from __future__ import annotations

import torch

from ..circuit import Circuit
from ..eap import EdgeScores
from .base import check_size
from .prune import prune


def greedy(scores: EdgeScores, n: int, model: str = "", prune_dangling: bool = True) -> Circuit:
    """Grow from logits: add the highest-|score| edge into a node already in the circuit, n times,
    then prune to input -> logits paths unless told not to (as Hanna et al.'s greedy search is
    followed by pruning dead nodes). A key/value receiver joins once any query head of its group is in."""
    g = scores.graph
    check_size(g, n)
    feeds = g.feeds
    absval = scores.scores.abs().masked_fill(~g.mask, -1.0)
    keep = torch.zeros_like(g.mask)
    active_rec = torch.zeros(len(g.receivers), dtype=torch.bool)  # receivers of nodes in the circuit
    active_rec[-1] = True
    in_circuit = torch.zeros(len(g.nodes), dtype=torch.bool)
    for _ in range(n):
        cand = absval.masked_fill(~active_rec[:, None] | keep, -1.0)
        best = int(cand.argmax())
        r, u = divmod(best, cand.shape[1])
        if float(cand[r, u]) < 0:
            break
        keep[r, u] = True
        if not in_circuit[u]:
            in_circuit[u] = True
            for rr, f in enumerate(feeds):
                if u in f:
                    active_rec[rr] = True
    if prune_dangling:
        keep = prune(g, keep)
    return Circuit.from_mask(g, keep, scores.scores, model, {"method": scores.method, "extraction": f"greedy({n})"})
