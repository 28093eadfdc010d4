"""interp/heads/loss.py: the LM loss against torch's cross-entropy, and binding tokens into a Metric."""

from __future__ import annotations

import pytest
import torch

from interp.heads.loss import BoundTokenMetric, LMLoss, lm_loss, metric_for, metric_form
from interp.metrics import KLToReference, LogitDiff


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 7, 100, generator=torch.Generator().manual_seed(seed))


def test_lm_loss_matches_cross_entropy(tokens):
    logits = _logits()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(lm_loss(logits, tokens), ref)


def test_lm_loss_leaves_padding_out_and_works_in_fp32_for_bf16(tokens):
    logits = _logits(1)
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100), tokens[:, 1:].reshape(-1), reduction="none")
    keep = mask[:, 1:].reshape(-1).bool()
    torch.testing.assert_close(lm_loss(logits, tokens, mask), per_token[keep].mean())
    low = lm_loss(logits.bfloat16(), tokens)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, lm_loss(logits.bfloat16().float(), tokens))


def test_lm_loss_class_is_the_function_with_tokens_bound(tokens):
    logits = _logits(2)
    mask = torch.ones_like(tokens)
    mask[0, 5:] = 0
    assert torch.equal(LMLoss(tokens)(logits), lm_loss(logits, tokens))
    assert torch.equal(LMLoss(tokens, mask)(logits), lm_loss(logits, tokens, mask))
    assert LMLoss.name == "lm_loss" and not LMLoss.last_position_only


def test_metric_for_binds_classes_and_the_older_form(tokens):
    logits = _logits(3)
    mask = torch.ones_like(tokens)
    mask[1, 3:] = 0
    bound = metric_for(LMLoss, tokens, mask)
    assert isinstance(bound, LMLoss) and bound.attention_mask is mask
    assert torch.equal(bound(logits), lm_loss(logits, tokens, mask))
    calls = []

    def older(logits, toks, *mask_arg):
        calls.append(len(mask_arg))
        return logits.sum() * 0 + toks.sum()

    assert float(metric_for(older, tokens)(logits)) == float(tokens.sum())
    metric_for(older, tokens, mask)(logits)
    assert calls == [0, 1]  # the mask is passed only when there is one
    assert torch.equal(metric_for(lm_loss, tokens, mask)(logits), lm_loss(logits, tokens, mask))


def test_metric_for_takes_a_logits_only_metric_as_it_is(tokens):
    """One required positional parameter: a Metric of logits alone, used unchanged (tokens and mask not passed)."""
    logits = _logits(4)
    mask = torch.ones_like(tokens)
    ld = LogitDiff(torch.tensor([[5, 6], [7, 8]]))
    assert metric_form(ld) == "logits"
    assert metric_for(ld, tokens) is ld and metric_for(ld, tokens, mask) is ld
    expected = ((logits[0, -1, 5] - logits[0, -1, 6]) + (logits[1, -1, 7] - logits[1, -1, 8])) / 2
    torch.testing.assert_close(metric_for(ld, tokens, mask)(logits), expected)
    kl = KLToReference(_logits(5))
    assert metric_for(kl, tokens) is kl
    bound = LMLoss(tokens)  # an instance of a token-binding class is a Metric of logits too
    assert metric_for(bound, tokens) is bound

    def plain(logits):
        return logits[:, -1, 0].mean()

    assert metric_for(plain, tokens) is plain
    lam = lambda logits, scale=1.0: logits.sum() * scale  # noqa: E731 (optional extras are fine)
    assert metric_for(lam, tokens) is lam


def test_metric_for_keeps_the_older_forms_and_their_attributes(tokens):
    assert metric_form(LMLoss) == "binds_tokens"
    assert metric_form(lm_loss) == "tokens"

    def last_only(logits, toks):
        return logits[:, -1, 0].mean()

    last_only.last_position_only = True
    bound = metric_for(last_only, tokens)
    assert isinstance(bound, BoundTokenMetric) and bound.last_position_only and bound.name == "last_only"
    assert not metric_for(lm_loss, tokens).last_position_only
    assert torch.equal(bound(_logits(6)), _logits(6)[:, -1, 0].mean())


def _three(logits, tokens, mask):
    return logits.sum()


def _kw_only(logits, *, answers):
    return logits.sum()


def _two(logits, toks):
    return logits.sum()


class NotBinding:
    def __init__(self, answers):
        self.answers = answers

    def __call__(self, logits):
        return logits.sum()


@pytest.mark.parametrize("bad,match", [
    (_three, r"3 required positional parameters \['logits', 'tokens', 'mask'\]"),
    (lambda: 0.0, "0 required positional parameters"),
    (_kw_only, r"required keyword-only parameters \['answers'\]"),
    ("logit_diff", "metric must be callable, got str"),
    (None, "metric must be callable, got NoneType"),
    (LogitDiff, "LogitDiff is a class that does not bind tokens.*pass an instance"),
    (NotBinding, "NotBinding is a class that does not bind tokens"),
])
def test_metric_for_refuses_anything_else_clearly(tokens, bad, match):
    with pytest.raises(TypeError, match=match):
        metric_for(bad, tokens)
    with pytest.raises(TypeError, match=r"LMLoss.*LogitDiff\(answer_tokens\).*lm_loss"):  # the message lists the forms
        metric_for(bad, tokens)


def test_metric_for_refuses_a_signature_it_cannot_read(tokens):
    with pytest.raises(TypeError, match="cannot read the signature of metric max"):
        metric_for(max, tokens)  # a builtin without a signature


def test_a_two_argument_metric_with_a_mask_is_refused_up_front(tokens):
    mask = torch.ones_like(tokens)
    assert float(metric_for(_two, tokens)(_logits())) == float(_logits().sum())
    with pytest.raises(TypeError, match="takes \\(logits, tokens\\) but an attention_mask is given"):
        metric_for(_two, tokens, mask)


def test_experiments_over_other_token_sets_refuse_a_batch_bound_metric(tokens):
    """gate_gradients scores each prompt alone and act_calibrate a held-out set: LogitDiff(answers) holds one
    batch's answers, so both refuse it before any forward, saying what to pass instead; LMLoss passes the check."""
    from interp.heads import calibration, importance
    from interp.heads.loss import require_per_set_metric

    from conftest import make_tiny

    model = make_tiny("llama")
    ran = []
    model.hf_model.register_forward_pre_hook(lambda *a: ran.append(1))
    answers = torch.tensor([[1, 2]] * tokens.shape[0])
    with pytest.raises(TypeError, match="gate_gradients scores other token sets.*LMLoss"):
        importance.gate_gradients(model, tokens, LogitDiff(answers))
    with pytest.raises(TypeError, match="act_calibrate scores other token sets"):
        calibration.act_calibrate(model, tokens, tokens, LogitDiff(answers))
    assert not ran, "refused only after running the model"
    require_per_set_metric(LMLoss, "x")
    require_per_set_metric(lm_loss, "x")
