"""The circuit graph (nodes, receivers, edges) and exact edge patching (circuits/graph.py) on tiny Llama-family models.

`patched_logits` is pinned bit for bit to its implementation at 45e1437 (one function with eight
closures, copied below as `patched_logits_at_45e1437`), so the split into named functions changes no number.
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import interp.circuits.graph as graph_module
from interp.circuits import Edge, Graph, Node, node_outputs, patched_logits

from conftest import make_tiny, random_prompt_pairs


# ---------------------------------------------------------------------------- circuits/graph.py at 45e1437, verbatim
def _proj_at_45e1437(module: torch.nn.Linear, index: int, d_head: int, x: Tensor) -> Tensor:
    """One head's slice of a linear projection: [..., d_model] -> [..., d_head]."""
    rows = slice(index * d_head, (index + 1) * d_head)
    bias = module.bias[rows] if module.bias is not None else None
    return F.linear(x, module.weight[rows], bias)


def _subtract_kept_at_45e1437(n_kept: int, n_corrupt: int) -> bool:
    """Sum a receiver's corrupted edges as (all upstream - kept) when that is the shorter sum."""
    return n_kept < n_corrupt


def patched_logits_at_45e1437(
    model,
    graph: Graph,
    tokens: Tensor,
    corrupted_outputs: Tensor,
    corrupt: Tensor,
    **forward_kwargs,
) -> Tensor:
    """Logits of a run of `tokens` where every edge in `corrupt` carries its source's corrupted output.

    corrupted_outputs: Float[Tensor, "node batch pos d_model"] from `node_outputs` on the
        corrupted prompts (same shape of tokens).
    corrupt: Bool[Tensor, "receiver node"]: the edges to corrupt (edges outside a circuit).
    forward_kwargs: passed to the model (e.g. logits_to_keep=1).

    Receiver r reads ``current residual + sum_{u: corrupt[r, u]} (corrupted_out_u - current_out_u)``
    where current_out_u is u's output in this very run (so effects propagate). With nothing
    corrupted it is the clean run; with every edge corrupted it is the corrupted run.
    """
    if corrupt.shape != graph.mask.shape:
        raise ValueError(f"corrupt must be [receivers, nodes] = {tuple(graph.mask.shape)}, got {tuple(corrupt.shape)}")
    if corrupted_outputs.shape[0] != len(graph.nodes) or corrupted_outputs.shape[1:3] != tokens.shape:
        raise ValueError(
            f"corrupted_outputs must be [nodes, batch, pos, d_model] = [{len(graph.nodes)}, {tokens.shape[0]}, "
            f"{tokens.shape[1]}, d_model], got {tuple(corrupted_outputs.shape)}"
        )
    corrupt = (corrupt & graph.mask).to(corrupted_outputs.device)
    parts = model.adapter.layers
    d_head = model.cfg.d_head
    H = graph.n_heads
    # diff[u] = corrupted_out_u - current_out_u, filled as the forward writes each node's output;
    # total = the float64 sum of every diff written so far. A receiver reads all nodes written
    # before it, so the sum over its corrupted edges is total minus its kept edges: a small
    # circuit costs its own edges, not the whole graph's.
    diff = torch.zeros_like(corrupted_outputs)
    total = torch.zeros(corrupted_outputs.shape[1:], dtype=torch.float64, device=corrupted_outputs.device)
    written = [0]
    state: dict[str, Tensor] = {}
    r_up = [r.n_upstream for r in graph.receivers]
    upstream = graph.mask.to(corrupt.device)

    def summed(select: Tensor, r: int) -> Tensor:
        """Sum of diff over the nodes `select` (Bool["node"]) picks."""
        idx = select.nonzero(as_tuple=True)[0]
        if len(idx) < 8:
            return diff[idx].sum(0)
        return torch.einsum("u,u...->...", select[: r_up[r]].to(diff.dtype), diff[: r_up[r]])

    def delta(r: int) -> Optional[Tensor]:
        row = corrupt[r]
        n_corrupt = int(row.sum())
        if n_corrupt == 0:
            return None
        kept = upstream[r] & ~row
        if _subtract_kept_at_45e1437(int(kept.sum()), n_corrupt) and written[0] == r_up[r]:
            return (total - summed(kept, r).double()).to(diff.dtype)
        return summed(row, r)

    def put(lo: int, hi: int, out: Tensor) -> None:  # out: [n, b, pos, d]
        diff[lo:hi] = corrupted_outputs[lo:hi] - out.to(diff.dtype)
        total.add_(diff[lo:hi].sum(0, dtype=torch.float64))
        written[0] = hi

    hooks: list[tuple[str, Callable]] = [("hook_embed", lambda x, hook: put(0, 1, x[None]))]
    for l in range(graph.n_layers):
        base = 1 + l * (H + 1)
        pre = f"blocks.{l}."

        def save_pre(x, hook, key=f"pre{l}"):
            state[key] = x

        def qkv_hook(x, hook, l=l, kind="q"):
            recs = graph.layer_receivers(l, kind)
            out = None
            module = getattr(parts[l].qkv, kind)
            for r in recs:
                d = delta(r)
                if d is None:
                    continue
                if out is None:
                    out = x.clone()
                normed = parts[l].ln1.forward(state[f"pre{l}"] + d.to(x.dtype))
                out[:, :, graph.receivers[r].index] = _proj_at_45e1437(module, graph.receivers[r].index, d_head, normed).to(x.dtype)
            return out

        def save_result(x, hook, base=base):
            put(base, base + H, x.permute(2, 0, 1, 3))

        def save_mid(x, hook, key=f"mid{l}"):
            state[key] = x

        def ln2_hook(x, hook, l=l, r=graph.layer_receivers(l, "mlp")[0]):  # noqa: B008
            d = delta(r)
            if d is None:
                return None
            return parts[l].ln2.forward(state[f"mid{l}"] + d.to(x.dtype)).to(x.dtype)

        def save_mlp(x, hook, u=base + H):
            put(u, u + 1, x[None])

        hooks += [
            (pre + "hook_resid_pre", save_pre),
            (pre + "attn.hook_q", lambda x, hook, f=qkv_hook: f(x, hook, kind="q")),
            (pre + "attn.hook_k", lambda x, hook, f=qkv_hook: f(x, hook, kind="k")),
            (pre + "attn.hook_v", lambda x, hook, f=qkv_hook: f(x, hook, kind="v")),
            (pre + "attn.hook_result", save_result),
            (pre + "hook_resid_mid", save_mid),
            (pre + "ln2.hook_normalized", ln2_hook),
            (pre + "hook_mlp_out", save_mlp),
        ]

    def logits_hook(x, hook, r=len(graph.receivers) - 1):  # noqa: B008
        d = delta(r)
        return None if d is None else x + d.to(x.dtype)

    hooks.append((f"blocks.{graph.n_layers - 1}.hook_resid_post", logits_hook))
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks, **forward_kwargs)


