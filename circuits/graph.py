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
from functools import cached_property, partial
from typing import Any, Iterable, Optional

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from interp.hook_points import HookFn, HookPoint, get_act_name
from interp.hooks import HookedModel

from .types import EDGE_NAMES, Edge, Node

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class Receiver:
    """Where a downstream node reads the residual stream.

    dest: the reading node (a query head for q, a key/value head for k and v, an MLP or the
    logits); channel: "q", "k", "v" or "" (MLP, logits); layer: the layer that reads (n_layers
    for the logits); n_upstream: how many upstream nodes (in `Graph.nodes` order) it can read:
    everything written before it.
    """

    dest: Node
    channel: str
    layer: int
    n_upstream: int

    @property
    def kind(self) -> str:
        """"q", "k", "v", "mlp" or "logits"."""
        return self.channel or self.dest.kind

    @property
    def index(self) -> int:
        """The query head (q) or key/value head (k, v) within the layer; 0 for an MLP or the logits."""
        return self.dest.index if self.dest.index is not None else 0

    @property
    def name(self) -> str:
        """"a3.h1<q>", "a3.kv0<k>", "m3" or "logits"."""
        return f"{self.dest.name}<{self.channel}>" if self.channel else self.dest.name

    def edge(self, src: Node) -> Edge:
        """The edge from `src` into this receiver."""
        return Edge(src, self.dest, self.channel)


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
        self.nodes: list[Node] = [Node.input()]
        for l in range(n_layers):
            self.nodes += [Node.head(l, h) for h in range(n_heads)] + [Node.mlp(l)]
        self.receivers: list[Receiver] = []
        for l in range(n_layers):
            before_attn = 1 + l * (n_heads + 1)
            self.receivers += [Receiver(Node.head(l, h), "q", l, before_attn) for h in range(n_heads)]
            for kind in "kv":
                self.receivers += [Receiver(Node.kv(l, g), kind, l, before_attn) for g in range(n_kv_heads)]
            self.receivers.append(Receiver(Node.mlp(l), "", l, before_attn + n_heads))
        self.receivers.append(Receiver(Node.logits(), "", n_layers, len(self.nodes)))
        self.node_index: dict[Node, int] = {n: i for i, n in enumerate(self.nodes)}
        self.receiver_index: dict[tuple[Node, str], int] = {(r.dest, r.channel): i for i, r in enumerate(self.receivers)}

    @classmethod
    def from_model(cls, model: HookedModel) -> Graph:
        """The graph of `model` (refused unless its blocks fit the graph, see `check_model`)."""
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
        """How many edges the graph has (set entries of `mask`)."""
        return int(self.mask.sum())

    def layer_receivers(self, layer: int, kind: str) -> list[int]:
        """Indices of the receivers of `kind` ("q", "k", "v", "mlp", "logits") at `layer`."""
        return [i for i, r in enumerate(self.receivers) if r.layer == layer and r.kind == kind]

    def query_heads(self, dest: Node) -> list[Node]:
        """The nodes a downstream node stands for: a key/value head's group of query heads, else itself."""
        if dest.kind != "kv":
            return [dest]
        per = self.n_heads // self.n_kv_heads
        return [Node.head(dest.layer, h) for h in range(dest.index * per, (dest.index + 1) * per)]

    @cached_property
    def feeds(self) -> list[list[int]]:
        """Per receiver, the node indices (in `nodes`) whose input it is ([] for the logits)."""
        return [[self.node_index[h] for h in self.query_heads(r.dest)] if r.kind != "logits" else [] for r in self.receivers]

    def edge(self, r: int, u: int) -> Edge:
        """The edge from node `u` into receiver `r`."""
        return self.receivers[r].edge(self.nodes[u])

    def edge_name(self, r: int, u: int) -> str:
        """The name of the edge from node `u` into receiver `r`, e.g. "a0.h1->a2.h3<q>"."""
        return self.edge(r, u).name

    def edge_index(self, edge: Edge) -> tuple[int, int]:
        """(receiver index, node index) of an edge of this graph."""
        if not isinstance(edge, Edge):
            raise TypeError(f"expected an Edge, got {type(edge).__name__} {edge!r} (Edge.parse reads a name such as 'a0.h1->a2.h3<q>')")
        try:
            return self.receiver_index[edge.dest, edge.channel], self.node_index[edge.src]
        except KeyError:
            raise ValueError(f"unknown edge {edge.name!r}: {EDGE_NAMES}") from None

    def parse_edge(self, edge: str) -> tuple[int, int]:
        """(receiver index, node index) of an edge name such as "a0.h1->a2.h3<q>"."""
        return self.edge_index(Edge.parse(edge))

    def edge_mask(self, edges: Iterable[Edge]) -> Tensor:
        """Bool[Tensor, "receiver node"] with the given edges set."""
        m = torch.zeros_like(self.mask)
        for e in edges:
            r, u = self.edge_index(e)
            if not self.mask[r, u]:
                raise ValueError(f"edge {e.name!r} goes backwards: {self.nodes[u].name} is written after its receiver reads")
            m[r, u] = True
        return m

    def edges_frame(self, scores: Optional[Tensor] = None) -> pd.DataFrame:
        """One row per edge: edge, src, dst, channel (q/k/v or ''), as names; with `scores`
        (Float[Tensor, "receiver node"]) also score and abs_score."""
        r_idx, u_idx = self.mask.nonzero(as_tuple=True)
        rows = {
            "edge": [self.edge_name(r, u) for r, u in zip(r_idx.tolist(), u_idx.tolist())],
            "src": [self.nodes[u].name for u in u_idx.tolist()],
            "dst": [self.receivers[r].dest.name for r in r_idx.tolist()],
            "channel": [self.receivers[r].channel for r in r_idx.tolist()],
        }
        df = pd.DataFrame(rows)
        if scores is not None:
            if scores.shape != self.mask.shape:
                raise ValueError(f"scores must be [receivers, nodes] = {tuple(self.mask.shape)}, got {tuple(scores.shape)}")
            s = scores[r_idx, u_idx].detach().double().cpu().numpy()
            df["score"] = s
            df["abs_score"] = abs(s)
        return df

    def __repr__(self) -> str:
        return f"Graph(nodes={len(self.nodes)}, receivers={len(self.receivers)}, edges={self.n_edges})"


