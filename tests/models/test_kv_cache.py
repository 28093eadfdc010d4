"""Driving the HF forward through interp/models/kv_cache.py: every path gives the full forward's logits."""

from __future__ import annotations

import torch

from interp.models.kv_cache import (
    cache_argument,
    cache_from_key_values,
    decode_step,
    forward_with_cache,
    forward_without_cache,
    key_values,
    prefill,
)

from conftest import make_hf


def test_prefill_then_decode_steps_equal_the_full_forward(family, tokens):
    hf = make_hf(family)
    with torch.no_grad():
        full = hf(input_ids=tokens).logits
        cache = prefill(hf, tokens[:, :4])
        for pos in range(4, tokens.shape[1]):
            logits, cache = decode_step(hf, tokens[:, pos : pos + 1], cache)
            assert logits.shape == (tokens.shape[0], full.shape[-1])
            torch.testing.assert_close(logits, full[:, pos], atol=2e-5, rtol=0)


def test_forward_without_cache_builds_none_and_keeps_logits(family, tokens):
    hf = make_hf(family)
    with torch.no_grad():
        full = hf(input_ids=tokens).logits
        out = forward_without_cache(hf, tokens, logits_to_keep=1)
    assert getattr(out, cache_argument(hf)) is None
    torch.testing.assert_close(out.logits[:, 0], full[:, -1], atol=1e-5, rtol=0)


def test_a_cache_rebuilt_from_its_key_values_resumes_the_run(tokens):
    hf = make_hf("llama")
    with torch.no_grad():
        full = hf(input_ids=tokens).logits
        _, cache = forward_with_cache(hf, tokens[:, :3], None)
        kv = key_values(cache)
        assert len(kv) == 2 and kv[0][0].shape == (tokens.shape[0], 2, 3, 8)  # [batch, kv_head, pos, d_head]
        rebuilt = cache_from_key_values([(k.clone(), v.clone()) for k, v in kv], hf)
        out, _ = forward_with_cache(hf, tokens[:, 3:], rebuilt)
    torch.testing.assert_close(out.logits, full[:, 3:], atol=2e-5, rtol=0)