# ---------------------------------------------------------------------------- the graph
def test_graph_counts():
    g = Graph(2, 4, 2)
    assert len(g.nodes) == 1 + 2 * 5
    # per layer 4 q + 2 k + 2 v + 1 mlp receivers, then logits
    assert len(g.receivers) == 2 * 9 + 1
    # layer 0 attention receivers read input only (8 x 1), mlp0 reads input + 4 heads (5);
    # layer 1 attention reads 6 nodes (8 x 6), mlp1 reads 10; logits read all 11
    assert g.n_edges == 8 * 1 + 5 + 8 * 6 + 10 + 11
    r, u = g.parse_edge("a0.h1->a1.kv0<k>")
    assert g.edge_name(r, u) == "a0.h1->a1.kv0<k>"
    assert g.edge(r, u) == Edge(Node.head(0, 1), Node.kv(1, 0), "k")
    with pytest.raises(ValueError, match="goes backwards"):
        g.edge_mask([Edge.parse("m1->a1.h0<q>")])
    with pytest.raises(ValueError, match="unknown edge"):
        g.parse_edge("a0.h9->logits")
    with pytest.raises(ValueError, match="unknown edge"):
        g.edge_index(Edge(Node.head(3, 0), Node.logits()))  # a layer the graph does not have


def test_nodes_and_receivers_in_forward_order():
    g = Graph(1, 4, 2)
    assert [n.name for n in g.nodes] == ["input", "a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0"]
    assert [r.name for r in g.receivers] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>", "a0.kv0<k>", "a0.kv1<k>",
                                             "a0.kv0<v>", "a0.kv1<v>", "m0", "logits"]
    assert [r.kind for r in g.receivers] == ["q"] * 4 + ["k", "k", "v", "v", "mlp", "logits"]
    assert [r.n_upstream for r in g.receivers] == [1] * 8 + [5, 6]
    assert g.layer_receivers(0, "v") == [6, 7]
    # a kv receiver feeds its group's query heads; the logits feed no node
    assert g.query_heads(Node.kv(0, 1)) == [Node.head(0, 2), Node.head(0, 3)]
    assert g.feeds == [[1], [2], [3], [4], [1, 2], [3, 4], [1, 2], [3, 4], [5], []]


def test_edges_frame_and_every_edge_name_round_trip():
    g = Graph(2, 4, 2)
    frame = g.edges_frame(torch.arange(g.mask.numel(), dtype=torch.float32).view_as(g.mask) * g.mask)
    assert len(frame) == g.n_edges
    r_idx, u_idx = g.mask.nonzero(as_tuple=True)
    for row, r, u in zip(frame.itertuples(), r_idx.tolist(), u_idx.tolist()):
        e = g.edge(r, u)
        assert (row.edge, row.src, row.dst, row.channel) == (e.name, e.src.name, e.dest.name, e.channel)
        assert Edge.parse(row.edge) == e and g.edge_index(e) == (r, u)
        assert row.score == r * g.mask.shape[1] + u
    assert frame.edge.iloc[[0, -1]].tolist() == ["input->a0.h0<q>", "m1->logits"]


