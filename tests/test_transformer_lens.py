"""Agreement with TransformerLens's TransformerBridge (transformer-lens 4.x) at the shared hook names."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import interp

from conftest import make_hf, word_tokenizer

SHARED = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
          "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern"]


def bridge_for(directory, hf_model):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        str(directory), hf_model=hf_model, tokenizer=AutoTokenizer.from_pretrained(directory), device="cpu"
    )


def compare(ours: interp.HookedModel, bridge, tokens: torch.Tensor) -> None:
    names = [f"blocks.{l}.{h}" for l in range(ours.cfg.n_layers) for h in SHARED]
    with torch.no_grad():
        our_logits, our_cache = ours.run_with_cache(tokens, names_filter=names)
        tl_logits, tl_cache = bridge.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(our_logits, tl_logits, atol=1e-4, rtol=1e-4)
    for name in names:
        torch.testing.assert_close(our_cache[name], tl_cache[name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tiny_models_match_bridge(family, tmp_path, tokens):
    make_hf(family).save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    ours = interp.load(tmp_path)
    bridge = bridge_for(tmp_path, make_hf(family))  # its own instance: the bridge may alter the module
    compare(ours, bridge, tokens)


def test_smollm2_matches_bridge(smollm):
    from interp.models.bundled import bundled_gguf, converted_dir

    directory = converted_dir(bundled_gguf("smollm2-135m"))
    bridge = bridge_for(directory, AutoModelForCausalLM.from_pretrained(directory))
    compare(smollm, bridge, smollm.to_tokens("The Eiffel Tower is in the city of Paris, which"))
