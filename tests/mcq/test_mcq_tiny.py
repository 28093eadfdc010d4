"""The harness on a scripted tiny llama whose letter bias is known (interp.mcq end to end).

The model: a 2-layer llama with a word tokenizer. Residual dimension 0 is a constant K written by
the embedding and by nothing else (the rows of o_proj and down_proj that write it are zeroed), so
after the final RMSNorm it is about sqrt(d_model) on every prompt; the unembedding row of the letter
"w61" (B) reads it with weight BIAS / sqrt(d_model) and the letter rows read nothing else from it.
So B's logit carries a push of about BIAS on every prompt: the harness must find B chosen always,
PriDe must divide it out, and DLA must put it on the embedding.
"""

from __future__ import annotations

import math

import pytest
import torch

import interp
from interp.mcq import (
    LetterTable,
    PromptFormat,
    bias_scores,
    build_prompts,
    collect_last,
    debias,
    letter_dla,
    letter_ids,
    letter_lens,
    letter_logits,
    mean_ablation_hooks,
    parse_questions,
    pride,
    summarize,
)

from conftest import make_hf, word_tokenizer

K, BIAS = 40.0, 4.0
# letter ids 60..63 (words w1x-w3x would split: the special tokens w1, w2, w3 match first)
FMT = PromptFormat(letters=("w60", "w61", "w62", "w63"), question_prefix="w4 ", answer_line="w5")


def biased_llama() -> interp.HookedModel:
    hf = make_hf("llama", seed=1)
    d = hf.config.hidden_size
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 0] = K
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        hf.lm_head.weight[60:64, 0] = 0
        hf.lm_head.weight[61, 0] = BIAS / math.sqrt(d)
    return interp.load(hf, tokenizer=word_tokenizer())


def questions(n: int = 20):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        words = (torch.randperm(36, generator=g)[:6] + 64).tolist()
        out.append({"question": f"w{words[0]} w{words[1]}", "options": [f"w{w}" for w in words[2:]], "answer": i % 4})
    return parse_questions(out)


@pytest.fixture(scope="module")
def run():
    model = biased_llama()
    ps = build_prompts(questions(), FMT)
    ids = letter_ids(model.tokenizer, FMT)
    acts = collect_last(model, ps, ids, batch_size=16)
    return model, ps, ids, acts


def test_letter_ids_of_the_format():
    assert letter_ids(word_tokenizer(), FMT) == [60, 61, 62, 63]
    with pytest.raises(ValueError, match="not one"):
        letter_ids(word_tokenizer(), PromptFormat(letters=("w60 w61", "w62", "w63", "w64")))


def test_harness_measures_the_scripted_bias(run):
    model, ps, ids, acts = run
    # the letter logits are the model's own last-token logits
    tokens = model.to_tokens(ps.prompts[:3])
    direct = model(tokens)[:, -1][:, ids]
    assert torch.allclose(acts.logits[:3], direct.float(), atol=1e-5)
    s = summarize(LetterTable.from_prompts(ps, acts.logits))
    assert s.selection == [0.0, 1.0, 0.0, 0.0]
    assert s.accuracy == 0.25 and s.consistency == 0.0
    assert s.rstd == pytest.approx(math.sqrt(3) / 4)
    # the push is BIAS, up to the small random part of the other dimensions
    margin = acts.logits[:, 1] - acts.logits[:, [0, 2, 3]].mean(1)
    assert float(margin.mean()) == pytest.approx(BIAS, rel=0.1)


def test_pride_removes_the_scripted_bias(run):
    model, ps, ids, acts = run
    table = LetterTable.from_prompts(ps, acts.logits)
    res = pride(table, share=0.1, seed=0)
    assert res.prior[1] > 0.9  # the estimated prior puts nearly all mass on B
    assert res.before.selection[1] == 1.0
    # the debiased scores carry no push toward B: what is left is the tiny random part of the model
    # (it has no knowledge to show, so the debiased choice among the letters is close to a coin toss)
    held = table.subset(res.held_out)
    scores = debias(held.logits, torch.tensor(res.prior))
    assert float(bias_scores(held.logits, 1).mean()) == pytest.approx(BIAS, rel=0.1)
    assert abs(float(bias_scores(scores, 1).mean())) < 0.05
    assert res.after.selection[1] <= 0.6
    assert res.after.rstd < 0.6 * res.before.rstd


