"""Sink metrics against hand-worked patterns and float64 recomputation from cached activations."""

from __future__ import annotations

import pytest
import torch

from interp.heads import sinks
from interp.heads.reducers import col_sums_of_pattern, collect_col_sums

from conftest import make_tiny

# A hand-built 4x4 causal pattern (rows sum to 1) and its alpha, worked by hand:
# column sums 2.5, 0.8, 0.5, 0.2 over 4, 3, 2, 1 queries.
P = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.6, 0.2, 0.2, 0], [0.4, 0.1, 0.3, 0.2]])
ALPHA = torch.tensor([2.5 / 4, 0.8 / 3, 0.5 / 2, 0.2 / 1], dtype=torch.float64)
# A head that keeps little on the first token: alpha(0) = (1 + .2 + .1 + .1) / 4 = 0.35, still > 0.3;
# and one below: alpha(0) = (1 + 0 + 0 + 0) / 4 = 0.25.
Q = torch.tensor([[1.0, 0, 0, 0], [0.2, 0.8, 0, 0], [0.1, 0.1, 0.8, 0], [0.1, 0.1, 0.1, 0.7]])
R = torch.tensor([[1.0, 0, 0, 0], [0.0, 1.0, 0, 0], [0.0, 0.5, 0.5, 0], [0.0, 0.0, 0.5, 0.5]])


def test_alpha_of_hand_built_pattern():
    alpha = sinks.alpha_from_col_sums(col_sums_of_pattern(P[None, None]))
    torch.testing.assert_close(alpha[0, 0], ALPHA)


def test_sink_rate_hand_worked():
    pats = torch.stack([P, Q, R])[None]  # [batch 1, head 3, q, k]
    alpha = sinks.alpha_from_col_sums(col_sums_of_pattern(pats))[:, None]  # [1, layer 1, head 3, k]
    torch.testing.assert_close(alpha[0, 0, :, 0], torch.tensor([0.625, 0.35, 0.25], dtype=torch.float64))
    assert sinks.sink_rate(alpha, k=0, eps=0.3) == pytest.approx(200 / 3)
    # alpha(1): P .8/3 = .267, Q (.8 + .1 + .1)/3 = .333, R (1 + .5)/3 = .5
    assert sinks.sink_rate(alpha, k=1, eps=0.3) == pytest.approx(200 / 3)
    assert sinks.sink_rate(alpha, k=0, eps=0.5) == pytest.approx(100 / 3)