def check_model(model: HookedModel) -> None:
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


# ---------------------------------------------------------------------------- node outputs
def output_hooks(n_layers: int) -> list[str]:
    """Hook points that hold per-node outputs."""
    return [get_act_name("embed")] + [get_act_name("result", l) for l in range(n_layers)] + [
        get_act_name("mlp_out", l) for l in range(n_layers)
    ]


def stack_outputs(graph: Graph, store: dict[str, Tensor]) -> Tensor:
    """Float[Tensor, "node batch pos d_model"]: the outputs in `graph.nodes` order."""
    parts = [store[get_act_name("embed")][None]]
    for l in range(graph.n_layers):
        parts.append(store[get_act_name("result", l)].permute(2, 0, 1, 3))
        parts.append(store[get_act_name("mlp_out", l)][None])
    return torch.cat(parts)


def node_outputs(model: HookedModel, tokens: Tensor, graph: Graph) -> Tensor:
    """Float[Tensor, "node batch pos d_model"] of one unpatched run (hook_embed, per-head results, MLP outputs)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=output_hooks(graph.n_layers))
    return stack_outputs(graph, {k: cache[k] for k in output_hooks(graph.n_layers)})


# ---------------------------------------------------------------------------- edge patching
def _proj(module: nn.Linear, index: int, d_head: int, x: Tensor) -> Tensor:
    """One head's slice of a linear projection: [..., d_model] -> [..., d_head]."""
    rows = slice(index * d_head, (index + 1) * d_head)
    bias = module.bias[rows] if module.bias is not None else None
    return F.linear(x, module.weight[rows], bias)


def _subtract_kept(n_kept: int, n_corrupt: int) -> bool:
    """Sum a receiver's corrupted edges as (all upstream - kept) when that is the shorter sum."""
    return n_kept < n_corrupt


