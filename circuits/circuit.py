"""A circuit: a set of edges of a model's graph with their scores.

The edges are `Edge` values; `interp.circuits.serialize` writes them out (JSON, dot) and
`interp.circuits.extract` chooses them from edge scores (top_n, greedy, then prune).

A key/value receiver ``a{l}.kv{g}<k>`` belongs to the query heads of its group: the circuit's
node set names query heads; an edge into a kv receiver reaches every head of the group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd
from torch import Tensor

from . import serialize
from .graph import Graph
from .serialize import DrawnEdge
from .types import Edge, Node


@dataclass
class Circuit:
    """A circuit: edges (`Edge` values, into receivers of the graph) with their scores.

    model: the model's name; n_layers / n_heads / n_kv_heads: its graph's shape (so a saved
    circuit can be checked against a model); scores: edge -> score (signed); meta: free-form
    (task, method, faithfulness, ...).
    """

    edges: list[Edge]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    scores: dict[Edge, float] = field(default_factory=dict)
    model: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for e in list(self.edges) + list(self.scores):
            if not isinstance(e, Edge):
                raise TypeError(f"a circuit's edges are Edge values, got {type(e).__name__} {e!r} "
                                "(Edge.parse reads a name such as 'a0.h1->a2.h3<q>')")

    @classmethod
    def from_mask(cls, graph: Graph, keep: Tensor, scores: Tensor, model: str = "", meta: Optional[dict] = None) -> Circuit:
        """The edges set in `keep` (Bool[Tensor, "receiver node"]), largest |score| first
        (scores: Float[Tensor, "receiver node"])."""
        r_idx, u_idx = keep.nonzero(as_tuple=True)
        pairs = sorted(zip(r_idx.tolist(), u_idx.tolist()), key=lambda p: -abs(float(scores[p])))
        edges = [graph.edge(r, u) for r, u in pairs]
        vals = {e: float(scores[r, u]) for e, (r, u) in zip(edges, pairs)}
        return cls(edges, graph.n_layers, graph.n_heads, graph.n_kv_heads, vals, model, dict(meta or {}))

    @property
    def graph(self) -> Graph:
        """The graph of the circuit's model shape."""
        return Graph(self.n_layers, self.n_heads, self.n_kv_heads)

    def edge_mask(self, graph: Optional[Graph] = None) -> Tensor:
        """Bool[Tensor, "receiver node"] of the circuit's edges."""
        g = graph or self.graph
        if (g.n_layers, g.n_heads, g.n_kv_heads) != (self.n_layers, self.n_heads, self.n_kv_heads):
            raise ValueError(
                f"this circuit is for a graph of {self.n_layers} layers x {self.n_heads} heads ({self.n_kv_heads} kv); "
                f"the given graph has {g.n_layers} x {g.n_heads} ({g.n_kv_heads})"
            )
        return g.edge_mask(self.edges)

    @property
    def nodes(self) -> list[Node]:
        """Nodes touched by an edge, in graph order (kv receivers expanded to their query heads)."""
        g = self.graph
        seen: set[Node] = set()
        for e in self.edges:
            seen.add(e.src)
            seen.update(g.query_heads(e.dest))
        return [n for n in g.nodes + [Node.logits()] if n in seen]

    def heads(self) -> list[tuple[int, int]]:
        """(layer, head) of every attention head in the circuit."""
        return [(n.layer, n.index) for n in self.nodes if n.kind == "head"]

    def __len__(self) -> int:
        return len(self.edges)

    def frame(self) -> pd.DataFrame:
        """One row per edge, by name: edge, src, dst, channel, score."""
        rows = [{"edge": e.name, "src": e.src.name, "dst": e.dest.name, "channel": e.channel,
                 "score": self.scores.get(e, float("nan"))} for e in self.edges]
        return pd.DataFrame(rows, columns=["edge", "src", "dst", "channel", "score"])

    def drawn_edges(self) -> list[DrawnEdge]:
        """The edges as drawn: an edge into a key/value head once per query head of its group."""
        g = self.graph
        return [DrawnEdge(e.src, d, e.channel, self.scores.get(e, 0.0)) for e in self.edges for d in g.query_heads(e.dest)]

    # ---------------------------------------------------------------- JSON and dot (interp.circuits.serialize)
    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the circuit (format interp.circuit/1; edges by name)."""
        return serialize.encode(self.edges, self.scores, (self.n_layers, self.n_heads, self.n_kv_heads), self.model, self.meta)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Circuit:
        """A circuit from its JSON object; every edge is checked against the graph."""
        c = cls(**serialize.decode(d))
        c.edge_mask()  # validates every edge against the graph
        return c

    def save(self, path: Union[str, Path]) -> Path:
        """Write the circuit as JSON (format interp.circuit/1), atomically."""
        return serialize.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, Path]) -> Circuit:
        """Read a circuit saved by `save` (or by any earlier version: the format is unchanged)."""
        return cls.from_dict(serialize.read_json(path))

    def to_dot(self) -> str:
        """Graphviz dot text: nodes by layer (input at the top, logits at the bottom), edges
        coloured by sign of their score (blue supports the clean answer, red opposes), q/k/v labelled."""
        return serialize.to_dot(self.nodes, self.drawn_edges())

