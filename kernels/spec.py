"""What every backend computes: argument checking, per-head controls and the statistics record.

Both backends (kernels/reference.py, kernels/triton_attention.py) receive a `Problem` built
here, so shapes, defaults and error messages are written once.

Semantics (identical in every backend), for query head h of batch row b, query i and key j:

    s[i, j] = c(q_i . k_j * scale) / temperature[b, h]     c = softcap * tanh(x / softcap), or identity
    s[i, j] = 0                         where head_uniform[b, h]  (Wu et al.'s ablation: a zeroed query)
    allowed(i, j) = (not causal or j <= i + k_len - q_len) and mask[b, ., i, j]
    A[i, j] = softmax over the allowed j of s[i, j]
    out[b, h, i] = head_gate[b, h] * sum_j A[i, j] v_j       with v from KV head h // (n_heads // n_kv_heads)

A query with no allowed key gets out = 0 (as torch SDPA), lse = -inf, row_max = 0,
row_argmax = -1, row_entropy = 0, and adds nothing to col_sum. The statistics describe A, the
attention actually used (after temperature and uniform); the gate scales the output only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

STATS = ("col_sum", "row_max", "row_argmax", "row_entropy", "lse")


def sink_alpha(col_sum: Tensor, n_queries: Optional[Tensor] = None) -> Tensor:
    """Gu et al.'s sink score alpha(k) = col_sum(k) / (number of queries that see key k): Float[Tensor, "... k_len"].

    ("When Attention Sink Emerges in Language Models", 2024.) The one definition of alpha:
    `interp.heads.sinks`, ACT's calibration and `AttentionStats.alpha` all call it.
    col_sum: Float[Tensor, "... k_len"], sum over queries i of A[i, k].
    n_queries: counts broadcastable to col_sum, or None for Gu's denominator T - k (0-based k,
    T = k_len): the count under causal attention with q_len == k_len and no other mask, which
    Gu's code keeps on sliding-window layers too. A count of 0 (a key no query sees, whose
    col_sum is 0) gives alpha = 0. Computed and returned in col_sum's dtype.
    """
    if n_queries is None:
        T = col_sum.shape[-1]
        return col_sum / torch.arange(T, 0, -1, dtype=col_sum.dtype, device=col_sum.device)
    return col_sum / n_queries.clamp(min=1).to(col_sum.dtype)


@dataclass
class AttentionStats:
    """Statistics of one attention call, per query head (never T x T).

    col_sum:     Float[Tensor, "batch head k_len"]  sum over queries of A[i, k] (attention mass key k receives)
    row_max:     Float[Tensor, "batch head q_len"]  max_j A[i, j]
    row_argmax:  Long[Tensor, "batch head q_len"]   argmax_j A[i, j] (first on ties; -1 when no key is allowed)
    row_entropy: Float[Tensor, "batch head q_len"]  -sum_j A[i, j] log A[i, j], in nats
    lse:         Float[Tensor, "batch head q_len"]  log sum_j exp s[i, j] over the allowed j
    n_queries:   Long[Tensor, "batch head k_len"]   number of queries allowed to see key k (filled with col_sum)
    k_len:       int, the number of keys of the call (when decoding: the KV cache's length, which on a
                 sliding-window layer may be shorter than the sequence); set by every call

    Floats are float32 (float64 for float64 inputs). Fields not requested are None.
    """

    col_sum: Optional[Tensor] = None
    row_max: Optional[Tensor] = None
    row_argmax: Optional[Tensor] = None
    row_entropy: Optional[Tensor] = None
    lse: Optional[Tensor] = None
    n_queries: Optional[Tensor] = None
    k_len: Optional[int] = None

    def alpha(self) -> Tensor:
        """Gu et al.'s sink score alpha(k) = mean over the queries i >= k of A[i, k]: [batch, head, k_len].

        ("When Attention Sink Emerges in Language Models", 2024.) With causal attention and
        q_len == k_len the queries that see key k are i = k .. T-1; in general the count is
        `n_queries` (causality and mask included: on a sliding-window layer min(window, T - k),
        where `interp.heads.sinks` keeps Gu's T - k). Keys no query sees get alpha = 0.
        `sink_alpha(col_sum, n_queries)`.
        """
        if self.col_sum is None or self.n_queries is None:
            raise ValueError("alpha needs col_sum: call attention(..., stats=('col_sum',)).")
        return sink_alpha(self.col_sum, self.n_queries)

    def as_dict(self) -> dict[str, Tensor]:
        """The tensors computed (k_len, an int, is left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}


@dataclass
class Problem:
    """Checked inputs of one call, controls broadcast to [batch, n_heads]."""

    q: Tensor  # [batch, n_heads, q_len, d]
    k: Tensor  # [batch, n_kv_heads, k_len, d]
    v: Tensor  # [batch, n_kv_heads, k_len, d]
    causal: bool
    scale: float
    softcap: Optional[float]
    gate: Optional[Tensor]  # [batch, n_heads] float32/64 or None (= ones)
    uniform: Optional[Tensor]  # [batch, n_heads] bool or None (= no head)
    temperature: Optional[Tensor]  # [batch, n_heads] float32/64 or None (= ones)
    mask: Optional[Tensor]  # bool, broadcastable view [batch, n_heads, q_len, k_len] (expanded, may have 0 strides)
    stats: tuple[str, ...]

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.q.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def k_len(self) -> int:
        return self.k.shape[2]

    @property
    def acc_dtype(self) -> torch.dtype:
        """fp32 accumulation, float64 for float64 inputs."""
        return torch.float64 if self.q.dtype == torch.float64 else torch.float32


HeadArg = Union[None, float, Sequence[float], Tensor]


def _per_head(x: HeadArg, name: str, batch: int, n_heads: int, dtype: torch.dtype, device) -> Optional[Tensor]:
    """A control given per head [n_heads] or per batch row and head [batch, n_heads] -> [batch, n_heads]."""
    if x is None:
        return None
    t = torch.as_tensor(x, device=device)
    if t.dim() == 0:
        t = t.expand(n_heads)
    if t.dim() == 1:
        if t.shape[0] != n_heads:
            raise ValueError(f"{name} has {t.shape[0]} entries but there are {n_heads} query heads; "
                             f"pass shape [n_heads]=[{n_heads}] or [batch, n_heads]=[{batch}, {n_heads}].")
        t = t[None].expand(batch, n_heads)
    elif t.dim() != 2 or tuple(t.shape) != (batch, n_heads):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [n_heads]=[{n_heads}] "
                         f"or [batch, n_heads]=[{batch}, {n_heads}].")
    if dtype == torch.bool:
        if t.dtype != torch.bool:
            raise ValueError(f"{name} must be boolean (True = the head attends uniformly), got {t.dtype}.")
        return t.contiguous()
    return t.to(dtype).contiguous()


