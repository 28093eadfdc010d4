"""Activation, attribution and path patching against independent references.

References: TransformerLens's own `get_act_patch_*` on its TransformerBridge; a naive sweep
written here with one full forward (from the embeddings) per patch index; HF modules applied
by hand; float64 finite differences for attribution patching.
"""

from __future__ import annotations

import pytest
import torch

import interp
from interp.cache import CacheStore
from interp.metrics import KLToReference, LogitDiff
from interp.patching import COMPONENTS, activation_patch, attribution_patch
from interp.path_patching import path_patch

from conftest import VOCAB, make_hf, make_tiny, word_tokenizer


def prompt_set(seed: int = 3, n: int = 3, pos: int = 8):
    """Clean prompts, corrupted ones differing at two positions, and (correct, wrong) answers."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, VOCAB, (n, pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(4, VOCAB, (n,), generator=g)
    corrupted[:, 5] = torch.randint(4, VOCAB, (n,), generator=g)
    answers = torch.randint(4, VOCAB, (n, 2), generator=g)
    return clean, corrupted, answers


def naive_sweep(model, component, by, clean, corrupted, metric, direction="denoising"):
    """One full forward per index, patch written with run_with_hooks: no batching, no resuming."""
    comp = COMPONENTS[component]
    run, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    names = [comp.hook_name(l) for l in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(source, names_filter=names)
    n_heads = model.cfg.n_kv_heads if comp.layout.name == "kv_heads" else model.cfg.n_heads
    n_pos = clean.shape[1]
    out = torch.zeros(model.cfg.n_layers, *([n_pos] if by != "head" else []), *([n_heads] if by != "pos" else []))
    for index in torch.cartesian_prod(*[torch.arange(s) for s in out.shape]).reshape(-1, out.ndim).tolist():
        layer, rest = index[0], index[1:]
        src = cache[comp.hook_name(layer)]

        def patch(x, hook):
            x = x.clone()
            if comp.layout.name == "resid":
                x[:, rest[0]] = src[:, rest[0]]
            elif comp.layout.name == "pattern":
                sl = (slice(None), rest[0]) if by == "head" else (slice(None), rest[1], rest[0])
                x[sl] = src[sl]
            else:
                sl = (slice(None), slice(None), rest[0]) if by == "head" else (slice(None), rest[0], rest[1])
                x[sl] = src[sl]
            return x

        with torch.no_grad():
            out[tuple(index)] = metric(model.run_with_hooks(run, fwd_hooks=[(comp.hook_name(layer), patch)]))
    if comp.layout.name == "pattern" and by == "pos_head":
        out = out.transpose(1, 2)
    return out


# ------------------------------------------------------------------------------- TransformerLens
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from test_transformer_lens import bridge_for

    d = tmp_path_factory.mktemp("llama")
    make_hf("llama").save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return interp.load(d), bridge_for(d, make_hf("llama"))


TL_CASES = [
    ("resid_pre", "pos", "get_act_patch_resid_pre"),
    ("attn_out", "pos", "get_act_patch_attn_out"),
    ("mlp_out", "pos", "get_act_patch_mlp_out"),
    ("z", "pos_head", "get_act_patch_attn_head_out_by_pos"),
    ("z", "head", "get_act_patch_attn_head_out_all_pos"),
    ("q", "pos_head", "get_act_patch_attn_head_q_by_pos"),
    ("v", "head", "get_act_patch_attn_head_v_all_pos"),
    ("pattern", "head", "get_act_patch_attn_head_pattern_all_pos"),
    ("pattern", "pos_head", "get_act_patch_attn_head_pattern_by_pos"),
]


@pytest.mark.parametrize("component,by,tl_name", TL_CASES)
def test_equals_transformer_lens(tiny_pair, component, by, tl_name):
    import transformer_lens.patching as tlp

    ours, bridge = tiny_pair
    clean, corrupted, answers = prompt_set()
    metric = LogitDiff(answers)
    _, tl_cache = bridge.run_with_cache(clean)
    expected = getattr(tlp, tl_name)(bridge, corrupted, tl_cache, metric)
    got = activation_patch(ours, component, clean, corrupted, metric, by=by)
    assert got.values.shape == expected.shape
    torch.testing.assert_close(got.values, expected.float(), atol=1e-4, rtol=0)
    assert got.values.std() > 0.01  # the sweep found real effects, not a constant


# ------------------------------------------------------------------------------- batched, resumed, naive
SWEEP_CASES = [("resid_pre", "pos"), ("resid_mid", "pos"), ("resid_post", "pos"), ("z", "pos_head"), ("k", "pos_head"), ("pattern", "head")]


# GPT-NeoX's parallel attention/MLP blocks have no resid_mid, so that pair is left out.
@pytest.mark.parametrize("family,component,by", [(f, c, b) for f in ["llama", "gpt2", "gemma3", "gpt_neox"] for c, b in SWEEP_CASES
                                                 if not (f == "gpt_neox" and c == "resid_mid")])
def test_resumed_and_batched_equal_naive_full_forwards(family, component, by):
    model = make_tiny(family)
    clean, corrupted, answers = prompt_set(seed=5)
    metric = LogitDiff(answers)
    expected = naive_sweep(model, component, by, clean, corrupted, metric)
    batched = activation_patch(model, component, clean, corrupted, metric, by=by)
    one_at_a_time = activation_patch(model, component, clean, corrupted, metric, by=by, memory_budget_mb=1e-6, position_buckets=1)
    torch.testing.assert_close(batched.values, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(one_at_a_time.values, expected, atol=1e-4, rtol=0)


def test_no_op_patches_are_not_run_and_patches_resume_at_their_first_change(monkeypatch):
    """prompt_set differs at positions 2 and 5: before 2 every activation is shared, and at
    layer 0 resid_pre differs only at the changed tokens. Only the other patches are run, each
    from the first position it changes, and the results still equal the naive sweep."""
    import interp.patching.activation as activation

    model = make_tiny("llama")
    clean, corrupted, answers = prompt_set()
    metric = LogitDiff(answers)
    runs = []
    real = activation._run_chunk

    def spy(model, run, comp, layer, groups, src, start, metric, kept):
        runs.append((comp.name, layer, start, list(groups)))
        return real(model, run, comp, layer, groups, src, start, metric, kept)

    monkeypatch.setattr(activation, "_run_chunk", spy)
    resid = activation_patch(model, "resid_pre", clean, corrupted, metric)
    patched = {(layer, pos) for name, layer, _, groups in runs for pos, _ in groups}
    assert patched == {(0, 2), (0, 5)} | {(1, p) for p in range(2, 8)}
    assert all(start == min(pos for pos, _ in groups) for _, _, start, groups in runs)
    torch.testing.assert_close(resid.values, naive_sweep(model, "resid_pre", "pos", clean, corrupted, metric), atol=1e-4, rtol=0)
    assert torch.equal(resid.values[:, :2], torch.full((2, 2), resid.corrupted_metric))

    runs.clear()
    z = activation_patch(model, "z", clean, corrupted, metric, by="head")
    assert {start for _, _, start, _ in runs} == {2}  # every head first changes at position 2
    assert sum(len(groups) for *_, groups in runs) == model.cfg.n_layers * model.cfg.n_heads
    torch.testing.assert_close(z.values, naive_sweep(model, "z", "head", clean, corrupted, metric), atol=1e-4, rtol=0)

    runs.clear()
    every = activation_patch(model, "z", clean, corrupted, metric, by="head", skip_unchanged=False)
    assert {start for _, _, start, _ in runs} == {0}
    assert sum(len(groups) for *_, groups in runs) == model.cfg.n_layers * model.cfg.n_heads
    torch.testing.assert_close(every.values, z.values, atol=1e-5, rtol=0)


def test_noising_and_normalisation():
    model = make_tiny("llama")
    clean, corrupted, answers = prompt_set()
    metric = LogitDiff(answers)
    deno = activation_patch(model, "resid_post", clean, corrupted, metric)
    noise = activation_patch(model, "resid_post", clean, corrupted, metric, direction="noising")
    assert deno.clean_metric == pytest.approx(float(metric(model(clean))), abs=1e-5)
    assert deno.corrupted_metric == pytest.approx(float(metric(model(corrupted))), abs=1e-5)
    # The whole final residual at the last position decides the last logits.
    assert deno.normalized[-1, -1] == pytest.approx(1.0, abs=1e-4)
    assert noise.normalized[-1, -1] == pytest.approx(0.0, abs=1e-4)
    # Positions the two prompt sets share change nothing in either direction.
    assert torch.allclose(deno.normalized[:, :2], torch.zeros(1), atol=1e-4)
    assert torch.allclose(noise.normalized[:, :2], torch.ones(1), atol=1e-4)
    frame = deno.frame()
    assert list(frame.columns) == ["layer", "pos", "metric", "normalized"]
    assert len(frame) == deno.values.numel() and frame.attrs["component"] == "resid_post"
    row = frame[(frame.layer == 1) & (frame.pos == 7)].iloc[0]
    assert row.metric == pytest.approx(float(deno.values[1, 7]))


def test_kl_metric_is_zero_for_a_full_clean_patch():
    model = make_tiny("qwen2")
    clean, corrupted, _ = prompt_set()
    result = activation_patch(model, "resid_post", clean, corrupted, "kl")
    kl = KLToReference(model(clean))
    assert result.clean_metric == pytest.approx(0.0, abs=1e-6)
    assert result.corrupted_metric == pytest.approx(float(kl(model(corrupted))), rel=1e-5)
    assert result.values[-1, -1] == pytest.approx(0.0, abs=1e-5)


def test_resid_mid_patch_matches_hf_modules_by_hand():
    """Patching resid_mid of the last layer at the last position, computed from HF's own modules."""
    model = make_tiny("llama")
    clean, corrupted, answers = prompt_set()
    result = activation_patch(model, "resid_mid", clean, corrupted, LogitDiff(answers))
    _, cache = model.run_with_cache(clean, names_filter="blocks.1.hook_resid_mid")
    hf = model.hf_model
    mid = cache["blocks.1.hook_resid_mid"][:, -1:]
    block = hf.model.layers[1]
    with torch.no_grad():
        logits = hf.lm_head(hf.model.norm(mid + block.mlp(block.post_attention_layernorm(mid))))
    assert result.values[1, -1] == pytest.approx(float(LogitDiff(answers)(logits)), abs=1e-5)


