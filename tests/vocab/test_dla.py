"""Direct logit attribution against float64 references read straight from the HF modules: the parts
sum to the model's logit difference on every tiny family (pre-softcap on Gemma 2), heads equal their
hook_result through the frozen norms, neurons sum to their MLP, and the same on SmolLM2's IOI."""

from __future__ import annotations

import pytest
import torch

from interp.hook_points import get_act_name
from interp.vocab import direct_logit_attribution

from conftest import make_tiny

ANSWERS = torch.tensor([[5, 9], [11, 12], [40, 41]])


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 7 tokens; the last is right-padded after 5 real tokens."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 100, (3, 7), generator=g)
    mask = torch.ones_like(tokens)
    mask[2, 5:] = 0
    return tokens, mask


LAST = torch.tensor([6, 6, 4])


# ---------------------------------------------------------------------------- an independent float64 reference
def hf_final_norm(model):
    hf = model.hf_model
    return {"gpt2": lambda: hf.transformer.ln_f, "gpt_neox": lambda: hf.gpt_neox.final_layer_norm}.get(
        model.cfg.family, lambda: hf.model.norm)()


def hf_blocks(model):
    hf = model.hf_model
    return {"gpt2": lambda: hf.transformer.h, "gpt_neox": lambda: hf.gpt_neox.layers}.get(model.cfg.family, lambda: hf.model.layers)()


def gemma(family: str) -> bool:
    """Gemma 2/3 (model_type gemma2, gemma3_text): (1 + w) norms, and a norm on each sublayer's output."""
    return family.startswith("gemma")


def frozen64(x: torch.Tensor, resid: torch.Tensor, norm, family: str) -> torch.Tensor:
    """The norm module's map at `resid`, scale frozen, on x (float64, no bias), written out per norm class."""
    x, resid, w = x.double(), resid.double(), norm.weight.detach().double()
    if isinstance(norm, torch.nn.LayerNorm):
        s = 1 / torch.sqrt(resid.var(-1, unbiased=False, keepdim=True) + norm.eps)
        return (x - x.mean(-1, keepdim=True)) * s * w
    if gemma(family):
        return x / torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + w)
    return x / torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * w


def direction(model, answers: torch.Tensor) -> torch.Tensor:
    w_u = model.hf_model.get_output_embeddings().weight.detach().double()
    return w_u[answers[:, 0]] - w_u[answers[:, 1]]


def last(t: torch.Tensor) -> torch.Tensor:
    return t[torch.arange(len(LAST)), LAST]


def run(model, names):
    tokens, mask = inputs()
    logits, cache = model.run_with_cache(tokens, names_filter=names, attention_mask=mask)
    return logits, cache


def per_prompt(frame, component=None):
    rows = frame if component is None else frame[frame.component == component]
    return torch.tensor(rows.groupby("prompt", sort=True).dla.sum().to_numpy())


