"""Neuron decoding: what each MLP neuron writes, read through the vocabulary, and where it fires.

Geva et al. 2022, "Transformer Feed-Forward Layers Build Predictions by Promoting Concepts in the
Vocabulary Space" (arXiv:2203.14680): an MLP's output is a sum of value vectors (the rows of the
down projection W_out, one per neuron) weighted by the neurons' activations (`mlp.hook_post`).
Projecting a value vector through the unembedding shows the tokens the neuron promotes (highest
logits) and suppresses (lowest).

Convention (frozen-norm direction): neuron n of layer l is read as

    logits_n = (centre?(W_out[n] * g_post) * g_final) @ W_U^T

with g_final the final norm's weight (1 + w for Gemma), centring only for a LayerNorm (GPT-2,
GPT-NeoX), and g_post the weight of the norm Gemma 2/3 apply to the MLP output (1 elsewhere).
The norms' scales are left out: they are one positive number per position, which never changes a
ranking; so are the norm and unembedding biases (not the neuron's) and final logit soft-capping
(monotone). Geva et al. project with the (tied) embedding matrix and no norm; the final norm's
weight is kept here because it rescales each residual direction before the unembedding, as DLA
and the logit lens do. Logit values are in units of one unit of activation, norm scale 1.

Streamed: never all neurons x vocabulary at once (SmolLM2's 1536 x 49,152 is 300 MB per layer;
Qwen's vocabulary is 151,936). Neurons go through in blocks of at most `budget` / d_vocab rows,
each block reduced to its top-k at once (`torch.topk`). Top-activating positions are kept as a
running top-k over batches of prompts.

    table = neuron_vocab_table(model, prompts, layers=[3], top_k=10)
    table.query("neuron == 17 and kind == 'promoted'")
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..hook_points import get_act_name
from ..hooks import HookedModel, Input
from ._frozen import W_out, check_layers, decoder, final_norm, post_norms, row_chunks, unembed_weight

KINDS = ("promoted", "suppressed", "activation")
BUDGET = 2**24  # elements of one [neurons, d_vocab] float32 block (64 MiB)
Layers = Union[None, int, Sequence[int]]


def _neurons(model: HookedModel, neurons: Optional[Sequence[int]]) -> Tensor:
    n = model.cfg.d_mlp
    if neurons is None:
        return torch.arange(n)
    idx = torch.as_tensor(list(neurons), dtype=torch.long)
    bad = idx[(idx < 0) | (idx >= n)].tolist()
    if bad:
        raise ValueError(f"neurons {bad[:8]} are outside 0..{n - 1} (the MLP has d_mlp = {n} neurons)")
    return idx


def _check_k(top_k: int) -> None:
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")


def neuron_directions(model: HookedModel, layer: int, neurons: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The frozen-norm directions centre?(W_out[n] * g_post) * g_final of some neurons: Float[Tensor, "neuron d_model"]."""
    w_u = unembed_weight(model)
    w = W_out(model, layer)
    rows = w[neurons.to(w.device)].to(w_u.device, dtype)
    _, post = post_norms(model, layer)
    if post is not None:
        rows = rows * post.gain(rows)
    norm = final_norm(model)
    ones = torch.ones(rows.shape[:-1] + (1,), dtype=dtype, device=rows.device)
    return norm.apply_frozen(rows, ones)  # scale 1: centre (LayerNorm) and multiply by the weight


