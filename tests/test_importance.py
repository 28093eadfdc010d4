"""Michel et al. head importance against float64 finite differences; pruning curve against weight edits."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import interp
from interp.heads.ablation import lm_loss
from interp.heads.importance import head_importance, head_importance_scores, pruning_curve, pruning_order

from conftest import make_hf


def _tokens(shape=(3, 8), seed=2):
    return torch.randint(4, 100, shape, generator=torch.Generator().manual_seed(seed))


def _loss_with_scaled_head(model, tokens, layer, head, scale):
    def fn(z, hook):
        z = z.clone()
        z[:, :, head] *= scale
        return z

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", fn)])
    return float(lm_loss(logits, tokens))


def test_importance_matches_float64_finite_differences():
    """GPT-2 runs fully in float64 (Llama's RMSNorm upcasts to fp32, too coarse for differences)."""
    model = interp.load(make_hf("gpt2").double())
    tokens = _tokens()
    raw, norm = head_importance_scores(model, tokens, batch_size=2)  # batches of 2 and 1
    eps = 1e-5
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for l in range(2):
        for h in range(4):
            for b in range(tokens.shape[0]):  # |dL/dxi| per prompt, then the mean
                x = tokens[b : b + 1]
                d = (_loss_with_scaled_head(model, x, l, h, 1 + eps) - _loss_with_scaled_head(model, x, l, h, 1 - eps)) / (2 * eps)
                expected[l, h] += abs(d) / tokens.shape[0]
    torch.testing.assert_close(raw.double(), expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(norm.double(), expected / expected.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-9)


def test_importance_equals_taylor_form_from_backward_hooks():
    """Michel et al.: dL/dxi_h = sum over positions of z_h . dL/dz_h (read with the hook layer's backward hooks)."""
    model = interp.load(make_hf("llama").double())
    tokens = _tokens()
    raw, _ = head_importance_scores(model, tokens, batch_size=3)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for b in range(tokens.shape[0]):
        x = tokens[b : b + 1]
        zs, grads = {}, {}
        fwd = [(f"blocks.{l}.attn.hook_z", lambda z, hook: zs.__setitem__(hook.layer(), z.detach())) for l in range(2)]
        bwd = [(f"blocks.{l}.attn.hook_z", lambda g, hook: grads.__setitem__(hook.layer(), g.detach())) for l in range(2)]
        with torch.enable_grad():
            lm_loss(model.run_with_hooks(x, fwd_hooks=fwd, bwd_hooks=bwd), x).backward()
        for l in range(2):
            expected[l] += (zs[l] * grads[l]).sum(dim=(0, 1, 3)).abs() / tokens.shape[0]
    torch.testing.assert_close(raw.double(), expected, rtol=1e-5, atol=1e-8)


def test_importance_frame_and_fp32_gradients():
    model = interp.load(make_hf("llama"))
    df = head_importance(model, _tokens())
    assert list(df.columns) == ["layer", "head", "importance", "importance_raw", "rank"]
    assert len(df) == 8 and sorted(df["rank"]) == list(range(8))
    per_layer = df.groupby("layer").importance.apply(lambda s: float((s**2).sum() ** 0.5))
    assert per_layer.tolist() == pytest.approx([1.0, 1.0])
    # bf16 model: the gates and their gradients stay fp32, and agree with the fp32 model
    bf = interp.load(make_hf("llama").to(torch.bfloat16))
    raw_bf, _ = head_importance_scores(bf, _tokens())
    assert raw_bf.dtype == torch.float32
    torch.testing.assert_close(raw_bf, torch.tensor(df.importance_raw.values, dtype=torch.float32).view(2, 4), rtol=0.1, atol=1e-3)


def test_pruning_curve_follows_order_and_matches_o_proj_edits():
    model = interp.load(make_hf("llama"))
    tokens = _tokens()
    # a fixed ranking: least important is (1, 3), then (0, 0), ...
    order = [(1, 3), (0, 0), (0, 2), (1, 1), (0, 1), (1, 0), (0, 3), (1, 2)]
    imp = pd.DataFrame([{"layer": l, "head": h, "importance": float(i)} for i, (l, h) in enumerate(order)])
    assert pruning_order(imp) == order
    curve = pruning_curve(model, tokens, importance=imp, step=0.25)
    assert curve.n_pruned.tolist() == [0, 2, 4, 6, 8]
    assert curve.share_pruned.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    for n, value in zip(curve.n_pruned, curve.metric):
        hf = make_hf("llama")  # reference: the pruned heads' o_proj columns zeroed by hand
        with torch.no_grad():
            for l, h in order[:n]:
                hf.model.layers[l].self_attn.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
            expected = float(lm_loss(hf(input_ids=tokens).logits, tokens))
        assert value == pytest.approx(expected, abs=1e-5)


def test_pruning_curve_default_steps_and_recompute():
    model = interp.load(make_hf("qwen2"))
    tokens = _tokens()
    curve = pruning_curve(model, tokens)
    assert len(curve) == 11 and curve.n_pruned.iloc[-1] == 8
    again = pruning_curve(model, tokens, recompute=True)
    # same endpoints (nothing or everything pruned), and the first step prunes the same least-important head
    assert again.metric.iloc[[0, 1, -1]].tolist() == pytest.approx(curve.metric.iloc[[0, 1, -1]].tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="step must be"):
        pruning_curve(model, tokens, step=0)