class ReceiverDeltas:
    """What each receiver adds to its input in one patched forward.

    ``diff[u] = corrupted_out_u - current_out_u`` is filled as the forward writes each node's
    output; ``total`` is the float64 sum of every diff written so far. A receiver reads all nodes
    written before it, so the sum over its corrupted edges is total minus its kept edges: a
    small circuit costs its own edges, not the whole graph's.

    corrupted_outputs: Float[Tensor, "node batch pos d_model"]; corrupt: Bool[Tensor, "receiver node"]
    (already restricted to the graph's edges, on corrupted_outputs' device).
    """

    def __init__(self, graph: Graph, corrupted_outputs: Tensor, corrupt: Tensor):
        self.corrupted = corrupted_outputs
        self.corrupt = corrupt
        self.upstream = graph.mask.to(corrupt.device)
        self.n_upstream = [r.n_upstream for r in graph.receivers]
        self.diff = torch.zeros_like(corrupted_outputs)
        self.total = torch.zeros(corrupted_outputs.shape[1:], dtype=torch.float64, device=corrupted_outputs.device)
        self.written = 0  # nodes [0, written) have their diff filled

    def record(self, lo: int, hi: int, out: Tensor) -> None:
        """Nodes lo..hi-1 wrote `out` (Float[Tensor, "node batch pos d_model"])."""
        self.diff[lo:hi] = self.corrupted[lo:hi] - out.to(self.diff.dtype)
        self.total.add_(self.diff[lo:hi].sum(0, dtype=torch.float64))
        self.written = hi

    def summed(self, select: Tensor, r: int) -> Tensor:
        """Sum of diff over the nodes `select` (Bool[Tensor, "node"]) picks, for receiver r: [batch, pos, d_model]."""
        idx = select.nonzero(as_tuple=True)[0]
        if len(idx) < 8:
            return self.diff[idx].sum(0)
        up = self.n_upstream[r]
        return torch.einsum("u,u...->...", select[:up].to(self.diff.dtype), self.diff[:up])

    def delta(self, r: int) -> Optional[Tensor]:
        """What receiver r adds to its input ([batch, pos, d_model]), or None when none of its edges is corrupted."""
        row = self.corrupt[r]
        n_corrupt = int(row.sum())
        if n_corrupt == 0:
            return None
        kept = self.upstream[r] & ~row
        if _subtract_kept(int(kept.sum()), n_corrupt) and self.written == self.n_upstream[r]:
            return (self.total - self.summed(kept, r).double()).to(self.diff.dtype)
        return self.summed(row, r)


# Hook functions of the patched forward; `patch_hooks` binds their keyword arguments.
def _record_output(x: Tensor, hook: HookPoint, *, deltas: ReceiverDeltas, lo: int, heads: bool) -> None:
    """Record the outputs of nodes lo.. : per-head results [batch, pos, head, d_model] or one output [batch, pos, d_model]."""
    out = x.permute(2, 0, 1, 3) if heads else x[None]
    deltas.record(lo, lo + out.shape[0], out)


def _keep_input(x: Tensor, hook: HookPoint, *, inputs: dict[str, Tensor]) -> None:
    """Keep a residual stream a later hook of the layer re-normalises (resid_pre, resid_mid)."""
    inputs[hook.name] = x


def _patch_attention_input(x: Tensor, hook: HookPoint, *, deltas: ReceiverDeltas, graph: Graph, receivers: list[int],
                           module: nn.Linear, norm: nn.Module, inputs: dict[str, Tensor], resid: str,
                           d_head: int) -> Optional[Tensor]:
    """Recompute q, k or v ([batch, pos, head, d_head]) of every receiver with a corrupted edge from ln1 of its own input."""
    out = None
    for r in receivers:
        d = deltas.delta(r)
        if d is None:
            continue
        if out is None:
            out = x.clone()
        index = graph.receivers[r].index
        normed = norm.forward(inputs[resid] + d.to(x.dtype))
        out[:, :, index] = _proj(module, index, d_head, normed).to(x.dtype)
    return out


def _patch_mlp_input(x: Tensor, hook: HookPoint, *, deltas: ReceiverDeltas, r: int, norm: nn.Module,
                     inputs: dict[str, Tensor], resid: str) -> Optional[Tensor]:
    """ln2's output [batch, pos, d_model] from the MLP's own input, when one of its edges is corrupted."""
    d = deltas.delta(r)
    if d is None:
        return None
    return norm.forward(inputs[resid] + d.to(x.dtype)).to(x.dtype)


