"""interp/heads/stacked.py: single-head ablations as stacked per-row kernel controls, each forward started
at the ablated layer, give the numbers of the hook-based sweep (`single_head_ablation(backend="eager")`)."""

from __future__ import annotations

import pytest
import torch

from interp.heads import stacked
from interp.heads.ablate import AblationKind
from interp.heads.loss import LMLoss, lm_loss
from interp.heads.sweeps import single_head_ablation
from interp.metrics import LogitDiff

from conftest import FAMILIES, make_tiny

CUDA = torch.cuda.is_available()
TOL = 1e-5


def _tokens(seed: int, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(4, 100, shape, generator=torch.Generator().manual_seed(seed))


def _both(model, tokens, how, **kwargs):
    eager = single_head_ablation(model, tokens, LMLoss, how=how, backend="eager", **kwargs)
    fast = single_head_ablation(model, tokens, LMLoss, how=how, **kwargs)
    return eager, fast


def _assert_same(eager, fast, tol=TOL):
    assert list(fast.columns) == list(eager.columns)
    assert fast[["layer", "head", "how"]].equals(eager[["layer", "head", "how"]])
    assert float((fast.metric - eager.metric).abs().max()) <= tol
    assert float((fast.delta - eager.delta).abs().max()) <= tol
    assert float(eager.delta.abs().max()) > 1e-3  # the ablations do something


@pytest.mark.parametrize("how", ["zero", "mean", "uniform"])
@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_equals_eager_on_every_family(family, how, tokens):
    """GQA (llama, qwen2, mistral, gemma2, gemma3), Gemma's sliding windows (T = 7 > window) and soft-capping."""
    model = make_tiny(family)
    _assert_same(*_both(model, tokens, how, reference=_tokens(13)))


@pytest.mark.parametrize("how,kwargs", [
    ("resample", {}),
    ("mean", {"per_position": True}),
    ("mean", {"reference_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])}),
])
def test_resample_and_mean_variants(how, kwargs, tokens):
    model = make_tiny("qwen2")
    _assert_same(*_both(model, tokens, how, reference=_tokens(21), **kwargs))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("how", ["zero", "uniform", "mean"])
def test_padded_batch(family, how):
    """A right-padded batch: the mask goes to every stacked copy, as to the eager sweep's forward."""
    model = make_tiny(family)
    tokens = _tokens(3, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    _assert_same(*_both(model, tokens, how, attention_mask=mask, reference=_tokens(8)))


def _padded(seed: int = 3):
    """Three prompts of 8, 5 and 3 real tokens, right-padded to 8, with (correct, wrong) answers."""
    tokens = _tokens(seed, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return tokens, mask, _tokens(seed + 100, (3, 2))


@pytest.mark.parametrize("how", ["zero", "mean", "uniform"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "right-padded"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_last_position_metric_stacked_equals_eager(family, padded, how):
    """LogitDiff (a logits-only Metric, last_position_only): the stacked sweep, which unembeds only
    each prompt's last (real) token, gives the eager sweep's numbers."""
    model = make_tiny(family)
    if padded:
        tokens, mask, answers = _padded()
    else:
        tokens, mask, answers = _tokens(4, (2, 7)), None, _tokens(104, (2, 2))
    kw = dict(how=how, attention_mask=mask, reference=_tokens(8))
    eager = single_head_ablation(model, tokens, LogitDiff(answers), backend="eager", **kw)
    fast = single_head_ablation(model, tokens, LogitDiff(answers), **kw)
    _assert_same(eager, fast)


@pytest.mark.parametrize("how", ["zero", "mean", "uniform"])
@pytest.mark.parametrize("backend", ["eager", "stacked"])
def test_padded_last_position_metric_equals_each_prompt_alone(backend, how):
    """Independent reference for the padded batch: each prompt run alone, unpadded, at its own length;
    the batch's LogitDiff is the mean over prompts of theirs (the pads are never read)."""
    model = make_tiny("llama")
    tokens, mask, answers = _padded()
    reference = _tokens(8)
    batch = single_head_ablation(model, tokens, LogitDiff(answers), how=how, attention_mask=mask, reference=reference,
                                 backend=backend)
    alone = []
    for i, n in enumerate(mask.sum(1).tolist()):
        alone.append(single_head_ablation(model, tokens[i : i + 1, :n], LogitDiff(answers[i : i + 1]), how=how,
                                          reference=reference, backend="eager"))
    for col in ("metric", "delta"):
        expected = sum(torch.tensor(df[col].to_numpy()) for df in alone) / len(alone)
        assert float((torch.tensor(batch[col].to_numpy()) - expected).abs().max()) <= TOL
    # the pad positions do carry other logits: reading them (the bug fixed here) would change the numbers
    full = model(tokens, attention_mask=mask)
    assert float((LogitDiff(answers)(full) - LogitDiff(answers)(full[torch.arange(3), mask.sum(1) - 1][:, None])).abs()) > 1e-3


class Recording:
    """LogitDiff that records the shape of every logits tensor it is handed."""

    last_position_only = True

    def __init__(self, answers):
        self.inner = LogitDiff(answers)
        self.shapes = []

    def __call__(self, logits):
        self.shapes.append(tuple(logits.shape))
        return self.inner(logits)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "right-padded"])
def test_stacked_forms_only_the_last_positions_logits(padded):
    """With a last-position metric every stacked forward (and the clean one) unembeds one position per
    row: the unembedding's output is [rows, 1, d_vocab] and the metric gets [batch, 1, d_vocab]. With
    LMLoss the forwards form every position's logits, and the unpadded eager sweep hands the metric the
    full logits, as before."""
    model = make_tiny("llama")
    if padded:
        tokens, mask, answers = _padded()
    else:
        tokens, mask, answers = _tokens(4, (2, 7)), None, _tokens(104, (2, 2))
    B, T = tokens.shape
    V = model.cfg.d_vocab
    unembedded = []
    handle = model.hf_model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: unembedded.append(tuple(out.shape)))
    try:
        metric = Recording(answers)
        single_head_ablation(model, tokens, metric, how="zero", attention_mask=mask, heads=[(0, 1), (1, 0), (1, 3)])
        # one clean forward, then one forward per layer: 1 copy for layer 0, 2 for layer 1
        assert unembedded == [(B, 1, V), (B, 1, V), (2 * B, 1, V)]
        assert metric.shapes == [(B, 1, V)] * 4
        unembedded.clear()
        single_head_ablation(model, tokens, LMLoss, how="zero", attention_mask=mask, heads=[(1, 0)])
        assert unembedded == [(B, T, V), (B, T, V)]
        eager = Recording(answers)
        single_head_ablation(model, tokens, eager, how="zero", attention_mask=mask, heads=[(1, 0)], backend="eager")
        assert eager.shapes == [(B, 1, V) if padded else (B, T, V)] * 2
    finally:
        handle.remove()


@pytest.mark.parametrize("batch_heads", [1, 3, None])
def test_chunking_and_head_subsets_do_not_change_the_numbers(batch_heads, tokens):
    model = make_tiny("mistral")
    heads = [(1, 2), (0, 3), (1, 0), (0, 0)]
    eager = single_head_ablation(model, tokens, lm_loss, how="zero", heads=heads, backend="eager")
    fast = single_head_ablation(model, tokens, lm_loss, how="zero", heads=heads, batch_heads=batch_heads)
    assert [(int(l), int(h)) for l, h in zip(fast.layer, fast["head"])] == heads
    _assert_same(eager, fast)


def test_forwards_start_at_the_ablated_layer(tokens, monkeypatch):
    """Heads of layer 1 only: block 0 runs once (the clean run), on the prompt batch alone; the
    stacked forward gets per-row controls [copies * batch, n_heads] at layer 1."""
    model = make_tiny("llama")
    ran = []
    controls = []
    real = stacked.forward_from_layer

    def spy(model, layer, resid, tokens, copies, ctl, *args, **kwargs):
        controls.append((layer, copies, ctl))
        return real(model, layer, resid, tokens, copies, ctl, *args, **kwargs)

    monkeypatch.setattr(stacked, "forward_from_layer", spy)
    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: ran.append(x.shape[0]))]):
        df = single_head_ablation(model, tokens, LMLoss, how="zero", heads=[(1, h) for h in range(4)])
    assert ran == [tokens.shape[0]]
    assert len(df) == 4
    ((layer, copies, ctl),) = controls
    B = tokens.shape[0]
    assert (layer, copies) == (1, 4)
    gate = ctl.head_gate
    assert gate.shape == (4 * B, 4) and ctl.head_uniform is None
    for j in range(4):
        expected = torch.ones(4)
        expected[j] = 0
        assert torch.equal(gate[j * B : (j + 1) * B], expected.expand(B, 4))


def test_controls_per_kind():
    sel = stacked.row_heads([2, 0], 3, 4, "cpu")
    assert sel.shape == (6, 4) and sel[:3, 2].all() and sel[3:, 0].all() and int(sel.sum()) == 6
    uni = stacked.kernel_controls_for(AblationKind.UNIFORM, sel)
    assert uni.head_gate is None and torch.equal(uni.head_uniform, sel)
    for kind in (AblationKind.ZERO, AblationKind.MEAN, AblationKind.RESAMPLE):
        ctl = stacked.kernel_controls_for(kind, sel)
        assert ctl.head_uniform is None and torch.equal(ctl.head_gate, (~sel).float())


def test_chunk_heads_is_even_and_complete():
    assert stacked.chunk_heads(list(range(9)), 8) == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert stacked.chunk_heads(list(range(9)), 9) == [list(range(9))]
    assert stacked.chunk_heads([4], 3) == [[4]]
    with pytest.raises(ValueError, match="batch_heads must be >= 1"):
        stacked.chunk_heads([0, 1], 0)


def test_errors(tokens):
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="backend must be one of"):
        single_head_ablation(model, tokens, LMLoss, backend="fast")
    with pytest.raises(ValueError, match="needs `reference`"):
        single_head_ablation(model, tokens, LMLoss, how="mean")
    with pytest.raises(ValueError, match="reference batch 3 does not match input batch 2"):
        single_head_ablation(model, tokens, LMLoss, how="resample", reference=_tokens(2, (3, 7)))
    with pytest.raises(ValueError, match="hook_pattern has a hook attached"), \
            model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: None)]):
        single_head_ablation(model, tokens, LMLoss, heads=[(1, 0)])


