"""Greedy extraction (circuits/extract/greedy.py) on hand-built graphs with known scores."""

from __future__ import annotations

import pytest
import torch

from interp.circuits import EXTRACTIONS, EdgeScores, Graph, greedy


def scores_of(values: dict[str, float], g: Graph) -> EdgeScores:
    s = torch.zeros(g.mask.shape)
    for name, v in values.items():
        s[g.parse_edge(name)] = v
    return EdgeScores(g, s, "eap-ig", 1.0, 0.0)


def names(c) -> list[str]:
    return [e.name for e in c.edges]


def test_greedy_grows_from_logits():
    g = Graph(2, 2, 1)
    sc = scores_of({"a0.h0->m1": 9, "m1->logits": 1, "input->m1": 2, "input->a0.kv0<v>": 3}, g)
    c = greedy(sc, 3)
    # first only edges into logits qualify (m1->logits), then into m1 (a0.h0->m1, 9); once a0.h0 is in,
    # its kv receiver qualifies (the kv head serves every query head of its group): 3 beats input->m1 (2)
    assert names(c) == ["a0.h0->m1", "input->a0.kv0<v>", "m1->logits"]  # listed by |score|
    assert c.meta == {"method": "eap-ig", "extraction": "greedy(3)"}
    assert set(greedy(sc, 4).edges) == set(c.edges) | {g.edge(*g.parse_edge("input->m1"))}
    with pytest.raises(ValueError, match="n must be"):
        greedy(sc, 0)
    assert EXTRACTIONS["greedy"] is greedy


def test_greedy_prunes_edges_out_of_nodes_nothing_feeds():
    g = Graph(2, 2, 1)
    # a0.h1 -> a1.h0<q> is picked (a1.h0 is in the circuit) but nothing chosen feeds a0.h1
    sc = scores_of({"a1.h0->logits": 5, "a0.h1->a1.h0<q>": 4, "input->a1.kv0<v>": 3}, g)
    assert names(greedy(sc, 3, prune_dangling=False)) == ["a1.h0->logits", "a0.h1->a1.h0<q>", "input->a1.kv0<v>"]
    assert names(greedy(sc, 3)) == ["a1.h0->logits", "input->a1.kv0<v>"]


def test_greedy_asked_for_every_edge_takes_them_all():
    """Asked for every edge, greedy takes each edge into a node that joins, whatever its score (zeros included)."""
    g = Graph(1, 2, 1)
    sc = scores_of({"a0.h0->logits": 2}, g)
    c = greedy(sc, g.n_edges, prune_dangling=False)
    assert len(c) == g.n_edges  # every node of a one-layer graph reaches the logits directly
    assert names(c)[0] == "a0.h0->logits"
