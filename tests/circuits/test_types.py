"""Node and Edge (circuits/types.py): names, the one parser, and what they refuse."""

from __future__ import annotations

import dataclasses

import pytest

from interp.circuits import Edge, Graph, Node


def test_node_names_and_parse():
    cases = {"input": Node.input(), "logits": Node.logits(), "a3.h1": Node.head(3, 1), "a12.kv0": Node.kv(12, 0), "m2": Node.mlp(2)}
    for name, node in cases.items():
        assert node.name == str(node) == name
        assert Node.parse(name) == node
    assert Node.head(3, 1) == Node("head", 3, 1) and Node.head(3, 1) != Node.kv(3, 1)
    for bad in ("a3", "a3.h", "h1", "a03.h1", "m", "mlp0", "Input", "a1.kv1<k>", ""):
        with pytest.raises(ValueError, match="unknown node"):
            Node.parse(bad)


def test_node_fields_must_fit_its_kind():
    with pytest.raises(ValueError, match="node kind"):
        Node("attn", 0, 0)
    with pytest.raises(ValueError, match="has a layer and an index"):
        Node("head", 0)
    with pytest.raises(ValueError, match="has no layer"):
        Node("input", 0)
    with pytest.raises(ValueError, match="has a layer and no index"):
        Node("mlp", 1, 0)


def test_edge_name_round_trips_for_every_edge_of_a_graph():
    g = Graph(3, 4, 2)
    r_idx, u_idx = g.mask.nonzero(as_tuple=True)
    names = set()
    for r, u in zip(r_idx.tolist(), u_idx.tolist()):
        e = g.edge(r, u)
        assert Edge.parse(e.name) == e and str(e) == e.name
        names.add(e.name)
    assert len(names) == g.n_edges
    assert {"input->a0.h0<q>", "a0.h1->a1.kv0<k>", "a1.h3->a2.kv1<v>", "m0->m1", "m2->logits"} <= names


def test_edge_fields_and_name():
    e = Edge(Node.head(0, 1), Node.kv(2, 0), "v")
    assert (e.name, e.receiver) == ("a0.h1->a2.kv0<v>", "a2.kv0<v>")
    assert Edge.parse("m4->logits") == Edge(Node.mlp(4), Node.logits())
    assert Edge.parse("input->a0.h2<q>").dest == Node.head(0, 2)
    assert {e: 1.0}[Edge.parse("a0.h1->a2.kv0<v>")] == 1.0  # hashable: a dict key
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.channel = "k"


@pytest.mark.parametrize("args, match", [
    ((Node.logits(), Node.mlp(1)), "source"),
    ((Node.kv(0, 0), Node.mlp(1)), "source"),
    ((Node.head(0, 0), Node.head(1, 0), "k"), "channel 'k'"),
    ((Node.head(0, 0), Node.kv(1, 0), "q"), "channel 'q'"),
    ((Node.head(0, 0), Node.kv(1, 0)), "channel ''"),
    ((Node.head(0, 0), Node.mlp(1), "q"), "channel 'q'"),
    ((Node.head(0, 0), Node.input()), "'input' node cannot read"),
])
def test_edge_refuses_what_no_graph_has(args, match):
    with pytest.raises(ValueError, match=match):
        Edge(*args)


@pytest.mark.parametrize("bad", ["a0.h1->a2.h3", "a0.h1->m1<q>", "a0.h1->a2.kv0", "logits->m1", "a0.h1-a2.h3<q>",
                                 "a0.h1->a2.h3<q>->m4", "a0.h1->a2.h3<x>", " a0.h1->logits", 7])
def test_edge_parse_refuses_malformed_names(bad):
    with pytest.raises(ValueError, match="unknown edge"):
        Edge.parse(bad)