@torch.no_grad()
def neuron_vocab_projection(
    model: HookedModel,
    layers: Layers = None,
    neurons: Optional[Sequence[int]] = None,
    top_k: int = 10,
    budget: int = BUDGET,
) -> pd.DataFrame:
    """The tokens each neuron's output weight promotes and suppresses (module docstring: the convention).

    layers: layer indices (default all); neurons: neuron indices within each layer (default all).
    One row per (layer, neuron, kind, rank): kind "promoted" (highest logits, rank 0 the highest)
    or "suppressed" (lowest, rank 0 the lowest); token_id, token, value (the logit).
    """
    _check_k(top_k)
    layers = check_layers(model, layers)
    idx = _neurons(model, neurons)
    k = min(top_k, model.cfg.d_vocab)
    w_u = unembed_weight(model)
    w_u_t = w_u.to(torch.float32).T  # [d_model, d_vocab], one float32 copy
    decode = decoder(model)
    frames = []
    for layer in layers:
        for sl in row_chunks(len(idx), model.cfg.d_vocab, budget):
            logits = neuron_directions(model, layer, idx[sl]) @ w_u_t  # [block, d_vocab]
            for kind, largest in (("promoted", True), ("suppressed", False)):
                top = logits.topk(k, dim=-1, largest=largest)
                frames.append(_rows(layer, idx[sl], kind, top.values.cpu(), top.indices.cpu(), decode))
    return _finish(pd.concat(frames, ignore_index=True))


def _rows(layer: int, neurons: Tensor, kind: str, values: Tensor, ids: Tensor, decode) -> pd.DataFrame:
    n, k = values.shape
    ids_flat = ids.reshape(-1).numpy()
    return pd.DataFrame({
        "layer": layer, "neuron": np.repeat(neurons.numpy(), k), "kind": kind, "rank": np.tile(np.arange(k), n),
        "token_id": ids_flat, "token": [decode(i) for i in ids_flat], "value": values.reshape(-1).double().numpy(),
    })


def _finish(frame: pd.DataFrame) -> pd.DataFrame:
    order = frame["kind"].map({k: i for i, k in enumerate(KINDS)})
    frame = frame.assign(_order=order).sort_values(["layer", "neuron", "_order", "rank"], kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True)


# ---------------------------------------------------------------------------- where neurons fire
def _batches(model: HookedModel, prompts: Input, attention_mask: Optional[Tensor], batch_size: int):
    """(tokens, mask or None, index of the first prompt) per batch of prompts."""
    if isinstance(prompts, Tensor):
        tokens = prompts if prompts.ndim == 2 else prompts[None]
        for s in range(0, tokens.shape[0], batch_size):
            mask = None if attention_mask is None else attention_mask[s:s + batch_size]
            yield (*model.prepare_inputs(tokens[s:s + batch_size], mask), s)
        return
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    for s in range(0, len(texts), batch_size):
        yield (*model.prepare_inputs(texts[s:s + batch_size]), s)


def _merge(best: tuple[Tensor, Tensor, Tensor], acts: Tensor, prompt: Tensor, pos: Tensor, k: int):
    """Running top-k per neuron: best = (values [k', N], prompt [k', N], pos [k', N]); acts [rows, N]."""
    values = torch.cat([best[0], acts])
    prompts = torch.cat([best[1], prompt[:, None].expand_as(acts)])
    positions = torch.cat([best[2], pos[:, None].expand_as(acts)])
    top = values.topk(min(k, values.shape[0]), dim=0)
    return top.values, prompts.gather(0, top.indices), positions.gather(0, top.indices)