# ---------------------------------------------------------------------------- the sum
@pytest.mark.parametrize("by", ["component", "head", "neuron"])
def test_parts_sum_to_the_models_logit_difference(family, by):
    model = make_tiny(family)
    tokens, mask = inputs()
    frame = direct_logit_attribution(model, tokens, ANSWERS, by=by, attention_mask=mask, reduce="none")
    logits, cache = run(model, ["ln_final.hook_normalized"])
    # pre-softcap logits: the final norm's output through the unembedding, float64
    pre = last(cache["ln_final.hook_normalized"]).double() @ model.hf_model.get_output_embeddings().weight.detach().double().T
    want = pre.gather(1, ANSWERS) @ torch.tensor([1.0, -1.0], dtype=torch.float64)
    got = per_prompt(frame)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(torch.tensor(frame.attrs["model_values"], dtype=torch.float64), want, atol=2e-6, rtol=1e-6)
    model_logits = last(logits).double()
    cap = model.adapter.final_logit_softcapping
    if cap is not None:  # Gemma 2: DLA is defined before the soft-capping, which the model's logits include
        assert family == "gemma2"
        torch.testing.assert_close(torch.tanh(pre / cap) * cap, model_logits, atol=2e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(got, model_logits.gather(1, ANSWERS) @ torch.tensor([1.0, -1.0], dtype=torch.float64),
                                   atol=2e-6, rtol=1e-6)


def test_component_rows_equal_the_hand_computation(family):
    """Each component through the frozen final norm (centred for LayerNorm) and u; the norm's bias its own row."""
    model = make_tiny(family)
    tokens, mask = inputs()
    frame = direct_logit_attribution(model, tokens, ANSWERS, attention_mask=mask, reduce="none")
    n = model.cfg.n_layers
    names = ["hook_embed"] + [get_act_name(k, l) for l in range(n) for k in ("attn_out", "mlp_out")] + [get_act_name("resid_post", n - 1)]
    names += ["hook_pos_embed"] if family == "gpt2" else []
    _, cache = run(model, names)
    resid = last(cache[get_act_name("resid_post", n - 1)])
    norm, u = hf_final_norm(model), direction(model, ANSWERS)
    rows = {"embed": "hook_embed", "pos_embed": "hook_pos_embed",
            **{f"{l}_{k}": get_act_name(k, l) for l in range(n) for k in ("attn_out", "mlp_out")}}
    labels = set(frame.label)
    expected = set(rows) - ({"pos_embed"} if family != "gpt2" else set())
    expected |= {"final_norm_bias"} if isinstance(norm, torch.nn.LayerNorm) else set()
    assert labels == expected
    for label, name in rows.items():
        if label not in labels:
            continue
        comp = last(cache[name].expand(3, *cache[name].shape[1:]))
        want = (frozen64(comp, resid, norm, family) * u).sum(-1)
        got = torch.tensor(frame[frame.label == label].sort_values("prompt").dla.to_numpy())
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
    if isinstance(norm, torch.nn.LayerNorm):
        got = torch.tensor(frame[frame.label == "final_norm_bias"].dla.to_numpy())
        torch.testing.assert_close(got, u @ norm.bias.detach().double())
        # Without centring the parts would not be each part's share: the check above tells them apart.
        uncentred = (last(cache["hook_embed"]).double() / torch.sqrt(resid.double().var(-1, unbiased=False, keepdim=True)
                                                                      + norm.eps) * norm.weight.double() * u).sum(-1)
        assert not torch.allclose(uncentred, torch.tensor(frame[frame.label == "embed"].sort_values("prompt").dla.to_numpy()))


# ---------------------------------------------------------------------------- heads
def head_reference(model, cache, l: int, u: torch.Tensor) -> torch.Tensor:
    """[prompt, head]: hook_result at the last position through the frozen (post-attention and final) norms, dot u."""
    n = model.cfg.n_layers
    result = last(cache[get_act_name("result", l)]).double()  # [prompt, head, d_model]
    family = model.cfg.family
    if gemma(family):
        post = hf_blocks(model)[l].post_attention_layernorm
        result = frozen64(result, result.sum(1, keepdim=True), post, family)  # Gemma's o_proj has no bias
    resid = last(cache[get_act_name("resid_post", n - 1)])[:, None]
    return (frozen64(result, resid, hf_final_norm(model), family) * u[:, None]).sum(-1)


def test_head_dla_equals_hook_result_through_the_frozen_norms(family):
    model = make_tiny(family)
    tokens, mask = inputs()
    n = model.cfg.n_layers
    heads = direct_logit_attribution(model, tokens, ANSWERS, by="head", attention_mask=mask, reduce="none")
    comps = direct_logit_attribution(model, tokens, ANSWERS, attention_mask=mask, reduce="none")
    _, cache = run(model, [get_act_name("result", l) for l in range(n)] + [get_act_name("resid_post", n - 1)])
    u = direction(model, ANSWERS)
    for l in range(n):
        rows = heads[(heads.component == "head") & (heads.layer == l)].sort_values(["prompt", "head"])
        got = torch.tensor(rows.dla.to_numpy()).reshape(3, model.cfg.n_heads)
        torch.testing.assert_close(got, head_reference(model, cache, l, u), atol=1e-7, rtol=1e-6)
        # heads plus the output bias make up the layer's attention part
        layer_rows = heads[(heads.layer == l) & heads.component.isin(["head", "attn_bias"])]
        assert (heads[(heads.layer == l) & (heads.component == "attn_bias")].shape[0] == 3) == (family in ("gpt2", "gpt_neox"))
        torch.testing.assert_close(per_prompt(layer_rows), per_prompt(comps[comps.layer == l], "attn"), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_per_position_heads_split_each_head_by_source_position(family):
    """pattern[last, k] * v[k] @ W_O[h] through the frozen norms, by hand from the HF weights; the parts sum to the head."""
    model = make_tiny(family)
    tokens, mask = inputs()
    n, c = model.cfg.n_layers, model.cfg
    split = direct_logit_attribution(model, tokens, ANSWERS, by="head", per_position=True, attention_mask=mask, reduce="none")
    whole = direct_logit_attribution(model, tokens, ANSWERS, by="head", attention_mask=mask, reduce="none")
    assert split.dla.sum() == pytest.approx(whole.dla.sum(), abs=1e-5)
    heads = split[split.component == "head"]
    summed = heads.groupby(["prompt", "layer", "head"]).dla.sum().to_numpy()
    # the split run attaches hook_pattern (eager attention), the whole one runs SDPA: float32 rounding apart
    torch.testing.assert_close(torch.tensor(summed), torch.tensor(whole[whole.component == "head"].dla.to_numpy()), atol=1e-6, rtol=1e-5)
    # the padded prompt reads nothing from its padding, nor does any prompt read ahead of the last position
    assert (heads[(heads.prompt == 2) & (heads.src_pos > 4)].dla == 0).all()
    l, h = 1, 3
    _, cache = run(model, [get_act_name(k, l) for k in ("pattern", "v", "result")] + [get_act_name("resid_post", n - 1)])
    pattern = cache[get_act_name("pattern", l)].double()[torch.arange(3), h, LAST]  # [prompt, k]
    v = cache[get_act_name("v", l)].double()[:, :, h // c.n_groups]  # [prompt, k, d_head]
    block = hf_blocks(model)[l]
    if family == "gpt2":
        w_o = block.attn.c_proj.weight.detach().double()[h * c.d_head:(h + 1) * c.d_head]  # Conv1D: [in, out]
    else:
        w_o = block.self_attn.o_proj.weight.detach().double()[:, h * c.d_head:(h + 1) * c.d_head].T
    per_k = pattern[..., None] * (v @ w_o)  # [prompt, k, d_model]
    if gemma(family):
        whole_out = last(cache[get_act_name("result", l)]).double().sum(1)
        per_k = frozen64(per_k, whole_out[:, None], block.post_attention_layernorm, family)
    resid = last(cache[get_act_name("resid_post", n - 1)])[:, None]
    want = (frozen64(per_k, resid, hf_final_norm(model), family) * direction(model, ANSWERS)[:, None]).sum(-1)
    got = heads[(heads.layer == l) & (heads["head"] == h)].sort_values(["prompt", "src_pos"]).dla.to_numpy()
    torch.testing.assert_close(torch.tensor(got).reshape(3, -1), want, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------- neurons
def test_neurons_plus_the_output_bias_make_up_their_mlp(family):
    model = make_tiny(family)
    tokens, mask = inputs()
    neurons = direct_logit_attribution(model, tokens, ANSWERS, by="neuron", attention_mask=mask, reduce="none")
    comps = direct_logit_attribution(model, tokens, ANSWERS, attention_mask=mask, reduce="none")
    for l in range(model.cfg.n_layers):
        rows = neurons[(neurons.layer == l) & neurons.component.isin(["neuron", "mlp_bias"])]
        assert rows[rows.component == "neuron"].neuron.nunique() == model.cfg.d_mlp
        torch.testing.assert_close(per_prompt(rows), per_prompt(comps[comps.layer == l], "mlp"), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt_neox"])
def test_a_neuron_is_its_activation_times_its_output_weight(family):
    model = make_tiny(family)
    tokens, mask = inputs()
    n, l = model.cfg.n_layers, 0
    frame = direct_logit_attribution(model, tokens, ANSWERS, by="neuron", attention_mask=mask, reduce="none")
    _, cache = run(model, [get_act_name("post", l), get_act_name("resid_post", n - 1)])
    block = hf_blocks(model)[l]
    down = block.mlp.dense_4h_to_h if family == "gpt_neox" else block.mlp.down_proj
    writes = last(cache[get_act_name("post", l)]).double()[..., None] * down.weight.detach().double().T  # [prompt, neuron, d_model]
    if gemma(family):
        writes = frozen64(writes, writes.sum(1, keepdim=True), block.post_feedforward_layernorm, family)
    resid = last(cache[get_act_name("resid_post", n - 1)])[:, None]
    want = (frozen64(writes, resid, hf_final_norm(model), family) * direction(model, ANSWERS)[:, None]).sum(-1)
    got = frame[(frame.component == "neuron") & (frame.layer == l)].sort_values(["prompt", "neuron"]).dla.to_numpy()
    torch.testing.assert_close(torch.tensor(got).reshape(3, -1), want, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------- inputs and errors
def test_a_single_answer_reads_the_logit_and_the_mean_frame_averages_prompts():
    model = make_tiny("llama")
    tokens, mask = inputs()
    frame = direct_logit_attribution(model, tokens, ANSWERS[:, 0], attention_mask=mask)
    logits = model(tokens, attention_mask=mask)
    want = last(logits).double().gather(1, ANSWERS[:, :1]).mean()
    assert frame.attrs["metric"] == "logit" and "prompt" not in frame.columns
    assert frame.dla.sum() == pytest.approx(float(want), abs=2e-6)
    assert frame.attrs["positions"] == LAST.tolist()


def test_prompt_pairs_and_string_answers_are_accepted():
    from interp.circuits.tasks.base import PromptPairs

    model = make_tiny("mistral")
    tokens, _ = inputs()
    answers = torch.tensor([[5, 9], [6, 7], [8, 4]])  # one-digit words: the tiny word tokenizer splits "w11"
    pairs = PromptPairs(tokens, tokens.clone(), answers)
    a = direct_logit_attribution(model, pairs)
    b = direct_logit_attribution(model, tokens, [[f"w{i}" for i in row] for row in answers.tolist()])
    assert a.dla.tolist() == pytest.approx(b.dla.tolist())
    assert a.attrs["answers"][0] == ["w5", "w9"]


def test_bad_arguments_say_what_to_do():
    model = make_tiny("llama")
    tokens, _ = inputs()
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        direct_logit_attribution(model, tokens, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary"):
        direct_logit_attribution(model, tokens, torch.tensor([1, 2, 500]))
    with pytest.raises(ValueError, match="by must be one of"):
        direct_logit_attribution(model, tokens, ANSWERS, by="layer")
    with pytest.raises(ValueError, match="by='head'"):
        direct_logit_attribution(model, tokens, ANSWERS, per_position=True)
    with pytest.raises(ValueError, match="answer_tokens is required"):
        direct_logit_attribution(model, tokens)
    with pytest.raises(ValueError, match="not one"):
        direct_logit_attribution(model, "w5 w6", [["w5 w6", "w7"]])


# ---------------------------------------------------------------------------- SmolLM2
@pytest.mark.bundled
def test_smollm2_ioi_heads_and_neurons_sum_to_the_logit_difference(smollm):
    from interp.circuits.tasks.ioi import ioi_prompts

    pairs = ioi_prompts(smollm, 4)
    n = smollm.cfg.n_layers
    logits, cache = smollm.run_with_cache(pairs.clean_tokens, names_filter=[get_act_name("result", l) for l in range(n)]
                                          + [get_act_name("resid_post", n - 1)])
    want = logits[:, -1].double().gather(1, pairs.answer_tokens) @ torch.tensor([1.0, -1.0], dtype=torch.float64)
    heads = direct_logit_attribution(smollm, pairs, by="head", reduce="none")
    torch.testing.assert_close(per_prompt(heads), want, atol=1e-4, rtol=1e-5)
    assert float(want.mean()) > 0  # the model prefers the indirect object
    # heads against hook_result through the adapter's frozen final norm and the unembedding
    u = direction(smollm, pairs.answer_tokens).float()
    resid = cache[get_act_name("resid_post", n - 1)][:, -1]
    for l in (0, n // 2, n - 1):
        stack = cache[get_act_name("result", l)][:, -1].transpose(0, 1)  # [head, prompt, d_model]
        ref = (smollm.apply_final_norm_frozen(stack, resid).double() * u.double()).sum(-1).T  # [prompt, head]
        got = heads[(heads.component == "head") & (heads.layer == l)].sort_values(["prompt", "head"]).dla.to_numpy()
        torch.testing.assert_close(torch.tensor(got).reshape(4, -1), ref, atol=1e-5, rtol=1e-4)
    neurons = direct_logit_attribution(smollm, pairs, by="neuron", reduce="none")
    torch.testing.assert_close(per_prompt(neurons), want, atol=1e-4, rtol=1e-5)
