"""Neuron decoding against brute force: the whole neurons x vocabulary matrix in float64 from the HF
weights (tiny models), and every activation of a prompt set sorted by hand."""

from __future__ import annotations

import pytest
import torch

from interp.hook_points import get_act_name
from interp.vocab import neuron_top_activations, neuron_vocab_projection, neuron_vocab_table

from conftest import VOCAB, make_tiny


def brute_logits(model, layer: int) -> torch.Tensor:
    """[d_mlp, d_vocab] float64: centre?(W_out[n] * g_post) * g_final @ W_U^T, written out per family from the HF modules."""
    hf, family = model.hf_model, model.cfg.family
    d = lambda t: t.detach().double()
    if family == "gpt2":
        w_out, final = d(hf.transformer.h[layer].mlp.c_proj.weight), hf.transformer.ln_f  # Conv1D: [in, out]
    else:
        block = hf.model.layers[layer]
        w_out, final = d(block.mlp.down_proj.weight).T, hf.model.norm
    if family.startswith("gemma"):
        w_out = w_out * (1 + d(block.post_feedforward_layernorm.weight))
        g = 1 + d(final.weight)
    else:
        g = d(final.weight)
    if family == "gpt2":
        w_out = w_out - w_out.mean(-1, keepdim=True)
    return (w_out * g) @ d(hf.get_output_embeddings().weight).T


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_promoted_and_suppressed_tokens_equal_the_whole_matrix(family):
    model = make_tiny(family)
    neurons = [0, 5, 17, 63]
    # a budget of 3 vocabularies forces blocks of 3 neurons: the streaming is exercised
    frame = neuron_vocab_projection(model, layers=[1, 0], neurons=neurons, top_k=4, budget=3 * VOCAB)
    assert frame.layer.unique().tolist() == [0, 1]
    for layer in (0, 1):
        full = brute_logits(model, layer)[neurons]
        for kind, largest in (("promoted", True), ("suppressed", False)):
            top = full.topk(4, dim=-1, largest=largest)
            rows = frame[(frame.layer == layer) & (frame.kind == kind)].sort_values(["neuron", "rank"])
            assert rows.token_id.to_numpy().reshape(4, 4).tolist() == top.indices.tolist()
            torch.testing.assert_close(torch.tensor(rows.value.to_numpy()).reshape(4, 4), top.values, atol=1e-5, rtol=1e-5)
            assert rows.token.tolist()[:2] == [model.tokenizer.decode([int(i)]) for i in top.indices[0, :2]]


def test_top_activations_equal_every_activation_sorted():
    model = make_tiny("qwen2")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, VOCAB, (5, 6), generator=g)
    mask = torch.ones_like(tokens)
    mask[3, 4:] = 0  # right padding never counts
    neurons = [2, 40]
    frame = neuron_top_activations(model, tokens, layers=1, neurons=neurons, top_k=3, batch_size=2, attention_mask=mask, context=2)
    _, cache = model.run_with_cache(tokens, names_filter=get_act_name("post", 1), attention_mask=mask)
    post = cache[get_act_name("post", 1)]
    for n in neurons:
        found = sorted(((float(post[p, s, n]), p, s) for p in range(5) for s in range(6) if mask[p, s]), reverse=True)[:3]
        rows = frame[frame.neuron == n].sort_values("rank")
        assert list(zip(rows.prompt, rows.pos)) == [(p, s) for _, p, s in found]
        assert rows.value.tolist() == pytest.approx([v for v, _, _ in found], abs=1e-6)
        assert rows.token_id.tolist() == [int(tokens[p, s]) for _, p, s in found]
        p, s = found[0][1], found[0][2]
        before = model.tokenizer.decode(tokens[p, max(0, s - 2):s].tolist())
        assert rows.context.iloc[0] == f"{before}[[{model.tokenizer.decode([int(tokens[p, s])])}]]"


def test_the_table_joins_both_readings_and_strings_work():
    model = make_tiny("mistral")
    prompts = ["w5 w6 w7 w8", "w9 w4 w5", "w7 w7 w6 w5 w4"]  # unequal lengths: padded per batch
    table = neuron_vocab_table(model, prompts, layers=[0], neurons=[1, 2], top_k=2, batch_size=2)
    assert list(table.columns) == ["layer", "neuron", "kind", "rank", "token_id", "token", "value", "prompt", "pos", "context"]
    assert table.groupby("neuron").kind.apply(list).tolist() == [["promoted"] * 2 + ["suppressed"] * 2 + ["activation"] * 2] * 2
    assert table[table.kind != "activation"].prompt.isna().all()
    acts = table[table.kind == "activation"]
    lengths = [4, 3, 5]
    assert all(0 <= s < lengths[p] for p, s in zip(acts.prompt, acts.pos))
    alone = neuron_vocab_table(model, None, layers=0, neurons=[1], top_k=2)
    assert set(alone.kind) == {"promoted", "suppressed"} and alone.prompt.isna().all()


def test_bad_arguments_say_what_to_do():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="d_mlp = 64"):
        neuron_vocab_projection(model, neurons=[64])
    with pytest.raises(ValueError, match="outside the model's 2 layers"):
        neuron_vocab_projection(model, layers=[2])
    with pytest.raises(ValueError, match="top_k"):
        neuron_vocab_projection(model, top_k=0)
