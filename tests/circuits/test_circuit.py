"""The circuit data type (circuits/circuit.py): its nodes, heads, tables and mask, from hand-built edges."""

from __future__ import annotations

import math

import pytest
import torch

from interp import viz
from interp.circuits import Circuit, Edge, Graph, Node


def _circuit(names: dict[str, float], shape=(2, 2, 1)) -> Circuit:
    edges = [Edge.parse(n) for n in names]
    return Circuit(edges, *shape, scores=dict(zip(edges, names.values())), model="tiny")


def test_nodes_expand_kv_receivers_to_their_query_heads():
    c = _circuit({"input->a0.kv0<k>": -2.0, "a0.h1->m1": 1.5, "m1->logits": 1.0})
    assert c.nodes == [Node.input(), Node.head(0, 0), Node.head(0, 1), Node.mlp(1), Node.logits()]
    assert c.heads() == [(0, 0), (0, 1)]
    assert len(c) == 3
    drawn = c.drawn_edges()
    assert [(d.src.name, d.dst.name, d.channel, d.score) for d in drawn] == [
        ("input", "a0.h0", "k", -2.0), ("input", "a0.h1", "k", -2.0), ("a0.h1", "m1", "", 1.5), ("m1", "logits", "", 1.0)]


def test_frame_is_by_name():
    c = _circuit({"input->a0.kv0<k>": -2.0, "a0.h1->m1": 1.5})
    c.scores.pop(Edge.parse("a0.h1->m1"))
    frame = c.frame()
    assert frame.columns.tolist() == ["edge", "src", "dst", "channel", "score"]
    assert frame.iloc[0].tolist() == ["input->a0.kv0<k>", "input", "a0.kv0", "k", -2.0]
    assert frame.iloc[1, :4].tolist() == ["a0.h1->m1", "a0.h1", "m1", ""] and math.isnan(frame.score.iloc[1])


def test_from_mask_orders_by_abs_score():
    g = Graph(2, 2, 1)
    scores = torch.zeros(g.mask.shape)
    for name, v in {"input->m0": 0.5, "a0.h1->logits": -3.0, "m0->a1.h0<q>": 2.0}.items():
        scores[g.parse_edge(name)] = v
    keep = scores != 0
    c = Circuit.from_mask(g, keep, scores, model="m", meta={"extraction": "hand"})
    assert [e.name for e in c.edges] == ["a0.h1->logits", "m0->a1.h0<q>", "input->m0"]
    assert c.scores[Edge.parse("a0.h1->logits")] == -3.0 and c.meta == {"extraction": "hand"}
    assert torch.equal(c.edge_mask(g), keep)


def test_edge_mask_checks_the_graph_and_edges_are_typed():
    c = _circuit({"a0.h1->logits": 1.0})
    with pytest.raises(ValueError, match="circuit is for a graph"):
        c.edge_mask(Graph(3, 2, 1))
    with pytest.raises(ValueError, match="goes backwards"):
        Circuit([Edge.parse("m1->a0.h0<q>")], 2, 2, 1).edge_mask()
    with pytest.raises(TypeError, match="Edge values"):
        Circuit(["a0.h1->logits"], 2, 2, 1)
    with pytest.raises(TypeError, match="Edge values"):
        Circuit([], 2, 2, 1, scores={"a0.h1->logits": 1.0})


def test_figure_draws_every_drawn_edge_and_the_nodes():
    c = _circuit({"input->a0.kv0<k>": -2.0, "a0.h1->logits": 1.5})
    fig = viz.circuit_figure(c)
    assert len(fig.data) == len(c.drawn_edges()) + 1 == 4
    assert list(fig.data[-1].text) == ["input", "a0.h0", "a0.h1", "logits"]
    assert fig.data[0].line.color == "#1f5fbf" and fig.data[2].line.color == "#c0392b"
    assert (fig.data[2].x, fig.data[2].y) == ((1, 1.0), (0, 2))  # a0.h1 at (head 1, layer 0) -> logits below the last layer
