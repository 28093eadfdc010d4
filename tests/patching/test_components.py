"""interp/patching/components.py: each Component's hook name, layout, axes, result shape and patch write."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from interp.patching import COMPONENTS, activation_patch, attribution_patch, component
from interp.patching.components import HEADS, KV_HEADS, PATTERN, RESID, Component

from conftest import VOCAB, make_tiny

# name -> (hook at layer 1, layout, patch axes allowed)
EXPECTED = {
    "resid_pre": ("blocks.1.hook_resid_pre", RESID, ("pos",)),
    "resid_mid": ("blocks.1.hook_resid_mid", RESID, ("pos",)),
    "resid_post": ("blocks.1.hook_resid_post", RESID, ("pos",)),
    "attn_out": ("blocks.1.hook_attn_out", RESID, ("pos",)),
    "mlp_out": ("blocks.1.hook_mlp_out", RESID, ("pos",)),
    "z": ("blocks.1.attn.hook_z", HEADS, ("head", "pos_head")),
    "q": ("blocks.1.attn.hook_q", HEADS, ("head", "pos_head")),
    "k": ("blocks.1.attn.hook_k", KV_HEADS, ("head", "pos_head")),
    "v": ("blocks.1.attn.hook_v", KV_HEADS, ("head", "pos_head")),
    "pattern": ("blocks.1.attn.hook_pattern", PATTERN, ("head", "pos_head")),
}


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")  # 2 layers, 4 query heads, 2 key/value heads (GQA)


def tokens(seed=0, n=2, pos=6):
    return torch.randint(4, VOCAB, (n, pos), generator=torch.Generator().manual_seed(seed))


def test_every_component_hook_layout_and_axes():
    assert set(COMPONENTS) == set(EXPECTED)
    for name, (hook, layout, by) in EXPECTED.items():
        comp = COMPONENTS[name]
        assert comp.hook_name(1) == hook
        assert comp.hook_names(2) == [hook.replace("blocks.1.", "blocks.0."), hook]
        assert comp.layout is layout and comp.layout.by == by and comp.default_by == by[0]
        for b in by:
            expected_axes = {"pos": ("layer", "pos"), "head": ("layer", "head"), "pos_head": ("layer", "pos", "head")}[b]
            if name == "pattern" and b == "pos_head":
                expected_axes = ("layer", "head", "pos")  # as TransformerLens's get_act_patch_attn_head_pattern_by_pos
            assert comp.axes(b) == expected_axes, (name, b)


def test_layout_shapes_match_the_activations(model):
    """The layout's declared activation shape is what the hook point really carries."""
    cfg = model.cfg
    t = tokens()
    names = [c.hook_name(1) for c in COMPONENTS.values()]
    _, cache = model.run_with_cache(t, names_filter=names)
    sizes = {"batch": 2, "pos": 6, "query": 6, "key": 6, "d_model": cfg.d_model, "head": cfg.n_heads,
             "kv_head": cfg.n_kv_heads, "d_head": cfg.d_head}
    for comp in COMPONENTS.values():
        want = tuple(sizes[axis] for axis in comp.layout.shape.split())
        assert tuple(cache[comp.hook_name(1)].shape) == want, comp.name
    assert COMPONENTS["k"].n_heads(cfg) == cfg.n_kv_heads == 2
    assert COMPONENTS["z"].n_heads(cfg) == COMPONENTS["pattern"].n_heads(cfg) == cfg.n_heads == 4


def test_result_shape_and_axes_are_what_the_sweeps_return(model):
    clean, corrupted = tokens(1), tokens(2)
    answers = torch.tensor([[5, 6], [7, 8]])
    cases = [(c.name, b) for c in COMPONENTS.values() for b in c.layout.by]
    for name, b in cases:
        got = attribution_patch(model, name, clean, corrupted, answer_tokens=answers, by=b, progress=False)
        comp = COMPONENTS[name]
        assert tuple(got.values.shape) == comp.result_shape(model.cfg, 6, b), (name, b)
        assert got.axes == comp.axes(b)
        assert len(comp.indices(model.cfg, 6, b)) == got.values.numel()
    exact = activation_patch(model, "pattern", clean, corrupted, answer_tokens=answers, by="pos_head", progress=False)
    assert tuple(exact.values.shape) == (2, 4, 6) == COMPONENTS["pattern"].result_shape(model.cfg, 6, "pos_head")


def test_arrange_puts_index_order_into_result_order(model):
    comp = COMPONENTS["pattern"]
    indices = comp.indices(model.cfg, 3, "pos_head")
    values = torch.arange(len(indices), dtype=torch.float)
    arranged = comp.arrange(values, model.cfg, 3, "pos_head")  # [layer, head, pos]
    for i, (layer, pos, head) in enumerate(indices):
        assert arranged[layer, head, pos] == i


