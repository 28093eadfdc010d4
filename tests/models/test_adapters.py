"""The adapter's per-family facts and operations (interp/models/adapters.py) on every tiny family.

References: the HF model's own modules and forward, and the frozen-norm maths as `interp.cache`
had it at ecc1a02 (copied below, so the numbers stay pinned when cache.py calls the adapter).
"""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoModelForCausalLM, OlmoConfig

from interp.models.adapters import build_adapter, checkpoint_name

from conftest import family_config, make_hf, make_tiny


def frozen_norm_at_ecc1a02(norm: torch.nn.Module, stack: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """interp/cache.py::frozen_norm at ecc1a02, verbatim."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or getattr(norm, "epsilon", 1e-6)
    x = resid.float()
    if isinstance(norm, torch.nn.LayerNorm):
        centred = stack.float() - stack.float().mean(-1, keepdim=True)
        scale = torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
        return (centred * scale * norm.weight.float()).to(stack.dtype)
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    weight = norm.weight.float()
    if "Gemma" in type(norm).__name__:
        weight = 1.0 + weight
    return (stack.float() * scale * weight).to(stack.dtype)


def _randomise_final_norm(adapter) -> None:
    """Random weights (and bias): Gemma's norms start at w = 0, where (1 + w) and w are easy to mix up."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.final_norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_d_mlp_is_the_width_of_the_mlp_hidden_activation(family, tokens):
    model = make_tiny(family)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_post")
    assert model.cfg.d_mlp == cache["blocks.0.mlp.hook_post"].shape[-1]
    config = family_config(family)
    expected = (config.n_inner or 4 * config.n_embd) if family == "gpt2" else config.intermediate_size
    assert model.cfg.d_mlp == expected


def test_gpt2_d_mlp_follows_n_inner():
    config = family_config("gpt2")
    config.n_inner = 48
    hf = AutoModelForCausalLM.from_config(config)
    assert build_adapter(hf).cfg.d_mlp == 48 == hf.transformer.h[0].mlp.c_fc.nf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_norm_frozen_equals_the_old_frozen_norm(family, dtype):
    adapter = build_adapter(make_hf(family).to(dtype))
    _randomise_final_norm(adapter)
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(5, 2, 3, adapter.cfg.d_model, generator=g, dtype=dtype)
    resid = torch.randn(2, 3, adapter.cfg.d_model, generator=g, dtype=dtype) * 4
    got = adapter.apply_norm_frozen(stack, resid)
    assert got.dtype == dtype and got.shape == stack.shape
    assert torch.equal(got, frozen_norm_at_ecc1a02(adapter.final_norm, stack, resid))


def test_apply_norm_frozen_of_the_residual_itself_is_the_norm_minus_its_bias(family):
    adapter = build_adapter(make_hf(family))
    _randomise_final_norm(adapter)
    resid = torch.randn(2, 3, adapter.cfg.d_model, generator=torch.Generator().manual_seed(1)) * 4
    parts = torch.stack([resid * 0.25, resid * 0.75])  # components summing to resid
    bias = getattr(adapter.final_norm, "bias", None)
    expected = adapter.final_norm(resid) - (bias if bias is not None else 0)
    torch.testing.assert_close(adapter.apply_norm_frozen(parts, resid).sum(0), expected, atol=1e-5, rtol=1e-5)


def test_olmo_norm_without_weight():
    """OLMo's final norm is a LayerNorm with no weight and eps 1e-5 (the old frozen_norm crashed on it)."""
    torch.manual_seed(0)
    olmo = AutoModelForCausalLM.from_config(OlmoConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, max_position_embeddings=128)).eval()
    adapter = build_adapter(olmo)
    assert adapter.final_norm_spec.kind == "layernorm" and adapter.cfg.d_mlp == 64
    resid = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1)) * 4
    torch.testing.assert_close(adapter.apply_norm_frozen(resid[None], resid)[0], adapter.final_norm(resid), atol=1e-5, rtol=1e-5)


def test_apply_unembed_gives_the_models_logits(family, tokens):
    """Final logit soft-capping included (the tiny Gemma 2 caps at 30)."""
    hf = make_hf(family)
    adapter = build_adapter(hf)
    with torch.no_grad():
        out = hf(input_ids=tokens, output_hidden_states=True)
        torch.testing.assert_close(adapter.apply_unembed(out.hidden_states[-1]), out.logits, atol=1e-5, rtol=0)
    assert (adapter.final_logit_softcapping is not None) == (family == "gemma2")


def test_skip_blocks_feeds_the_residual_to_block_layer_and_restores_the_blocks(family, tokens):
    hf = make_hf(family)
    adapter = build_adapter(hf)
    blocks = [p.block for p in adapter.layers]
    resid = torch.randn(*tokens.shape, adapter.cfg.d_model)
    with torch.no_grad():
        full = hf(input_ids=tokens, output_hidden_states=True)
        with adapter.skip_blocks(1, full.hidden_states[1]):
            assert blocks[0](resid) is full.hidden_states[1]
            resumed = hf(input_ids=tokens).logits
    torch.testing.assert_close(resumed, full.logits, atol=2e-5, rtol=0)
    assert all("forward" not in vars(b) for b in blocks)
    with pytest.raises(RuntimeError, match="inside"):
        with adapter.skip_blocks(2, resid):
            raise RuntimeError("inside")
    assert all("forward" not in vars(b) for b in blocks)
    with pytest.raises(ValueError, match="layer"):
        with adapter.skip_blocks(3, resid):
            pass


def test_checkpoint_name(tmp_path):
    hf = make_hf("llama")
    assert checkpoint_name(hf) == "LlamaForCausalLM"
    hf.config._name_or_path = str(tmp_path)
    assert checkpoint_name(hf) == str(tmp_path)
    assert checkpoint_name(types.SimpleNamespace(config=types.SimpleNamespace())) == "SimpleNamespace"
