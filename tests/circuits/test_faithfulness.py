"""Faithfulness of circuits (circuits/faithfulness.py) by exact edge patching on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from interp.circuits import Circuit, EdgeScores, Faithfulness, edge_attribution, faithfulness, greedy, top_n
from interp.circuits.tasks.base import PromptPairs

from conftest import make_tiny


def one_token_task(seed: int, n: int, pos: int) -> PromptPairs:
    """n random 6-token prompts, corrupted at one position, with random (correct, wrong) answers."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, 100, (n, 6), generator=gen)
    corr = clean.clone()
    corr[:, pos] = torch.randint(4, 100, (n,), generator=gen)
    return PromptPairs(clean, corr, torch.randint(4, 100, (n, 2), generator=gen))


def test_faithfulness_endpoints_and_curve():
    m = make_tiny("llama")
    task = one_token_task(seed=0, n=4, pos=1)
    clean = task.clean_tokens
    sc = edge_attribution(m, task)
    f = Faithfulness(m, task, batch_size=3)  # two batches
    g = f.graph
    full = top_n(sc, g.n_edges, prune_dangling=False)
    assert f(full) == pytest.approx(1.0, abs=1e-5)
    empty = Circuit([], g.n_layers, g.n_heads, g.n_kv_heads)
    assert f(empty) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        assert f.clean_metric == pytest.approx(float(task.metric(m(clean))), abs=1e-5)
    curve = f.curve(sc, [5, 20, g.n_edges])
    assert list(curve.columns) == ["n", "n_edges", "share_of_edges", "faithfulness", "method", "extraction"]
    assert curve.faithfulness.iloc[-1] == pytest.approx(1.0, abs=1e-4)
    # a custom metric (whole prompt set at once) gives the same numbers as the task's own
    f2 = Faithfulness(m, task, metric=lambda logits: task.metric(logits))
    c = top_n(sc, 20)
    assert f2(c) == pytest.approx(f(c), abs=1e-5)
    assert faithfulness(m, task, c) == pytest.approx(f(c), abs=1e-5)


def test_curve_looks_extractions_up_by_name():
    m = make_tiny("llama")
    task = one_token_task(seed=2, n=2, pos=3)
    sc = edge_attribution(m, task, progress=False)
    f = Faithfulness(m, task)
    curve = f.curve(sc, [4, 12], how="greedy", progress=False)
    assert curve.extraction.tolist() == ["greedy", "greedy"]
    assert curve.n_edges.tolist() == [len(greedy(sc, 4)), len(greedy(sc, 12))]
    assert curve.faithfulness.tolist() == [f(greedy(sc, 4)), f(greedy(sc, 12))]
    with pytest.raises(ValueError, match="how must be 'top_n' or 'greedy', got 'acdc'"):
        f.curve(sc, [4], how="acdc")


def test_greedy_prunes_parentless_edges_without_changing_faithfulness():
    """Greedy grows from the logits, so it can pick an edge out of a node that nothing chosen feeds from the
    input. That node reads the corrupted residual stream, so its edge carries the corrupted output kept or not:
    pruning it shrinks the circuit and leaves the exact patched run unchanged."""
    m = make_tiny("llama")
    task = one_token_task(seed=1, n=3, pos=2)
    f = Faithfulness(m, task)
    g = f.graph
    # a0.h1 -> a1.h0<q> is picked (a1.h0 is in the circuit) but nothing feeds a0.h1
    s = torch.zeros(g.mask.shape)
    for name, v in {"a1.h0->logits": 5, "a0.h1->a1.h0<q>": 4, "input->a1.kv0<v>": 3}.items():
        s[g.parse_edge(name)] = v
    sc = EdgeScores(g, s, "eap", 1.0, 0.0)
    full, pruned = greedy(sc, 3, prune_dangling=False), greedy(sc, 3)
    assert [e.name for e in full.edges] == ["a1.h0->logits", "a0.h1->a1.h0<q>", "input->a1.kv0<v>"]
    assert [e.name for e in pruned.edges] == ["a1.h0->logits", "input->a1.kv0<v>"]
    assert f(pruned) == pytest.approx(f(full), abs=1e-6)
    assert abs(f(pruned)) > 1e-3  # the kept path does carry clean information
    # the same on real scores, at several sizes
    real = edge_attribution(m, task)
    for n in (3, 10, 30):
        a, b = greedy(real, n, prune_dangling=False), greedy(real, n)
        assert set(b.edges) <= set(a.edges)
        assert f(b) == pytest.approx(f(a), abs=1e-5)


def test_no_gap_is_refused():
    m = make_tiny("llama")
    task = one_token_task(seed=0, n=2, pos=1)
    same = PromptPairs(task.clean_tokens, task.clean_tokens.clone(), task.answer_tokens)
    with pytest.raises(ValueError, match="no gap"):
        Faithfulness(m, same)
