"""The hook layer on every family: parity with HF, every hook point live, GQA shapes, hook API."""

from __future__ import annotations

import pytest
import torch

from conftest import make_hf, make_tiny

# Hooks present in every family; resid_mid is absent in parallel-residual blocks (GPT-NeoX).
PER_LAYER = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post", "ln1.hook_normalized",
             "ln2.hook_normalized", "mlp.hook_post", "attn.hook_q", "attn.hook_k", "attn.hook_v",
             "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result"]


def test_no_hooks_logits_equal_hf_exactly(family, tokens):
    model = make_tiny(family)
    reference = make_hf(family)  # same seed, untouched HF model, same attention implementation
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens).logits)
        # Caching non-pattern hooks does not change a single bit either.
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "pattern" not in n and "scores" not in n)
    assert torch.equal(logits, reference(tokens).logits)
    assert len(cache) > 10


def test_pattern_path_matches_hf_eager(family, tokens):
    model = make_tiny(family)
    eager = make_hf(family, attn="eager")
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        out = eager(tokens, output_attentions=True)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    for l, attn in enumerate(out.attentions):
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_pattern"], attn, atol=1e-6, rtol=1e-5)


def test_residual_hooks_read_hf_hidden_states(family, tokens):
    model = make_tiny(family)
    with torch.no_grad():
        # Without pattern hooks attention stays on SDPA, as in the reference run: exact equality.
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: "pattern" not in n and "scores" not in n)
        hidden = model.hf_model(tokens, output_hidden_states=True).hidden_states
    for l in range(model.cfg.n_layers):
        assert torch.equal(cache[f"blocks.{l}.hook_resid_pre"], hidden[l])
        post = cache[f"blocks.{l}.hook_resid_post"]
        if l + 1 < model.cfg.n_layers:
            assert torch.equal(post, cache[f"blocks.{l + 1}.hook_resid_pre"])
        parts = cache[f"blocks.{l}.hook_resid_pre"] + cache[f"blocks.{l}.hook_attn_out"]
        if model.cfg.parallel_attn_mlp:
            torch.testing.assert_close(post, parts + cache[f"blocks.{l}.hook_mlp_out"])
        else:
            assert torch.equal(cache[f"blocks.{l}.hook_resid_mid"], parts)
            torch.testing.assert_close(post, parts + cache[f"blocks.{l}.hook_mlp_out"])
    # hook_result sums over heads (plus the output bias) to the attention output before any post-norm.
    l = 1
    result = cache[f"blocks.{l}.attn.hook_result"]
    z = cache[f"blocks.{l}.attn.hook_z"]
    o = model.adapter.layers[l].o_proj
    torch.testing.assert_close(result.sum(2) + (o.bias if o.bias is not None else 0), o(z.flatten(-2)), atol=1e-5, rtol=1e-5)


def _names(model):
    names = ["hook_embed", "ln_final.hook_normalized"] + [f"blocks.{l}.{h}" for l in range(2) for h in PER_LAYER]
    if not model.cfg.parallel_attn_mlp:
        names += [f"blocks.{l}.hook_resid_mid" for l in range(2)]
    if model.cfg.family != "gpt2":
        names += [f"blocks.{l}.attn.hook_rot_{x}" for l in range(2) for x in "qk"]
    else:
        names.append("hook_pos_embed")
    return names


def test_every_hook_point_is_live(family, tokens):
    """Editing any hook point changes the logits; a hook that silently does nothing fails here."""
    model = make_tiny(family)
    names = _names(model)
    assert set(names) <= set(model.hook_names())
    with torch.no_grad():
        clean = model(tokens)
        for name in names:
            def scramble(x, hook):
                if hook.name.endswith("hook_pattern"):  # stays a distribution: uniform over all keys
                    return torch.full_like(x, 1.0 / x.shape[-1])
                # A fixed random direction: survives the final norm (scaling alone would not).
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
                if hook.name.endswith("hook_attn_scores"):  # masked entries hold the dtype's minimum
                    return x + noise
                return x + noise * (x.std() + 0.1)

            edited = model.run_with_hooks(tokens, fwd_hooks=[(name, scramble)])
            assert (edited - clean).abs().max() > 1e-4, f"editing {name} did not change the logits"
    # Hooks are gone after run_with_hooks.
    assert all(not p.active for p in model.hook_dict.values())
    assert torch.equal(model(tokens), clean)


