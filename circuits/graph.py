"""The computational graph of a model at head and MLP granularity, and edge-level patching.

Nodes: ``input`` (the token embeddings), every attention head ``a{l}.h{h}``, every MLP ``m{l}``
and ``logits``. The residual stream is the sum of the outputs of the nodes before a point, so
an *edge* u -> v is "the output of u as read by v" (Elhage et al. 2021; Conmy et al. 2023,
ACDC; Syed et al. 2023, EAP; Hanna et al. 2024, EAP-IG).

A downstream node reads its input through a *receiver*:

- a query head reads its query input: receiver ``a{l}.h{h}<q>`` (its row of W_Q),
- a key/value head reads its key and value inputs: receivers ``a{l}.kv{g}<k>`` and
  ``a{l}.kv{g}<v>``. Under grouped-query attention a key/value head is shared by the query
  heads of its group, so its input really is one input: the edge is scored and patched once,
  at the key/value head (as the design's GQA convention says: key/value heads for k and v),
- an MLP reads ``ln2``'s input: receiver ``m{l}``,
- the logits read the final residual: receiver ``logits``.

Per-receiver inputs. In the model every receiver of a layer reads the same residual stream
``x = resid_pre[l]`` through the shared norm ``ln1``. An edge patch changes the input of one
receiver only: receiver r computes its projection from ``ln1(x + delta_r)`` with its own
``delta_r = sum over corrupted edges u -> r of (corrupted_out_u - current_out_u)``, while every
other receiver keeps reading x. We do this in the forward with hooks on ``attn.hook_q/k/v``
(each head's slice is recomputed from its own input), ``ln2.hook_normalized`` (the MLP) and
the last ``hook_resid_post`` (the logits), and read per-node outputs at ``hook_embed``,
``attn.hook_result`` and ``hook_mlp_out``. The gradient of a metric with respect to a
receiver's own input is the matching vector-Jacobian product: the gradient at hook_q for
head h mapped back through that head's rows of W_Q and through the norm's Jacobian at x
(``gradients`` in `interp.circuits.eap`).

Scope: decoder blocks whose attention and MLP outputs are added to the residual stream as they
are and whose q/k/v are separate linear projections of ``ln1``'s output (Llama, Qwen2/3,
Mistral; SmolLM2 is a Llama). Gemma 2/3 normalise each sublayer's output before adding it,
GPT-2 and GPT-NeoX fuse q/k/v: they are refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class Receiver:
    """Where a downstream node reads the residual stream.

    kind: "q", "k", "v" (attention at `layer`, `index` = query head for q, key/value head for
    k and v), "mlp" or "logits". `n_upstream`: how many upstream nodes (in `Graph.nodes` order)
    it can read: everything written before it.
    """

    name: str
    kind: str
    layer: int
    index: int
    n_upstream: int

    def node(self) -> str:
        """The downstream node's name ("a3.kv1" for a key/value receiver)."""
        return self.name.split("<")[0]


