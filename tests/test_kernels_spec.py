"""kernels/spec.py's `sink_alpha`, the one definition of Gu et al.'s alpha, and its two denominators.

(Here rather than tests/kernels/: a tests/kernels folder on sys.path would be found by
transformers' probe for a top-level `kernels` package.)
"""

from __future__ import annotations

import torch

from interp.heads.sinks import alpha_from_col_sums
from interp.kernels import attention
from interp.kernels.spec import AttentionStats, build_problem, queries_per_key, sink_alpha


def _causal_pattern(T: int, seed: int = 0) -> torch.Tensor:
    """[1, 2, T, T] random causal attention, float64."""
    s = torch.randn(1, 2, T, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return s.masked_fill(~causal, float("-inf")).softmax(-1)


def test_gu_denominator_is_t_minus_k():
    """Hand-worked: alpha(k) = col_sum(k) / (T - k), 0-based k."""
    col = torch.tensor([[3.0, 1.5, 0.5]])
    torch.testing.assert_close(sink_alpha(col), torch.tensor([[1.0, 0.75, 0.5]]))
    a = _causal_pattern(6)
    expected = torch.stack([a[..., k:, k].mean(-1) for k in range(6)], -1)
    torch.testing.assert_close(sink_alpha(a.sum(-2)), expected, atol=1e-12, rtol=0)


def test_dtype_follows_col_sum_and_sinks_keeps_float64():
    col = _causal_pattern(5).sum(-2).float()
    assert sink_alpha(col).dtype == torch.float32
    got = alpha_from_col_sums(col)
    assert got.dtype == torch.float64
    assert torch.equal(got, col.double() / torch.arange(5, 0, -1, dtype=torch.float64))  # the numbers sinks.py had


def test_given_counts_agree_with_gu_without_a_mask_and_zero_counts_give_zero():
    a = _causal_pattern(7)
    p = build_problem(torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4))
    n = queries_per_key(p)
    assert torch.equal(n[0, 0], torch.arange(7, 0, -1))
    torch.testing.assert_close(sink_alpha(a.sum(-2), n), sink_alpha(a.sum(-2)), atol=0, rtol=0)
    stats = AttentionStats(col_sum=a.sum(-2), n_queries=n)
    assert torch.equal(stats.alpha(), sink_alpha(a.sum(-2), n))
    assert torch.equal(sink_alpha(torch.zeros(3), torch.zeros(3, dtype=torch.long)), torch.zeros(3))


def test_sliding_window_counts_differ_from_gu_where_t_minus_k_exceeds_the_window():
    """AttentionStats.alpha divides by the queries that see key k (min(window, T - k) on a
    sliding-window layer); sinks.py keeps Gu's T - k. They agree on the last `window` keys only."""
    T, W = 8, 3
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    mask = (j <= i) & (i - j < W)
    q = torch.randn(1, 2, T, 4, generator=torch.Generator().manual_seed(1))
    _, st = attention(q, q, q, mask=mask, stats=("col_sum",), backend="reference")
    assert torch.equal(st.n_queries[0, 0], torch.clamp(T - torch.arange(T), max=W))
    windowed, gu = st.alpha(), sink_alpha(st.col_sum)
    torch.testing.assert_close(windowed[..., T - W :], gu[..., T - W :], atol=0, rtol=0)
    assert bool((windowed[..., : T - W] > gu[..., : T - W]).all())