def test_clean_activations_come_from_the_cache_store(tmp_path):
    model = make_tiny("llama")
    clean, corrupted, answers = prompt_set()
    store = CacheStore(tmp_path)
    first = activation_patch(model, "z", clean, corrupted, LogitDiff(answers), store=store)
    assert len(store.keys()) == 1
    key = store.keys()[0]
    stored = store.load(key)
    second = activation_patch(model, "z", clean, corrupted, LogitDiff(answers), store=store)
    assert store.keys() == [key]
    torch.testing.assert_close(second.values, first.values)
    assert set(stored) == {f"blocks.{l}.attn.hook_z" for l in range(2)}


def test_bad_input_is_a_clear_error():
    model = make_tiny("llama")
    clean, corrupted, answers = prompt_set()
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(3, 7\)"):
        activation_patch(model, "resid_pre", clean, corrupted[:, :7], LogitDiff(answers))
    with pytest.raises(ValueError, match="unknown component 'resid'"):
        activation_patch(model, "resid", clean, corrupted, LogitDiff(answers))
    with pytest.raises(ValueError, match="patched by"):
        activation_patch(model, "resid_pre", clean, corrupted, LogitDiff(answers), by="head")
    with pytest.raises(ValueError, match="needs answer_tokens"):
        activation_patch(model, "resid_pre", clean, corrupted, "logit_diff")


