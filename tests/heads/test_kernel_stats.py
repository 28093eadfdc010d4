"""The head analyses on their default engine (interp.kernels, `stats=`) against the eager pattern
path (`backend="eager"`, the oracle): sinks, entropy, value drain and the retrieval argmax, on every
tiny family (Gemma's sliding-window layers included) and on SmolLM2; and an allocation watch
showing that no T x T tensor is created at T = 2048."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from interp.heads import sinks
from interp.heads.niah import greedy_decode
from interp.heads.reducers import collect_attention_stats
from interp.heads.retrieval import KernelArgmax, PatternHookArgmax, score_retrieval

from conftest import VOCAB, make_tiny

STATS = ("col_sum", "row_max", "row_argmax", "row_entropy")


def top1_equal_except_ties(pattern: torch.Tensor, got: torch.Tensor, want: torch.Tensor, tie: float = 1e-6) -> None:
    """Top-1 keys equal wherever the pattern's best key beats the runner-up by more than `tie`."""
    top2 = pattern.double().topk(2, dim=-1).values if pattern.shape[-1] > 1 else None
    clear = torch.ones_like(want, dtype=torch.bool) if top2 is None else (top2[..., 0] - top2[..., 1]) > tie
    assert torch.equal(got[clear], want[clear])
    chosen = pattern.double().gather(-1, got[..., None])[..., 0]
    assert (pattern.double().amax(-1) - chosen).max() <= tie


def patterns(model, tokens):
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return torch.stack([cache[n] for n in names], dim=1)  # [batch, layer, head, q, k]


def long_tokens(n: int = 14, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Longer than Gemma 2's window (4) and Gemma 3's (3): the sliding layers mask keys."""
    return torch.randint(4, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_every_statistic_equals_eager_on_every_family(family):
    model = make_tiny(family)
    ids = long_tokens()
    kern = collect_attention_stats(model, ids, STATS)
    eager = collect_attention_stats(model, ids, STATS, backend="eager")
    for name in ("col_sum", "row_max", "row_entropy"):
        assert kern[name].shape == (2, 2, 4, 14)
        torch.testing.assert_close(kern[name], eager[name], atol=1e-5, rtol=0, msg=f"{family} {name}")
    torch.testing.assert_close(sinks.alpha_from_col_sums(kern["col_sum"]), sinks.alpha_from_col_sums(eager["col_sum"]),
                               atol=1e-5, rtol=0)
    top1_equal_except_ties(patterns(model, ids), kern["row_argmax"], eager["row_argmax"])
    assert not any(p.active for p in model.hook_dict.values())  # nothing left attached


def test_sink_entropy_and_drain_equal_eager(family):
    model = make_tiny(family)
    ids = long_tokens(seed=2)
    alpha, ent = sinks.sink_and_entropy(model, ids)
    alpha_e, ent_e = sinks.sink_and_entropy(model, ids, backend="eager")
    torch.testing.assert_close(alpha, alpha_e, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_e, atol=1e-5, rtol=0)
    torch.testing.assert_close(sinks.attention_alpha(model, ids), alpha_e, atol=1e-5, rtol=0)
    torch.testing.assert_close(sinks.attention_entropy(model, ids), ent_e, atol=1e-5, rtol=0)
    a = sinks.sink_scores(alpha, min_queries=4)
    b = sinks.sink_scores(alpha_e, min_queries=4)
    assert (a.sink_score - b.sink_score).abs().max() < 1e-5 and a.is_sink.tolist() == b.is_sink.tolist()
    d, d_e = sinks.value_drain(model, ids), sinks.value_drain(model, ids, backend="eager")
    assert (d.alpha_sink - d_e.alpha_sink).abs().max() < 1e-5
    assert (d.v_norm_ratio - d_e.v_norm_ratio).abs().max() < 1e-6
    e, e_e = sinks.entropy_scores(ent), sinks.entropy_scores(ent_e)
    assert (e.mean_entropy - e_e.mean_entropy).abs().max() < 1e-5


def test_entropy_by_hand_on_a_forced_pattern():
    """An edit hook on the pattern makes the layers eager on both engines; the statistics see the edit."""
    model = make_tiny("llama")
    ids = long_tokens(4)

    def uniform(p, hook):
        n = p.shape[-1]
        return (torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]).to(p.dtype).expand_as(p).clone()

    with model.hooks([(lambda n: n.endswith("hook_pattern"), uniform)]):
        ent = sinks.attention_entropy(model, ids)
    torch.testing.assert_close(ent, torch.log(torch.arange(1, 5, dtype=torch.float64)).expand(2, 2, 4, 4))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gemma2"])
def test_kernel_argmax_equals_pattern_hook_argmax(family):
    """Decode-step top-1 keys through the kernel = through the eager pattern (Gemma: sliding-window cache)."""
    model = make_tiny(family)
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    kern = greedy_decode(model, ids, 4, KernelArgmax(model))
    eager = greedy_decode(model, ids, 4, PatternHookArgmax(model))
    assert torch.equal(kern.tokens, eager.tokens)
    assert torch.equal(kern.argmax, eager.argmax)
    assert not any(p.active for p in model.hook_dict.values())


def test_engine_names_are_checked():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="backend must be one of"):
        sinks.attention_alpha(model, long_tokens(), backend="flash")
    with pytest.raises(ValueError, match="PatternHookArgmax"):
        KernelArgmax(model, backend="eager")


# ---------------------------------------------------------------------------- SmolLM2
PROMPT_LEN = 64


@pytest.mark.bundled
def test_smollm_kernel_equals_eager(smollm):
    prompts = sinks.load_domain_prompts()["prose"][:2]
    ids = sinks.sink_tokens(smollm, prompts, PROMPT_LEN)
    kern = collect_attention_stats(smollm, ids, STATS)
    eager = collect_attention_stats(smollm, ids, STATS, backend="eager")
    alpha, alpha_e = sinks.alpha_from_col_sums(kern["col_sum"]), sinks.alpha_from_col_sums(eager["col_sum"])
    torch.testing.assert_close(alpha, alpha_e, atol=1e-5, rtol=0)
    torch.testing.assert_close(kern["row_entropy"], eager["row_entropy"], atol=1e-5, rtol=0)
    top1_equal_except_ties(patterns(smollm, ids), kern["row_argmax"], eager["row_argmax"])
    assert sinks.sink_rate(alpha) == sinks.sink_rate(alpha_e)


# ---------------------------------------------------------------------------- allocations
T_LONG = 2048


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op returns that spans the sequence twice (two dimensions
    of at least `span` positions: a pattern or score matrix, or a slab of one); weights, which span
    it once (e.g. the [vocab, d_model] embedding), do not count."""

    def __init__(self, span: int = T_LONG):
        super().__init__()
        self.span, self.largest, self.shape = span, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and sum(n >= self.span for n in t.shape) >= 2 and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), tuple(t.shape)
        return out