def test_edge_mask_takes_edges_not_names():
    g = Graph(1, 2, 1)
    m = g.edge_mask([Edge(Node.input(), Node.kv(0, 0), "v"), Edge.parse("a0.h1->logits")])
    assert m.sum() == 2 and m[g.receiver_index[Node.kv(0, 0), "v"], 0] and m[-1, g.node_index[Node.head(0, 1)]]
    with pytest.raises(TypeError, match="Edge.parse"):
        g.edge_mask(["a0.h1->logits"])


def test_unsupported_family_refused():
    with pytest.raises(ValueError, match="circuit graphs support"):
        Graph.from_model(make_tiny("gpt2"))


# ---------------------------------------------------------------------------- exact edge patching
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_patched_run_endpoints(family):
    """Nothing corrupted = the clean run; every edge corrupted = the corrupted run."""
    m = make_tiny(family)
    g, task = Graph.from_model(m), random_prompt_pairs()
    co = node_outputs(m, task.corrupted_tokens, g)
    with torch.no_grad():
        clean, corr = m(task.clean_tokens), m(task.corrupted_tokens)
    none = patched_logits(m, g, task.clean_tokens, co, torch.zeros_like(g.mask))
    every = patched_logits(m, g, task.clean_tokens, co, g.mask.clone())
    torch.testing.assert_close(none, clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(every, corr, atol=1e-5, rtol=0)
    # the node outputs sum to the residual stream the logits read
    _, cache = m.run_with_cache(task.clean_tokens, names_filter=["blocks.1.hook_resid_post"])
    torch.testing.assert_close(node_outputs(m, task.clean_tokens, g).sum(0), cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_patched_logits_are_bit_identical_to_45e1437(family):
    """Random masks from a few edges to nearly all (both the direct and the total - kept sums), with and
    without logits_to_keep: the same bits as the single-function implementation."""
    m = make_tiny(family)
    g, task = Graph.from_model(m), random_prompt_pairs(n=2, pos=5, seed=3)
    co = node_outputs(m, task.corrupted_tokens, g)
    gen = torch.Generator().manual_seed(1)
    for p in (0.05, 0.5, 0.95, 1.0):
        corrupt = g.mask & (torch.rand(g.mask.shape, generator=gen) < p)
        for kw in ({}, {"logits_to_keep": 1}):
            new = patched_logits(m, g, task.clean_tokens, co, corrupt, **kw)
            old = patched_logits_at_45e1437(m, g, task.clean_tokens, co, corrupt, **kw)
            assert torch.equal(new, old), (p, kw, (new - old).abs().max())


def test_summing_kept_edges_from_the_total_equals_summing_corrupted_edges(monkeypatch):
    """A receiver with few kept edges reads total - kept; the direct sum over its corrupted edges must agree."""
    m = make_tiny("llama")
    g, task = Graph.from_model(m), random_prompt_pairs()
    co = node_outputs(m, task.corrupted_tokens, g)
    gen = torch.Generator().manual_seed(0)
    corrupt = g.mask & (torch.rand(g.mask.shape, generator=gen) < 0.7)  # most edges corrupted, some kept
    # Layer-0 heads read only the input: leave them clean, so that what later receivers keep differs
    # from its corrupted value (a node with every input corrupted outputs exactly its corrupted value).
    corrupt[[i for i, r in enumerate(g.receivers) if r.layer == 0 and r.kind != "mlp"]] = False
    assert any(0 < int((g.mask[r] & ~corrupt[r]).sum()) < int(corrupt[r].sum()) for r in range(len(g.receivers)))
    fast = patched_logits(m, g, task.clean_tokens, co, corrupt)
    monkeypatch.setattr(graph_module, "_subtract_kept", lambda n_kept, n_corrupt: False)
    direct = patched_logits(m, g, task.clean_tokens, co, corrupt)
    torch.testing.assert_close(fast, direct, atol=1e-5, rtol=0)
    assert not torch.equal(fast, direct)  # the two sums really are different code paths
    with torch.no_grad():
        clean = m(task.clean_tokens)
    assert (fast - clean).abs().max() > 1e-2  # the patch did something


def test_patched_logits_refuses_wrong_shapes():
    m = make_tiny("llama")
    g, task = Graph.from_model(m), random_prompt_pairs()
    co = node_outputs(m, task.corrupted_tokens, g)
    with pytest.raises(ValueError, match="corrupt must be"):
        patched_logits(m, g, task.clean_tokens, co, g.mask[:-1])
    with pytest.raises(ValueError, match="corrupted_outputs must be"):
        patched_logits(m, g, task.clean_tokens, co[:, :2], g.mask)
