"""Every patching experiment takes a PromptPairs directly, with the numbers of the unpacked call;
the old import paths (interp.patching, interp.path_patching) keep working."""

from __future__ import annotations

import pytest
import torch

from interp.circuits.tasks.base import PromptPairs
from interp.patching import PromptPairsLike, activation_patch, attribution_patch, path_patch

from conftest import VOCAB, make_tiny


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


def pairs_and_parts(seed=3, n=3, pos=7, padded=False):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, VOCAB, (n, pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(4, VOCAB, (n,), generator=g)
    answers = torch.randint(4, VOCAB, (n, 2), generator=g)
    mask = None
    if padded:  # right padding: prompt 1 is two tokens shorter
        mask = torch.ones(n, pos, dtype=torch.long)
        mask[1, -2:] = 0
    return PromptPairs(clean, corrupted, answers, attention_mask=mask), (clean, corrupted, answers, mask)


@pytest.mark.parametrize("padded", [False, True])
def test_activation_patch_takes_prompt_pairs(model, padded):
    pairs, (clean, corrupted, answers, mask) = pairs_and_parts(padded=padded)
    assert isinstance(pairs, PromptPairsLike)
    for comp, by in [("z", "head"), ("resid_pre", "pos"), ("k", "pos_head")]:
        got = activation_patch(model, comp, pairs, metric="logit_diff", by=by, progress=False)
        want = activation_patch(model, comp, clean, corrupted, "logit_diff", answer_tokens=answers, by=by,
                                attention_mask=mask, progress=False)
        assert torch.equal(got.values, want.values), comp
        assert (got.clean_metric, got.corrupted_metric) == (want.clean_metric, want.corrupted_metric)
        assert got.values.std() > 0  # the sweep measured something
    noising = activation_patch(model, "z", pairs, metric="prob", direction="noising", progress=False)
    assert torch.equal(noising.values, activation_patch(model, "z", clean, corrupted, "prob", answer_tokens=answers,
                                                        attention_mask=mask, direction="noising", progress=False).values)


@pytest.mark.parametrize("padded", [False, True])
def test_attribution_and_path_patch_take_prompt_pairs(model, padded):
    pairs, (clean, corrupted, answers, mask) = pairs_and_parts(padded=padded)
    got = attribution_patch(model, ["z", "mlp_out"], pairs, metric="logit_diff", progress=False)
    want = attribution_patch(model, ["z", "mlp_out"], clean, corrupted, answer_tokens=answers, attention_mask=mask,
                             progress=False)
    for name in ("z", "mlp_out"):
        assert torch.equal(got[name].values, want[name].values)

    got = path_patch(model, pairs, metric="logit_diff", receivers=[(1, 0)], receiver_input="v", progress=False)
    want = path_patch(model, clean, corrupted, "logit_diff", answer_tokens=answers, attention_mask=mask,
                      receivers=[(1, 0)], receiver_input="v", progress=False)
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=0, equal_nan=True)
    assert not got.values[0].isnan().any() and got.values[1].isnan().all()  # senders at the receiver's layer have no path


def test_prompt_pairs_with_a_task_metric_callable(model):
    pairs, (clean, corrupted, answers, _) = pairs_and_parts()
    got = activation_patch(model, "z", pairs, metric=pairs.metric, progress=False)
    want = activation_patch(model, "z", clean, corrupted, pairs.metric, progress=False)
    assert torch.equal(got.values, want.values)


def test_prompt_pairs_misuse_is_a_clear_error(model):
    pairs, (clean, corrupted, answers, mask) = pairs_and_parts(padded=True)
    with pytest.raises(TypeError, match="pass the metric by keyword"):
        activation_patch(model, "z", pairs, "logit_diff")
    with pytest.raises(ValueError, match="answer_tokens come from the prompt pairs"):
        attribution_patch(model, "z", pairs, answer_tokens=answers)
    with pytest.raises(ValueError, match="attention_mask come from the prompt pairs"):
        path_patch(model, pairs, attention_mask=mask)
    with pytest.raises(TypeError, match="give the corrupted prompts"):
        activation_patch(model, "z", clean)


def test_old_import_paths_still_work():
    """README and notebooks import from interp.patching and interp.path_patching."""
    import interp.patching
    import interp.path_patching
    from interp.patching import path as path_module

    assert interp.path_patching.path_patch is path_module.path_patch is path_patch
    for name in ("activation_patch", "attribution_patch", "PatchResult", "COMPONENTS", "AXES", "DIRECTIONS", "Component",
                 "component", "axes_of", "prompt_pair", "source_activations", "changed_positions", "first_change"):
        assert name in interp.patching.__all__ and hasattr(interp.patching, name), name
