"""A circuit written out: the JSON file format `interp.circuit/1` and Graphviz dot text.

JSON: ``{"format": "interp.circuit/1", "model", "n_layers", "n_heads", "n_kv_heads",
"edges": ["a0.h1->a2.h3<q>", "m4->logits", ...], "scores": {edge: float}, "meta": {...}}``,
edges by name (`Edge.name`). This is the one place edge names are read back (`Edge.parse`).
Files are written atomically (`interp.atomic`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence, Union

from interp.atomic import atomic_write_text

from .types import Edge, Node

FORMAT = "interp.circuit/1"


def encode(edges: Sequence[Edge], scores: Mapping[Edge, float], shape: tuple[int, int, int], model: str,
           meta: dict) -> dict[str, Any]:
    """The JSON object of a circuit; shape: (n_layers, n_heads, n_kv_heads) of its graph."""
    n_layers, n_heads, n_kv_heads = shape
    return {
        "format": FORMAT, "model": model, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
        "edges": [e.name for e in edges], "scores": {e.name: float(v) for e, v in scores.items()}, "meta": meta,
    }


def decode(d: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a circuit (the keyword arguments of `Circuit`) from its JSON object; edges are
    parsed here, and checked against the graph by the caller."""
    if d.get("format") != FORMAT:
        raise ValueError(f"not a saved circuit (format {d.get('format')!r}, expected {FORMAT!r})")
    return {
        "edges": [Edge.parse(e) for e in d["edges"]], "n_layers": int(d["n_layers"]), "n_heads": int(d["n_heads"]),
        "n_kv_heads": int(d["n_kv_heads"]), "scores": {Edge.parse(e): v for e, v in d.get("scores", {}).items()},
        "model": d.get("model", ""), "meta": dict(d.get("meta", {})),
    }


def write_json(path: Union[str, Path], obj: Mapping[str, Any]) -> Path:
    """Write a circuit's JSON object to `path` atomically; returns the path."""
    return atomic_write_text(Path(path), json.dumps(obj, indent=1))


def read_json(path: Union[str, Path]) -> dict[str, Any]:
    """The JSON object in `path` (decode it with `decode`)."""
    return json.loads(Path(path).read_text())


class DrawnEdge(NamedTuple):
    """An edge as drawn: key/value receivers are drawn once per query head of their group."""

    src: Node
    dst: Node  # an attention head, an MLP or the logits
    channel: str  # "q", "k", "v" or ""
    score: float


NODE_FILL = {"input": "#dddddd", "logits": "#dddddd", "head": "#cfe3ff", "mlp": "#ffe2c6"}


def edge_colour(score: float) -> str:
    """Blue for score <= 0 (the edge supports the clean answer: corrupting it lowers the metric), red above."""
    return "#1f5fbf" if score <= 0 else "#c0392b"


def to_dot(nodes: Sequence[Node], edges: Sequence[DrawnEdge]) -> str:
    """Graphviz dot text: nodes by layer (input at the top, logits at the bottom), edges coloured by
    the sign of their score, q/k/v labelled."""
    lines = ["digraph circuit {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for n in nodes:
        lines.append(f'  "{n.name}" [fillcolor="{NODE_FILL[n.kind]}"];')
    for e in edges:
        label = f', label="{e.channel}"' if e.channel else ""
        lines.append(f'  "{e.src.name}" -> "{e.dst.name}" [color="{edge_colour(e.score)}"{label}];')
    lines.append("}")
    return "\n".join(lines)
