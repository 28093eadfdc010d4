"""interp/heads/calibration.py: ACT (Yu et al. 2024) by hand-worked patterns, the model's own pattern and a search."""

from __future__ import annotations

import pytest
import torch

from interp.heads.calibration import act_calibrate, act_search, calibrate_heads, calibrate_pattern
from interp.heads.loss import LMLoss, lm_loss
from interp.kernels.spec import sink_alpha

from conftest import make_tiny


def _ref_tokens(seed: int, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(4, 100, shape, generator=torch.Generator().manual_seed(seed))


def test_calibrate_pattern_hand_worked():
    # alpha = [1.3/3, 1.4/2, 0.3/1]; threshold 0.5 -> key 1 is the only non-initial sink.
    p = torch.tensor([[1.0, 0, 0], [0.2, 0.8, 0], [0.1, 0.6, 0.3]])[None, None]
    got = calibrate_pattern(p, torch.tensor([[True]]), beta=0.4, threshold=0.5)[0, 0]
    # row 1: key 1 keeps .32, the .48 removed goes to key 0 (the only other key) -> .68
    # row 2: key 1 keeps .24, .36 is shared by keys 0 and 2 as .1 : .3 -> +.09, +.27
    expected = torch.tensor([[1.0, 0, 0], [0.68, 0.32, 0], [0.19, 0.24, 0.57]])
    torch.testing.assert_close(got, expected)
    # the first token is never a calibrated sink, whatever its alpha
    torch.testing.assert_close(calibrate_pattern(p, torch.tensor([[True]]), 0.4, 0.71)[0, 0], p[0, 0])
    # an unselected head is untouched
    torch.testing.assert_close(calibrate_pattern(p, torch.tensor([[False]]), 0.4, 0.5), p)


def test_calibrate_pattern_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 12, 12, generator=g) * 3
    scores = scores.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    p = scores.softmax(-1)
    new = calibrate_pattern(p, torch.ones(1, 3, dtype=torch.bool), beta=0.4, threshold=0.1)
    torch.testing.assert_close(new.sum(-1), torch.ones(2, 3, 12))
    assert not torch.allclose(new, p)
    assert bool((new.triu(1) == 0).all())  # still causal
    with pytest.raises(ValueError, match="q == k"):
        calibrate_pattern(p[:, :, -1:], torch.ones(1, 3, dtype=torch.bool))


def test_calibrate_heads_edits_the_model_pattern(tokens):
    model = make_tiny("llama")
    name = "blocks.0.attn.hook_pattern"
    _, clean = model.run_with_cache(tokens, names_filter=name)
    with calibrate_heads(model, [(0, 1)], beta=0.4, threshold=0.1):
        _, cache = model.run_with_cache(tokens, names_filter=name)
        cal_logits = model(tokens)
    sel = torch.tensor([[False, True, False, False]])
    torch.testing.assert_close(cache[name], calibrate_pattern(clean[name], sel, 0.4, 0.1))
    assert not torch.allclose(cal_logits, model(tokens), atol=1e-5)


def test_act_search_batched_and_calibrate_summary(tokens):
    model = make_tiny("llama")
    df = act_search(model, tokens, lm_loss, batch_heads=3)
    clean = float(lm_loss(model(tokens), tokens))
    for row in df.to_dict("records"):
        with calibrate_heads(model, [(row["layer"], row["head"])]):
            one = float(lm_loss(model(tokens), tokens))
        assert row["metric"] == pytest.approx(one, abs=1e-5)
        assert row["delta"] == pytest.approx(one - clean, abs=1e-5)
    held = _ref_tokens(21)
    search, summary = act_calibrate(model, tokens, held, lm_loss)
    chosen = search[search.delta < 0]
    assert summary.set.tolist() == ["calibration", "held_out"]
    assert (summary.n_heads == len(chosen)).all()
    assert summary.loc[0, "clean"] == pytest.approx(clean, abs=1e-6)
    with calibrate_heads(model, list(zip(chosen.layer, chosen["head"]))):
        assert summary.loc[1, "calibrated"] == pytest.approx(float(lm_loss(model(held), held)), abs=1e-6)


def test_calibrate_pattern_uses_gus_alpha():
    """A key is a calibrated sink exactly when sink_alpha (col_sum / (T - k)) exceeds the threshold."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(1, 2, 9, 9, generator=g) * 4
    p = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    alpha = sink_alpha(p.sum(-2))
    threshold = float(alpha[..., 1:].flatten().sort().values[-3])  # a threshold between alphas: some keys pass
    new = calibrate_pattern(p, torch.ones(1, 2, dtype=torch.bool), beta=0.5, threshold=threshold - 1e-6)
    changed = ~torch.isclose(new, p).all(dim=-2)  # [1, head, k]: columns that changed
    sinks = alpha > threshold - 1e-6
    sinks[..., 0] = False
    # every sink column keeps half its mass, every other column gains (or is empty)
    torch.testing.assert_close((new * sinks[:, :, None, :]).sum(), (p * sinks[:, :, None, :]).sum() * 0.5)
    assert bool(changed[sinks].all())


def test_act_search_metric_forms_agree(tokens):
    """LMLoss (the default), lm_loss and a custom metric(logits, tokens) give the same rows."""
    model = make_tiny("llama")
    by_class = act_search(model, tokens, batch_heads=4)
    assert by_class.equals(act_search(model, tokens, LMLoss, batch_heads=4))
    by_function = act_search(model, tokens, lm_loss, batch_heads=4)
    assert by_class.equals(by_function)
    doubled = act_search(model, tokens, lambda logits, toks: 2 * lm_loss(logits, toks), batch_heads=4)
    torch.testing.assert_close(torch.tensor(doubled.metric.values), 2 * torch.tensor(by_class.metric.values))