def test_gqa_shapes(family, tokens):
    model = make_tiny(family)
    c = model.cfg
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: True)  # every hook, hook_result included
        _, default = model.run_with_cache(tokens)
    assert set(default) == set(cache) - {f"blocks.{l}.attn.hook_result" for l in range(c.n_layers)}
    b, s = tokens.shape
    assert cache["blocks.0.attn.hook_q"].shape == (b, s, c.n_heads, c.d_head)
    assert cache["blocks.0.attn.hook_k"].shape == (b, s, c.n_kv_heads, c.d_head)
    assert cache["blocks.0.attn.hook_v"].shape == (b, s, c.n_kv_heads, c.d_head)
    assert cache["blocks.0.attn.hook_z"].shape == (b, s, c.n_heads, c.d_head)
    assert cache["blocks.0.attn.hook_pattern"].shape == (b, c.n_heads, s, s)
    assert cache["blocks.0.attn.hook_result"].shape == (b, s, c.n_heads, c.d_model)


def test_head_zero_ablation_on_z_equals_zeroing_o_proj_columns(tokens):
    model = make_tiny("llama")
    head = 1

    def kill(z, hook):
        z[:, :, head] = 0  # in place, as users write it

    with torch.no_grad():
        hooked = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", kill)])
        ref = make_hf("llama")
        d = model.cfg.d_head
        ref.model.layers[1].self_attn.o_proj.weight[:, head * d:(head + 1) * d] = 0
        expected = ref(tokens).logits
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=1e-5)


def test_resid_mid_edit_equals_attn_out_edit(tokens):
    model = make_tiny("llama")
    delta = torch.randn(32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        via_mid = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_mid", lambda x, hook: x + delta)])
        via_attn = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_out", lambda x, hook: x + delta)])
    torch.testing.assert_close(via_mid, via_attn, atol=1e-5, rtol=1e-5)


def test_backward_hooks_receive_gradients(tokens):
    model = make_tiny("llama")
    grads = {}

    def save(g, hook):
        grads[hook.name] = g.detach()

    with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", save), ("blocks.1.attn.hook_z", save)]):
        logits = model(tokens)
        logits[:, -1, 5].sum().backward()
    assert grads["blocks.0.hook_resid_post"].shape == (2, 7, 32)
    assert grads["blocks.1.attn.hook_z"].abs().sum() > 0
    # Finite-difference check of one gradient entry through the hook layer.
    eps = 1e-3

    def bump(x, hook):
        x = x.clone()
        x[0, 3, 4] += eps
        return x

    with torch.no_grad():
        up = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", bump)])[:, -1, 5].sum()
        base = model(tokens)[:, -1, 5].sum()
    assert abs(float((up - base) / eps) - float(grads["blocks.0.hook_resid_post"][0, 3, 4])) < 1e-2


def test_run_with_hooks_backward_hooks_fire_after_return(tokens):
    model = make_tiny("llama")
    grads = []
    logits = model.run_with_hooks(tokens, bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: grads.append(g))])
    assert all(not p.active for p in model.hook_dict.values())
    logits[0, -1].logsumexp(-1).backward()
    assert len(grads) == 1 and grads[0][1].abs().sum() == 0 and grads[0][0, -1].abs().sum() > 0


def test_unknown_hook_name_suggests_nearest(tokens):
    model = make_tiny("llama")
    with pytest.raises(KeyError, match="blocks.0.attn.hook_pattern"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, hook: x)])
    with pytest.raises(ValueError, match=r"returned \(2, 4\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x[:, :4, 0])])
    assert all(not p.active for p in model.hook_dict.values())


def test_hooks_context_and_filters(tokens):
    model = make_tiny("llama")
    seen = []
    with model.hooks(fwd_hooks=[(lambda n: n.endswith("hook_resid_post"), lambda x, hook: seen.append(hook.layer()))]):
        model(tokens)
    assert seen == [0, 1]
    model(tokens)
    assert seen == [0, 1]
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    assert list(cache) == ["blocks.1.attn.hook_z"]
    assert torch.equal(cache["z", 1], cache["blocks.1.attn.hook_z"])


def test_tokens_and_padding():
    model = make_tiny("llama")
    toks = model.to_tokens(["w5 w6 w7", "w8 w9"])
    assert toks.tolist() == [[5, 6, 7], [8, 9, 1]]
    assert model.to_str_tokens("w5 w6") == ["w5", "w6"]
    assert model.to_tokens("w5", prepend_bos=True).tolist() == [[2, 5]]
    # Right padding with a mask: the real positions match the unpadded run.
    with torch.no_grad():
        batched = model(["w5 w6 w7", "w8 w9"])
        single = model("w8 w9")
    torch.testing.assert_close(batched[1, :2], single[0], atol=1e-5, rtol=1e-5)


def test_fingerprint_follows_the_weights():
    model = make_tiny("llama")
    first = model.fingerprint()
    assert model.fingerprint() == first == make_tiny("llama").fingerprint()
    with torch.no_grad():
        model.adapter.layers[0].o_proj.weight[0, 0] += 1.0  # in place
    edited = model.fingerprint()
    assert edited != first
    model.hf_model.to(torch.bfloat16)
    assert model.fingerprint() not in (first, edited)