# ------------------------------------------------------------------------------- attribution patching
def test_attribution_is_the_first_order_term_in_float64():
    """attribution - metric(run) = d/dt metric(run + t (source - run)) at t = 0, by central differences.

    GPT-2: its LayerNorm computes in float64 (Llama's RMSNorm upcasts to float32 only).
    """
    model = interp.load(make_hf("gpt2").double(), tokenizer=word_tokenizer())
    clean, corrupted, answers = prompt_set()
    metric = LogitDiff(answers)
    results = attribution_patch(model, ["resid_pre", "z", "v", "pattern"], clean, corrupted, metric,
                                by={"z": "pos_head", "v": "head", "pattern": "pos_head"})
    run_metric = float(metric(model(corrupted)))
    _, cache = model.run_with_cache(clean)
    _, run_cache = model.run_with_cache(corrupted)
    eps = 1e-5

    def derivative(name, index):
        def at(t):
            def patch(x, hook):
                x = x.clone()
                x[index] = run_cache[name][index] + t * (cache[name][index] - run_cache[name][index])
                return x
            return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])))
        return (at(eps) - at(-eps)) / (2 * eps)

    checks = [
        ("resid_pre", "blocks.1.hook_resid_pre", (1, 5), (slice(None), 5)),
        ("z", "blocks.0.attn.hook_z", (0, 2, 3), (slice(None), 2, 3)),
        ("v", "blocks.1.attn.hook_v", (1, 1), (slice(None), slice(None), 1)),
        ("pattern", "blocks.1.attn.hook_pattern", (1, 2, 6), (slice(None), 2, 6)),
    ]
    for comp, name, out_index, act_index in checks:
        got = float(results[comp].values[out_index]) - run_metric
        assert got == pytest.approx(derivative(name, act_index), rel=1e-4, abs=1e-7), comp
        assert results[comp].method == "attribution"


