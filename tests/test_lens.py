"""Logit lens (interp/lens.py): exact at the last layer, and a float64 recomputation from the weights elsewhere."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from interp.lens import logit_lens_frame, logit_lens_logits, logit_lens_table, readable_lens_table, space_variant, target_pieces

from conftest import FAMILIES, make_hf, make_tiny

TOKENS = torch.tensor([[5, 6, 7, 8, 9, 44], [45, 46, 47, 48, 49, 50]])


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_is_the_models_logits_exactly(family):
    model, hf = make_tiny(family), make_hf(family)  # same seed: same weights, hf untouched by hooks
    lens, _, labels = logit_lens_logits(model, TOKENS)
    with torch.no_grad():
        expected = hf(TOKENS).logits
    assert labels == ["0_pre", "1_pre", "final_post"] and lens.shape == (3, *expected.shape)
    assert torch.equal(lens[-1], expected)


@pytest.mark.bundled
def test_last_layer_is_the_models_logits_exactly_smollm2(smollm):
    tokens = smollm.to_tokens(["The Eiffel Tower is in the city of", "When Mary and John went to the store, John gave"])
    lens, _, labels = logit_lens_logits(smollm, tokens)
    with torch.no_grad():
        expected = smollm.hf_model(tokens, use_cache=False).logits
    assert len(labels) == 31 and torch.equal(lens[-1], expected)
    frame = logit_lens_frame(smollm, "The Eiffel Tower is in the city of", targets=[" Paris"])
    final = frame[(frame.layer == 30) & (frame.pos == frame.pos.max())].iloc[0]
    assert final["top1"] == " Paris" and final["rank(' Paris')"] == 0 and final["kl_to_final"] == 0.0


def _norm64(module, x):
    """The final norm in float64, written from its definition."""
    name = type(module).__name__
    if name == "LayerNorm":
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + module.eps) * module.weight.double() + module.bias.double()
    eps = getattr(module, "variance_epsilon", None) or module.eps
    scale = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    if name.startswith("Gemma"):  # Gemma stores the RMSNorm gain as an offset from 1
        return scale * (1.0 + module.weight.double())
    return scale * module.weight.double()


@torch.no_grad()
def _lens64(model, hf, tokens):
    """log-probs [component, pos, vocab] in float64 for the first prompt; residuals from HF's hidden states."""
    hidden = hf(tokens, output_hidden_states=True).hidden_states  # [0..n-1] enter each block
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")  # HF's last entry is normed
    resids = [hidden[0][0], hidden[1][0], cache["blocks.1.hook_resid_post"][0]]
    head = hf.get_output_embeddings()
    out = []
    for r in resids:
        logits = _norm64(model.adapter.final_norm, r.double()) @ head.weight.double().T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias.double()
        cap = getattr(hf.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        out.append(logits.log_softmax(-1))
    return torch.stack(out)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gemma3", "gpt_neox"])
def test_frame_equals_float64_recomputation(family):
    model, hf = make_tiny(family), make_hf(family)
    frame = logit_lens_frame(model, TOKENS, targets=["w9", 42], top_k=3)
    ref = _lens64(model, hf, TOKENS)  # [3, 6, 100]
    assert len(frame) == 3 * 6 and list(frame[["layer", "pos"]].itertuples(index=False, name=None)) == [
        (l, p) for l in range(3) for p in range(6)
    ]
    assert list(frame.token[:6]) == ["w5", "w6", "w7", "w8", "w9", "w44"] and frame.attrs["tokens"][5] == "w44"
    for row in frame.itertuples(index=False):
        lp = ref[row.layer, row.pos]
        top = lp.topk(3)
        assert [row.top1, row.top2, row.top3] == [f"w{i}" for i in top.indices.tolist()]
        assert [row.p1, row.p2, row.p3] == pytest.approx(top.values.exp().tolist(), abs=1e-5)
        final = ref[-1, row.pos]
        assert row.kl_to_final == pytest.approx(float((final.exp() * (final - lp)).sum()), abs=1e-5)
    # targets, by column name (they are not identifiers)
    for name, tid in (("'w9'", 9), ("'w42'", 42)):
        p = torch.tensor(frame[f"p({name})"].to_list(), dtype=torch.float64).reshape(3, 6)
        rank = torch.tensor(frame[f"rank({name})"].to_list()).reshape(3, 6)
        assert torch.allclose(p, ref[..., tid].exp(), atol=1e-5)
        assert torch.equal(rank, (ref > ref[..., tid : tid + 1]).sum(-1))
    assert (frame[frame.layer == 2].kl_to_final == 0).all()


def test_chunks_positions_and_batch_index_agree():
    model = make_tiny("llama")
    full = logit_lens_frame(model, TOKENS, top_k=2, targets=["w9"])
    cols = ["p1", "p2", "p('w9')", "kl_to_final"]
    for chunk in (1, 4):
        chunked = logit_lens_frame(model, TOKENS, top_k=2, targets=["w9"], chunk_size=chunk)
        assert list(chunked.top1) == list(full.top1)
        assert torch.allclose(torch.tensor(chunked[cols].values), torch.tensor(full[cols].values), atol=1e-6)
    some = logit_lens_frame(model, TOKENS, top_k=2, targets=["w9"], positions=[-1, 2])
    assert sorted(set(some.pos)) == [2, 5]
    merged = some.merge(full, on=["layer", "pos"], suffixes=("", "_full"))
    assert len(merged) == 6 and (merged.top1 == merged.top1_full).all()
    assert torch.allclose(torch.tensor(merged["p1"].values), torch.tensor(merged["p1_full"].values), atol=1e-6)
    second = logit_lens_frame(model, TOKENS, batch_index=1)
    alone = logit_lens_frame(model, TOKENS[1:])
    assert list(second.top1) == list(alone.top1) and list(second.token) == [f"w{i}" for i in TOKENS[1].tolist()] * 3
    assert torch.allclose(torch.tensor(second.p1.values), torch.tensor(alone.p1.values), atol=1e-6)


def test_table_is_the_frame_at_one_position():
    model = make_tiny("qwen2")
    table = logit_lens_table(model, TOKENS[:1], top_k=2, targets=["w9"])
    assert list(table.columns) == ["layer", "label", "kl_to_final", "top1", "p1", "top2", "p2", "p('w9')", "rank('w9')"]
    frame = logit_lens_frame(model, TOKENS[:1], top_k=2, targets=["w9"])
    last = frame[frame.pos == 5].reset_index(drop=True)
    assert list(table.top1) == list(last.top1) and list(table.label) == ["0_pre", "1_pre", "final_post"]
    assert torch.allclose(torch.tensor(table.p1.values), torch.tensor(last.p1.values), atol=1e-6)


def test_bad_input_is_refused():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match=r"'w10' is 2 tokens \['w1', 'w0'\]"):
        logit_lens_frame(model, TOKENS, targets=["w10"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        logit_lens_frame(model, TOKENS, targets=[100])
    with pytest.raises(ValueError, match="batch_index 2 is out of range for a batch of 2"):
        logit_lens_frame(model, TOKENS, batch_index=2)
    with pytest.raises(ValueError, match=r"positions \[6\] are out of range for a prompt of 6"):
        logit_lens_frame(model, TOKENS, positions=[6])


def test_readable_table_quotes_tokens_and_labels_units():
    raw = pd.DataFrame({"layer": [0, 1], "label": ["0_pre", "final_post"], "kl_to_final": [2.5, 0.0],
                        "top1": [" Paris", "\n"], "p1": [0.6, 0.25], "p(' Paris')": [0.6, 2.4e-5], "rank(' Paris')": [0, 31]})
    text = readable_lens_table(raw)
    header, first, second = text.splitlines()
    assert header.split()[:4] == ["layer", "label", "kl_to_final", "(nats)"]
    assert "rank of ' Paris' (0 = top1)" in header and "p(' Paris')" in header and "top1" in header
    assert "' Paris'" in first and first.split()[-1] == "0"
    assert "'\\n'" in second and "2.4e-05" in second  # a newline shows as \n; a small p is not printed as 0.000
    assert second.split()[-1] == "31" and "0.250" in second
    assert list(raw["top1"]) == [" Paris", "\n"] and "rank(' Paris')" in raw.columns  # the frame is untouched


@pytest.mark.bundled
def test_targets_without_their_leading_space_smollm2(smollm):
    assert target_pieces(smollm, " Paris") == [" Paris"] and space_variant(smollm, " Paris") is None
    assert target_pieces(smollm, "Paris") == ["Paris"] and space_variant(smollm, "Paris") == " Paris"  # two tokens
    with pytest.raises(ValueError, match=r"'Barcelona' is 3 tokens \['B', 'arc', 'elona'\], not one; ' Barcelona', with a leading space, is one token"):
        logit_lens_frame(smollm, "The city of", targets=["Barcelona"])