def _mask_view(mask: Optional[Tensor], key_mask: Optional[Tensor], b: int, h: int, tq: int, tk: int) -> Optional[Tensor]:
    """Combine a full boolean mask and a key-padding mask into one expanded [b, h, tq, tk] view.

    A key mask alone becomes a stride-0 view of [b, 1, 1, tk]: O(T) memory, never T x T.
    """
    view = None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be boolean (True = attend), got {mask.dtype}; "
                             "for an additive 0/-inf mask pass `mask == 0`.")
        m = mask
        while m.dim() < 4:
            m = m[None]
        try:
            view = m.expand(b, h, tq, tk)
        except RuntimeError:
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected one broadcastable to "
                             f"[batch, n_heads, q_len, k_len]=[{b}, {h}, {tq}, {tk}].") from None
    if key_mask is not None:
        if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (b, tk):
            raise ValueError(f"key_mask must be boolean [batch, k_len]=[{b}, {tk}] (True = real token), "
                             f"got {key_mask.dtype} {tuple(key_mask.shape)}.")
        km = key_mask[:, None, None, :].expand(b, h, tq, tk)
        view = km if view is None else (view & km)
    return view


def build_problem(
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
    stats: Sequence[str] = (),
) -> Problem:
    """Check shapes and dtypes and normalise the per-head controls (see the module docstring)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [batch, heads, pos, d_head]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}. (transformers' attention functions use this layout; from "
                         "[batch, pos, heads, d] use .transpose(1, 2).)")
    b, h, tq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must be [batch, n_kv_heads, k_len, d_head] matching q [{b}, {h}, {tq}, {d}]; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}.")
    hk, tk = k.shape[1], k.shape[2]
    if hk == 0 or h % hk != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk}) for grouped-query attention.")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"q, k, v must share one float dtype (fp16, bf16, fp32, fp64); got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}.")
    if causal and tq > tk:
        raise ValueError(f"causal attention needs q_len <= k_len (queries are the last q_len positions); "
                         f"got q_len {tq}, k_len {tk}.")
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {STATS}.")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}.")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    temp = _per_head(temperature, "temperature", b, h, acc, q.device)
    if temp is not None and not bool((temp > 0).all()):
        raise ValueError("temperature must be positive for every head (it divides the scores).")
    return Problem(
        q=q, k=k, v=v, causal=causal,
        scale=float(d ** -0.5 if scale is None else scale),
        softcap=None if softcap is None else float(softcap),
        gate=_per_head(head_gate, "head_gate", b, h, acc, q.device),
        uniform=_per_head(head_uniform, "head_uniform", b, h, torch.bool, q.device),
        temperature=temp,
        mask=_mask_view(mask, key_mask, b, h, tq, tk),
        stats=tuple(dict.fromkeys(stats)),
    )


def queries_per_key(p: Problem) -> Tensor:
    """How many queries may attend each key: [batch, n_heads, k_len] (the denominator of alpha(k)).

    Computed from causality alone when there is no mask (O(T)); with a mask, in query blocks.
    """
    dev = p.q.device
    j = torch.arange(p.k_len, device=dev)
    if p.mask is None:
        if p.causal:  # queries i with j <= i + k_len - q_len, i in [0, q_len)
            first = (j - (p.k_len - p.q_len)).clamp(min=0)
            n = (p.q_len - first).clamp(min=0)
        else:
            n = torch.full((p.k_len,), p.q_len, device=dev)
        return n.expand(p.batch, p.n_heads, p.k_len).contiguous()
    n = torch.zeros(p.batch, p.n_heads, p.k_len, dtype=torch.long, device=dev)
    step = max(1, (1 << 22) // max(1, p.k_len * p.batch * p.n_heads))
    for start in range(0, p.q_len, step):
        i = torch.arange(start, min(start + step, p.q_len), device=dev)
        allowed = p.mask[:, :, start:start + len(i)]
        if p.causal:
            allowed = allowed & (j[None, :] <= i[:, None] + (p.k_len - p.q_len))
        n += allowed.sum(dim=2)
    return n

