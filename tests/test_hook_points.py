"""interp/hook_points.py: HookPoint's run order and checks, did-you-mean errors, get_act_name, opt-in hooks."""

from __future__ import annotations

import pytest
import torch

from interp.hook_points import HookPoint, check_returned, get_act_name, unknown_hook_error
from interp.hooks import OPT_IN_HOOKS

from conftest import make_tiny


# ---------------------------------------------------------------------------- HookPoint
def test_forward_functions_run_in_order_and_none_keeps_the_tensor():
    point = HookPoint("blocks.3.attn.hook_z")
    seen = []
    point.add(lambda x, hook: x + 1)
    point.add(lambda x, hook: seen.append((hook.name, x.clone())))  # returns None: keeps x
    point.add(lambda x, hook: x * 10)
    out = point.run(torch.zeros(2))
    assert torch.equal(out, torch.full((2,), 10.0))
    assert seen[0][0] == "blocks.3.attn.hook_z" and torch.equal(seen[0][1], torch.ones(2))
    assert point.layer() == 3 and HookPoint("hook_embed").layer() is None


def test_add_remove_clear_and_edits_flag():
    point = HookPoint("hook_embed")
    reader, editor = (lambda x, hook: None), (lambda x, hook: x)
    assert not point.active
    point.add(reader, edits=False)
    assert point.active and not point.edits  # a read-only function: sites may skip write-back
    point.add(editor)
    assert point.edits
    point.remove(editor)
    assert not point.edits and len(point.fwd) == 1
    point.add(reader, "bwd")
    point.clear()
    assert not point.active and point.fwd == [] and point.bwd == []
    with pytest.raises(ValueError, match="'fwd' or 'bwd'"):
        point.add(reader, "sideways")


def test_backward_functions_are_armed_on_the_returned_tensor():
    point = HookPoint("blocks.0.hook_resid_pre")
    grads = []
    point.add(lambda g, hook: grads.append((hook.name, g.clone())), "bwd")
    x = torch.ones(3, requires_grad=True)
    (point.run(x) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert grads[0][0] == "blocks.0.hook_resid_pre"
    assert torch.equal(grads[0][1], torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    "returned, message",
    [
        (torch.zeros(2, 4), r"returned \(2, 4\); it must return None or a tensor of the activation's shape \(2, 3\)"),
        ("not a tensor", r"returned str"),
        (torch.zeros(2, 3, dtype=torch.float64), r"returned a torch.float64 tensor; it must return the activation's dtype torch.float32"),
    ],
)
def test_a_returned_tensor_of_the_wrong_shape_or_dtype_is_named(returned, message):
    point = HookPoint("blocks.1.hook_mlp_out")

    def bad_hook(x, hook):
        return returned

    point.add(bad_hook)
    with pytest.raises(ValueError, match=message) as e:
        point.run(torch.zeros(2, 3))
    assert "'test_a_returned_tensor_of_the_wrong_shape_or_dtype_is_named.<locals>.bad_hook' on blocks.1.hook_mlp_out" in str(e.value)


def test_a_returned_tensor_on_another_device_is_named():
    x = torch.zeros(2, 3)
    fake = torch.zeros(2, 3, device="meta")  # another device without needing a GPU
    with pytest.raises(ValueError, match="on device meta; it must stay on the activation's device cpu"):
        check_returned("hook_embed", lambda x, hook: fake, fake, x)
    check_returned("hook_embed", lambda x, hook: x, x.clone(), x)  # the right tensor passes


# ---------------------------------------------------------------------------- names
def test_unknown_hook_error_suggests_the_closest_names():
    known = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "hook_embed"]
    err = unknown_hook_error("blocks.0.hook_resid_pr", known)
    assert isinstance(err, KeyError)
    assert "Did you mean 'blocks.0.hook_resid_pre'" in str(err) and "all 4 of them" in str(err)
    assert "Did you mean" not in str(unknown_hook_error("zzzz", known))


@pytest.mark.parametrize(
    "args, name",
    [
        (("pattern", 3), "blocks.3.attn.hook_pattern"),
        (("hook_z", 0), "blocks.0.attn.hook_z"),
        (("rot_q", 1), "blocks.1.attn.hook_rot_q"),
        (("post", 2), "blocks.2.mlp.hook_post"),
        (("resid_mid", 4), "blocks.4.hook_resid_mid"),
        (("normalized", 1), "blocks.1.ln1.hook_normalized"),
        (("normalized", 1, "ln2"), "blocks.1.ln2.hook_normalized"),
        (("embed",), "hook_embed"),
        (("ln_final.hook_normalized",), "ln_final.hook_normalized"),
    ],
)
def test_get_act_name(args, name):
    assert get_act_name(*args) == name


def test_every_wired_name_is_what_get_act_name_gives():
    """The model's hook names and the helper agree (the hook layer builds its names with it)."""
    model = make_tiny("llama")
    names = set(model.hook_names())
    for l in range(model.cfg.n_layers):
        for short in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "q", "k", "v", "rot_q", "rot_k",
                      "attn_scores", "pattern", "z", "result", "post"):
            assert get_act_name(short, l) in names, short
        assert {get_act_name("normalized", l, ln) for ln in ("ln1", "ln2")} <= names


# ---------------------------------------------------------------------------- opt-in hooks
def test_opt_in_hooks_are_left_out_unless_asked_for(tokens):
    model = make_tiny("llama")
    everything = model.resolve_names(None)
    assert get_act_name("result", 0) not in everything and all(not n.endswith(OPT_IN_HOOKS) for n in everything)
    assert get_act_name("z", 0) in everything
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(KeyError, match="opt-in hook"):
        cache[get_act_name("result", 0)]
    _, cache = model.run_with_cache(tokens, names_filter=[get_act_name("result", 0)])
    assert cache["result", 0].shape == (2, 7, model.cfg.n_heads, model.cfg.d_model)
    with pytest.raises(KeyError, match="Did you mean 'blocks.0.attn.hook_result'"):
        model.resolve_names("blocks.0.attn.hook_reslt")
