"""`attention`: the one entry point, choosing a backend (Triton on CUDA, the PyTorch reference elsewhere)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .reference import reference_attention
from .spec import STATS, AttentionStats, HeadArg, build_problem

BACKENDS = ("auto", "reference", "triton")


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def choose_backend(q: Tensor, *controls: object) -> str:
    """Triton for CUDA inputs without gradients (fp16/bf16/fp32, triton installed); the reference otherwise."""
    if not q.is_cuda or q.dtype == torch.float64 or _wants_grad(q, *controls):
        return "reference"
    from . import triton_attention

    return "triton" if triton_attention.available() else "reference"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    head_gate: HeadArg = None,
    head_uniform: HeadArg = None,
    temperature: HeadArg = None,
    mask: Optional[Tensor] = None,
    key_mask: Optional[Tensor] = None,
    stats: Union[bool, str, Sequence[str]] = (),
    backend: str = "auto",
    block_size: Optional[int] = None,
) -> Union[Tensor, tuple[Tensor, AttentionStats]]:
    """Softmax attention with per-head interventions, returning statistics instead of the T x T pattern.

    q: Float[Tensor, "batch n_heads q_len d"]; k, v: Float[Tensor, "batch n_kv_heads k_len d"]
    (transformers' layout). Grouped-query attention: query head h reads KV head
    h // (n_heads // n_kv_heads), without repeating K/V. With q_len < k_len the queries are the
    last q_len positions (decoding with a KV cache): causal offset k_len - q_len.

    causal:       keys j <= i + k_len - q_len only.
    scale:        multiplies q.k; default d ** -0.5.
    softcap:      scores -> softcap * tanh(scores / softcap) (Gemma 2), before the temperature.
    head_gate:    [n_heads] or [batch, n_heads]; multiplies each head's output (0 = zero ablation,
                  Michel et al.'s gate xi_h). Stacking different gates in the batch dimension runs
                  an ablation sweep in one call.
    head_uniform: bool [n_heads] or [batch, n_heads]; True = the head's scores are set to 0, i.e.
                  uniform attention over its allowed keys (Wu et al.'s retrieval-head ablation,
                  which zeroes the query).
    temperature:  [n_heads] or [batch, n_heads], positive; divides the scores: s = c(q.k * scale) / T_h.
    mask:         bool, broadcastable to [batch, n_heads, q_len, k_len], True = may attend (combined
                  with `causal`). key_mask: bool [batch, k_len], True = real token (padding in O(T)).
    stats:        names from ("col_sum", "row_max", "row_argmax", "row_entropy", "lse"), or True for all.
                  They describe the attention actually used (after temperature / uniform; the
                  gate scales the output only) -- see AttentionStats and kernels/spec.py.
    backend:      "auto" (Triton on CUDA without gradients, else reference), "reference", "triton".
    block_size:   query rows per block of the reference backend (memory O(block * k_len); default:
                  a slab of about 2M scores); Triton: both tiles.

    Returns out: Float[Tensor, "batch n_heads q_len d"] in q's dtype, or (out, AttentionStats)
    when stats are asked for. Queries with no allowed key get out = 0.
    """
    if stats is True:
        stats = STATS
    elif stats is False or stats is None:
        stats = ()
    elif isinstance(stats, str):
        stats = (stats,)
    p = build_problem(q, k, v, causal=causal, scale=scale, softcap=softcap, head_gate=head_gate,
                      head_uniform=head_uniform, temperature=temperature, mask=mask, key_mask=key_mask, stats=stats)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        backend = choose_backend(q, k, v, p.gate, p.temperature)
    if backend == "triton":
        if _wants_grad(q, k, v, p.gate, p.temperature):
            raise ValueError("the Triton backend is forward-only; use backend='reference' for gradients "
                             "(or run under torch.no_grad()).")
        from .triton_attention import triton_attention

        out, st = triton_attention(p, block_size, block_size)
    else:
        out, st = reference_attention(p, block=block_size)
    st.k_len = p.k_len
    return (out, st) if p.stats else out
