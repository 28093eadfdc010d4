"""Head lens: each attention head's output at each position, read through the vocabulary.

The logit lens (nostalgebraist 2020) reads the residual stream; this reads one head's write to it,
its `attn.hook_result` (z @ W_O[h], no bias), the way direct logit attribution does
(TransformerLens's `apply_ln_to_stack` convention, see `interp.vocab.dla`):

    logits[l, h, p] = (centre?(result[l, h, p] * post) * s_p * g) @ W_U^T

s_p: the final norm's scale frozen from the full residual at position p (the last block's
output), g its weight (1 + w for Gemma), centring only for a LayerNorm (GPT-2, GPT-NeoX). On
Gemma 2/3 the head output first goes through the post-attention norm, its scale frozen from the
layer's whole attention output at p (`post`). No biases (they belong to no head) and no final
logit soft-capping: the logits are the head's direct contribution, so the heads' logits at the
last position are their DLA on every token at once.

Streamed: rows of (position, head) are unembedded in chunks of at most `budget` / d_vocab rows
and reduced to their top-k at once.

    frame = head_lens(model, "When Mary and John went to the store, John gave a drink to", top_k=5)
    interp.vocab.head_lens_heatmap(frame).show()
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..hook_points import get_act_name
from ..hooks import HookedModel, Input
from ._frozen import check_layers, decoder, final_norm, post_norms, row_chunks, unembed_weight

BUDGET = 2**24  # elements of one [rows, d_vocab] float32 block (64 MiB)


def _positions(positions: Optional[Sequence[int]], n_real: int) -> list[int]:
    if positions is None:
        return list(range(n_real))
    positions = [positions] if isinstance(positions, int) else list(positions)
    bad = [p for p in positions if not -n_real <= p < n_real]
    if bad:
        raise ValueError(f"positions {bad} are out of range for a prompt of {n_real} tokens")
    return sorted({p % n_real for p in positions})


def head_results_frozen(model: HookedModel, cache, layer: int, row: int, positions: Tensor) -> Tensor:
    """Each head's output at the positions through the frozen norms (no unembedding):
    Float[Tensor, "pos head d_model"] in float32, ready for W_U^T."""
    z = cache[get_act_name("z", layer)][row, positions].float()  # [pos, head, d_head]
    w_o = model.W_O(layer).to(z.device, torch.float32)
    result = torch.einsum("phe,hem->phm", z, w_o)
    post, _ = post_norms(model, layer)
    if post is not None:  # Gemma 2/3: the post-attention norm, its scale frozen from the whole attention output
        b_o = model.b_O(layer)
        raw = result.sum(1) + (0 if b_o is None else b_o.to(z.device, torch.float32))
        result = post.apply_frozen(result, post.scale(raw)[:, None])
    norm = final_norm(model)
    resid = cache[get_act_name("resid_post", model.cfg.n_layers - 1)][row, positions].float()
    return norm.apply_frozen(result, norm.scale(resid)[:, None])


@torch.no_grad()
def head_lens(
    model: HookedModel,
    input: Input,
    top_k: int = 5,
    layers: Optional[Sequence[int]] = None,
    positions: Optional[Sequence[int]] = None,
    batch_index: int = 0,
    attention_mask: Optional[Tensor] = None,
    budget: int = BUDGET,
) -> pd.DataFrame:
    """The top tokens of every head's output at every position of one prompt (module docstring: the convention).

    input: a prompt (or a batch, with `batch_index` picking one). layers: default all; positions:
    default every real position of the prompt (right padding is dropped).
    One row per (layer, head, pos, rank): input_token (the prompt's token at pos), token_id, token
    (the rank-th highest logit), logit. attrs: tokens (the prompt's str tokens), component, metric_name.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    layers = check_layers(model, layers)
    tokens, mask = model.prepare_inputs(input, attention_mask)
    if not -tokens.shape[0] <= batch_index < tokens.shape[0]:
        raise ValueError(f"batch_index {batch_index} is out of range for a batch of {tokens.shape[0]} prompts")
    row = batch_index % tokens.shape[0]
    n_real = tokens.shape[1] if mask is None else int(mask[row].sum())
    if mask is not None and not bool(mask[row, :n_real].all()):
        raise ValueError("head_lens reads one prompt with right padding only (its real tokens first); pass it unpadded")
    pos = _positions(positions, n_real)
    names = [get_act_name("z", l) for l in layers] + [get_act_name("resid_post", model.cfg.n_layers - 1)]
    _, cache = model.run_with_cache(tokens, names_filter=names, attention_mask=mask)
    w_u_t = unembed_weight(model).to(torch.float32).T  # [d_model, d_vocab]
    k = min(top_k, model.cfg.d_vocab)
    decode = decoder(model)
    str_tokens = [decode(i) for i in tokens[row, :n_real].tolist()]
    n_heads = model.cfg.n_heads
    frames = []
    for layer in layers:
        normed = head_results_frozen(model, cache, layer, row, torch.tensor(pos)).reshape(len(pos) * n_heads, -1)
        values, ids = [], []
        for sl in row_chunks(normed.shape[0], model.cfg.d_vocab, budget):
            top = (normed[sl].to(w_u_t.device) @ w_u_t).topk(k, dim=-1)
            values.append(top.values.cpu())
            ids.append(top.indices.cpu())
        ids_flat = torch.cat(ids).reshape(-1).numpy()
        p_rows = np.repeat(np.asarray(pos), n_heads * k)
        frames.append(pd.DataFrame({
            "layer": layer, "head": np.tile(np.repeat(np.arange(n_heads), k), len(pos)), "pos": p_rows,
            "input_token": [str_tokens[p] for p in p_rows], "rank": np.tile(np.arange(k), len(pos) * n_heads),
            "token_id": ids_flat, "token": [decode(i) for i in ids_flat], "logit": torch.cat(values).reshape(-1).double().numpy(),
        }))
    frame = pd.concat(frames, ignore_index=True).sort_values(["layer", "head", "pos", "rank"], kind="stable").reset_index(drop=True)
    frame.attrs.update(tokens=str_tokens, component="attn.hook_result", metric_name="head lens")
    return frame
