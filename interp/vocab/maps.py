"""MAPS: what an attention head does, read from its parameters in vocabulary space.

Elhelo & Geva, "Inferring Functionality of Attention Heads from their Parameters" (2024). A head's
OV circuit maps a source token's embedding to what the head writes; projected through the
unembedding it becomes a row of a vocab x vocab matrix

    M_OV[s] = unembed_frozen( W_O^h W_V^{kv(h)} ln1(e(s)) )

where e(s) is the token's embedding for layer 0 and, for later layers, the output of the first
MLP on that embedding (`mlp0(ln2_0(E[s]))`, the paper's choice), kv(h) = h // group size under
grouped-query attention, ln1 is the layer's input norm as the module computes it, and
unembed_frozen multiplies by the final norm's weight (centring first for a LayerNorm) before the
unembedding: a positive per-row scale never changes a row's ranking, so the frozen scale is left
out. Biases of the value and output projections are left out, as in the paper's W_VO.

Relation score of a head for a relation of (source, target) token pairs: the share of pairs whose
target is among the top-k entries of M_OV[source] (k = 1 for copying relations, 10 otherwise);
the suppression score uses -M_OV. QK maps (`qk_top_keys`) score query tokens against key
tokens through W_Q W_K^T, position-free (RoPE left out).

Never a vocab x vocab matrix: rows are computed for blocks of source tokens and reduced to their
top-k at once (49,152^2 floats would be 9.7 GB; Qwen's vocabulary is 151,936).

Validation, as in the paper: `dynamic_relation_scores` (the head's output at the last position of
prompts that express the relation, projected the same way) against the static scores
(`static_dynamic_correlation`), and `ablation_accuracy` (zero the top heads' outputs at the last
position against as many random heads; accuracy on the relation's prompts).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Optional, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..hooks import HookedModel
from ..models.adapters import split_fused_qkv

Head = tuple[int, int]


# ---------------------------------------------------------------------------- relations
@dataclass(frozen=True)
class Relation:
    """Source -> target pairs as single token ids under one tokenizer, with the relation's k and prompt template."""

    name: str
    k: int
    template: str  # "<X>" stands for " " + source; the next token should be " " + target
    words: tuple[tuple[str, str], ...]  # the pairs kept (both sides one token)
    sources: Tensor  # Int[Tensor, "pair"]
    targets: Tensor  # Int[Tensor, "pair"]
    dropped: int  # pairs left out because a side is several tokens

    def prompts(self) -> list[str]:
        return [self.template.replace("<X>", " " + s) for s, _ in self.words]


def load_relations(model: HookedModel, names: Optional[Sequence[str]] = None, min_pairs: int = 10) -> dict[str, Relation]:
    """The bundled relation sets (data/relations.json) tokenised for `model`, keeping single-token pairs.

    A relation left with fewer than `min_pairs` pairs under this tokenizer is an error naming it.
    """
    spec = json.loads(resources.files("interp.data").joinpath("relations.json").read_text())["relations"]
    names = list(spec) if names is None else list(names)
    unknown = [n for n in names if n not in spec]
    if unknown:
        raise KeyError(f"unknown relation(s) {unknown}; the bundled ones are {', '.join(spec)}")
    tok = model.require_tokenizer()
    out = {}
    for name in names:
        kept, ids = [], []
        for source, target in spec[name]["pairs"]:
            s, t = (tok.encode(" " + w, add_special_tokens=False) for w in (source, target))
            if len(s) == 1 and len(t) == 1:
                kept.append((source, target))
                ids.append((s[0], t[0]))
        if len(kept) < min_pairs:
            raise ValueError(f"relation {name!r} keeps {len(kept)} single-token pairs under this tokenizer "
                             f"(fewer than min_pairs={min_pairs}); choose other relations or lower min_pairs")
        pairs = torch.tensor(ids)
        out[name] = Relation(name, spec[name]["k"], spec[name]["template"], tuple(kept), pairs[:, 0], pairs[:, 1],
                             len(spec[name]["pairs"]) - len(kept))
    return out


# ---------------------------------------------------------------------------- the maps
def _params_device(model: HookedModel) -> torch.device:
    return model.adapter.embed.weight.device


