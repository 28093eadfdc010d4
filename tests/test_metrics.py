"""interp/metrics.py: the Metric protocol, the built-in metrics by hand, padding helpers."""

from __future__ import annotations

import pytest
import torch

from interp.metrics import (
    AnswerProb,
    KLToReference,
    LogitDiff,
    Metric,
    accumulate,
    keep_last,
    last_real_tokens,
    make_metric,
    metric_name,
    require_last_position,
)
from interp.patching import activation_patch

from conftest import VOCAB, make_tiny


def logits_and_answers(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 11, generator=g), torch.tensor([[1, 2], [3, 4], [5, 0]])


def test_builtin_metrics_by_hand():
    logits, answers = logits_and_answers()
    last = logits[:, -1]
    diff = torch.stack([last[i, answers[i, 0]] - last[i, answers[i, 1]] for i in range(3)])
    torch.testing.assert_close(LogitDiff(answers).per_prompt(logits), diff)
    torch.testing.assert_close(LogitDiff(answers)(logits), diff.mean())
    probs = last.softmax(-1)
    torch.testing.assert_close(AnswerProb(answers)(logits), torch.stack([probs[i, answers[i, 0]] for i in range(3)]).mean())
    other = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    kl = torch.nn.functional.kl_div(other[:, -1].log_softmax(-1), last.log_softmax(-1), log_target=True, reduction="none")
    torch.testing.assert_close(KLToReference(logits)(other), kl.sum(-1).mean())
    assert float(KLToReference(logits)(logits)) == pytest.approx(0.0, abs=1e-6)


def test_metric_protocol_and_make_metric():
    logits, answers = logits_and_answers()
    fn = lambda x: x[:, -1, 0].mean()  # noqa: E731
    for m in (LogitDiff(answers), AnswerProb(answers), KLToReference(logits), fn):
        assert isinstance(m, Metric)
        assert make_metric(m) is m  # callables are used as they are
    assert not isinstance("logit_diff", Metric)
    assert isinstance(make_metric("logit_diff", answers), LogitDiff)
    assert isinstance(make_metric("prob", answers), AnswerProb)
    assert isinstance(make_metric("kl", clean_logits=logits), KLToReference)
    assert all(make_metric(n, answers, logits).last_position_only for n in ("logit_diff", "prob", "kl"))
    with pytest.raises(ValueError, match="needs answer_tokens"):
        make_metric("logit_diff")
    with pytest.raises(ValueError, match="unknown metric 'acc'"):
        make_metric("acc", answers)
    with pytest.raises(ValueError, match=r"\(correct, wrong\) answer pairs"):
        LogitDiff(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="logits have 3 prompts but answer_tokens has 2 rows"):
        LogitDiff(answers[:2])(logits)

    def my_metric(x):
        return x.sum()

    assert [metric_name(m) for m in (LogitDiff(answers), my_metric, KLToReference(logits))] == ["logit_diff", "my_metric", "kl_to_clean"]


def test_accumulate_keeps_float64_and_upcasts_the_rest():
    assert accumulate(torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    assert accumulate(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert accumulate(torch.ones(2, dtype=torch.float16)).dtype == torch.float32


def test_padding_helpers():
    assert last_real_tokens(None) is None
    assert last_real_tokens(torch.ones(2, 4, dtype=torch.long)) is None
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert last_real_tokens(right).tolist() == [3, 1]
    with pytest.raises(ValueError, match="only right padding"):
        last_real_tokens(torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert keep_last(torch.tensor([3, 1]), start=1, copies=2).tolist() == [[2], [0], [2], [0]]
    plain = lambda x: x.sum()  # noqa: E731
    require_last_position(plain, None, "here")  # unpadded: any metric
    with pytest.raises(ValueError, match="here: the batch is padded"):
        require_last_position(plain, torch.tensor([3, 1]), "here")
    require_last_position(LogitDiff(torch.tensor([[1, 2], [3, 4]])), torch.tensor([3, 1]), "here")


def test_a_plain_lambda_is_a_metric_for_the_sweeps():
    """The callable-of-logits contract: a lambda (full logits, no attributes) gives LogitDiff's numbers."""
    model = make_tiny("llama")
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(4, VOCAB, (2, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(4, VOCAB, (2,), generator=g)
    answers = torch.tensor([[5, 6], [7, 8]])
    ld = LogitDiff(answers)
    got = activation_patch(model, "z", clean, corrupted, lambda logits: ld(logits), progress=False)
    want = activation_patch(model, "z", clean, corrupted, ld, progress=False)
    assert got.metric_name == "<lambda>"
    torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=0)
    assert want.values.std() > 0