def _patch_logits_input(x: Tensor, hook: HookPoint, *, deltas: ReceiverDeltas, r: int) -> Optional[Tensor]:
    """The final residual stream [batch, pos, d_model] the logits read, plus their corrupted edges."""
    d = deltas.delta(r)
    return None if d is None else x + d.to(x.dtype)


def patch_hooks(model: HookedModel, graph: Graph, deltas: ReceiverDeltas) -> list[tuple[str, HookFn]]:
    """The forward hooks of an edge-patched run: record every node's output into `deltas` and
    re-read each receiver's input with its delta added."""
    parts = model.adapter.layers
    d_head = model.cfg.d_head
    H = graph.n_heads
    inputs: dict[str, Tensor] = {}
    hooks: list[tuple[str, HookFn]] = [(get_act_name("embed"), partial(_record_output, deltas=deltas, lo=0, heads=False))]
    for l in range(graph.n_layers):
        base = 1 + l * (H + 1)
        pre, mid = get_act_name("resid_pre", l), get_act_name("resid_mid", l)
        hooks.append((pre, partial(_keep_input, inputs=inputs)))
        for kind in "qkv":
            hooks.append((get_act_name(kind, l), partial(
                _patch_attention_input, deltas=deltas, graph=graph, receivers=graph.layer_receivers(l, kind),
                module=getattr(parts[l].qkv, kind), norm=parts[l].ln1, inputs=inputs, resid=pre, d_head=d_head)))
        hooks += [
            (get_act_name("result", l), partial(_record_output, deltas=deltas, lo=base, heads=True)),
            (mid, partial(_keep_input, inputs=inputs)),
            (get_act_name("normalized", l, "ln2"), partial(_patch_mlp_input, deltas=deltas, r=graph.layer_receivers(l, "mlp")[0],
                                                          norm=parts[l].ln2, inputs=inputs, resid=mid)),
            (get_act_name("mlp_out", l), partial(_record_output, deltas=deltas, lo=base + H, heads=False)),
        ]
    hooks.append((get_act_name("resid_post", graph.n_layers - 1),
                  partial(_patch_logits_input, deltas=deltas, r=len(graph.receivers) - 1)))
    return hooks


def check_patch_inputs(graph: Graph, tokens: Tensor, corrupted_outputs: Tensor, corrupt: Tensor) -> None:
    """Refuse a `corrupt` mask or corrupted outputs of the wrong shape for `graph` and `tokens`."""
    if corrupt.shape != graph.mask.shape:
        raise ValueError(f"corrupt must be [receivers, nodes] = {tuple(graph.mask.shape)}, got {tuple(corrupt.shape)}")
    if corrupted_outputs.shape[0] != len(graph.nodes) or corrupted_outputs.shape[1:3] != tokens.shape:
        raise ValueError(
            f"corrupted_outputs must be [nodes, batch, pos, d_model] = [{len(graph.nodes)}, {tokens.shape[0]}, "
            f"{tokens.shape[1]}, d_model], got {tuple(corrupted_outputs.shape)}"
        )


def patched_logits(
    model: HookedModel,
    graph: Graph,
    tokens: Tensor,
    corrupted_outputs: Tensor,
    corrupt: Tensor,
    **forward_kwargs: Any,
) -> Tensor:
    """Logits of a run of `tokens` where every edge in `corrupt` carries its source's corrupted output.

    tokens: Long[Tensor, "batch pos"].
    corrupted_outputs: Float[Tensor, "node batch pos d_model"] from `node_outputs` on the
        corrupted prompts (same shape of tokens).
    corrupt: Bool[Tensor, "receiver node"]: the edges to corrupt (edges outside a circuit).
    forward_kwargs: passed to the model (e.g. logits_to_keep=1).

    Receiver r reads ``current residual + sum_{u: corrupt[r, u]} (corrupted_out_u - current_out_u)``
    where current_out_u is u's output in this very run (so effects propagate). With nothing
    corrupted it is the clean run; with every edge corrupted it is the corrupted run.
    """
    check_patch_inputs(graph, tokens, corrupted_outputs, corrupt)
    corrupt = (corrupt & graph.mask).to(corrupted_outputs.device)
    deltas = ReceiverDeltas(graph, corrupted_outputs, corrupt)
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=patch_hooks(model, graph, deltas), **forward_kwargs)
