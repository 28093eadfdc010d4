"""q, k, v, rot_q, rot_k, pattern and z checked against a float64 recomputation from the layer's
weights, written independently of both HF's code and ours (rotary embedding included)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny


def rms_norm(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x, theta):
    """Rotary embedding, half-split convention: pairs (i, i + d/2) rotate by pos * theta^(-2i/d)."""
    pos, d = x.shape[1], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(pos, dtype=torch.float64)[:, None] * inv_freq[None]  # [pos, d/2]
    cos = torch.cat([angles.cos()] * 2, -1)[None, :, None]
    sin = torch.cat([angles.sin()] * 2, -1)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attend(q, k, v, scale):
    """q [b, s, h, d], k/v [b, s, kv, d] -> pattern [b, h, s, s], z [b, s, h, d]."""
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = q.shape[1]
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    pattern = scores.softmax(-1)
    return pattern, torch.einsum("bhqk,bkhd->bqhd", pattern, v)


def linear(x, module):
    out = x @ module.weight.double().T
    return out + module.bias.double() if module.bias is not None else out


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_llama_family_attention_in_float64(family, tokens):
    model = make_tiny(family)
    c, hf_cfg = model.cfg, model.hf_model.config
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    for l in range(c.n_layers):
        attn = model.adapter.layers[l].attn
        ln = model.adapter.layers[l].ln1
        x = rms_norm(cache[f"blocks.{l}.hook_resid_pre"].double(), ln.weight.double(), ln.variance_epsilon)
        b, s, _ = x.shape
        q = linear(x, attn.q_proj).view(b, s, c.n_heads, c.d_head)
        k = linear(x, attn.k_proj).view(b, s, c.n_kv_heads, c.d_head)
        v = linear(x, attn.v_proj).view(b, s, c.n_kv_heads, c.d_head)
        theta = hf_cfg.rope_parameters["rope_theta"]
        rq, rk = rotate(q, theta), rotate(k, theta)
        pattern, z = attend(rq, rk, v, c.d_head ** -0.5)
        for name, ref in (("q", q), ("k", k), ("v", v), ("rot_q", rq), ("rot_k", rk), ("pattern", pattern), ("z", z)):
            got = cache[f"blocks.{l}.attn.hook_{name}"].double()
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{family} layer {l} {name}: {m}")


def test_gpt2_attention_in_float64(tokens):
    model = make_tiny("gpt2")
    c = model.cfg
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    for l in range(c.n_layers):
        block = model.adapter.layers[l].block
        x = torch.nn.functional.layer_norm(
            cache[f"blocks.{l}.hook_resid_pre"].double(), (c.d_model,), block.ln_1.weight.double(), block.ln_1.bias.double(), block.ln_1.eps
        )
        qkv = x @ block.attn.c_attn.weight.double() + block.attn.c_attn.bias.double()  # Conv1D: [in, out]
        b, s, _ = x.shape
        q, k, v = (t.reshape(b, s, c.n_heads, c.d_head) for t in qkv.split(c.d_model, -1))
        pattern, z = attend(q, k, v, c.d_head ** -0.5)
        for name, ref in (("q", q), ("k", k), ("v", v), ("pattern", pattern), ("z", z)):
            torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_{name}"].double(), ref, atol=1e-5, rtol=1e-4)
