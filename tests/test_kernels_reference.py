"""interp.kernels, reference backend: output and every statistic against a float64 full-pattern
oracle written independently here, on fresh random inputs each run (the seed is in every failure
message; set KERNEL_TEST_SEED to replay one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from interp.kernels import STATS, AttentionStats, attention

ROOT = Path(__file__).resolve().parents[1]
# Error bounds by input dtype: max |ours - oracle| / max(1, max |oracle|) per tensor.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def fresh_seed() -> int:
    return int(os.environ.get("KERNEL_TEST_SEED") or int.from_bytes(os.urandom(4), "little") % 2**31)


def make_qkv(seed: int, b: int, h: int, hk: int, tq: int, tk: int, d: int, dtype: torch.dtype, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n, t in ((h, tq), (hk, tk), (hk, tk)))
    return tuple(x.to(device=device, dtype=dtype) for x in (q * 1.5, k * 1.5, v))


def oracle(q, k, v, causal=True, scale=None, gate=None, uniform=None, temperature=None, mask=None, softcap=None):
    """Full T x T attention in float64: returns out and the statistics, from the whole pattern."""
    q, k, v = (x.double() for x in (q, k, v))
    b, h, tq, d = q.shape
    tk = k.shape[2]
    groups = h // k.shape[1]
    k = torch.repeat_interleave(k, groups, dim=1)
    v = torch.repeat_interleave(v, groups, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * (d ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    ctrl = lambda x, dt: torch.as_tensor(x, dtype=dt).expand(b, h)[:, :, None, None]  # noqa: E731
    if temperature is not None:
        s = s / ctrl(temperature, torch.float64)
    if uniform is not None:
        s = torch.where(ctrl(uniform, torch.bool), 0.0, s)
    allowed = torch.ones(b, h, tq, tk, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    if mask is not None:
        allowed &= mask
    s = s.masked_fill(~allowed, float("-inf"))
    has = allowed.any(-1)
    lse = torch.logsumexp(s, -1)
    a = torch.exp(s - torch.where(has, lse, 0.0)[..., None])
    out = a @ v
    if gate is not None:
        out = out * ctrl(gate, torch.float64)
    plogp = torch.where(a > 0, a * torch.log(torch.where(a > 0, a, 1.0)), 0.0)
    return out, dict(
        col_sum=a.sum(-2), row_max=a.max(-1).values, row_argmax=torch.where(has, a.argmax(-1), -1),
        row_entropy=-plogp.sum(-1), lse=lse, n_queries=allowed.sum(-2), pattern=a,
    )


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double().cpu(), ref.double().cpu()
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(ours), inf), "infinities differ"
    if inf.all():
        return 0.0
    diff = (ours - ref)[~inf].abs().max().item()
    return diff / max(1.0, ref[~inf].abs().max().item())


def check(out, st: AttentionStats, ref_out, ref: dict, dtype, msg: str) -> None:
    """Every output within the dtype's bound; argmax exact up to near-ties of the float64 pattern."""
    tol = TOL[dtype]
    assert not torch.isnan(out).any(), f"NaN in out; {msg}"
    assert rel_err(out, ref_out) < tol, f"out error {rel_err(out, ref_out):.3g} >= {tol}; {msg}"
    for name in ("col_sum", "row_max", "row_entropy", "lse"):
        got = getattr(st, name)
        assert got is not None and not torch.isnan(got).any(), f"{name} missing or NaN; {msg}"
        assert rel_err(got, ref[name]) < tol, f"{name} error {rel_err(got, ref[name]):.3g} >= {tol}; {msg}"
    arg = st.row_argmax.cpu()
    assert torch.equal(arg == -1, ref["row_argmax"] == -1), f"rows with no key differ; {msg}"
    a = ref["pattern"]
    chosen = a.gather(-1, arg.clamp(min=0)[..., None])[..., 0]
    gap = torch.where(arg >= 0, a.max(-1).values - chosen, 0.0)
    assert gap.max().item() <= 2 * tol, f"row_argmax picks a key {gap.max().item():.3g} below the top; {msg}"
    assert torch.equal(st.n_queries.cpu(), ref["n_queries"]), f"n_queries; {msg}"


