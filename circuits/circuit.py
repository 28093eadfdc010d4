"""Circuits: a set of edges of a model's graph, chosen from edge scores, saved as JSON and drawn.

Extraction (Hanna et al. 2024, "Have Faith in Faithfulness", arXiv:2403.17806, section 3):

- ``top_n``: the n edges with the largest |score|, then pruned to the edges that lie on a path
  from ``input`` to ``logits`` inside the chosen set (an edge into a node that reaches nothing
  changes nothing, so it is dropped, as is an edge out of a node nothing feeds).
- ``greedy``: start from ``logits``; repeatedly add the highest-|score| edge whose downstream
  node is already in the circuit, until n edges are chosen; then pruned like ``top_n`` (every
  chosen edge already reaches the logits, so only edges out of nodes that nothing chosen feeds
  from ``input`` go: such a node reads the corrupted residual stream and writes its corrupted
  output, so dropping its edges leaves the circuit's patched run, hence its faithfulness, unchanged).

A key/value receiver ``a{l}.kv{g}<k>`` belongs to the query heads of its group: the circuit's
node set names query heads; an edge into a kv receiver reaches every head of the group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd
import torch

from .eap import EdgeScores
from .graph import Graph


def _dst_heads(graph: Graph, dst: str) -> list[str]:
    """Query-head node names a receiver node stands for ("a3.kv1" -> its group's heads)."""
    if ".kv" in dst:
        layer, g = dst[1:].split(".kv")
        per = graph.n_heads // graph.n_kv_heads
        return [f"a{layer}.h{h}" for h in range(int(g) * per, (int(g) + 1) * per)]
    return [dst]


@dataclass
class Circuit:
    """A circuit: edges (names as in `Graph.edge_name`) with their scores.

    model: the model's name; n_layers / n_heads / n_kv_heads: its graph's shape (so a saved
    circuit can be checked against a model); scores: edge -> score (signed); meta: free-form
    (task, method, faithfulness, ...).
    """

    edges: list[str]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    scores: dict[str, float] = field(default_factory=dict)
    model: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def graph(self) -> Graph:
        return Graph(self.n_layers, self.n_heads, self.n_kv_heads)

    def edge_mask(self, graph: Optional[Graph] = None) -> torch.Tensor:
        """Bool[Tensor, "receiver node"] of the circuit's edges."""
        g = graph or self.graph
        if (g.n_layers, g.n_heads, g.n_kv_heads) != (self.n_layers, self.n_heads, self.n_kv_heads):
            raise ValueError(
                f"this circuit is for a graph of {self.n_layers} layers x {self.n_heads} heads ({self.n_kv_heads} kv); "
                f"the given graph has {g.n_layers} x {g.n_heads} ({g.n_kv_heads})"
            )
        return g.edge_mask(self.edges)

    @property
    def nodes(self) -> list[str]:
        """Nodes touched by an edge, in graph order (kv receivers expanded to their query heads)."""
        g = self.graph
        seen = set()
        for e in self.edges:
            src, dst = e.split("->")
            seen.add(src)
            seen.update(_dst_heads(g, dst.split("<")[0]))
        return [n for n in g.nodes + ["logits"] if n in seen]

    def heads(self) -> list[tuple[int, int]]:
        """(layer, head) of every attention head in the circuit."""
        out = []
        for n in self.nodes:
            if n.startswith("a"):
                l, h = n[1:].split(".h")
                out.append((int(l), int(h)))
        return out

    def __len__(self) -> int:
        return len(self.edges)

    def frame(self) -> pd.DataFrame:
        """One row per edge: edge, src, dst, channel, score."""
        rows = []
        for e in self.edges:
            src, dst = e.split("->")
            node, _, ch = dst.partition("<")
            rows.append({"edge": e, "src": src, "dst": node, "channel": ch.rstrip(">"), "score": self.scores.get(e, float("nan"))})
        return pd.DataFrame(rows, columns=["edge", "src", "dst", "channel", "score"])

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {
            "format": "interp.circuit/1", "model": self.model, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads, "edges": list(self.edges), "scores": {e: float(v) for e, v in self.scores.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Circuit":
        if d.get("format") != "interp.circuit/1":
            raise ValueError(f"not a saved circuit (format {d.get('format')!r}, expected 'interp.circuit/1')")
        c = cls(list(d["edges"]), int(d["n_layers"]), int(d["n_heads"]), int(d["n_kv_heads"]),
                dict(d.get("scores", {})), d.get("model", ""), dict(d.get("meta", {})))
        c.edge_mask()  # validates every edge name
        return c

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Circuit":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ---------------------------------------------------------------- drawing
    def _draw_edges(self) -> list[tuple[str, str, str, float]]:
        g, out = self.graph, []
        for e in self.edges:
            src, dst = e.split("->")
            node, _, ch = dst.partition("<")
            for d in _dst_heads(g, node):
                out.append((src, d, ch.rstrip(">"), self.scores.get(e, 0.0)))
        return out

    def to_dot(self) -> str:
        """Graphviz dot text: nodes by layer (input at the top, logits at the bottom), edges
        coloured by sign of their score (blue supports the clean answer, red opposes), q/k/v labelled."""
        lines = ["digraph circuit {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
        colour = {"input": "#dddddd", "logits": "#dddddd"}
        for n in self.nodes:
            fill = colour.get(n, "#cfe3ff" if n.startswith("a") else "#ffe2c6")
            lines.append(f'  "{n}" [fillcolor="{fill}"];')
        for src, dst, ch, s in self._draw_edges():
            c = "#1f5fbf" if s <= 0 else "#c0392b"  # score < 0: corrupting the edge lowers the metric
            label = f', label="{ch}"' if ch else ""
            lines.append(f'  "{src}" -> "{dst}" [color="{c}"{label}];')
        lines.append("}")
        return "\n".join(lines)

    def figure(self, title: Optional[str] = None):
        """A plotly figure: x = head index (MLPs at the right), y = layer; lines are edges."""
        import plotly.graph_objects as go

        def xy(n: str) -> tuple[float, float]:
            if n == "input":
                return (self.n_heads / 2, -1)
            if n == "logits":
                return (self.n_heads / 2, self.n_layers)
            if n.startswith("m"):
                return (self.n_heads + 0.5, int(n[1:]) + 0.5)
            l, h = n[1:].split(".h")
            return (int(h), int(l))

        fig = go.Figure()
        for src, dst, ch, s in self._draw_edges():
            (x0, y0), (x1, y1) = xy(src), xy(dst)
            fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text", showlegend=False,
                                     text=f"{src}->{dst} {ch} {s:+.3g}",
                                     line=dict(color="#1f5fbf" if s <= 0 else "#c0392b", width=1)))
        pts = [xy(n) for n in self.nodes]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+text", text=self.nodes,
                                 textposition="top center", marker=dict(size=10, color="#333"), showlegend=False))
        fig.update_layout(title=title or f"circuit: {len(self.edges)} edges, {len(self.nodes)} nodes",
                          xaxis_title="head (MLP at right)", yaxis_title="layer", template="plotly_white")
        return fig