def test_attribution_has_the_exact_sweep_shapes():
    model = make_tiny("llama")
    clean, corrupted, answers = prompt_set()
    for comp, by in [("resid_pre", "pos"), ("z", "head"), ("k", "pos_head"), ("pattern", "pos_head")]:
        exact = activation_patch(model, comp, clean, corrupted, LogitDiff(answers), by=by)
        approx = attribution_patch(model, comp, clean, corrupted, LogitDiff(answers), by=by)
        assert approx.values.shape == exact.values.shape and approx.axes == exact.axes


# ------------------------------------------------------------------------------- path patching
def naive_path_patch(model, clean, corrupted, metric, receivers, receiver_input):
    """Wang et al.'s two steps, one sender at a time, with full forwards."""
    cfg = model.cfg
    z = [f"blocks.{l}.attn.hook_z" for l in range(cfg.n_layers)]
    _, orig = model.run_with_cache(clean, names_filter=z)
    _, new = model.run_with_cache(corrupted, names_filter=z)
    out = torch.full((cfg.n_layers, cfg.n_heads), float("nan"))
    first = min(l for l, _ in receivers)
    inputs = sorted({f"blocks.{l}.attn.hook_{receiver_input}" for l, _ in receivers})
    for layer in range(first):
        for head in range(cfg.n_heads):
            def freeze(x, hook, layer=layer, head=head):
                x = orig[hook.name].clone()
                if hook.name == z[layer]:
                    x[:, :, head] = new[hook.name][:, :, head]
                return x
            rec = {}
            def record(x, hook):
                rec[hook.name] = x.clone()
            with torch.no_grad():
                model.run_with_hooks(clean, fwd_hooks=[(n, freeze) for n in z] + [(n, record) for n in inputs])

            def patch(x, hook):
                x = x.clone()
                heads = [h for l, h in receivers if f"blocks.{l}.attn.hook_{receiver_input}" == hook.name]
                x[:, :, heads] = rec[hook.name][:, :, heads]
                return x
            with torch.no_grad():
                out[layer, head] = metric(model.run_with_hooks(clean, fwd_hooks=[(n, patch) for n in inputs]))
    return out


@pytest.mark.parametrize("receiver_input,receivers", [("q", [(2, 1), (3, 0)]), ("v", [(3, 1)])])
def test_path_patching_equals_naive_two_step_reference(receiver_input, receivers):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    model = interp.load(AutoModelForCausalLM.from_config(cfg).eval(), tokenizer=word_tokenizer())
    clean, corrupted, answers = prompt_set()
    metric = LogitDiff(answers)
    got = path_patch(model, clean, corrupted, metric, receivers=receivers, receiver_input=receiver_input)
    expected = naive_path_patch(model, clean, corrupted, metric, receivers, receiver_input)
    torch.testing.assert_close(got.values, expected, atol=1e-4, rtol=0, equal_nan=True)
    first = min(l for l, _ in receivers)
    assert torch.isnan(got.values[first:]).all() and not torch.isnan(got.values[:first]).any()


def test_path_to_logits_from_the_last_layer_is_activation_patching():
    model = make_tiny("llama")
    clean, corrupted, answers = prompt_set()
    metric = LogitDiff(answers)
    path = path_patch(model, clean, corrupted, metric)
    act = activation_patch(model, "z", clean, corrupted, metric, by="head", direction="noising")
    torch.testing.assert_close(path.values[-1], act.values[-1], atol=1e-5, rtol=0)
    # Earlier senders reach the logits through later heads too; freezing those changes the result.
    assert not torch.allclose(path.values[0], act.values[0], atol=1e-3)