def test_no_t_by_t_tensor_at_2048_tokens_tiny():
    """At T = 2048 the kernel engine's largest tensor is below T x T; the eager engine's is a pattern."""
    model = make_tiny("llama")
    ids = torch.randint(4, VOCAB, (1, T_LONG), generator=torch.Generator().manual_seed(0))
    with LargestTensor() as kern:
        sinks.sink_and_entropy(model, ids)
        sinks.value_drain(model, ids)
    assert kern.largest < T_LONG * T_LONG, kern.shape
    with LargestTensor() as eager:
        sinks.attention_alpha(model, ids, backend="eager")
    assert eager.largest >= model.cfg.n_heads * T_LONG * T_LONG  # the check can see a pattern


@pytest.mark.bundled
def test_no_t_by_t_tensor_at_2048_tokens_smollm(smollm):
    """SmolLM2 at T = 2048: sinks, entropy, value drain and retrieval scoring never create a tensor of
    T x T elements (one head's pattern)."""
    from interp.heads.niah import make_samples

    ids = torch.randint(100, 40000, (1, T_LONG), generator=torch.Generator().manual_seed(0))
    samples = make_samples(smollm.tokenizer, [T_LONG], [0.5])
    with LargestTensor() as mode:
        alpha, ent = sinks.sink_and_entropy(smollm, ids)
        sinks.value_drain(smollm, ids)
        res = score_retrieval(smollm, samples, max_new_tokens=3)
    assert alpha.shape == ent.shape == (1, 30, 9, T_LONG)
    assert res.per_sample.shape == (1, 30, 9)
    assert mode.largest < T_LONG * T_LONG, mode.shape