SHAPES = [  # (q_len, k_len): odd lengths, T not a multiple of the block, decode (q_len < k_len)
    (1, 1), (7, 7), (33, 33), (65, 65), (5, 40), (1, 33),
]
HEADS = [(4, 2), (3, 3), (6, 1)]  # (query heads, KV heads): GQA, MHA, MQA


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq,tk", SHAPES)
def test_matches_float64_oracle(dtype, causal, tq, tk):
    seed = fresh_seed()
    for h, hk in HEADS:
        q, k, v = make_qkv(seed, 2, h, hk, tq, tk, 16, dtype)
        out, st = attention(q, k, v, causal=causal, stats=True, backend="reference", block_size=16)
        ref_out, ref = oracle(q, k, v, causal=causal)
        assert out.dtype == dtype and out.shape == q.shape
        check(out, st, ref_out, ref, dtype, f"seed={seed} heads={h}/{hk} tq={tq} tk={tk} causal={causal} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_interventions_per_batch_row(dtype):
    """Gate, uniform and temperature given per (batch, head), with softcap, a key mask and a full mask."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed + 1)
    b, h, hk, t = 3, 4, 2, 37
    q, k, v = make_qkv(seed, b, h, hk, t, t, 16, dtype)
    gate = torch.rand(b, h, generator=g) * 2 - 0.5
    gate[0, 1] = 0.0
    uniform = torch.rand(b, h, generator=g) < 0.4
    temperature = torch.rand(b, h, generator=g) + 0.3
    key_mask = torch.ones(b, t, dtype=torch.bool)
    key_mask[1, :5] = False  # left padding: its first queries see no key at all
    key_mask[2, -3:] = False  # right padding
    full = torch.rand(1, 1, t, t, generator=g) < 0.8
    kw = dict(head_gate=gate, head_uniform=uniform, temperature=temperature, softcap=3.0)
    for mask_kw, mask in (({"key_mask": key_mask}, key_mask[:, None, None, :]), ({"mask": full}, full)):
        out, st = attention(q, k, v, stats=True, backend="reference", block_size=16, **kw, **mask_kw)
        ref_out, ref = oracle(q, k, v, gate=gate, uniform=uniform, temperature=temperature, softcap=3.0, mask=mask)
        check(out, st, ref_out, ref, dtype, f"seed={seed} {dtype} {list(mask_kw)}")
    assert torch.all(out[0, 1] == 0), "gate 0 must zero the head"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_head_gemm_path_matches_oracle(dtype, monkeypatch):
    """Long-context slabs run one 2-D GEMM per (batch, KV head) (`_Slab.matmul`); forced here on small
    inputs (threshold 0), with interventions, a key mask and several blocks, against the oracle."""
    import interp.kernels.reference as reference

    monkeypatch.setattr(reference, "LOOP_MIN_MACS", 0)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed + 2)
    b, h, hk, t = 2, 6, 2, 41
    q, k, v = make_qkv(seed, b, h, hk, t, t, 16, dtype)
    out, st = attention(q, k, v, stats=True, backend="reference", block_size=8)
    ref_out, ref = oracle(q, k, v)
    check(out, st, ref_out, ref, dtype, f"seed={seed} {dtype} plain")
    key_mask = torch.ones(b, t, dtype=torch.bool)
    key_mask[1, -4:] = False
    gate, temperature = torch.rand(b, h, generator=g), torch.rand(b, h, generator=g) + 0.5
    out, st = attention(q, k, v, stats=True, backend="reference", block_size=8, key_mask=key_mask, head_gate=gate,
                        temperature=temperature)
    ref_out, ref = oracle(q, k, v, gate=gate, temperature=temperature, mask=key_mask[:, None, None, :])
    check(out, st, ref_out, ref, dtype, f"seed={seed} {dtype} masked")


@pytest.mark.parametrize("wanted", [("col_sum",), ("row_entropy",), ("lse",), ("row_max",), ("row_argmax",),
                                    ("col_sum", "row_entropy")])
def test_each_statistic_alone_matches_all_at_once(wanted):
    """The block pass skips what is not asked for (the max pass, the second scratch buffer): each
    statistic asked alone equals the same statistic computed with all of them, and the output is unchanged."""
    seed = fresh_seed()
    q, k, v = make_qkv(seed, 2, 4, 2, 37, 37, 16, torch.float32)
    out_all, st_all = attention(q, k, v, stats=True, backend="reference", block_size=8)
    out, st = attention(q, k, v, stats=wanted, backend="reference", block_size=8)
    assert torch.equal(out, out_all), f"seed={seed}"
    for name in STATS:
        got = getattr(st, name)
        if name in wanted:
            torch.testing.assert_close(got, getattr(st_all, name), rtol=0, atol=1e-6, msg=f"{name}, seed={seed}")
        else:
            assert got is None, f"{name} was not asked for"


def test_empty_rows_and_uniform_heads_by_hand():
    """Hand-worked: a uniform causal head gives row_max 1/(i+1), entropy log(i+1), argmax 0, col_sum H_T - H_k;
    a query with no allowed key gets out 0, lse -inf, argmax -1, row_max 0, entropy 0."""
    t = 9
    q, k, v = make_qkv(fresh_seed(), 1, 2, 1, t, t, 16, torch.float64)
    key_mask = torch.ones(1, t, dtype=torch.bool)
    key_mask[0, :2] = False
    out, st = attention(q, k, v, head_uniform=[True, False], key_mask=key_mask, stats=True, backend="reference", block_size=4)
    n = (torch.arange(t) - 1).clamp(min=0).double()  # keys 2..i allowed for query i
    seen = n > 0
    assert torch.allclose(st.row_max[0, 0][seen], 1 / n[seen])
    assert torch.allclose(st.row_entropy[0, 0][seen], torch.log(n[seen]))
    assert st.row_argmax[0, 0].tolist() == [-1, -1] + [2] * (t - 2)
    assert torch.all(out[0, :, :2] == 0) and torch.all(torch.isneginf(st.lse[0, :, :2]))
    assert torch.all(st.row_max[0, :, :2] == 0) and torch.all(st.row_entropy[0, :, :2] == 0)
    # col_sum of key j (j >= 2) under the uniform head: sum over queries i >= j of 1 / (i - 1)
    expect = torch.tensor([0.0, 0.0] + [sum(1 / (i - 1) for i in range(j, t)) for j in range(2, t)], dtype=torch.float64)
    assert torch.allclose(st.col_sum[0, 0], expect)
    v_mean = torch.stack([v[0, 0, 2:i + 1].mean(0) for i in range(2, t)])
    assert torch.allclose(out[0, 0, 2:], v_mean)


def test_alpha_is_gu_sink_score():
    """alpha(k) = mean over the queries i >= k of A[i, k] (Gu et al.), from the float64 pattern."""
    seed = fresh_seed()
    q, k, v = make_qkv(seed, 2, 4, 2, 21, 21, 16, torch.float64)
    _, st = attention(q, k, v, stats="col_sum", backend="reference", block_size=8)
    _, ref = oracle(q, k, v)
    a = ref["pattern"]
    alpha = torch.stack([a[..., j:, j].mean(-1) for j in range(21)], dim=-1)
    assert torch.allclose(st.alpha(), alpha, atol=1e-12), f"seed={seed}"
    assert st.row_max is None and st.lse is None  # only what was asked for


def test_gradients_through_gate_match_oracle():
    """The reference backend is autograd-able: d loss / d gate (Michel et al.'s importance) equals float64."""
    seed = fresh_seed()
    q, k, v = make_qkv(seed, 2, 4, 2, 13, 13, 16, torch.float64)
    gate = torch.ones(2, 4, dtype=torch.float64, requires_grad=True)
    q.requires_grad_(True)
    (attention(q, k, v, head_gate=gate, backend="reference", block_size=4) ** 2).sum().backward()
    g_ours, gq_ours = gate.grad.clone(), q.grad.clone()
    gate.grad = None
    q.grad = None
    (oracle(q, k, v, gate=gate)[0] ** 2).sum().backward()
    assert torch.allclose(g_ours, gate.grad, rtol=1e-10), f"seed={seed}"
    assert torch.allclose(gq_ours, q.grad, rtol=1e-8, atol=1e-10), f"seed={seed}"


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_t_by_t():
    """Largest tensor the reference creates, stats included, is O(T * block), well below T x T."""
    b, h, t, block = 1, 2, 512, 32
    q, k, v = make_qkv(fresh_seed(), b, h, h, t, t, 16, torch.float32)
    with _LargestTensor() as mode:
        attention(q, k, v, stats=True, backend="reference", block_size=block)
    assert mode.largest <= b * h * t * block, (mode.largest, b * h * t * t)


def test_bad_input_errors_say_what_to_do():
    q, k, v = make_qkv(0, 1, 4, 2, 5, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k[:, :1].expand(1, 3, 5, 16), v[:, :1].expand(1, 3, 5, 16))
    with pytest.raises(ValueError, match=r"\[n_heads\]=\[4\]"):
        attention(q, k, v, head_gate=torch.ones(3))
    with pytest.raises(ValueError, match="q_len <= k_len"):
        attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="unknown statistics"):
        attention(q, k, v, stats=("pattern",))
    with pytest.raises(ValueError, match="boolean"):
        attention(q, k, v, head_uniform=torch.ones(4))
    with pytest.raises(ValueError, match="must be 4-D"):
        attention(q[0], k[0], v[0])
    assert set(STATS) == {"col_sum", "row_max", "row_argmax", "row_entropy", "lse"}


def test_benchmark_smoke_mode_runs_on_cpu():
    """benchmarks/attention.py --smoke: every variant on the reference backend at tiny sizes; no RESULTS.md write."""
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--smoke"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    for variant in ("kernel", "kernel+stats", "sdpa", "eager+weights"):
        assert f"| {variant} " in run.stdout, run.stdout
    assert "smoke" in run.stdout and "max err" in run.stdout
    assert (results.read_bytes() if results.exists() else None) == before