@torch.no_grad()
def neuron_top_activations(
    model: HookedModel,
    prompts: Input,
    layers: Layers = None,
    neurons: Optional[Sequence[int]] = None,
    top_k: int = 10,
    batch_size: int = 8,
    attention_mask: Optional[Tensor] = None,
    context: int = 8,
) -> pd.DataFrame:
    """Each neuron's top-activating positions (`mlp.hook_post`, highest values) over a prompt set.

    prompts: strings or Long[Tensor, "n pos"] (with attention_mask for padded rows); padding never counts.
    One row per (layer, neuron, rank): kind "activation", prompt (index into prompts), pos (among
    the prompt's real tokens: the tensor position unless the prompt is left-padded),
    token_id, token (the token at pos), value (the activation), context (up to `context` tokens
    before it, then the token in [[ ]]).
    """
    _check_k(top_k)
    layers = check_layers(model, layers)
    idx = _neurons(model, neurons)
    names = [get_act_name("post", l) for l in layers]
    empty = (torch.empty(0, len(idx)), torch.empty(0, len(idx), dtype=torch.long), torch.empty(0, len(idx), dtype=torch.long))
    best = {l: empty for l in layers}
    rows: list[list[int]] = []  # each prompt's real token ids
    for tokens, mask, start in _batches(model, prompts, attention_mask, batch_size):
        _, cache = model.run_with_cache(tokens, names_filter=names, attention_mask=mask)
        b, p = tokens.shape
        real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
        rows += [t[r].tolist() for t, r in zip(tokens.cpu(), real.cpu())]
        real = real.cpu().reshape(-1)
        prompt = (torch.arange(b)[:, None].expand(b, p).reshape(-1) + start)[real]
        pos = torch.arange(p)[None].expand(b, p).reshape(-1)[real]
        if mask is not None:  # positions counted among each prompt's real tokens (right or left padding)
            pos = (mask.cpu().long().cumsum(1) - 1).reshape(-1)[real]
        for l, name in zip(layers, names):
            acts = cache[name].reshape(b * p, -1)[:, idx.to(cache[name].device)].float().cpu()[real]
            best[l] = _merge(best[l], acts, prompt, pos, top_k)
    return _finish(pd.concat([_activation_rows(l, idx, best[l], rows, model, context) for l in layers], ignore_index=True))


def _activation_rows(layer: int, neurons: Tensor, best: tuple[Tensor, Tensor, Tensor], rows: list[list[int]],
                     model: HookedModel, context: int) -> pd.DataFrame:
    values, prompt, pos = (t.T for t in best)  # [neuron, k]
    k = values.shape[1]
    decode = decoder(model)
    p_flat, s_flat = prompt.reshape(-1).tolist(), pos.reshape(-1).tolist()
    ids = [rows[p][s] for p, s in zip(p_flat, s_flat)]
    tok = model.tokenizer

    def ctx(p: int, s: int) -> str:
        before = rows[p][max(0, s - context):s]
        text = tok.decode(before) if tok is not None else " ".join(map(str, before))
        return f"{text}[[{decode(rows[p][s])}]]"

    return pd.DataFrame({
        "layer": layer, "neuron": np.repeat(neurons.numpy(), k), "kind": "activation", "rank": np.tile(np.arange(k), len(neurons)),
        "token_id": ids, "token": [decode(i) for i in ids], "value": values.reshape(-1).double().numpy(),
        "prompt": p_flat, "pos": s_flat, "context": [ctx(p, s) for p, s in zip(p_flat, s_flat)],
    })


def neuron_vocab_table(
    model: HookedModel,
    prompts: Optional[Input] = None,
    layers: Layers = None,
    neurons: Optional[Sequence[int]] = None,
    top_k: int = 10,
    batch_size: int = 8,
    attention_mask: Optional[Tensor] = None,
    context: int = 8,
    budget: int = BUDGET,
) -> pd.DataFrame:
    """One table per the chosen neurons: promoted and suppressed tokens, and (with prompts) top-activating positions.

    Columns: layer, neuron, kind ("promoted", "suppressed", "activation"), rank, token_id, token,
    value (a logit for promoted / suppressed, an activation for activation rows), and prompt,
    pos, context (activation rows only; NA elsewhere). Sorted by layer, neuron, kind, rank.
    """
    projection = neuron_vocab_projection(model, layers, neurons, top_k, budget)
    na = pd.array([pd.NA] * len(projection), dtype="Int64")
    parts = [projection.assign(prompt=na, pos=na, context=pd.Series([None] * len(projection), dtype=object))]
    if prompts is not None:
        acts = neuron_top_activations(model, prompts, layers, neurons, top_k, batch_size, attention_mask, context)
        parts.append(acts.astype({"prompt": "Int64", "pos": "Int64"}))
    return _finish(pd.concat(parts, ignore_index=True))