def test_sink_rate_thresholds_per_prompt_then_averages():
    # Gu et al.: the indicator is averaged over prompts, not alpha. alpha(0) = .9 and .1 -> 50%,
    # though the prompt-mean alpha (.5) is above eps.
    alpha = torch.zeros(2, 1, 1, 4, dtype=torch.float64)
    alpha[0, 0, 0, 0], alpha[1, 0, 0, 0] = 0.9, 0.1
    assert sinks.sink_rate(alpha) == pytest.approx(50.0)
    df = sinks.sink_scores(alpha, min_queries=1)
    assert df.loc[0, "sink_score"] == pytest.approx(0.5)
    assert df.loc[0, "sink_share"] == pytest.approx(0.5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_collect_col_sums_matches_float64_from_patterns(family, tokens):
    model = make_tiny(family)
    sums = collect_col_sums(model, tokens)
    assert sums.shape == (2, 2, 4, 7)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(2)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    T = tokens.shape[1]
    for l in range(2):
        A = cache["pattern", l].double()
        expected = torch.stack([A[:, :, k:, k].mean(-1) for k in range(T)], dim=-1)  # mean over i >= k
        torch.testing.assert_close(sinks.alpha_from_col_sums(sums[:, l]), expected, atol=1e-6, rtol=0)
    assert not any(p.active for p in model.hook_dict.values())  # the reducer left nothing attached


def test_forced_pattern_gives_hand_worked_metric(tokens):
    """An edit hook puts P in every head's first 4x4 block; the reducer sees exactly that."""
    model = make_tiny("llama")
    toks = tokens[:, :4]

    def force(p, hook):
        return P.to(p.dtype).expand_as(p).clone()

    with model.hooks([(lambda n: n.endswith("hook_pattern"), force)]):
        alpha = sinks.attention_alpha(model, toks)
    torch.testing.assert_close(alpha, ALPHA.expand(2, 2, 4, 4))
    assert sinks.sink_rate(alpha) == 100.0


def test_secondary_sinks_found_with_their_layers():
    alpha = torch.zeros(1, 3, 2, 40, dtype=torch.float64)
    alpha[..., 0] = 0.8  # the first token is never secondary
    alpha[0, 1, 0, 5] = 0.3
    alpha[0, 2, 1, 5] = 0.15
    alpha[0, 2, 0, 9] = 0.05  # below threshold
    alpha[0, 0, 0, 39] = 0.9  # the last key: one query, left out by min_queries
    df = sinks.secondary_sinks(alpha, min_queries=16)
    assert df[["prompt", "position", "n_heads", "first_layer", "last_layer", "n_layers"]].values.tolist() == [[0, 5, 2, 1, 2, 2]]
    assert df.loc[0, "layers"] == [1, 2] and df.loc[0, "max_alpha"] == pytest.approx(0.3)
    per_layer = sinks.secondary_sink_layers(alpha, min_queries=16)
    assert per_layer.n_secondary.tolist() == [0, 1, 1]
    scores = sinks.sink_scores(alpha, min_queries=16)
    assert scores.set_index(["layer", "head"]).loc[(1, 0), "n_secondary"] == 1.0
    assert scores.set_index(["layer", "head"]).loc[(0, 0), "n_secondary"] == 0.0


def test_extreme_tokens_and_value_drain_match_cache(tokens):
    model = make_tiny("llama")
    ext = sinks.extreme_tokens(model, tokens)
    drain = sinks.value_drain(model, tokens)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("resid_post", "attn.hook_v")))
    for l in range(2):
        h = cache["resid_post", l].double()
        norms = h.norm(dim=-1)
        assert ext.loc[l, "resid_norm_sink"] == pytest.approx(float(norms[:, 0].mean()), rel=1e-5)
        assert ext.loc[l, "resid_norm_ratio"] == pytest.approx(float((norms[:, 0] / norms.median(1).values).mean()), rel=1e-5)
        assert ext.loc[l, "max_abs"] == pytest.approx(float(h.abs().max()), rel=1e-6)
        pos, dim = divmod(int(h[0].abs().argmax()), h.shape[-1])
        assert (ext.loc[l, "max_abs_pos"], ext.loc[l, "max_abs_dim"]) == (pos, dim)
        v = cache["v", l].double().norm(dim=-1)  # [b, pos, kv]
        for head in range(4):
            kv = head // 2
            row = drain[(drain.layer == l) & (drain["head"] == head)].iloc[0]
            assert row.kv_head == kv
            assert row.v_norm_ratio == pytest.approx(float((v[:, 0, kv] / v[:, :, kv].median(1).values).mean()), rel=1e-5)
    assert not ext.massive.any() and sinks.first_massive_layer(ext) is None


def test_domain_sinks_columns_and_active_dormant_logic():
    model = make_tiny("llama")
    prompts = {"a": ["w5 w9 w13 w21 w8 w40", "w7 w7 w30 w31 w32 w33"], "b": ["w50 w51 w52 w53 w54 w55"]}
    df = sinks.domain_sinks(model, prompts, length=6, eps=0.3)
    assert len(df) == 8
    alpha_b = sinks.attention_alpha(model, model.to_tokens(prompts["b"]))
    torch.testing.assert_close(torch.tensor(df.sink_b.values), alpha_b[0, :, :, 0].flatten())
    expected = (df.sink_a > 0.3) != (df.sink_b > 0.3)
    assert df.active_dormant.tolist() == expected.tolist()


def test_short_prompt_is_an_error():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="fewer than length=64"):
        sinks.sink_tokens(model, ["w5 w6 w7"])


def test_bundled_prompt_set_loads():
    prompts = sinks.load_domain_prompts()
    assert set(prompts) == {"prose", "code", "numbers"} and all(len(v) >= 4 for v in prompts.values())


@pytest.mark.bundled
def test_smollm_has_first_token_sinks(smollm):
    """Gu et al.: sinks are universal, even in small models. SmolLM2 has no BOS: the first token is text."""
    prompts = sinks.load_domain_prompts()["prose"][:3]
    alpha = sinks.attention_alpha(smollm, sinks.sink_tokens(smollm, prompts))
    assert alpha.shape == (3, 30, 9, 64)
    total = (alpha * torch.arange(64, 0, -1, dtype=torch.float64)).sum(-1)  # sum of all pattern entries
    torch.testing.assert_close(total, torch.full_like(total, 64.0), atol=1e-3, rtol=0)  # 64 rows summing to 1
    assert sinks.sink_rate(alpha) > 20.0
