"""interp.kernels, Triton backend: same oracle and bounds as the reference tests.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
interp.kernels.triton_attention before it imports triton) on small shapes; on a CUDA machine the
`gpu` tests add the real head dims and longer sequences. Fresh random inputs each run; the seed
is in every failure message (KERNEL_TEST_SEED replays one)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from interp.kernels import attention  # noqa: E402
from interp.kernels import triton_attention as ta  # noqa: E402

from test_kernels_reference import check, fresh_seed, make_qkv, oracle  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not ta.INTERPRETING:
    pytest.skip("no CUDA and Triton's interpreter is off (TRITON_INTERPRET=0)", allow_module_level=True)


@pytest.fixture(autouse=True)
def fast_interpreter(monkeypatch):
    """The interpreter checks every int32 multiply for overflow (a debug check compiled kernels skip);
    that doubles its run time here, so the tests switch it off (restored afterwards)."""
    if CUDA:
        return
    from triton.runtime import interpreter

    opts = interpreter.interpreter_builder.options
    if hasattr(opts, "sanitize_overflow"):
        monkeypatch.setattr(interpreter.interpreter_builder, "options", dataclasses.replace(opts, sanitize_overflow=False))


def poisoned(monkeypatch):
    """Every buffer the Triton launcher allocates starts as NaN (floats) or a sentinel (ints)."""

    def empty(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -12345
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(ta, "_empty", empty)


CASES = [  # (heads, kv heads, q_len, k_len, d, block): odd lengths, T not a multiple of the block, decode
    (4, 2, 1, 1, 16, 16),
    (4, 2, 7, 7, 32, 16),
    (3, 1, 33, 33, 16, 16),
    (2, 2, 65, 65, 64, 32),
    (4, 2, 5, 40, 16, 16),
    (6, 3, 1, 33, 16, 32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h,hk,tq,tk,d,block", CASES)
def test_triton_matches_float64_oracle(monkeypatch, dtype, causal, h, hk, tq, tk, d, block):
    poisoned(monkeypatch)
    seed = fresh_seed()
    q, k, v = make_qkv(seed, 2, h, hk, tq, tk, d, dtype, DEVICE)
    out, st = attention(q, k, v, causal=causal, stats=True, backend="triton", block_size=block)
    ref_out, ref = oracle(q.cpu(), k.cpu(), v.cpu(), causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    check(out, st, ref_out, ref, dtype, f"seed={seed} heads={h}/{hk} tq={tq} tk={tk} d={d} causal={causal} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_interventions_masks_and_strides(monkeypatch, dtype):
    """Per-(batch, head) gate / uniform / temperature, softcap, padding and a full mask, on
    non-contiguous inputs in transformers' [batch, pos, head, d] storage; same as the reference."""
    poisoned(monkeypatch)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed + 1)
    b, h, hk, t, d = 3, 4, 2, 37, 32
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make_qkv(seed, b, h, hk, t, t, d, dtype, DEVICE))
    assert not q.is_contiguous()
    gate = torch.rand(b, h, generator=g) * 2 - 0.5
    gate[0, 1] = 0.0
    uniform = torch.rand(b, h, generator=g) < 0.4
    temperature = torch.rand(b, h, generator=g) + 0.3
    key_mask = torch.ones(b, t, dtype=torch.bool)
    key_mask[1, :5] = False
    key_mask[2, -3:] = False
    full = torch.rand(1, 1, t, t, generator=g) < 0.8
    kw = dict(head_gate=gate, head_uniform=uniform, temperature=temperature, softcap=3.0)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    for mask_kw, mask in (({"key_mask": key_mask}, key_mask[:, None, None, :]), ({"mask": full}, full)):
        out, st = attention(q, k, v, stats=True, backend="triton", block_size=32,
                            **{n: dev(x) for n, x in kw.items() if torch.is_tensor(x)}, softcap=3.0,
                            **{n: dev(x) for n, x in mask_kw.items()})
        ref_out, ref = oracle(q.cpu(), k.cpu(), v.cpu(), gate=gate, uniform=uniform, temperature=temperature,
                              softcap=3.0, mask=mask)
        check(out, st, ref_out, ref, dtype, f"seed={seed} {dtype} {list(mask_kw)}")
    assert torch.all(out[0, 1] == 0)


def test_triton_without_stats_writes_only_the_output(monkeypatch):
    poisoned(monkeypatch)
    seed = fresh_seed()
    q, k, v = make_qkv(seed, 1, 4, 2, 19, 19, 16, torch.float32, DEVICE)
    out = attention(q, k, v, backend="triton", block_size=16)
    assert torch.is_tensor(out) and not torch.isnan(out).any()
    ref_out, _ = oracle(q.cpu(), k.cpu(), v.cpu())
    assert torch.allclose(out.cpu().double(), ref_out, atol=1e-5), f"seed={seed}"


def test_triton_refuses_what_it_cannot_do():
    q, k, v = make_qkv(0, 1, 2, 2, 4, 4, 16, torch.float64, DEVICE)
    with pytest.raises(ValueError, match="float64"):
        attention(q, k, v, backend="triton")
    q32 = q.float().requires_grad_(True)
    with pytest.raises(ValueError, match="forward-only"):
        attention(q32, k.float(), v.float(), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h,hk,d", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_real_head_dims(monkeypatch, dtype, h, hk, d, causal):
    """SmolLM2 (9/3, d 64) and Llama-3-8B (32/8, d 128) head layouts at T = 1000 with the default tiles."""
    poisoned(monkeypatch)
    seed = fresh_seed()
    q, k, v = make_qkv(seed, 1, h, hk, 1000, 1000, d, dtype, "cuda")
    out, st = attention(q, k, v, causal=causal, stats=True)  # auto picks triton on CUDA
    ref_out, ref = oracle(q.cpu(), k.cpu(), v.cpu(), causal=causal)
    check(out, st, ref_out, ref, dtype, f"seed={seed} {h}/{hk} d={d} {dtype} causal={causal}")
