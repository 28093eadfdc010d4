"""PyTorch reference backend: attention in query blocks, one pass, any device, autograd-able.

Memory is O(batch * heads * block * k_len) -- the T x T pattern never exists. For a block of
queries [i0, i1) the backend forms the scores against every key they may see (causal: keys
< i1 + k_len - q_len, so the work is triangular as in FlashAttention's causal loop), and takes
the exact softmax of that slab of rows:

    m = max_j s,  e = exp(s - m),  l = sum_j e,  lse = m + log l,  row_max = 1 / l,
    row_entropy = log l - sum_j e (s - m) / l,  out = gate * (e V) / l,
    col_sum[j] += sum_i e[i, j] / l_i          (a matrix-vector product, no normalised copy of e).

Each score is computed once, and every statistic comes out of the same pass (Milakov &
Gimelshein, "Online normalizer calculation for softmax", 2018, for the max-shifted sums; Dao et
al., FlashAttention, 2022, for the blocking). Queries of the `groups` heads that share a KV head
are stacked as rows of one matmul against that KV head, so K/V are never repeated in memory.
`block` = query rows per block; by default as many as keep one slab of scores near
SLAB_ELEMENTS entries (never fewer than MIN_ROWS). Without gradients the slab is updated in
place; with them, out of place. Accumulation is fp32 (float64 for float64 inputs). Semantics:
kernels/spec.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .spec import AttentionStats, Problem, queries_per_key

NEG_INF = float("-inf")
SLAB_ELEMENTS = 1 << 21  # scores per query block (all heads) when no block size is given
MIN_ROWS = 16


def _grouped(x: Optional[Tensor], p: Problem) -> Optional[Tensor]:
    """[batch, n_heads] -> [batch, kv_head, group, 1, 1], broadcasting against the scores."""
    return None if x is None else x.reshape(p.batch, p.n_kv_heads, p.groups, 1, 1)


def default_rows(p: Problem, budget: Optional[int] = None) -> int:
    """Query rows per block so that one slab [batch, heads, rows, k_len] has about `budget` entries."""
    rows = (budget or SLAB_ELEMENTS) // max(1, p.batch * p.n_heads * p.k_len)
    return max(MIN_ROWS, min(rows, p.q_len, 1024))


def _needs_grad(p: Problem) -> bool:
    ts = (p.q, p.k, p.v, p.gate, p.temperature)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


class _Slab:
    """Scores of one query block against its visible keys: [batch, kv_head, group, rows, keys]."""

    def __init__(self, p: Problem, grad: bool) -> None:
        self.p, self.grad = p, grad
        acc = p.acc_dtype
        q = p.q.to(acc).reshape(p.batch, p.n_kv_heads, p.groups, p.q_len, -1)
        self.q = q if p.softcap is not None else q * p.scale  # scale folded into q unless softcapped
        self.k = p.k.to(acc)
        self.v = p.v.to(acc)
        self.temperature = _grouped(p.temperature, p)
        self.uniform = _grouped(p.uniform, p)
        self.offset = p.k_len - p.q_len

    def key_end(self, i1: int) -> int:
        """Keys [0, key_end) may be seen by a query < i1."""
        return min(self.p.k_len, i1 + self.offset) if self.p.causal else self.p.k_len

    def scores(self, i0: int, i1: int, buf: Optional[Tensor] = None) -> Tensor:
        """buf: a flat scratch tensor the slab is written into (reused by every block: no
        allocator churn, whose fragmentation grew the resident memory with slabs of rising width)."""
        p, n, kend = self.p, i1 - i0, self.key_end(i1)
        qb = self.q[:, :, :, i0:i1].reshape(p.batch, p.n_kv_heads, p.groups * n, -1)
        kt = self.k[:, :, :kend].transpose(-1, -2)
        if buf is None:
            s = torch.matmul(qb, kt)
        else:
            s = torch.matmul(qb, kt, out=buf[: qb.shape[0] * qb.shape[1] * qb.shape[2] * kend].view(*qb.shape[:-1], kend))
        s = s.view(p.batch, p.n_kv_heads, p.groups, n, kend)
        if p.softcap is not None:
            c = p.scale / p.softcap
            s = s.mul_(c).tanh_().mul_(p.softcap) if not self.grad else torch.tanh(s * c) * p.softcap
        if self.temperature is not None:
            s = s.div_(self.temperature) if not self.grad else s / self.temperature
        if self.uniform is not None:
            s = s.masked_fill_(self.uniform, 0.0) if not self.grad else s.masked_fill(self.uniform, 0.0)
        return self._mask(s, i0, i1, kend)

    def _mask(self, s: Tensor, i0: int, i1: int, kend: int) -> Tensor:
        p, n = self.p, i1 - i0
        blocked = None
        if p.mask is not None:
            m = p.mask[:, :, i0:i1, :kend].reshape(p.batch, p.n_kv_heads, p.groups, n, kend)
            blocked = ~m
        if p.causal:
            j0 = i0 + self.offset  # keys before j0 are visible to every row of the block
            i = torch.arange(i0, i1, device=s.device)[:, None] + self.offset
            tri = torch.arange(j0, kend, device=s.device)[None, :] > i  # [rows, kend - j0]
            if blocked is not None or self.grad:
                full = torch.zeros(n, kend, dtype=torch.bool, device=s.device)
                full[:, j0:] = tri
                blocked = full if blocked is None else (blocked | full)
            else:
                s[..., j0:].masked_fill_(tri, NEG_INF)
        if blocked is None:
            return s
        return s.masked_fill_(blocked, NEG_INF) if not self.grad else s.masked_fill(blocked, NEG_INF)


def reference_attention(p: Problem, block: Optional[int] = None) -> tuple[Tensor, AttentionStats]:
    """Run the problem in query blocks of `block` rows; returns out [batch, n_heads, q_len, d] in q's
    dtype and the stats asked for."""
    if block is not None and block < 1:
        raise ValueError(f"block must be positive, got {block}.")
    rows = block or default_rows(p)
    grad = _needs_grad(p)
    slab = _Slab(p, grad)
    acc, dev = p.acc_dtype, p.q.device
    shape = (p.batch, p.n_kv_heads, p.groups)
    col = torch.zeros(*shape, p.k_len, dtype=acc, device=dev) if "col_sum" in p.stats else None
    entropy = "row_entropy" in p.stats
    # e @ [V | K]: the output and, for the entropy, sum_j A[i, j] k_j in one matmul
    vk = torch.cat([slab.v, slab.k], dim=-1) if entropy and p.softcap is None else slab.v
    parts: dict[str, list[Tensor]] = {k: [] for k in ("out", "lse", "row_max", "row_argmax", "row_entropy")}
    buf = None if grad else torch.empty(p.batch * p.n_heads * min(rows, p.q_len) * p.k_len, dtype=acc, device=dev)
    for i0 in range(0, p.q_len, rows):
        i1 = min(i0 + rows, p.q_len)
        _block(p, slab, vk, i0, i1, parts, col, buf)
    return _finish(p, parts, col)


def _block(p: Problem, slab: _Slab, vk: Tensor, i0: int, i1: int, parts: dict[str, list[Tensor]], col: Optional[Tensor],
           buf: Optional[Tensor] = None) -> None:
    """One query block: exact softmax of its score slab, then every statistic from the probabilities."""
    acc, dev, n, kend, d = p.acc_dtype, p.q.device, i1 - i0, slab.key_end(i1), p.q.shape[-1]
    zero = torch.zeros((), dtype=acc, device=dev)
    s = slab.scores(i0, i1, buf)  # [b, kv, g, n, kend]
    top = s.amax(dim=-1)
    has = top > NEG_INF
    entropy_by_slab = "row_entropy" in p.stats and p.softcap is not None
    if slab.grad or entropy_by_slab:
        a = torch.softmax(s, dim=-1)
    else:
        a = torch.ops.aten._softmax.out(s, -1, False, out=s)  # in place: s is not needed again
    if not bool(has.all()):  # rows with no allowed key: softmax gives NaN, the spec gives 0
        a = a.masked_fill(~has[..., None], 0.0) if slab.grad else a.masked_fill_(~has[..., None], 0.0)
    if "row_argmax" in p.stats:
        row_max, idx = a.max(dim=-1)  # first maximum on ties
        parts["row_argmax"].append(torch.where(has, idx, torch.full((), -1, dtype=idx.dtype, device=dev)))
    else:
        row_max = a.amax(dim=-1)  # = exp(m - m) / l = 1 / l; 0 on empty rows
    lse = torch.where(has, top - torch.log(torch.where(has, row_max, 1.0)), torch.full((), NEG_INF, dtype=acc, device=dev))
    av = torch.matmul(a.view(p.batch, p.n_kv_heads, p.groups * n, kend), vk[:, :, :kend]).view(*a.shape[:-1], -1)
    parts["out"].append(av[..., :d])
    if "row_entropy" in p.stats:  # -sum_j A log A = lse - sum_j A[i, j] s[i, j]
        if entropy_by_slab:
            mean_s = torch.where(a > 0, a * s, zero).sum(-1)
        else:
            mean_s = (av[..., d:] * slab.q[:, :, :, i0:i1]).sum(-1)  # q . (sum_j A k_j) = sum_j A s (scale in q)
            if slab.temperature is not None:
                mean_s = mean_s / slab.temperature[..., 0]
            if slab.uniform is not None:
                mean_s = mean_s.masked_fill(slab.uniform[..., 0], 0.0)
        parts["row_entropy"].append(torch.where(has, lse - mean_s, zero))
    if col is not None:
        ones = torch.ones(n, dtype=acc, device=dev)
        col[..., :kend] += torch.matmul(ones, a)  # sum over the block's queries, as a matrix-vector product
    parts["lse"].append(lse)
    parts["row_max"].append(row_max)


def _finish(p: Problem, parts: dict[str, list[Tensor]], col: Optional[Tensor]) -> tuple[Tensor, AttentionStats]:
    """Concatenate the query blocks, apply the gate, fill the statistics record."""
    out = torch.cat(parts["out"], dim=3)
    if p.gate is not None:
        out = out * _grouped(p.gate, p)
    out = out.reshape(p.batch, p.n_heads, p.q_len, -1).to(p.q.dtype)
    flat = (p.batch, p.n_heads, p.q_len)
    stats = AttentionStats()
    for name in ("lse", "row_max", "row_argmax", "row_entropy"):
        if name in p.stats:
            setattr(stats, name, torch.cat(parts[name], dim=3).reshape(flat))
    if col is not None:
        stats.col_sum = col.reshape(p.batch, p.n_heads, p.k_len)
        stats.n_queries = queries_per_key(p)
    return out, stats