@pytest.mark.bundled
@pytest.mark.parametrize("how", ["zero", "mean", "uniform"])
def test_smollm2_stacked_equals_eager(smollm, how):
    """SmolLM2-135M (9 query / 3 KV heads): every head of the first and last layers, two short prompts."""
    tokens = smollm.to_tokens(["The capital of France is Paris, and the capital", "def add(a, b):\n    return a + b\n"])[:, :8]
    reference = smollm.to_tokens(["Numbers: 1, 2, 3, 4, 5, 6, 7, 8", "She walked to the market and bought"])[:, :8]
    heads = [(l, h) for l in (0, 29) for h in range(smollm.cfg.n_heads)]
    _assert_same(*_both(smollm, tokens, how, heads=heads, reference=reference))


@pytest.mark.bundled
@pytest.mark.parametrize("how", ["zero", "mean"])
def test_smollm2_logit_diff_on_ioi_stacked_equals_eager(smollm, how):
    """SmolLM2 on two IOI prompts with LogitDiff: the stacked sweep unembeds the last position only."""
    from interp.circuits.tasks.ioi import ioi_prompts

    pairs = ioi_prompts(smollm, 2, seed=0)
    reference = ioi_prompts(smollm, 2, seed=1).clean_tokens
    heads = [(l, h) for l in (0, 29) for h in range(smollm.cfg.n_heads)]
    eager = single_head_ablation(smollm, pairs.clean_tokens, LogitDiff(pairs.answer_tokens), how=how, heads=heads,
                                 reference=reference, backend="eager")
    fast = single_head_ablation(smollm, pairs.clean_tokens, LogitDiff(pairs.answer_tokens), how=how, heads=heads,
                                reference=reference)
    _assert_same(eager, fast, tol=5e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("how", ["zero", "mean", "uniform"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_stacked_on_cuda_runs_triton_and_equals_eager(family, how, tokens):
    """On CUDA the same call runs the Triton kernel (fp32, forward-only)."""
    model = make_tiny(family)
    model.hf_model.to("cuda")
    eager, fast = _both(model, tokens.cuda(), how, reference=_tokens(13).cuda())
    _assert_same(eager, fast, tol=1e-4)