def test_dla_and_lens_find_the_embedding(run):
    model, ps, ids, acts = run
    dla = letter_dla(model, acts, favoured=1)
    # the parts sum to the model's mean letter logits
    sums = dla[[f"dla_{L}" for L in "ABCD"]].sum().to_numpy()
    assert sums == pytest.approx(dla.attrs["model_logits"], abs=1e-4)
    assert dla.bias.sum() == pytest.approx(dla.attrs["model_bias"], abs=1e-4)
    top = dla.nlargest(1, "bias").iloc[0]
    assert top.label == "embed" and top.bias == pytest.approx(BIAS, rel=0.15)
    lens = letter_lens(model, acts, favoured=1)
    assert list(lens.label) == ["0_pre", "1_pre", "final_post"]
    assert (lens.favoured_rate == 1.0).all()  # B tops the letters from the embedding on
    assert lens.bias.iloc[-1] == pytest.approx(dla.attrs["model_bias"], abs=1e-4)


def test_dla_matches_interp_vocab_dla(run):
    from interp.vocab import direct_logit_attribution

    model, ps, ids, acts = run
    sub = ps.prompts[:4]
    mine = letter_dla(model, collect_last(model, sub, ids), favoured=1)
    # letter B's logit minus letter A's, per part, from interp.vocab on the same prompts (one length each)
    for p, row in zip(sub, range(4)):
        del row
        ref = direct_logit_attribution(model, [p], answer_tokens=[[61, 60]], by="head")
        one = letter_dla(model, collect_last(model, [p], ids), favoured=1)
        heads = one[one.component == "head"]
        ref_heads = ref[ref.component == "head"].set_index("label").dla
        assert (heads.dla_B - heads.dla_A).to_numpy() == pytest.approx(ref_heads[heads.label].to_numpy(), abs=1e-4)
    assert len(mine) == 1 + 2 * (4 + 1)  # embed, 4 heads + 1 MLP per layer


def test_ablation_hooks(run):
    model, ps, ids, acts = run
    # the push lives in the embedding: zero-ablating every head and MLP at the last token keeps B chosen
    heads = [(l, h) for l in range(2) for h in range(4)]
    lg = letter_logits(model, ps, ids, fwd_hooks=mean_ablation_hooks(model, acts, heads, [0, 1], how="zero"))
    assert summarize(LetterTable.from_prompts(ps, lg)).selection[1] == 1.0
    assert not torch.allclose(lg, acts.logits)
    # mean ablation of everything: every prompt's last-token sublayer outputs become the same
    lg = letter_logits(model, ps, ids, fwd_hooks=mean_ablation_hooks(model, acts, heads, [0, 1]))
    assert not torch.allclose(lg, acts.logits)
    with pytest.raises(ValueError, match="out of range"):
        mean_ablation_hooks(model, acts, [(5, 0)])
    with pytest.raises(ValueError, match="how"):
        mean_ablation_hooks(model, acts, [(0, 0)], how="resample")


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])  # gemma2 soft-caps its logits: DLA is defined before the cap
def test_dla_sums_to_the_letter_logits_with_post_norms(family):
    """Gemma 2/3 norm each sublayer's output before the residual: the parts still sum to the model's letter logits."""
    from conftest import make_tiny

    model = make_tiny(family)
    ps = build_prompts(questions(4), FMT)
    ids = letter_ids(model.tokenizer, FMT)
    dla = letter_dla(model, collect_last(model, ps, ids), favoured=0)
    sums = dla[[f"dla_{L}" for L in "ABCD"]].sum().to_numpy()
    assert sums == pytest.approx(dla.attrs["model_logits"], abs=1e-4)
