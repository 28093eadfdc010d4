"""interp/heads/ablate.py: the ablation kinds and the hooks they build (behaviour on models: tests/test_ablation.py)."""

from __future__ import annotations

import pytest
import torch

from interp.heads.ablate import HOWS, AblationKind, ablate_heads, ablation_hooks, all_heads, head_mask, replacements

from conftest import make_tiny


def test_kinds_and_their_properties():
    assert HOWS == ("zero", "mean", "resample", "uniform")
    assert [AblationKind.parse(h) for h in HOWS] == list(AblationKind)
    assert AblationKind.parse(AblationKind.MEAN) is AblationKind.MEAN and AblationKind.MEAN == "mean"
    assert str(AblationKind.RESAMPLE) == "resample"
    assert {k.value for k in AblationKind if k.needs_reference_activations} == {"mean", "resample"}
    assert {k.value for k in AblationKind if k.zeroes} == {"zero", "uniform"}
    assert {k.value: k.acts_on for k in AblationKind} == {"zero": "output", "mean": "output", "resample": "output", "uniform": "query"}
    assert AblationKind.UNIFORM.hook_name(3) == "blocks.3.attn.hook_q" and AblationKind.ZERO.hook_name(3) == "blocks.3.attn.hook_z"
    with pytest.raises(ValueError, match=r"how must be one of \('zero', 'mean', 'resample', 'uniform'\), got 'knockout'"):
        AblationKind.parse("knockout")


@pytest.mark.parametrize("how", HOWS)
def test_hooks_sit_on_the_kinds_hook_point_of_the_ablated_layers_only(how, tokens):
    model = make_tiny("llama")
    mask = head_mask(model, [(1, 2)])
    repl = replacements(model, how, [1], tokens)
    assert bool(repl) == AblationKind(how).needs_reference_activations
    hooks = ablation_hooks(model, mask, how, repl)
    assert [name for name, _ in hooks] == [AblationKind(how).hook_name(1)]
    with pytest.raises(ValueError, match="head mask must be"):
        ablation_hooks(model, mask[:1], how, repl)


def test_unknown_kind_is_refused_before_any_work(tokens):
    model = make_tiny("llama")
    for call in (lambda: replacements(model, "knockout", [0], tokens),
                 lambda: ablation_hooks(model, head_mask(model, [(0, 0)]), "knockout")):
        with pytest.raises(ValueError, match="how must be one of"):
            call()


def test_enum_and_string_ablate_alike(tokens):
    model = make_tiny("gpt2")
    with ablate_heads(model, [(0, 1)], how="uniform"):
        by_string = model(tokens)
    with ablate_heads(model, [(0, 1)], how=AblationKind.UNIFORM):
        assert torch.equal(model(tokens), by_string)
    assert not torch.equal(model(tokens), by_string)


def test_all_heads():
    model = make_tiny("llama")
    assert all_heads(model) == [(l, h) for l in range(2) for h in range(4)]
    assert all_heads(model, [(1, 0), ("0", 2)]) == [(1, 0), (0, 2)]
    with pytest.raises(ValueError, match="out of range"):
        all_heads(model, [(0, 4)])
