"""interp/sites.py: taps on plain modules, torch hooks only while live, and the wiring on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from interp import sites
from interp.hook_points import HookPoint, get_act_name
from interp.models.adapters import merge_fused_qkv, split_fused_qkv

from conftest import make_tiny


def _linear(d_in: int = 4, d_out: int = 6) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out)


# ---------------------------------------------------------------------------- Site on a plain module
def test_post_site_installs_its_torch_hook_only_while_a_point_is_active():
    lin, point = _linear(), HookPoint("p")
    site = sites.Site(lin, "post")
    site.add([point], sites.whole(point))
    site.sync()
    assert not lin._forward_hooks  # nothing attached: the module runs untouched
    point.add(lambda x, hook: x * 2)
    site.sync()
    assert len(lin._forward_hooks) == 1
    x = torch.randn(3, 4)
    assert torch.equal(lin(x), 2 * nn.functional.linear(x, lin.weight, lin.bias))
    point.clear()
    site.sync()
    assert not lin._forward_hooks


def test_pre_site_edits_the_first_input_or_hidden_states_keyword():
    lin, point = _linear(), HookPoint("p")
    site = sites.Site(lin, "pre")
    site.add([point], sites.whole(point))
    point.add(lambda x, hook: torch.zeros_like(x))
    site.sync()
    assert torch.equal(lin(torch.randn(2, 4)), lin.bias.expand(2, 6))

    class Block(nn.Module):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return hidden_states + 1

    block = Block()
    site2 = sites.Site(block, "pre")
    site2.add([point], sites.whole(point))
    site2.sync()
    assert torch.equal(block(hidden_states=torch.full((2,), 5.0)), torch.ones(2))


def test_taps_run_only_for_active_points_and_share_the_layer_state():
    lin = _linear()
    first, second = HookPoint("first"), HookPoint("second")
    state: dict = {}
    site = sites.Site(lin, "post", state=state)
    site.add([first], sites.remember("kept", first))
    site.add([second], sites.whole(second))
    second.add(lambda x, hook: x + 1)
    site.sync()
    out = lin(torch.zeros(1, 4))
    assert "kept" not in state  # the first tap's point is idle: its tap did not run
    first.add(lambda x, hook: None, edits=False)
    out2 = lin(torch.zeros(1, 4))
    assert torch.equal(state["kept"], lin.bias[None]) and torch.equal(out, out2)


def test_heads_tap_shows_heads_and_writes_back():
    lin, point = _linear(4, 6), HookPoint("q")
    site = sites.Site(lin, "post")
    site.add([point], sites.heads(point, n_heads=3, d_head=2))
    seen = []

    def zero_head_1(x, hook):
        seen.append(x.shape)
        x = x.clone()
        x[:, :, 1] = 0
        return x

    point.add(zero_head_1)
    site.sync()
    x = torch.randn(2, 5, 4)
    out = lin(x)
    assert seen == [torch.Size([2, 5, 3, 2])]
    ref = nn.functional.linear(x, lin.weight, lin.bias)
    assert torch.equal(out[..., 2:4], torch.zeros(2, 5, 2))
    assert torch.equal(out[..., :2], ref[..., :2]) and torch.equal(out[..., 4:], ref[..., 4:])


@pytest.mark.parametrize("layout", ["fused_gpt2", "fused_neox"])
def test_fused_split_and_merge_are_inverse(layout):
    out = torch.randn(2, 5, 3 * 4 * 8)
    parts = split_fused_qkv(out, layout=layout, n_heads=4, d_head=8)
    assert [p.shape for p in parts] == [torch.Size([2, 5, 4, 8])] * 3
    assert torch.equal(merge_fused_qkv(parts, layout=layout), out)


def test_result_site_reads_without_changing_and_rewrites_when_edited():
    n_heads, d_head, d_model = 2, 3, 4
    o = _linear(n_heads * d_head, d_model)
    W_O = o.weight.T.reshape(n_heads, d_head, d_model)
    point = HookPoint("blocks.0.attn.hook_result")
    site = sites.ResultSite(o, point, sites.head_results(point, lambda: W_O, lambda: o.bias, n_heads))
    z = torch.randn(1, 5, n_heads * d_head)
    plain = o(z)
    seen = []
    point.add(lambda r, hook: seen.append(r.clone()), edits=False)
    site.sync()
    assert torch.equal(o(z), plain)  # read only: the projection's own output, bit for bit
    torch.testing.assert_close(seen[0].sum(2) + o.bias, plain, atol=1e-6, rtol=0)
    point.clear()
    point.add(lambda r, hook: r * torch.tensor([0.0, 1.0])[None, None, :, None])  # drop head 0
    site.sync()
    head1 = nn.functional.linear(z[..., d_head:], o.weight[:, d_head:], o.bias)
    torch.testing.assert_close(o(z), head1, atol=1e-6, rtol=0)
    point.clear()
    site.sync()
    assert not o._forward_hooks


# ---------------------------------------------------------------------------- wiring on tiny models
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_q_k_v_sites_see_each_projection_per_head(family, tokens):
    """Separate (llama), fused Conv1D (gpt2) and fused per-head (neox) projections: the q/k/v points
    see [batch, pos, head, d_head] and an edit of one head reaches only that head's slot."""
    model = make_tiny(family)
    c = model.cfg
    shapes = {}

    def read(x, hook):
        shapes[hook.name.rsplit("_", 1)[-1]] = tuple(x.shape)

    names = [get_act_name(x, 0) for x in "qkv"]
    with model.hooks([(n, read) for n in names]):
        model(tokens)
    assert shapes == {"q": (2, 7, c.n_heads, c.d_head), "k": (2, 7, c.n_kv_heads, c.d_head), "v": (2, 7, c.n_kv_heads, c.d_head)}

    def zero_v_head_0(x, hook):
        x = x.clone()
        x[:, :, 0] = 0
        return x

    _, clean = model.run_with_cache(tokens, names_filter=names)
    with model.hooks([(names[2], zero_v_head_0)]):
        _, edited = model.run_with_cache(tokens, names_filter=names)
    assert torch.equal(edited["v", 0][:, :, 0], torch.zeros_like(edited["v", 0][:, :, 0]))
    assert torch.equal(edited["v", 0][:, :, 1:], clean["v", 0][:, :, 1:])
    assert torch.equal(edited["q", 0], clean["q", 0]) and torch.equal(edited["k", 0], clean["k", 0])


def test_no_torch_hooks_remain_after_a_run(tokens):
    model = make_tiny("llama")

    def count() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf_model.modules())

    before = count()
    model.run_with_cache(tokens)
    with model.hooks([(lambda n: True, lambda x, hook: None)]):
        assert count() > before
    assert count() == before