# -------------------------------------------------------------------- extraction
def _circuit(graph: Graph, keep: torch.Tensor, scores: EdgeScores, model: str, how: str) -> Circuit:
    r_idx, u_idx = keep.nonzero(as_tuple=True)
    pairs = sorted(zip(r_idx.tolist(), u_idx.tolist()), key=lambda p: -abs(float(scores.scores[p])))
    edges = [graph.edge_name(r, u) for r, u in pairs]
    vals = {graph.edge_name(r, u): float(scores.scores[r, u]) for r, u in pairs}
    return Circuit(edges, graph.n_layers, graph.n_heads, graph.n_kv_heads, vals, model,
                   {"method": scores.method, "extraction": how})


def _receiver_nodes(graph: Graph) -> list[list[int]]:
    """Per receiver, the node indices (in graph.nodes) it feeds ([] for logits)."""
    out = []
    for r in graph.receivers:
        out.append([graph.node_index[h] for h in _dst_heads(graph, r.node())] if r.kind != "logits" else [])
    return out


def prune(graph: Graph, keep: torch.Tensor) -> torch.Tensor:
    """Keep only edges on an input -> logits path within `keep` (Bool[Tensor, "receiver node"])."""
    keep = keep & graph.mask
    feeds = _receiver_nodes(graph)
    n_nodes = len(graph.nodes)
    while True:
        # forward: nodes reachable from input
        reach = torch.zeros(n_nodes, dtype=torch.bool)
        reach[0] = True
        for r, rec in enumerate(graph.receivers):  # receivers are in forward order
            if feeds[r] and bool((keep[r] & reach).any()):
                reach[feeds[r]] = True
        # backward: nodes that reach logits
        useful = torch.zeros(n_nodes, dtype=torch.bool)
        logits_ok = keep[-1].clone()
        useful |= logits_ok
        for r in range(len(graph.receivers) - 2, -1, -1):
            if any(bool(useful[i]) for i in feeds[r]):
                useful |= keep[r]
        new = keep & reach[None, :]
        alive_rec = torch.tensor([r == len(graph.receivers) - 1 or any(bool(useful[i]) for i in feeds[r])
                                  for r in range(len(graph.receivers))])
        new &= alive_rec[:, None]
        if torch.equal(new, keep):
            return keep
        keep = new


def top_n(scores: EdgeScores, n: int, model: str = "", prune_dangling: bool = True) -> Circuit:
    """The n edges with the largest |score| (pruned to input -> logits paths unless told not to)."""
    g = scores.graph
    if not 0 < n <= g.n_edges:
        raise ValueError(f"n must be in [1, {g.n_edges}] (the graph's edge count), got {n}")
    s = scores.scores.abs().masked_fill(~g.mask, -1.0).flatten()
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep[s.topk(n).indices] = True
    keep = keep.view_as(g.mask)
    if prune_dangling:
        keep = prune(g, keep)
    return _circuit(g, keep, scores, model, f"top_n({n})")


def greedy(scores: EdgeScores, n: int, model: str = "", prune_dangling: bool = True) -> Circuit:
    """Grow from logits: add the highest-|score| edge into a node already in the circuit, n times,
    then prune to input -> logits paths unless told not to (as Hanna et al.'s greedy search is
    followed by pruning dead nodes).

    Every chosen edge lies on a path to the logits; pruning drops the edges out of nodes that no
    chosen edge feeds from the input. Those nodes read the corrupted residual stream and so write
    their corrupted outputs: their edges carry corrupted values whether kept or not, and pruning
    changes the circuit's size, not its patched run.
    """
    g = scores.graph
    if not 0 < n <= g.n_edges:
        raise ValueError(f"n must be in [1, {g.n_edges}] (the graph's edge count), got {n}")
    feeds = _receiver_nodes(g)
    absval = scores.scores.abs().masked_fill(~g.mask, -1.0)
    keep = torch.zeros_like(g.mask)
    active_rec = torch.zeros(len(g.receivers), dtype=torch.bool)
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
    return _circuit(g, keep, scores, model, f"greedy({n})")
