"""interp/heads/loss.py: the LM loss against torch's cross-entropy, and binding tokens into a Metric."""

from __future__ import annotations

import torch

from interp.heads.loss import LMLoss, lm_loss, metric_for


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
