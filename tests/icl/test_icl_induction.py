"""Induction scores on scripted tiny llamas whose attention is known by construction, the
repeat losses, and mean ablation of head sets (Yin & Steinhardt 2025)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import interp
from interp.icl import (
    ablated_accuracy,
    ablated_repeat_losses,
    head_stats,
    induction_score_from_pattern,
    length_groups,
    make_prompts,
    overlap,
    repeat_losses,
    repeat_run,
    repeated_tokens,
    top_heads,
)
from interp.icl.tasks import ICLTask

from conftest import make_tiny, word_tokenizer

S = 6  # repeated sequence length


def uniform_score(seq_len: int) -> float:
    """A head attending uniformly over keys 0..q gives key q - S + 1 the weight 1 / (q + 1)."""
    return sum(1 / (q + 1) for q in range(seq_len + 1, 2 * seq_len + 1)) / seq_len


def scripted_llama(offset: int) -> interp.HookedModel:
    """One layer, 4 heads, q and k constant (zero weights, scripted biases), so RoPE alone sets the scores.

    Each pair i of head 0 has k = (1, 0) and q = A (cos(offset theta_i), -sin(offset theta_i)): its score
    q_rot . k_rot = A cos((q - k - offset) theta_i) peaks at key = query - offset, for every pair at once.
    Heads 1..3 have q = 0: every score is 0, attention is uniform over the causal keys.
    """
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=8, attention_bias=True, max_position_embeddings=64,
                      rope_parameters={"rope_type": "default", "rope_theta": 10.0})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    attn = hf.model.layers[0].self_attn
    d, half = 8, 4
    theta = 10.0 ** (-torch.arange(half, dtype=torch.float32) * 2 / d)
    A = 200.0
    q_bias = torch.zeros(4, d)
    q_bias[0, :half], q_bias[0, half:] = A * torch.cos(offset * theta), -A * torch.sin(offset * theta)
    k_bias = torch.zeros(4, d)
    k_bias[:, :half] = 1.0
    with torch.no_grad():
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        attn.q_proj.bias.copy_(q_bias.flatten())
        attn.k_proj.bias.copy_(k_bias.flatten())
    return interp.load(hf, tokenizer=word_tokenizer())


def test_score_from_a_perfect_and_a_uniform_pattern():
    n = 1 + 2 * S
    perfect = torch.zeros(2, 1, n, n)
    for q in range(n):
        perfect[:, 0, q, q - S + 1 if q > S else 0] = 1.0
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    scores = induction_score_from_pattern(torch.cat([perfect, uniform.expand(2, 1, n, n)], dim=1), S)
    assert scores.tolist() == pytest.approx([1.0, uniform_score(S)], abs=1e-6)
    with pytest.raises(ValueError, match="positions"):
        induction_score_from_pattern(perfect, S + 1)


def test_scripted_induction_offset_head_scores_one_and_uniform_heads_the_known_value():
    model = scripted_llama(offset=S - 1)
    tokens = repeated_tokens(model, S, batch=3, seed=1, low=40, high=100)
    assert tokens.shape == (3, 1 + 2 * S) and torch.equal(tokens[:, 1 : S + 1], tokens[:, S + 1 :])
    rep = repeat_run(model, tokens, S)
    assert float(rep.scores[0, 0]) > 0.999
    assert rep.scores[0, 1:].tolist() == pytest.approx([uniform_score(S)] * 3, abs=1e-5)
    assert top_heads(rep.scores, 1) == [(0, 0)]


def test_scripted_previous_token_head_scores_zero():
    rep = repeat_run(scripted_llama(offset=1), repeated_tokens(scripted_llama(offset=1), S, 2, low=40, high=100), S)
    assert float(rep.scores[0, 0]) < 1e-3


def test_repeat_losses_by_hand():
    tokens = torch.tensor([[2, 5, 6, 7, 5, 6, 7]])  # S = 3
    logits = torch.zeros(1, 7, 10)
    logits[0, 4, 6] = logits[0, 5, 7] = 50.0  # the second copy's tokens 2..3 predicted with certainty
    first, second = repeat_losses(logits, tokens, 3)
    assert first == pytest.approx(float(torch.log(torch.tensor(10.0))), abs=1e-5)
    assert second == pytest.approx(0.0, abs=1e-5)


def test_mean_ablation_of_nothing_is_the_clean_run_and_of_heads_changes_it():
    model = make_tiny("llama")
    task = ICLTask("succ", tuple((f"w{i}", f"w{i + 1}") for i in range(40, 89)))
    groups = length_groups(model, make_prompts(model, task, 3, 4, seed=0))
    stats = head_stats(model, groups)
    assert ablated_accuracy(model, [], groups, stats.all_mean) == stats.accuracy
    rep = repeat_run(model, repeated_tokens(model, S, 2), S)
    assert ablated_repeat_losses(model, [], rep) == pytest.approx((rep.loss_first, rep.loss_second), abs=1e-6)
    f, s = ablated_repeat_losses(model, [(0, 0), (1, 2)], rep)
    assert abs(f - rep.loss_first) > 1e-6
    assert overlap([(0, 1), (1, 2), (1, 3)], [(1, 3), (0, 0), (0, 1)]) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="vocabulary"):
        repeated_tokens(model, S, low=50, high=500)
