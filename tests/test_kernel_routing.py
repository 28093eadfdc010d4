"""The hook layer routes head gates, uniform heads and statistics through interp.kernels."""

from __future__ import annotations

import pytest
import torch

from interp.kernels.hf import KernelControls, StatsRecorder

from conftest import make_tiny


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_gate_equals_zeroing_the_head_through_hook_z(family, tokens):
    model = make_tiny(family)

    def zero_head_2(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_head_2)])
    gate = torch.tensor([1.0, 1.0, 0.0, 1.0])
    with model.kernel_controls({1: KernelControls(head_gate=gate)}):
        got = model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - model(tokens)).abs().max() > 1e-3  # the gate did something, and is gone after the block


def test_per_row_gates_run_different_ablations_in_one_batch(tokens):
    model = make_tiny("llama")
    rows = tokens[:1].repeat(4, 1)
    gates = torch.ones(4, 4)
    for h in range(4):
        gates[h, h] = 0.0
    with model.kernel_controls({0: KernelControls(head_gate=gates)}):
        batched = model(rows)
    for h in range(4):
        with model.kernel_controls({0: KernelControls(head_gate=gates[h])}):
            torch.testing.assert_close(batched[h], model(tokens[:1])[0], atol=1e-5, rtol=1e-5)


def test_uniform_heads_and_statistics_match_the_eager_pattern(tokens):
    model = make_tiny("llama")
    recorder = StatsRecorder()
    uniform = torch.tensor([False, True, False, False])
    with model.kernel_controls({0: KernelControls(head_uniform=uniform, stats=("col_sum", "row_argmax"), on_stats=recorder)}):
        model(tokens)
    stats = recorder[0][0]

    def uniform_q(q, hook):  # Wu et al.'s masking: zero query, uniform attention over allowed keys
        q = q.clone()
        q[:, :, 1] = 0
        return q

    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_q", uniform_q)]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["pattern", 0]
    torch.testing.assert_close(stats.col_sum, pattern.sum(dim=2), atol=1e-5, rtol=1e-5)
    n = tokens.shape[1]
    torch.testing.assert_close(pattern[:, 1], torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None].expand(2, n, n),
                               atol=1e-6, rtol=0)