@pytest.mark.parametrize("name,group,expected", [
    ("resid_pre", (4, None), (slice(None), 4 - 2)),
    ("z", (3, 1), (slice(None), 3 - 2, 1)),
    ("z", (None, 2), (slice(None), slice(None), 2)),
    ("pattern", (5, 3), (slice(None), 3, 5 - 2)),
    ("pattern", (None, 0), (slice(None), 0)),
])
def test_patch_writes_exactly_the_selected_slice(name, group, expected):
    """Two stacked copies of 3 prompts that see positions 2.. (offset 2): copy 1 carries the patch
    `group`, copy 0 the patch (2, 0) (position 2, head 0; position 2 for the residual stream)."""
    comp = COMPONENTS[name]
    g = torch.Generator().manual_seed(0)
    full = {"resid_pre": (3, 6, 5), "z": (3, 6, 4, 5), "pattern": (3, 4, 6, 6)}[name]
    src = torch.randn(*full, generator=g)
    # what the run holds: positions 2.. only (query rows for a pattern), as seen in the offset coordinates
    src_view = src[:, 2:] if name in ("resid_pre", "z") else src[:, :, 2:]
    x = torch.randn(2 * 3, *src_view.shape[1:], generator=g)
    before = x.clone()
    first = {"resid_pre": (slice(None), 0), "z": (slice(None), 0, 0), "pattern": (slice(None), 0, 0)}[name]
    out = comp.patch(x, src, [(2, None) if name == "resid_pre" else (2, 0), group], offset=2)
    assert torch.equal(x, before)  # a copy, x untouched
    for j, where in enumerate((first, expected)):
        copy, base = out[3 * j : 3 * j + 3], before[3 * j : 3 * j + 3]
        assert torch.equal(copy[where], src_view[where])
        untouched = torch.ones_like(copy, dtype=torch.bool)
        untouched[where] = False
        assert torch.equal(copy[untouched], base[untouched])


def test_changed_positions_and_replace_heads():
    run = torch.zeros(2, 5, 3, 4)
    src = run.clone()
    src[1, 3, 2, 0] = 1.0
    changed = COMPONENTS["z"].changed_positions(src, run)
    assert changed.shape == (5, 3) and changed.nonzero().tolist() == [[3, 2]]
    resid = COMPONENTS["resid_post"].changed_positions(src[:, :, 2], run[:, :, 2])  # [b, pos, d] with d = 4
    assert resid.shape == (5, 1) and resid[:, 0].nonzero().flatten().tolist() == [3]
    pattern = COMPONENTS["pattern"].changed_positions(src.permute(0, 2, 1, 3), run.permute(0, 2, 1, 3))  # [b, head, q, k]
    assert pattern.shape == (5, 3) and pattern.nonzero().tolist() == [[3, 2]]  # [pos (query), head]

    new = torch.randn(2, 5, 3, 4)
    out = COMPONENTS["q"].replace_heads(run, new, [0, 2])
    assert torch.equal(out[:, :, [0, 2]], new[:, :, [0, 2]]) and torch.equal(out[:, :, 1], run[:, :, 1])
    assert torch.equal(run, torch.zeros(2, 5, 3, 4))  # a copy
    with pytest.raises(TypeError, match="resid_pre"):
        COMPONENTS["resid_pre"].replace_heads(run, new, [0])


def test_strings_become_components_once_with_did_you_mean():
    assert component("z") is COMPONENTS["z"]
    assert component(COMPONENTS["v"]) is COMPONENTS["v"]
    with pytest.raises(ValueError, match=r"unknown component 'resid'\. Did you mean 'resid_\w+', 'resid_\w+', 'resid_\w+'\?"):
        component("resid")
    with pytest.raises(ValueError, match=r"unknown component 'patern'\. Did you mean 'pattern'\?"):
        component("patern")
    with pytest.raises(ValueError, match=r"unknown component 'xyzzy'\. Choose one of \[") as err:
        component("xyzzy")
    assert "Did you mean" not in str(err.value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        COMPONENTS["z"].name = "q"  # type: ignore[misc]


def test_check_by(model):
    assert COMPONENTS["resid_pre"].check_by(None) == "pos"
    assert COMPONENTS["k"].check_by(None) == "head"
    assert COMPONENTS["k"].check_by("pos_head") == "pos_head"
    with pytest.raises(ValueError, match=r"'resid_pre' is patched by \('pos',\), not 'head'"):
        COMPONENTS["resid_pre"].check_by("head")
    with pytest.raises(ValueError, match=r"'z' is patched by \('head', 'pos_head'\), not 'pos'"):
        activation_patch(model, "z", tokens(1), tokens(2), answer_tokens=torch.tensor([[5, 6], [7, 8]]), by="pos")


def test_a_component_object_is_accepted_like_its_name(model):
    clean, corrupted, answers = tokens(1), tokens(2), torch.tensor([[5, 6], [7, 8]])
    by_name = activation_patch(model, "v", clean, corrupted, answer_tokens=answers, progress=False)
    by_object = activation_patch(model, COMPONENTS["v"], clean, corrupted, answer_tokens=answers, progress=False)
    assert torch.equal(by_name.values, by_object.values) and by_object.component == "v"
    custom = Component("v", KV_HEADS)
    assert custom == COMPONENTS["v"]
