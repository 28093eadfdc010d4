"""Top-n extraction (circuits/extract/top_n.py) on hand-built graphs with known scores."""

from __future__ import annotations

import pytest
import torch

from interp.circuits import EXTRACTIONS, Edge, EdgeScores, Graph, top_n


def scores_of(values: dict[str, float], g: Graph, method: str = "eap") -> EdgeScores:
    s = torch.zeros(g.mask.shape)
    for name, v in values.items():
        s[g.parse_edge(name)] = v
    return EdgeScores(g, s, method, 1.0, 0.0)


def names(c) -> list[str]:
    return [e.name for e in c.edges]


def test_top_n_prunes_dangling_edges():
    g = Graph(2, 2, 1)
    sc = scores_of({"input->a0.h1<q>": -5, "a0.h1->logits": 4, "a0.h0->m1": 3.5, "input->m0": 1}, g)
    c = top_n(sc, 3, model="tiny")
    # a0.h0->m1 is kept by rank but m1 reaches the logits through nothing chosen, and a0.h0 is fed by nothing
    assert names(c) == ["input->a0.h1<q>", "a0.h1->logits"]
    assert c.scores == {Edge.parse("input->a0.h1<q>"): -5.0, Edge.parse("a0.h1->logits"): 4.0}
    assert (c.model, c.meta) == ("tiny", {"method": "eap", "extraction": "top_n(3)"})
    assert names(top_n(sc, 3, prune_dangling=False)) == ["input->a0.h1<q>", "a0.h1->logits", "a0.h0->m1"]
    assert [n.name for n in c.nodes] == ["input", "a0.h1", "logits"]
    assert c.heads() == [(0, 1)]


def test_top_n_keeps_a_complete_path_through_a_kv_head_and_an_mlp():
    g = Graph(2, 2, 1)
    sc = scores_of({"input->a0.kv0<v>": 0.9, "a0.h0->m0": -0.8, "m0->logits": 0.7, "a0.h1->logits": -0.6, "input->a1.h0<q>": 0.5}, g)
    # a kv edge feeds both heads of the group, so a0.h0 and a0.h1 are fed; input->a1.h0<q> leads nowhere chosen
    assert names(top_n(sc, 5)) == ["input->a0.kv0<v>", "a0.h0->m0", "m0->logits", "a0.h1->logits"]
    assert names(top_n(sc, 2)) == []  # no complete input -> logits path among the top two


def test_top_n_size_is_checked():
    g = Graph(1, 2, 1)
    sc = scores_of({"a0.h0->logits": 1}, g)
    for n in (0, g.n_edges + 1):
        with pytest.raises(ValueError, match=r"n must be in \[1, 11\]"):
            top_n(sc, n)
    assert len(top_n(sc, g.n_edges, prune_dangling=False)) == g.n_edges
    assert EXTRACTIONS["top_n"] is top_n