def source_embeddings(model: HookedModel, tokens: Tensor, layer: int) -> Tensor:
    """e(s) for `layer`: the embedding at layer 0; after it, what the first block's MLP would add to
    the residual stream on that embedding alone (`mlp0(ln2_0(E[s]))`, post-MLP norm included where
    the family has one, e.g. Gemma).

    tokens: Int[Tensor, "n"] -> Float[Tensor, "n d_model"].
    """
    parts = model.adapter.layers[0]
    with torch.no_grad():
        e = model.adapter.embed(tokens.to(_params_device(model))[None])
        if layer == 0:
            return e[0]
        mlp = parts.block.mlp
        out = mlp(parts.ln2(e))
        if parts.mlp_out is not mlp:  # a norm after the MLP (Gemma's post_feedforward_layernorm)
            out = parts.mlp_out(out)
        return out[0]


def _project_qkv(model: HookedModel, layer: int, x: Tensor) -> list[Tensor]:
    """q, k, v of the rows x (Float[Tensor, "n d_model"], already normed), biases removed, no RoPE.

    Returns [q: "n head d_head", k: "n kv_head d_head", v: "n kv_head d_head"].
    """
    qkv, c = model.adapter.layers[layer].qkv, model.cfg
    rows = torch.cat([x, torch.zeros_like(x[:1])])[None]  # the last row gives the biases
    if qkv.layout == "separate":
        outs = [qkv.q(rows), qkv.k(rows), qkv.v(rows)]
        heads = [c.n_heads, c.n_kv_heads, c.n_kv_heads]
        outs = [o.view(1, o.shape[1], h, c.d_head) for o, h in zip(outs, heads)]
    else:
        outs = split_fused_qkv(qkv.q(rows), qkv.layout, c.n_heads, c.d_head)
    return [(o[0, :-1] - o[0, -1:]) for o in outs]


def _unembed_frozen(model: HookedModel, out: Tensor) -> Tensor:
    """Logits of head outputs through the final norm's weight (centred for a LayerNorm) and the unembedding.

    out: Float[Tensor, "n d_model"] -> Float[Tensor, "n d_vocab"]. The norm's per-row scale is
    left out (it never changes a row's ranking); no norm bias, no soft-capping (monotone).
    """
    spec, norm = model.adapter.final_norm_spec, model.adapter.final_norm
    if spec.kind == "layernorm":
        out = out - out.mean(-1, keepdim=True)
    weight = getattr(norm, "weight", None)
    if weight is not None:
        out = out * (1.0 + weight if spec.plus_one else weight)
    unembed = model.adapter.unembed
    return out @ unembed.weight.T


def ov_logits(model: HookedModel, layer: int, head: int, sources: Tensor) -> Tensor:
    """Rows M_OV[s] of one head for the source tokens: Int[Tensor, "n"] -> Float[Tensor, "n d_vocab"]."""
    return _layer_ov_logits(model, layer, source_embeddings(model, sources, layer), heads=[head])[0]


