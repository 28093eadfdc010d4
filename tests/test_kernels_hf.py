"""interp.kernels.hf: the kernel as transformers' "interp_kernel" attention, checked against HF's
own SDPA / eager forwards and, on SmolLM2, against the eager attention pattern of the hook layer."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.kernels.hf import NAME, KernelControls, StatsRecorder, clear_controls, controlled, get_controls, set_controls

from conftest import make_hf


@pytest.fixture(autouse=True)
def no_leftover_controls():
    yield
    clear_controls()


def attn_module(model, layer: int):
    return model.model.layers[layer].self_attn


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_logits_equal_sdpa(family, tokens):
    ref, ours = make_hf(family, "sdpa"), make_hf(family, NAME)
    assert ours.config._attn_implementation == NAME
    torch.testing.assert_close(logits(ours, tokens), logits(ref, tokens), atol=1e-5, rtol=0)


def test_gemma2_softcap_and_sliding_window_equal_eager(tokens):
    """Gemma 2 soft-caps the logits and slides a window of 4 (the mask transformers builds reaches the kernel)."""
    ids = torch.cat([tokens, tokens], dim=1)  # 14 tokens: longer than the window
    ref, ours = make_hf("gemma2", "eager"), make_hf("gemma2", NAME)
    torch.testing.assert_close(logits(ours, ids), logits(ref, ids), atol=1e-5, rtol=0)


def test_padding_and_cached_generation_equal_sdpa(tokens):
    ref, ours = make_hf("llama", "sdpa"), make_hf("llama", NAME)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding
    a, b = logits(ref, tokens, attention_mask=mask), logits(ours, tokens, attention_mask=mask)
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], atol=1e-5, rtol=0)
    rec = StatsRecorder()
    set_controls(attn_module(ours, 1), KernelControls(stats=("row_argmax",), on_stats=rec))
    kw = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(ours.generate(tokens[1:], **kw), ref.generate(tokens[1:], **kw))
    # one prefill call, then one call per decoding step with a single query against the KV cache
    assert [tuple(s.row_argmax.shape) for s in rec[1]] == [(1, 4, 7)] + [(1, 4, 1)] * 3


def test_head_gate_zero_equals_zeroing_o_proj_columns(tokens):
    """Per-batch gates: row 0 ablates head 1 of layer 0, row 1 ablates head 2 -- each equals HF with
    that head's o_proj input columns zeroed."""
    ours = make_hf("llama", NAME)
    d = ours.config.head_dim
    gate = torch.ones(2, 4)
    gate[0, 1] = 0.0
    gate[1, 2] = 0.0
    with controlled({attn_module(ours, 0): KernelControls(head_gate=gate)}):
        got = logits(ours, tokens)
    assert get_controls(attn_module(ours, 0)) is None
    for row, head in ((0, 1), (1, 2)):
        ref = make_hf("llama", "sdpa")
        with torch.no_grad():
            attn_module(ref, 0).o_proj.weight[:, head * d:(head + 1) * d] = 0
        torch.testing.assert_close(got[row], logits(ref, tokens)[row], atol=1e-5, rtol=0)
    assert (got - logits(ours, tokens)).abs().max() > 1e-3  # the gate did something


def test_uniform_and_temperature_equal_query_edits(tokens):
    """Uniform attention = zeroed query (Wu et al.); temperature T = query scaled by 1/T. RoPE is
    linear in q, so both equal HF SDPA with that head's q_proj rows edited."""
    ours = make_hf("llama", NAME)
    d = ours.config.head_dim
    rec = StatsRecorder()
    controls = KernelControls(head_uniform=torch.tensor([False, False, True, False]),
                              temperature=torch.tensor([1.0, 2.5, 1.0, 1.0]), stats=("row_max",), on_stats=rec)
    with controlled({attn_module(ours, 1): controls}):
        got = logits(ours, tokens)
    ref = make_hf("llama", "sdpa")
    with torch.no_grad():
        w = attn_module(ref, 1).q_proj.weight
        w[2 * d:3 * d] = 0
        w[1 * d:2 * d] /= 2.5
    torch.testing.assert_close(got, logits(ref, tokens), atol=1e-5, rtol=0)
    row_max = rec[1][0].row_max[:, 2]  # uniform causal head: 1 / (i + 1)
    torch.testing.assert_close(row_max, (1.0 / torch.arange(1, 8)).expand(2, 7))


