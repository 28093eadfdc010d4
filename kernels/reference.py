"""PyTorch reference backend: attention in query blocks, one pass, any device, autograd-able.

Memory is O(batch * heads * block * k_len) -- the T x T pattern never exists. For a block of
queries [i0, i1) the backend forms the scores against every key they may see (causal: keys
< i1 + k_len - q_len, so the work is triangular as in FlashAttention's causal loop), and takes
the exact softmax of that slab of rows with torch's fused softmax:

    m = max_j s,  A = softmax(s),  row_max = max_j A = 1 / l,  lse = m - log(row_max),
    row_entropy = lse - sum_j A[i, j] s[i, j]   (over the allowed keys),
    out = gate * (A V),  col_sum[j] += sum_i A[i, j].

Each score is computed once, and every statistic comes out of the same pass (Milakov &
Gimelshein, "Online normalizer calculation for softmax", 2018, for the max-shifted sums; Dao et
al., FlashAttention, 2022, for the blocking); a statistic not asked for costs nothing (the max
pass runs only for lse / entropy / masks, the second scratch buffer only for the entropy).
Queries of the `groups` heads that share a KV head are stacked as rows of one matmul against that
KV head, so K/V are never repeated in memory; on long slabs that matmul is one 2-D GEMM per
(batch row, KV head), which CPU BLAS runs faster than the batched form. `block` = query rows per
block; by default as many as keep one slab of scores near SLAB_ELEMENTS entries (never fewer
than MIN_ROWS). Without gradients the slabs live in scratch buffers reused by every block; with
them, ops are out of place. Accumulation is fp32 (float64 for float64 inputs). Semantics:
kernels/spec.py.

Cost on CPU (benchmarks/long_context.py): the attention of one SmolLM2 layer at 4K tokens with
col_sum and row_entropy takes about 1.6-2x torch's fused SDPA attention (which returns neither);
the two GEMMs are most of it.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

from .spec import AttentionStats, Problem, queries_per_key

NEG_INF = float("-inf")
SLAB_ELEMENTS = 1 << 21  # scores per query block (all heads) when no block size is given
MIN_ROWS = 16
LOOP_MIN_MACS = 1 << 22  # m * k * n from which `_Slab.matmul` runs one GEMM per (batch, KV head)


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
        self.q = p.q.to(acc).reshape(p.batch, p.n_kv_heads, p.groups, p.q_len, -1)  # a view for fp32 inputs
        self.k = p.k.to(acc)
        self.v = p.v.to(acc)
        self.temperature = _grouped(p.temperature, p)
        self.uniform = _grouped(p.uniform, p)
        self.offset = p.k_len - p.q_len
        self.gate = _grouped(p.gate, p)
        # Without gradients each block's output is written straight into [batch, q_len, head, d], the
        # layout transformers wants back, so neither a concatenation nor a transposed copy is made.
        self.out = None if grad else torch.empty(p.batch, p.q_len, p.n_kv_heads, p.groups, p.v.shape[-1],
                                                 dtype=p.q.dtype, device=p.q.device)

    def key_end(self, i1: int) -> int:
        """Keys [0, key_end) may be seen by a query < i1."""
        return min(self.p.k_len, i1 + self.offset) if self.p.causal else self.p.k_len

    def scores(self, i0: int, i1: int, buf: Optional[Tensor] = None) -> Tensor:
        """buf: a flat scratch tensor the slab is written into (reused by every block: no
        allocator churn, whose fragmentation grew the resident memory with slabs of rising width)."""
        p, n, kend = self.p, i1 - i0, self.key_end(i1)
        qb = self.q[:, :, :, i0:i1].reshape(p.batch, p.n_kv_heads, p.groups * n, -1)
        if p.softcap is None:  # scale folded into the block's queries (softcap needs the raw product)
            qb = qb * p.scale
        kt = self.k[:, :, :kend].transpose(-1, -2)
        out = None if buf is None else buf[: qb.shape[0] * qb.shape[1] * qb.shape[2] * kend].view(*qb.shape[:-1], kend)
        s = self.matmul(qb, kt, out).view(p.batch, p.n_kv_heads, p.groups, n, kend)
        if p.softcap is not None:
            c = p.scale / p.softcap
            s = s.mul_(c).tanh_().mul_(p.softcap) if not self.grad else torch.tanh(s * c) * p.softcap
        if self.temperature is not None:
            s = s.div_(self.temperature) if not self.grad else s / self.temperature
        if self.uniform is not None:
            s = s.masked_fill_(self.uniform, 0.0) if not self.grad else s.masked_fill(self.uniform, 0.0)
        return self._fill(s, i0, i1, kend, NEG_INF)

    def zero_blocked(self, s: Tensor, i0: int, i1: int, kend: int) -> Tensor:
        """s with every key the block's queries may not see set to 0 (s * A is then 0 there, not NaN)."""
        return self._fill(s, i0, i1, kend, 0.0)

    def matmul(self, a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """a [batch, kv, m, k] @ b [batch, kv, k, n].

        Large matrices (long context) go as one 2-D GEMM per (batch row, KV head): on CPU that ran
        1.2-1.4x the throughput of torch's batched matmul at these shapes (T = 4096, d = 64).
        Small ones (short prompts stacked in a batch, as in ablation sweeps) and autograd stay
        batched, where the loop's Python cost would dominate.
        """
        if self.grad or a.shape[-2] * a.shape[-1] * b.shape[-1] < LOOP_MIN_MACS:
            return torch.matmul(a, b) if out is None else torch.matmul(a, b, out=out)
        if out is None:
            out = torch.empty(*a.shape[:-1], b.shape[-1], dtype=a.dtype, device=a.device)
        for i in range(a.shape[0]):
            for h in range(a.shape[1]):
                torch.mm(a[i, h], b[i, h], out=out[i, h])
        return out

    def _fill(self, s: Tensor, i0: int, i1: int, kend: int, value: float) -> Tensor:
        """Write `value` where query i0 + r may not see key j (causality and mask)."""
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
                s[..., j0:].masked_fill_(tri, value)
        if blocked is None:
            return s
        return s.masked_fill_(blocked, value) if not self.grad else s.masked_fill(blocked, value)


_LOCAL = threading.local()
SCRATCH_KEEP_BYTES = 64 << 20  # scratch up to this size is kept for the next call (per thread)


def scratch(size: int, count: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """`count` flat buffers of at least `size` entries, reused from this thread's previous call when
    big enough. Fresh multi-megabyte buffers on every layer made the CPU allocator's resident
    memory creep up over a forward; reusing them keeps the kernel's peak near SDPA's."""
    kept = getattr(_LOCAL, "buffers", {})
    have = kept.get((dtype, device), ())
    if len(have) >= count and all(b.numel() >= size for b in have[:count]):
        return have[:count]
    new = tuple(torch.empty(size, dtype=dtype, device=device) for _ in range(count))
    if size * count * new[0].element_size() <= SCRATCH_KEEP_BYTES:
        kept[(dtype, device)] = new
        _LOCAL.buffers = kept
    return new


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
    parts: dict[str, list[Tensor]] = {k: [] for k in ("out", "lse", "row_max", "row_argmax", "row_entropy")}
    bufs: tuple[Tensor, ...] = ()
    if not grad:  # scratch reused by every block: the scores, and their softmax when the entropy needs both
        size = p.batch * p.n_heads * min(rows, p.q_len) * p.k_len
        bufs = scratch(size, 1 + ("row_entropy" in p.stats), acc, dev)
    for i0 in range(0, p.q_len, rows):
        i1 = min(i0 + rows, p.q_len)
        _block(p, slab, i0, i1, parts, col, bufs)
    return _finish(p, slab, parts, col)


def _block(p: Problem, slab: _Slab, i0: int, i1: int, parts: dict[str, list[Tensor]], col: Optional[Tensor],
           bufs: tuple[Tensor, ...] = ()) -> None:
    """One query block: exact softmax of its score slab, then every statistic from the probabilities."""
    acc, dev, n, kend = p.acc_dtype, p.q.device, i1 - i0, slab.key_end(i1)
    zero = torch.zeros((), dtype=acc, device=dev)
    s = slab.scores(i0, i1, bufs[0] if bufs else None)  # [b, kv, g, n, kend]
    entropy = "row_entropy" in p.stats
    need_lse = entropy or "lse" in p.stats
    # Without a mask every query sees at least one key (causal: key 0), so no row can be empty.
    top = s.amax(dim=-1) if p.mask is not None or need_lse else None
    has = None if p.mask is None else top > NEG_INF
    if slab.grad:
        a = torch.softmax(s, dim=-1)
    elif entropy:  # the entropy needs the scores after the softmax: write it into the second buffer
        a = torch.ops.aten._softmax.out(s, -1, False, out=bufs[1][: s.numel()].view(s.shape))
    else:
        a = torch.ops.aten._softmax.out(s, -1, False, out=s)  # in place: s is not needed again
    if has is not None and not bool(has.all()):  # rows with no allowed key: softmax gives NaN, the spec gives 0
        a = a.masked_fill(~has[..., None], 0.0) if slab.grad else a.masked_fill_(~has[..., None], 0.0)
    idx = row_max = None
    if "row_argmax" in p.stats:
        row_max, idx = a.max(dim=-1)  # first maximum on ties (a slower reduction than amax: only when asked)
    elif "row_max" in p.stats or need_lse:
        row_max = a.amax(dim=-1)  # = exp(m - m) / l = 1 / l; 0 on empty rows
    if need_lse:
        lse = top - torch.log(row_max if has is None else torch.where(has, row_max, 1.0))  # log l = m - log(1 / l)
        if has is not None:
            lse = torch.where(has, lse, torch.full((), NEG_INF, dtype=acc, device=dev))
        if "lse" in p.stats:
            parts["lse"].append(lse)
    if "row_argmax" in p.stats:
        parts["row_argmax"].append(idx if has is None else torch.where(has, idx, torch.full((), -1, dtype=idx.dtype, device=dev)))
    if "row_max" in p.stats:
        parts["row_max"].append(row_max)
    av = slab.matmul(a.view(p.batch, p.n_kv_heads, p.groups * n, kend), slab.v[:, :, :kend]).view(*a.shape[:-1], -1)
    if slab.out is None:
        parts["out"].append(av)
    else:
        if slab.gate is not None:
            av.mul_(slab.gate)
        slab.out[:, i0:i1].copy_(av.permute(0, 3, 1, 2, 4))
    if col is not None:
        col[..., :kend] += a.sum(dim=-2)  # sum over the block's queries
    if entropy:  # -sum_j A log A = lse - sum_j A[i, j] s[i, j], over the allowed keys (s = -inf elsewhere)
        s0 = slab.zero_blocked(s, i0, i1, kend)
        mean_s = (a * s0).sum(-1) if slab.grad else torch.mul(a, s0, out=s0).sum(-1)
        ent = lse - mean_s
        parts["row_entropy"].append(ent if has is None else torch.where(has, ent, zero))


def _finish(p: Problem, slab: _Slab, parts: dict[str, list[Tensor]], col: Optional[Tensor]) -> tuple[Tensor, AttentionStats]:
    """The output [batch, n_heads, q_len, d] (gated), and the statistics record."""
    if slab.out is not None:  # written block by block, gate applied: [b, q, kv, g, d] seen as [b, h, q, d]
        out = slab.out.view(p.batch, p.q_len, p.n_heads, -1).transpose(1, 2)
    else:
        out = torch.cat(parts["out"], dim=3)
        if p.gate is not None:
            out = out * slab.gate
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
