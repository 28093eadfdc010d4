"""interp/heads/sweeps.py: batched single-head sweeps equal one head at a time, whatever the metric's form."""

from __future__ import annotations

import pytest
import torch

from interp.heads.ablate import AblationKind, ablate_heads
from interp.heads.loss import LMLoss, lm_loss
from interp.heads.sweeps import batched_sweep, single_head_ablation
from interp.metrics import LogitDiff

from conftest import make_tiny


def _ref_tokens(seed: int, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(4, 100, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["stacked", "eager"])
@pytest.mark.parametrize("how", ["zero", "uniform", "mean", "resample"])
def test_batched_sweep_equals_one_at_a_time(how, backend, tokens):
    """Both backends (stacked kernel gates, the default; eager hooks) equal `ablate_heads` one head at a time."""
    model = make_tiny("llama")
    ref = _ref_tokens(13)
    metric = lm_loss
    df = single_head_ablation(model, tokens, metric, how=how, batch_heads=3, reference=ref, backend=backend)
    assert len(df) == 8 and list(df.columns) == ["layer", "head", "metric", "delta", "how"]
    clean = float(metric(model(tokens), tokens))
    for row in df.to_dict("records"):
        with ablate_heads(model, [(row["layer"], row["head"])], how=how, reference=ref):
            one = float(metric(model(tokens), tokens))
        assert row["metric"] == pytest.approx(one, abs=1e-5)
        assert row["delta"] == pytest.approx(one - clean, abs=1e-5)
    assert df.delta.abs().max() > 1e-4


def test_metric_forms_and_kinds_give_the_same_frame(tokens):
    """LMLoss (binds the tokens), lm_loss (the older form) and an AblationKind instead of its string."""
    model = make_tiny("qwen2")
    ref = _ref_tokens(5)
    by_function = single_head_ablation(model, tokens, lm_loss, how="mean", batch_heads=5, reference=ref)
    by_class = single_head_ablation(model, tokens, LMLoss, how=AblationKind.MEAN, batch_heads=5, reference=ref)
    assert by_function.equals(by_class)
    assert set(by_class["how"]) == {"mean"}


def test_batched_sweep_runs_each_chunk_with_its_own_masks(tokens):
    """hooks_for gets a [k*batch, layer, head] mask with one head per copy; chunks cover every head once."""
    model = make_tiny("llama")
    heads = [(0, 0), (0, 3), (1, 1), (1, 2), (1, 3)]
    calls = []

    def hooks_for(mask, k):
        calls.append((k, mask.clone()))
        return []

    clean, results = batched_sweep(model, tokens, LMLoss, heads, 2, hooks_for)
    assert [k for k, _ in calls] == [2, 2, 1]
    B = tokens.shape[0]
    seen = []
    for k, mask in calls:
        assert mask.shape == (k * B, 2, 4)
        for j in range(k):
            rows = mask[j * B : (j + 1) * B]
            assert bool((rows == rows[0]).all()) and int(rows[0].sum()) == 1
            seen.append(tuple(int(i) for i in rows[0].nonzero()[0]))
    assert seen == heads
    # no hooks: every copy is the clean run
    assert [h for h, _ in results] == heads
    assert all(v == pytest.approx(clean, abs=1e-6) for _, v in results)
    with pytest.raises(ValueError, match="batch_heads must be >= 1"):
        batched_sweep(model, tokens, LMLoss, heads, 0, hooks_for)


@pytest.mark.parametrize("backend", ["stacked", "eager"])
def test_logits_only_and_token_metrics_are_both_accepted(backend, tokens):
    """LogitDiff (an instance whose __call__ takes logits only), a lambda of logits and a function of
    (logits, tokens) computing the same thing give the same frame."""
    model = make_tiny("llama")
    ld = LogitDiff(torch.tensor([[5, 6], [7, 8]]))

    def with_tokens(logits, toks):
        assert toks is not None and toks.shape == tokens.shape
        return ld(logits)

    frames = [single_head_ablation(model, tokens, m, how="zero", backend=backend)
              for m in (ld, lambda logits: ld(logits), with_tokens)]
    for df in frames[1:]:
        assert float((df.metric - frames[0].metric).abs().max()) <= 1e-6
    assert float(frames[0].delta.abs().max()) > 1e-4


@pytest.mark.parametrize("bad,match", [
    (lambda logits, tokens, mask: logits.sum(), "3 required positional parameters"),
    (42, "metric must be callable, got int"),
    (LogitDiff, "pass an instance"),
])
def test_a_bad_metric_is_refused_before_any_forward(bad, match, tokens):
    model = make_tiny("llama")
    ran = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: ran.append(1))]):
        for backend in ("stacked", "eager"):
            with pytest.raises(TypeError, match=match):
                single_head_ablation(model, tokens, bad, how="mean", reference=_ref_tokens(3), backend=backend)
    assert ran == []


@pytest.mark.parametrize("backend", ["stacked", "eager"])
def test_lm_loss_on_a_padded_batch_leaves_the_pads_out(backend):
    """Right-padded prompts: each head's metric equals lm_loss over the real tokens only, computed from
    a forward with the head ablated (ablate_heads) -- not the loss with the pad positions counted."""
    model = make_tiny("llama")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    heads = [(0, 1), (1, 0)]
    df = single_head_ablation(model, tokens, LMLoss, heads=heads, attention_mask=mask, backend=backend)
    for (l, h), got in zip(heads, df.metric):
        with torch.no_grad(), ablate_heads(model, [(l, h)]):
            logits = model(tokens, attention_mask=mask)
        want = float(lm_loss(logits, tokens, mask))
        with_pads = float(lm_loss(logits, tokens))
        assert abs(got - want) < 1e-5, (l, h, got, want)
        assert abs(with_pads - want) > 1e-3, "the check needs the pads to change the loss"


def test_a_logits_metric_that_reads_every_position_is_refused_on_a_padded_batch(tokens):
    """With padding a logits-only metric would read pad positions: refused (as patching does), unless it is last-position."""
    model = make_tiny("llama")
    mask = torch.ones_like(tokens)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match="padded.*last_position_only"):
        single_head_ablation(model, tokens, lambda logits: logits.mean(), heads=[(0, 0)], attention_mask=mask)
