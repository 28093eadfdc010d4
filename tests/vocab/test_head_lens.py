"""Head lens against hook_result through float64 frozen norms and the unembedding, its agreement with
head DLA, and the vocabulary figures."""

from __future__ import annotations

import pytest
import torch

from interp.hook_points import get_act_name
from interp.vocab import direct_logit_attribution, dla_bar, dla_head_heatmap, head_lens, head_lens_heatmap

from conftest import VOCAB, make_tiny


def reference_logits(model, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """[pos, head, d_vocab] float64 from hook_result and the HF norm modules."""
    n, family = model.cfg.n_layers, model.cfg.family
    _, cache = model.run_with_cache(tokens, names_filter=[get_act_name("result", layer), get_act_name("resid_post", n - 1)])
    result = cache[get_act_name("result", layer)][0].double()  # [pos, head, d_model]
    resid = cache[get_act_name("resid_post", n - 1)][0].double()[:, None]
    hf = model.hf_model
    if family == "gpt_neox":
        final = hf.gpt_neox.final_layer_norm
        result = result - result.mean(-1, keepdim=True)
        s = 1 / torch.sqrt(resid.var(-1, unbiased=False, keepdim=True) + final.eps)
        g = final.weight.double()
    elif family.startswith("gemma"):
        post, final = hf.model.layers[layer].post_attention_layernorm, hf.model.norm
        whole = result.sum(1, keepdim=True)
        result = result / torch.sqrt(whole.pow(2).mean(-1, keepdim=True) + post.eps) * (1 + post.weight.double())
        s = 1 / torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + final.eps)
        g = 1 + final.weight.double()
    else:
        final = hf.model.norm
        s = 1 / torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + final.variance_epsilon)
        g = final.weight.double()
    return (result * s * g) @ hf.get_output_embeddings().weight.double().T


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox"])
def test_head_lens_equals_hook_result_through_the_frozen_norms(family):
    model = make_tiny(family)
    tokens = torch.randint(4, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    frame = head_lens(model, tokens, top_k=3, budget=5 * VOCAB)  # chunks of 5 (pos, head) rows
    assert len(frame) == model.cfg.n_layers * model.cfg.n_heads * 6 * 3
    assert frame.attrs["tokens"] == [model.tokenizer.decode([int(t)]) for t in tokens[0]]
    for layer in range(model.cfg.n_layers):
        top = reference_logits(model, tokens, layer).topk(3, dim=-1)  # [pos, head, 3]
        rows = frame[frame.layer == layer].sort_values(["pos", "head", "rank"])
        assert rows.token_id.to_numpy().reshape(6, -1, 3).tolist() == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(rows.logit.to_numpy()).reshape(6, -1, 3), top.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt2"])
def test_last_position_logits_are_the_heads_dla_on_every_token(family):
    model = make_tiny(family)
    tokens = torch.randint(4, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    frame = head_lens(model, tokens, top_k=VOCAB, positions=[-1])
    assert frame.pos.unique().tolist() == [6]
    dla = direct_logit_attribution(model, tokens, [[30, 31]], by="head")
    for (layer, head), rows in frame.groupby(["layer", "head"]):
        logit = rows.set_index("token_id").logit
        want = dla[(dla.component == "head") & (dla.layer == layer) & (dla["head"] == head)].dla.item()
        assert logit[30] - logit[31] == pytest.approx(want, abs=1e-5)


def test_figures_show_the_frames():
    model = make_tiny("llama")
    tokens = torch.randint(4, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    frame = head_lens(model, tokens, top_k=2)
    fig = head_lens_heatmap(frame, pos=3)
    heat = fig.data[0]
    top = frame[(frame.pos == 3) & (frame["rank"] == 0)].sort_values(["layer", "head"])
    assert heat.z.tolist() == top.logit.to_numpy().reshape(2, 4).tolist()
    assert heat.text[1][2] == repr(top[(top.layer == 1) & (top["head"] == 2)].token.item())
    assert heat.customdata[0][0].count("<br>") == 1  # both ranks in the hover
    with pytest.raises(ValueError, match="no rows at pos 9"):
        head_lens_heatmap(frame, pos=9)
    heads = direct_logit_attribution(model, tokens, [[6, 7]], by="head", per_position=True)
    z = dla_head_heatmap(heads).data[0].z
    summed = heads[heads.component == "head"].groupby(["layer", "head"]).dla.sum().to_numpy().reshape(2, 4)
    torch.testing.assert_close(torch.tensor(z), torch.tensor(summed))
    bars = dla_bar(direct_logit_attribution(model, tokens, [[6, 7]])).data[0]
    assert list(bars.x) == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    with pytest.raises(ValueError, match="by='head'"):
        dla_head_heatmap(direct_logit_attribution(model, tokens, [[6, 7]]))


def test_bad_arguments_say_what_to_do():
    model = make_tiny("llama")
    tokens = torch.randint(4, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="out of range for a prompt of 5 tokens"):
        head_lens(model, tokens, positions=[5])
    with pytest.raises(ValueError, match="batch_index 2"):
        head_lens(model, tokens, batch_index=2)
    with pytest.raises(ValueError, match="top_k"):
        head_lens(model, tokens, top_k=0)
