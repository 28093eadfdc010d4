"""Pruning to input -> logits paths (circuits/extract/prune.py) on hand-built edge sets."""

from __future__ import annotations

import torch

from interp.circuits import Edge, Graph, prune


def mask(g: Graph, names: list[str]) -> torch.Tensor:
    return g.edge_mask([Edge.parse(n) for n in names])


def test_prune_keeps_complete_paths():
    g = Graph(1, 2, 2)
    out = prune(g, mask(g, ["input->a0.h0<q>", "a0.h0->logits", "a0.h1->logits"]))
    assert torch.equal(out, mask(g, ["input->a0.h0<q>", "a0.h0->logits"]))


def test_prune_drops_a_dead_end_and_the_edges_into_it():
    g = Graph(3, 2, 1)
    # input -> a0.h0 -> m1 -> logits is complete; a0.h1 -> a2.h1<q> -> (a2.h1 -> m2, m2 reaches nothing) dangles
    # (a2.h1 reaches the logits only through m2), so a0.h1 -> a2.h1 goes too
    path = ["input->a0.h0<q>", "a0.h0->m1", "m1->logits"]
    dead = ["input->a0.kv0<k>", "a0.h1->a2.h1<q>", "a2.h1->m2"]
    assert torch.equal(prune(g, mask(g, path + dead)), mask(g, path + ["input->a0.kv0<k>"]))


def test_prune_ignores_entries_outside_the_graph():
    g = Graph(1, 2, 1)
    keep = mask(g, ["input->m0", "m0->logits"])
    keep[0, -1] = True  # m0 -> a0.h0<q>: not an edge (m0 is written after the head reads)
    assert torch.equal(prune(g, keep), mask(g, ["input->m0", "m0->logits"]))
