"""What every extraction algorithm is: `(scores, n, model="", prune_dangling=True) -> Circuit`."""

from __future__ import annotations

from typing import Protocol

from ..circuit import Circuit
from ..eap import EdgeScores
from ..graph import Graph


class Extraction(Protocol):
    def __call__(self, scores: EdgeScores, n: int, model: str = "", prune_dangling: bool = True) -> Circuit:
        """A circuit of (at most) n edges chosen from `scores`, pruned to input -> logits paths unless told not to."""
        ...


def check_size(graph: Graph, n: int) -> None:
    """Refuse a circuit size outside [1, the graph's edge count]."""
    if not 0 < n <= graph.n_edges:
        raise ValueError(f"n must be in [1, {graph.n_edges}] (the graph's edge count), got {n}")