def test_stats_equal_eager_output_attentions(tokens):
    ref, ours = make_hf("llama", "eager"), make_hf("llama", NAME)
    with torch.no_grad():
        pattern = ref(tokens, output_attentions=True).attentions
    rec = StatsRecorder()
    stats = ("col_sum", "row_max", "row_argmax", "row_entropy")
    with controlled({attn_module(ours, l): KernelControls(stats=stats, on_stats=rec) for l in range(2)}):
        logits(ours, tokens)
    for layer in range(2):
        a = pattern[layer]
        st = rec[layer][0]
        torch.testing.assert_close(st.col_sum, a.sum(-2), atol=1e-5, rtol=0)
        torch.testing.assert_close(st.row_max, a.max(-1).values, atol=1e-6, rtol=0)
        torch.testing.assert_close(st.row_entropy, -(a * a.clamp(min=1e-30).log()).sum(-1), atol=1e-5, rtol=0)
        assert torch.equal(st.row_argmax, a.argmax(-1))
        alpha = torch.stack([a[..., j:, j].mean(-1) for j in range(a.shape[-1])], -1)
        torch.testing.assert_close(st.alpha(), alpha, atol=1e-6, rtol=0)


def test_controls_reject_wrong_types():
    with pytest.raises(TypeError, match="KernelControls"):
        set_controls(torch.nn.Linear(1, 1), {"head_gate": 0})


# ---------------------------------------------------------------------------- SmolLM2 end to end

PROMPT = ("The special magic number is 73914. Remember it. The grass is green and the sky is blue. "
          "What is the special magic number? The special magic number is")
LAYERS = (0, 5, 14, 29)


def eager_reference(smollm):
    """Eager patterns and the post-RoPE q/k and v the hook layer saw, on the prompt."""
    names = lambda n: n.endswith(("hook_pattern", "hook_rot_q", "hook_rot_k", "hook_v"))  # noqa: E731
    _, cache = smollm.run_with_cache(PROMPT, names_filter=names)
    return cache


def top_is_maximal(pattern: torch.Tensor, argmax: torch.Tensor) -> None:
    """The kernel's top-1 key carries the maximal weight (equal index unless two keys tie within 1e-6)."""
    chosen = pattern.gather(-1, argmax[..., None])[..., 0]
    assert (pattern.max(-1).values - chosen).max() <= 1e-6
    assert (argmax == pattern.argmax(-1)).float().mean() > 0.99


@pytest.mark.bundled
def test_smollm_kernel_stats_equal_eager_pattern_on_same_qkv(smollm):
    cache = eager_reference(smollm)
    for l in LAYERS:
        q, k, v = (cache[f"blocks.{l}.attn.hook_{x}"].transpose(1, 2) for x in ("rot_q", "rot_k", "v"))
        pattern = cache[f"blocks.{l}.attn.hook_pattern"].double()
        _, st = interp.kernels.attention(q, k, v, stats=("col_sum", "row_argmax"), backend="reference", block_size=16)
        torch.testing.assert_close(st.col_sum.double(), pattern.sum(-2), atol=1e-5, rtol=0)
        alpha = torch.stack([pattern[..., j:, j].mean(-1) for j in range(pattern.shape[-1])], -1)
        torch.testing.assert_close(st.alpha().double(), alpha, atol=1e-6, rtol=0)  # Gu et al.'s alpha(k)
        top_is_maximal(pattern, st.row_argmax)


@pytest.mark.bundled
def test_smollm_through_registered_kernel_equals_eager(smollm):
    """The whole model on "interp_kernel" (a fresh copy): same logits as the hook layer's SDPA run;
    the stats recorded inside the forward equal the eager patterns: sink alpha(k) and top-1 keys."""
    cache = eager_reference(smollm)
    hf = interp.load("smollm2-135m").hf_model
    hf.set_attn_implementation(NAME)
    rec = StatsRecorder()
    for l in LAYERS:
        set_controls(hf.model.layers[l].self_attn, KernelControls(stats=("col_sum", "row_argmax"), on_stats=rec,
                                                                  backend="reference"))
    ids = smollm.to_tokens(PROMPT)
    torch.testing.assert_close(logits(hf, ids), smollm(ids).detach(), atol=1e-4, rtol=0)
    for l in LAYERS:
        pattern = cache[f"blocks.{l}.attn.hook_pattern"].double()
        (st,) = rec[l]
        alpha = torch.stack([pattern[..., j:, j].mean(-1) for j in range(pattern.shape[-1])], -1)
        torch.testing.assert_close(st.alpha().double(), alpha, atol=1e-5, rtol=0)
        top_is_maximal(pattern, st.row_argmax)