class Graph:
    """Nodes, receivers and the edges between them for a model configuration.

    ``nodes``: upstream nodes in residual-stream order: input, then per layer its heads and its
    MLP. ``receivers``: per layer the q receivers, k, v receivers and the MLP, then logits.
    Edge (r, u) exists when u is written before r reads (``mask[r, u]``).
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int):
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_layers, self.n_heads, self.n_kv_heads = n_layers, n_heads, n_kv_heads
        self.nodes: list[str] = ["input"]
        for l in range(n_layers):
            self.nodes += [f"a{l}.h{h}" for h in range(n_heads)] + [f"m{l}"]
        self.receivers: list[Receiver] = []
        for l in range(n_layers):
            before_attn = 1 + l * (n_heads + 1)
            self.receivers += [Receiver(f"a{l}.h{h}<q>", "q", l, h, before_attn) for h in range(n_heads)]
            for kind in "kv":
                self.receivers += [Receiver(f"a{l}.kv{g}<{kind}>", kind, l, g, before_attn) for g in range(n_kv_heads)]
            self.receivers.append(Receiver(f"m{l}", "mlp", l, 0, before_attn + n_heads))
        self.receivers.append(Receiver("logits", "logits", n_layers, 0, len(self.nodes)))
        self.node_index = {n: i for i, n in enumerate(self.nodes)}
        self.receiver_index = {r.name: i for i, r in enumerate(self.receivers)}

    @classmethod
    def from_model(cls, model) -> "Graph":
        check_model(model)
        c = model.cfg
        return cls(c.n_layers, c.n_heads, c.n_kv_heads)

    @cached_property
    def mask(self) -> Tensor:
        """Bool[Tensor, "receiver node"]: which edges exist."""
        m = torch.zeros(len(self.receivers), len(self.nodes), dtype=torch.bool)
        for i, r in enumerate(self.receivers):
            m[i, : r.n_upstream] = True
        return m

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    def layer_receivers(self, layer: int, kind: str) -> list[int]:
        return [i for i, r in enumerate(self.receivers) if r.layer == layer and r.kind == kind]

    def edge_name(self, r: int, u: int) -> str:
        rec = self.receivers[r]
        suffix = rec.name[len(rec.node()):]
        return f"{self.nodes[u]}->{rec.node()}{suffix}"

    def edges_frame(self, scores: Optional[Tensor] = None) -> pd.DataFrame:
        """One row per edge: edge, src, dst, channel (q/k/v or ''), layer of dst, [score, abs_score]."""
        r_idx, u_idx = self.mask.nonzero(as_tuple=True)
        rows = {
            "edge": [self.edge_name(r, u) for r, u in zip(r_idx.tolist(), u_idx.tolist())],
            "src": [self.nodes[u] for u in u_idx.tolist()],
            "dst": [self.receivers[r].node() for r in r_idx.tolist()],
            "channel": [self.receivers[r].kind if self.receivers[r].kind in "qkv" else "" for r in r_idx.tolist()],
        }
        df = pd.DataFrame(rows)
        if scores is not None:
            if scores.shape != self.mask.shape:
                raise ValueError(f"scores must be [receivers, nodes] = {tuple(self.mask.shape)}, got {tuple(scores.shape)}")
            s = scores[r_idx, u_idx].detach().double().cpu().numpy()
            df["score"] = s
            df["abs_score"] = abs(s)
        return df

    def parse_edge(self, edge: str) -> tuple[int, int]:
        """(receiver index, node index) of an edge name such as "a0.h1->a2.h3<q>"."""
        try:
            src, dst = edge.split("->")
            return self.receiver_index[dst], self.node_index[src]
        except (ValueError, KeyError):
            raise ValueError(
                f"unknown edge {edge!r}: edges are named 'src->dst' with src in input / a{{l}}.h{{h}} / m{{l}} and dst "
                "in a{l}.h{h}<q> / a{l}.kv{g}<k> / a{l}.kv{g}<v> / m{l} / logits"
            ) from None

    def edge_mask(self, edges) -> Tensor:
        """Bool[Tensor, "receiver node"] with the given edge names set."""
        m = torch.zeros_like(self.mask)
        for e in edges:
            r, u = self.parse_edge(e)
            if not self.mask[r, u]:
                raise ValueError(f"edge {e!r} goes backwards: {self.nodes[u]} is written after its receiver reads")
            m[r, u] = True
        return m

    def __repr__(self) -> str:
        return f"Graph(nodes={len(self.nodes)}, receivers={len(self.receivers)}, edges={self.n_edges})"


def check_model(model) -> None:
    """Refuse models whose blocks do not fit the graph's assumptions (see the module docstring)."""
    c = model.cfg
    parts = model.adapter.layers
    ok = (
        c.family in SUPPORTED_FAMILIES
        and not c.parallel_attn_mlp
        and all(p.qkv.layout == "separate" and p.attn_out is p.attn for p in parts)
        and all(isinstance(m, torch.nn.Linear) for p in parts for m in (p.qkv.q, p.qkv.k, p.qkv.v))
    )
    if not ok:
        raise ValueError(
            f"circuit graphs support blocks that add attention and MLP outputs to the residual stream unchanged and "
            f"project q/k/v separately from ln1 ({', '.join(SUPPORTED_FAMILIES)}); this model is {c.family!r}. "
            "Use activation or path patching (interp.patching, interp.path_patching) for it."
        )


# ---------------------------------------------------------------------------- hook names
def output_hooks(n_layers: int) -> list[str]:
    """Hook points that hold per-node outputs."""
    return ["hook_embed"] + [f"blocks.{l}.attn.hook_result" for l in range(n_layers)] + [
        f"blocks.{l}.hook_mlp_out" for l in range(n_layers)
    ]


def stack_outputs(graph: Graph, store: dict[str, Tensor]) -> Tensor:
    """Float[Tensor, "node batch pos d_model"]: the outputs in `graph.nodes` order."""
    parts = [store["hook_embed"][None]]
    for l in range(graph.n_layers):
        parts.append(store[f"blocks.{l}.attn.hook_result"].permute(2, 0, 1, 3))
        parts.append(store[f"blocks.{l}.hook_mlp_out"][None])
    return torch.cat(parts)


def node_outputs(model, tokens: Tensor, graph: Graph) -> Tensor:
    """Float[Tensor, "node batch pos d_model"] of one unpatched run (hook_embed, per-head results, MLP outputs)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=output_hooks(graph.n_layers))
    return stack_outputs(graph, {k: cache[k] for k in output_hooks(graph.n_layers)})


def _proj(module: torch.nn.Linear, index: int, d_head: int, x: Tensor) -> Tensor:
    """One head's slice of a linear projection: [..., d_model] -> [..., d_head]."""
    rows = slice(index * d_head, (index + 1) * d_head)
    bias = module.bias[rows] if module.bias is not None else None
    return F.linear(x, module.weight[rows], bias)


def _subtract_kept(n_kept: int, n_corrupt: int) -> bool:
    """Sum a receiver's corrupted edges as (all upstream - kept) when that is the shorter sum."""
    return n_kept < n_corrupt


def patched_logits(
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
        if _subtract_kept(int(kept.sum()), n_corrupt) and written[0] == r_up[r]:
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
                out[:, :, graph.receivers[r].index] = _proj(module, graph.receivers[r].index, d_head, normed).to(x.dtype)
            return out

        def save_result(x, hook, base=base):
            put(base, base + H, x.permute(2, 0, 1, 3))

        def save_mid(x, hook, key=f"mid{l}"):
            state[key] = x

        def ln2_hook(x, hook, l=l, r=graph.layer_receivers(l, "mlp")[0]):
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

    def logits_hook(x, hook, r=len(graph.receivers) - 1):
        d = delta(r)
        return None if d is None else x + d.to(x.dtype)

    hooks.append((f"blocks.{graph.n_layers - 1}.hook_resid_post", logits_hook))
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks, **forward_kwargs)
