"""Circuit extraction (top-n, greedy), pruning, JSON round trip, drawing and faithfulness on a tiny Llama."""

import json

import pytest
import torch
from conftest import make_tiny

from interp.circuits import Circuit, EdgeScores, Faithfulness, Graph, edge_attribution, greedy, prune, top_n
from interp.circuits.tasks.base import PromptPairs


def _scores(values: dict, g: Graph) -> EdgeScores:
    s = torch.zeros(g.mask.shape)
    for e, v in values.items():
        r, u = g.parse_edge(e)
        s[r, u] = v
    return EdgeScores(g, s, "eap", 1.0, 0.0)


def test_top_n_prunes_dangling_edges():
    g = Graph(2, 2, 1)
    sc = _scores({"input->a0.h1<q>": -5, "a0.h1->logits": 4, "a0.h0->m1": 3.5, "input->m0": 1}, g)
    c = top_n(sc, 3)
    # a0.h0->m1 is kept by rank but m1 reaches the logits through nothing chosen, and a0.h0 is fed by nothing
    assert c.edges == ["input->a0.h1<q>", "a0.h1->logits"]
    assert c.scores["input->a0.h1<q>"] == -5
    assert top_n(sc, 3, prune_dangling=False).edges == ["input->a0.h1<q>", "a0.h1->logits", "a0.h0->m1"]
    assert c.nodes == ["input", "a0.h1", "logits"]
    assert c.heads() == [(0, 1)]


def test_greedy_grows_from_logits():
    g = Graph(2, 2, 1)
    sc = _scores({"a0.h0->m1": 9, "m1->logits": 1, "input->m1": 2, "input->a0.kv0<v>": 3}, g)
    c = greedy(sc, 3)
    # first only edges into logits qualify (m1->logits), then into m1 (a0.h0->m1, 9); once a0.h0 is in,
    # its kv receiver qualifies (the kv head serves every query head of its group): 3 beats input->m1 (2)
    assert c.edges == ["a0.h0->m1", "input->a0.kv0<v>", "m1->logits"]  # listed by |score|
    assert set(greedy(sc, 4).edges) == set(c.edges) | {"input->m1"}
    with pytest.raises(ValueError, match="n must be"):
        greedy(sc, 0)


def test_prune_keeps_complete_paths():
    g = Graph(1, 2, 2)
    keep = g.edge_mask(["input->a0.h0<q>", "a0.h0->logits", "a0.h1->logits"])
    out = prune(g, keep)
    assert torch.equal(out, g.edge_mask(["input->a0.h0<q>", "a0.h0->logits"]))


def test_json_round_trip_and_drawing(tmp_path):
    g = Graph(2, 2, 1)
    c = top_n(_scores({"input->a0.kv0<k>": -2, "a0.h1->logits": 1.5, "a0.h0->logits": 1}, g), 3, model="tiny")
    c.meta["faithfulness"] = 0.5
    path = c.save(tmp_path / "c.json")
    back = Circuit.load(path)
    assert back == c
    assert json.loads(path.read_text())["format"] == "interp.circuit/1"
    dot = c.to_dot()
    assert dot.startswith("digraph") and '"input" -> "a0.h0" [color="#1f5fbf", label="k"]' in dot
    assert '"input" -> "a0.h1"' in dot  # the kv edge reaches both heads of the group
    fig = c.figure()
    assert len(fig.data) == len(c._draw_edges()) + 1
    bad = c.to_dict() | {"edges": ["m1->a0.h0<q>"]}
    with pytest.raises(ValueError, match="backwards"):
        Circuit.from_dict(bad)
    with pytest.raises(ValueError, match="circuit is for a graph"):
        c.edge_mask(Graph(3, 2, 1))


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


def test_greedy_prunes_parentless_edges_without_changing_faithfulness():
    """Greedy grows from the logits, so it can pick an edge out of a node that nothing chosen feeds from the
    input. That node reads the corrupted residual stream, so its edge carries the corrupted output kept or not:
    pruning it shrinks the circuit and leaves the exact patched run unchanged."""
    m = make_tiny("llama")
    task = one_token_task(seed=1, n=3, pos=2)
    f = Faithfulness(m, task)
    g = f.graph
    # a0.h1 -> a1.h0<q> is picked (a1.h0 is in the circuit) but nothing feeds a0.h1
    sc = _scores({"a1.h0->logits": 5, "a0.h1->a1.h0<q>": 4, "input->a1.kv0<v>": 3}, g)
    full, pruned = greedy(sc, 3, prune_dangling=False), greedy(sc, 3)
    assert full.edges == ["a1.h0->logits", "a0.h1->a1.h0<q>", "input->a1.kv0<v>"]
    assert pruned.edges == ["a1.h0->logits", "input->a1.kv0<v>"]
    assert f(pruned) == pytest.approx(f(full), abs=1e-6)
    assert abs(f(pruned)) > 1e-3  # the kept path does carry clean information
    # the same on real scores, at several sizes
    real = edge_attribution(m, task)
    for n in (3, 10, 30):
        a, b = greedy(real, n, prune_dangling=False), greedy(real, n)
        assert set(b.edges) <= set(a.edges)
        assert f(b) == pytest.approx(f(a), abs=1e-5)
