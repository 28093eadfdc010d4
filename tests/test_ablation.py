"""Head ablation checked against HF's own forward, weight edits and hand-computed patterns."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.heads.ablation import ablate_heads

from conftest import make_hf, make_tiny


def _ref_tokens(seed: int, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(4, 100, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("how", ["zero", "mean", "resample", "uniform"])
def test_no_heads_is_exact_hf(how, tokens):
    hf = make_hf("llama")
    expected = hf(input_ids=tokens).logits
    model = interp.load(hf)
    with ablate_heads(model, heads=[], how=how, reference=_ref_tokens(5)):
        got = model(tokens)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
def test_zero_equals_zeroed_o_proj_columns(family, tokens):
    heads = [(0, 1), (1, 3)]
    model = make_tiny(family)
    with ablate_heads(model, heads, how="zero"):
        got = model(tokens)
    hf = make_hf(family)  # a fresh copy, edited by hand
    model_ref = interp.load(hf)
    d = model.cfg.d_head
    with torch.no_grad():
        for l, h in heads:
            o = model_ref.adapter.layers[l].o_proj
            if type(o).__name__ == "Conv1D":  # GPT-2 stores [in, out]
                o.weight[h * d : (h + 1) * d, :] = 0
            else:
                o.weight[:, h * d : (h + 1) * d] = 0
    expected = hf(input_ids=tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, make_hf(family)(input_ids=tokens).logits, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox"])
def test_uniform_makes_pattern_uniform_over_allowed_keys(family, tokens):
    model = make_tiny(family)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(2)]
    _, clean = model.run_with_cache(tokens, names_filter=names)
    heads = [(0, 2), (1, 0)]
    with ablate_heads(model, heads, how="uniform"):
        _, cache = model.run_with_cache(tokens, names_filter=names)
    T = tokens.shape[1]
    for l, h in heads:
        got = cache["pattern", l][:, h].double()
        allowed = (clean["pattern", l][:, h] > 0).double()  # causal (and sliding-window) keys
        torch.testing.assert_close(got, allowed / allowed.sum(-1, keepdim=True), atol=1e-7, rtol=0)
        if model.cfg.layer_types is None or model.cfg.layer_types[l] == "full_attention":
            i = torch.arange(T, dtype=torch.float64)
            expected = torch.tril(torch.ones(T, T, dtype=torch.float64)) / (i[:, None] + 1)
            torch.testing.assert_close(got, expected.expand_as(got), atol=1e-7, rtol=0)
    # the other heads of an ablated layer are untouched
    torch.testing.assert_close(cache["pattern", 0][:, 0], clean["pattern", 0][:, 0])


def test_uniform_on_gemma3_sliding_layer_is_window_uniform(tokens):
    model = make_tiny("gemma3")
    assert model.cfg.layer_types[0] == "sliding_attention"
    with ablate_heads(model, [(0, 1)], how="uniform"):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    row = cache["pattern", 0][0, 1, -1]  # last query of a window-3 layer
    nz = row[row > 0]
    assert len(nz) == model.cfg.sliding_window
    torch.testing.assert_close(nz, torch.full_like(nz, 1 / len(nz)), atol=1e-7, rtol=0)


@pytest.mark.parametrize("how", ["zero", "uniform", "mean"])
def test_ablation_holds_during_generate(how):
    """Greedy tokens from generate (KV cache) equal argmax of an uncached ablated forward."""
    model = make_tiny("llama")
    prompt = _ref_tokens(3, (1, 5))
    heads = [(0, 0), (0, 3), (1, 1)]
    ref = _ref_tokens(4, (3, 6))
    with ablate_heads(model, heads, how=how, reference=ref):
        out = model.generate(prompt, max_new_tokens=6)
        logits = model(out)
    greedy = logits[0, prompt.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(out[0, prompt.shape[1] :], greedy)
    assert not torch.allclose(model(out), logits, atol=1e-4)  # the ablation did something


def test_uniform_pattern_at_decode_steps():
    model = make_tiny("llama")
    rows = []

    def read(p, hook):
        rows.append(p[0, 2, -1].clone())

    with ablate_heads(model, [(1, 2)], how="uniform"), model.hooks([("blocks.1.attn.hook_pattern", read)]):
        model.generate(_ref_tokens(3, (1, 4)), max_new_tokens=3)
    assert len(rows) == 3  # prefill + 2 decode steps
    for r in rows:
        torch.testing.assert_close(r, torch.full_like(r, 1 / len(r)), atol=1e-7, rtol=0)
    assert [len(r) for r in rows] == [4, 5, 6]


def test_resample_puts_reference_z_in_place(tokens):
    model = make_tiny("qwen2")
    ref = _ref_tokens(9)
    name = "blocks.1.attn.hook_z"
    _, clean_in = model.run_with_cache(tokens, names_filter=name)
    _, clean_ref = model.run_with_cache(ref, names_filter=name)
    with ablate_heads(model, [(1, 2)], how="resample", reference=ref):
        _, cache = model.run_with_cache(tokens, names_filter=name)
    z = cache[name]
    assert torch.equal(z[:, :, 2], clean_ref[name][:, :, 2])
    assert torch.equal(z[:, :, [0, 1, 3]], clean_in[name][:, :, [0, 1, 3]])


def test_resample_broadcasts_batch_of_one_and_rejects_mismatch(tokens):
    model = make_tiny("llama")
    ref = _ref_tokens(9, (1, 7))
    _, clean_ref = model.run_with_cache(ref, names_filter="blocks.0.attn.hook_z")
    with ablate_heads(model, [(0, 1)], how="resample", reference=ref):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    z = cache["blocks.0.attn.hook_z"]
    assert torch.equal(z[0, :, 1], clean_ref["blocks.0.attn.hook_z"][0, :, 1])
    assert torch.equal(z[1, :, 1], clean_ref["blocks.0.attn.hook_z"][0, :, 1])
    with ablate_heads(model, [(0, 1)], how="resample", reference=_ref_tokens(9, (1, 5))):
        with pytest.raises(ValueError, match="5 positions but the input has 7"):
            model(tokens)


def test_mean_is_float64_mean_of_reference_z(tokens):
    model = make_tiny("llama")
    ref = _ref_tokens(11, (3, 6))
    ref_mask = torch.ones(3, 6, dtype=torch.long)
    ref_mask[2, 4:] = 0  # padding is left out of the mean
    name = "blocks.1.attn.hook_z"
    _, clean_ref = model.run_with_cache(ref, names_filter=name, attention_mask=ref_mask)
    zr = clean_ref[name][:, :, 3].double()
    w = ref_mask.double()
    expected = (zr * w[..., None]).sum((0, 1)) / w.sum()
    with ablate_heads(model, [(1, 3)], how="mean", reference=ref, reference_mask=ref_mask):
        _, cache = model.run_with_cache(tokens, names_filter=name)
    got = cache[name][:, :, 3].double()
    torch.testing.assert_close(got, expected.expand_as(got), atol=1e-6, rtol=0)


def test_per_position_mean_of_the_input_itself_changes_nothing():
    model = make_tiny("llama")
    prompt = _ref_tokens(2, (1, 7))
    clean = model(prompt)
    with ablate_heads(model, [(0, 1), (1, 2)], how="mean", reference=prompt, per_position=True):
        got = model(prompt)
    torch.testing.assert_close(got, clean, atol=1e-6, rtol=0)
    with ablate_heads(model, [(0, 1), (1, 2)], how="mean", reference=prompt):  # position-averaged: differs
        assert not torch.allclose(model(prompt), clean, atol=1e-4)


def test_bad_input_errors(tokens):
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="out of range"):
        with ablate_heads(model, [(2, 0)]):
            pass
    with pytest.raises(ValueError, match="how must be one of"):
        with ablate_heads(model, [(0, 0)], how="knockout"):
            pass
    with pytest.raises(ValueError, match="needs `reference`"):
        with ablate_heads(model, [(0, 0)], how="mean"):
            pass
