"""Resuming a forward from a captured run (interp.resume) gives the full forward's logits.

Reference: the HF model's own forward from the embeddings, on every supported family.
"""

from __future__ import annotations

import pytest
import torch

from interp.resume import capture_run, forward_from

from conftest import make_tiny


@pytest.mark.parametrize("layer", [0, 1])
def test_forward_from_a_layer_and_position_equals_the_full_forward(family, tokens, layer):
    model = make_tiny(family)
    with torch.no_grad():
        full = model.hf_model(input_ids=tokens).logits
    run = capture_run(model, tokens)
    starts = [0, 3] if run.can_resume_positions else [0]
    for start in starts:
        got = forward_from(model, run, layer, start, copies=3)
        assert got.shape == (3 * tokens.shape[0], tokens.shape[1] - start, full.shape[-1])
        for copy in got.view(3, *full[:, start:].shape):
            torch.testing.assert_close(copy, full[:, start:], atol=2e-5, rtol=0)
        last = forward_from(model, run, layer, start, copies=2, logits_to_keep=1)
        torch.testing.assert_close(last.view(2, tokens.shape[0], -1)[1], full[:, -1], atol=2e-5, rtol=0)


def test_sliding_window_models_resume_only_at_position_zero(tokens):
    model = make_tiny("gemma3")
    run = capture_run(model, tokens)
    assert not run.can_resume_positions
    with pytest.raises(ValueError, match="sliding-window"):
        forward_from(model, run, 1, start_pos=2)


def test_logits_to_keep_gives_the_full_forwards_last_logits_and_gradients(family, tokens):
    """HookedModel's logits_to_keep path (contiguous unembedding input) changes no value."""
    model = make_tiny(family)
    emb = model.hf_model.get_input_embeddings()
    emb.weight.requires_grad_(True)
    full = model(tokens)[:, -1]
    full.sum().backward()
    grad_full = emb.weight.grad.clone()
    emb.weight.grad = None
    last = model(tokens, logits_to_keep=1)
    assert last.shape == (tokens.shape[0], 1, full.shape[-1])
    last.sum().backward()
    torch.testing.assert_close(last[:, 0], full, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb.weight.grad, grad_full, atol=1e-5, rtol=0)
