"""Gemma 3 specifics on a tiny config: sliding-window layers, one KV head, pre/post norms."""

from __future__ import annotations

import torch

from conftest import make_tiny


def test_sliding_layers_see_only_their_window():
    model = make_tiny("gemma3")
    assert model.cfg.n_kv_heads == 1 and model.cfg.layer_types == ("sliding_attention", "full_attention")
    window = model.cfg.sliding_window
    tokens = torch.arange(4, 16)[None]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: "pattern" in n or n.endswith("hook_k"))
    q = torch.arange(12)[:, None]
    k = torch.arange(12)[None, :]
    outside = (k > q) | (q - k >= window)  # HF's window: a query sees the last `window` keys, itself included
    sliding = cache["blocks.0.attn.hook_pattern"]
    assert torch.all(sliding[..., outside] == 0)
    assert torch.all(sliding[..., ~outside] > 0)
    full = cache["blocks.1.attn.hook_pattern"]
    assert torch.all(full[..., k > q] == 0) and torch.all(full[..., (q - k >= window)] > 0)
    torch.testing.assert_close(sliding.sum(-1), torch.ones_like(sliding.sum(-1)))
    assert cache["blocks.0.attn.hook_k"].shape == (1, 12, 1, 8)


def test_post_norms_are_inside_attn_out_and_mlp_out():
    model = make_tiny("gemma3")
    layer = model.adapter.layers[0].block
    tokens = torch.arange(4, 12)[None]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0.") and "pattern" not in n)
        o = layer.self_attn.o_proj(cache["blocks.0.attn.hook_z"].flatten(-2))
        torch.testing.assert_close(cache["blocks.0.hook_attn_out"], layer.post_attention_layernorm(o))
        mlp = layer.mlp(layer.pre_feedforward_layernorm(cache["blocks.0.hook_resid_mid"]))
        torch.testing.assert_close(cache["blocks.0.hook_mlp_out"], layer.post_feedforward_layernorm(mlp))
    assert torch.equal(cache["blocks.0.hook_resid_mid"], cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_attn_out"])
    # ln2 is the pre-feed-forward norm, not Gemma's (confusingly named) post-attention norm.
    torch.testing.assert_close(cache["blocks.0.ln2.hook_normalized"], layer.pre_feedforward_layernorm(cache["blocks.0.hook_resid_mid"]))