def _layer_ov_logits(model: HookedModel, layer: int, embedded: Tensor, heads: Sequence[int]) -> Tensor:
    """M_OV rows of several heads of one layer from already embedded sources.

    embedded: Float[Tensor, "n d_model"] -> Float[Tensor, "head n d_vocab"].
    """
    with torch.no_grad():
        x = model.adapter.layers[layer].ln1(embedded[None])[0]
        v = _project_qkv(model, layer, x)[2]  # [n, kv_head, d_head]
        w_o = model.W_O(layer)
        return torch.stack([_unembed_frozen(model, v[:, h // model.cfg.n_groups] @ w_o[h]) for h in heads])


def _hits(logits: Tensor, targets: Tensor, k: int) -> Tensor:
    """Bool[Tensor, "... n"]: whether each row's target is among its top-k entries."""
    return (logits.topk(k, dim=-1).indices == targets.to(logits.device)[:, None]).any(-1)


def relation_scores(model: HookedModel, relation: Relation, block_size: int = 256) -> pd.DataFrame:
    """Static MAPS scores of every head: one row per (layer, head) with `score` and `suppression`.

    Source rows are computed `block_size` at a time and reduced to top-k at once.
    """
    c = model.cfg
    hits = torch.zeros(c.n_layers, c.n_heads)
    supp = torch.zeros(c.n_layers, c.n_heads)
    heads = list(range(c.n_heads))
    for start in range(0, len(relation.sources), block_size):
        s, t = relation.sources[start:start + block_size], relation.targets[start:start + block_size]
        embedded = {0: source_embeddings(model, s, 0), 1: source_embeddings(model, s, 1)}
        for layer in range(c.n_layers):
            logits = _layer_ov_logits(model, layer, embedded[min(layer, 1)], heads)  # [head, n, vocab]
            hits[layer] += _hits(logits, t, relation.k).sum(-1).cpu()
            supp[layer] += _hits(-logits, t, relation.k).sum(-1).cpu()
    n = len(relation.sources)
    return pd.DataFrame([dict(relation=relation.name, layer=l, head=h, score=float(hits[l, h]) / n,
                              suppression=float(supp[l, h]) / n) for l in range(c.n_layers) for h in heads])


def ov_top_mappings(model: HookedModel, layer: int, head: int, k: int = 5, sources: Optional[Tensor] = None,
                    block_size: int = 1024) -> pd.DataFrame:
    """Each source token's top-k targets under one head's OV map, streamed over blocks of sources.

    sources: Int[Tensor, "n"] (default: the whole vocabulary). One row per (source, rank).
    """
    sources = torch.arange(model.cfg.d_vocab) if sources is None else sources
    tok = model.tokenizer
    rows = []
    for start in range(0, len(sources), block_size):
        block = sources[start:start + block_size]
        values, ids = ov_logits(model, layer, head, block).topk(k, dim=-1)
        for i, s in enumerate(block.tolist()):
            for rank in range(k):
                t = int(ids[i, rank])
                rows.append(dict(layer=layer, head=head, source_id=s, rank=rank, target_id=t, logit=float(values[i, rank]),
                                 source=tok.decode([s]) if tok else str(s), target=tok.decode([t]) if tok else str(t)))
    return pd.DataFrame(rows)


def qk_top_keys(model: HookedModel, layer: int, head: int, queries: Tensor, k: int = 10,
                keys: Optional[Tensor] = None, block_size: int = 4096) -> tuple[Tensor, Tensor]:
    """The top-k key tokens for each query token under one head's QK map (W_Q W_K^T, no RoPE).

    Query and key tokens are embedded as for the OV map (first MLP after layer 0) and normed by
    the layer's ln1. Key tokens are streamed in blocks, keeping a running top-k.
    queries: Int[Tensor, "n"]; keys: Int[Tensor, "m"] (default: the whole vocabulary).
    Returns (scores, key ids), each Float/Int[Tensor, "n k"].
    """
    keys = torch.arange(model.cfg.d_vocab) if keys is None else keys
    ln1 = model.adapter.layers[layer].ln1
    with torch.no_grad():
        q = _project_qkv(model, layer, ln1(source_embeddings(model, queries, layer)[None])[0])[0][:, head]
        best_scores = torch.full((len(queries), 0), float("-inf"), device=q.device)
        best_ids = torch.zeros((len(queries), 0), dtype=torch.long, device=q.device)
        for start in range(0, len(keys), block_size):
            block = keys[start:start + block_size].to(q.device)
            kk = _project_qkv(model, layer, ln1(source_embeddings(model, block, layer)[None])[0])[1]
            scores = q @ kk[:, head // model.cfg.n_groups].T
            merged = torch.cat([best_scores, scores], dim=1)
            ids = torch.cat([best_ids, block[None].expand(len(queries), -1)], dim=1)
            best_scores, idx = merged.topk(min(k, merged.shape[1]), dim=1)
            best_ids = ids.gather(1, idx)
    return best_scores, best_ids


# ---------------------------------------------------------------------------- validation
def _relation_tokens(model: HookedModel, relation: Relation) -> Tensor:
    """The relation's prompts as one batch; they must tokenise to one length (single-token sources)."""
    tok = model.require_tokenizer()
    encoded = [tok.encode(p, add_special_tokens=False) for p in relation.prompts()]
    lengths = {len(e) for e in encoded}
    if len(lengths) != 1:
        raise ValueError(f"relation {relation.name!r}: its prompts tokenise to lengths {sorted(lengths)}; "
                         "a template must give one length for single-token sources")
    return torch.tensor(encoded)


def dynamic_relation_scores(model: HookedModel, relation: Relation, batch_size: int = 16) -> pd.DataFrame:
    """The paper's dynamic score: each head's output at the last position of the relation's prompts
    (hook_z through W_O, then the frozen-norm unembedding), the share whose target is in the top-k.

    One row per (layer, head): `dynamic` and `dynamic_suppression`.
    """
    tokens = _relation_tokens(model, relation)
    c = model.cfg
    hits = torch.zeros(c.n_layers, c.n_heads)
    supp = torch.zeros(c.n_layers, c.n_heads)
    names = [f"blocks.{l}.attn.hook_z" for l in range(c.n_layers)]
    for start in range(0, len(tokens), batch_size):
        batch, targets = tokens[start:start + batch_size], relation.targets[start:start + batch_size]
        with torch.no_grad():
            _, cache = model.run_with_cache(batch, names_filter=names)
            for l in range(c.n_layers):
                z = cache[names[l]][:, -1]  # [batch, head, d_head]
                out = torch.einsum("bhd,hdm->hbm", z, model.W_O(l).to(z.device))
                for h in range(c.n_heads):
                    logits = _unembed_frozen(model, out[h])
                    hits[l, h] += _hits(logits, targets, relation.k).sum()
                    supp[l, h] += _hits(-logits, targets, relation.k).sum()
    n = len(tokens)
    return pd.DataFrame([dict(relation=relation.name, layer=l, head=h, dynamic=float(hits[l, h]) / n,
                              dynamic_suppression=float(supp[l, h]) / n)
                         for l in range(c.n_layers) for h in range(c.n_heads)])


def static_dynamic_correlation(static: pd.DataFrame, dynamic: pd.DataFrame) -> float:
    """Pearson correlation over heads of the static `score` and the `dynamic` score (NaN if either is constant)."""
    both = static.merge(dynamic, on=["relation", "layer", "head"])
    if both["score"].std() == 0 or both["dynamic"].std() == 0:
        return float("nan")
    return float(both["score"].corr(both["dynamic"]))


def relation_accuracy(model: HookedModel, relation: Relation, heads: Sequence[Head] = (), batch_size: int = 16) -> float:
    """Share of the relation's prompts whose greedy next token is the target, with `heads`' outputs
    (hook_z) zeroed at the last position (the paper's ablation)."""
    tokens = _relation_tokens(model, relation)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def zero_last(z: Tensor, hook) -> Tensor:
        z = z.clone()
        z[:, -1, by_layer[int(hook.name.split(".")[1])]] = 0.0
        return z

    hooks = [(f"blocks.{l}.attn.hook_z", zero_last) for l in by_layer]
    correct = 0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size]
        with torch.no_grad():
            logits = model.run_with_hooks(batch, fwd_hooks=hooks)[:, -1]
        correct += int((logits.argmax(-1).cpu() == relation.targets[start:start + batch_size]).sum())
    return correct / len(tokens)


def ablation_accuracy(model: HookedModel, relation: Relation, static: pd.DataFrame, n_heads: int,
                      n_random: int = 3, seed: int = 0) -> pd.DataFrame:
    """The causal check: accuracy with no ablation, with the `n_heads` top-scoring heads of `static`
    zeroed, and with as many random heads (mean over `n_random` draws, fixed seed)."""
    top = static.sort_values("score", ascending=False, kind="stable").head(n_heads)
    top_heads = list(zip(top["layer"].astype(int), top["head"].astype(int)))
    every = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    rng = random.Random(seed)
    random_acc = [relation_accuracy(model, relation, rng.sample(every, n_heads)) for _ in range(n_random)]
    return pd.DataFrame([dict(relation=relation.name, n_heads=n_heads, clean=relation_accuracy(model, relation),
                              top_heads=relation_accuracy(model, relation, top_heads),
                              random_heads=sum(random_acc) / len(random_acc))])
