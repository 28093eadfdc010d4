"""ActivationCache's residual-stream views and the on-disk CacheStore (keys, atomic writes, refusals)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import interp.atomic as atomic_mod
import interp.store as store_mod
from interp.cache import ActivationCache, CacheError, CacheStore, cache_key

from conftest import make_tiny

# Pattern/score hooks send attention down the eager path; everything else keeps SDPA bit-identical.
EXACT = lambda n: "pattern" not in n and "scores" not in n  # noqa: E731
TOKENS = torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(1))
_RUNS: dict = {}


def run(family: str):
    """(model, logits, cache, hidden_states) of the tiny model of `family` on TOKENS, built once per module."""
    if family not in _RUNS:
        model = make_tiny(family)
        with torch.no_grad():
            logits, cache = model.run_with_cache(TOKENS, names_filter=EXACT)
            hidden = model.hf_model(TOKENS, output_hidden_states=True).hidden_states
        _RUNS[family] = (model, logits, cache, hidden)
    return _RUNS[family]


def final_norm_reference(model, x: torch.Tensor) -> torch.Tensor:
    """The final norm written out by hand (RMSNorm for llama, LayerNorm for gpt2)."""
    norm = model.adapter.final_norm
    if model.cfg.family == "gpt2":
        return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


FAMILIES = ["llama", "gpt2"]


# ---------------------------------------------------------------------- accumulated_resid


@pytest.mark.parametrize("family", FAMILIES)
def test_accumulated_resid(family):
    model, logits, cache, hidden = run(family)
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"]
    assert stack.shape == (3, 2, 7, 32)
    # HF's hidden states before each layer are the residual stream (its last one is after the final norm).
    assert torch.equal(stack[0], hidden[0]) and torch.equal(stack[1], hidden[1])
    assert torch.equal(stack[2], cache["blocks.1.hook_resid_post"])

    mid, mid_labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert mid_labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    torch.testing.assert_close(mid[1], hidden[0] + cache["blocks.0.hook_attn_out"], atol=1e-6, rtol=0)

    partial, partial_labels = cache.accumulated_resid(layer=1, return_labels=True)
    assert partial_labels == ["0_pre"] and torch.equal(partial[0], hidden[0])
    assert torch.equal(cache.accumulated_resid(pos_slice=-1), stack[:, :, -1])

    normed = cache.accumulated_resid(apply_ln=True)
    # Recomputed per component: at the last one it is the model's own final norm, and then its logits.
    torch.testing.assert_close(normed[-1], cache["ln_final.hook_normalized"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.unembed(normed[-1]), logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(normed[0], final_norm_reference(model, hidden[0]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- decompose_resid


@pytest.mark.parametrize("family", FAMILIES)
def test_decompose_resid(family):
    model, _, cache, hidden = run(family)
    parts, labels = cache.decompose_resid(return_labels=True)
    embeds = ["embed", "pos_embed"] if family == "gpt2" else ["embed"]
    assert labels == embeds + ["0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    assert parts.shape == (len(labels), 2, 7, 32)
    torch.testing.assert_close(parts.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.decompose_resid(layer=1).sum(0), hidden[1], atol=1e-5, rtol=0)
    assert cache.decompose_resid(mode="attn", return_labels=True)[1] == embeds + ["0_attn_out", "1_attn_out"]
    assert cache.decompose_resid(mode="mlp", incl_embeds=False, return_labels=True)[1] == ["0_mlp_out", "1_mlp_out"]

    # Frozen final-norm scale: the map is linear, so components still sum to the normed residual
    # (LayerNorm's bias is added once, not per component).
    normed = cache.decompose_resid(apply_ln=True)
    norm = model.adapter.final_norm
    bias = norm.bias if family == "gpt2" else 0
    torch.testing.assert_close(normed.sum(0) + bias, cache["ln_final.hook_normalized"], atol=1e-5, rtol=0)
    if family == "llama":  # RMSNorm: each component is scaled by the whole residual's 1/rms
        resid = cache["blocks.1.hook_resid_post"]
        scale = torch.rsqrt(resid.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        torch.testing.assert_close(normed[1], parts[1] * scale * norm.weight, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------- stack_head_results


def per_head_reference(model, z: torch.Tensor, layer: int) -> torch.Tensor:
    """Each head's write, computed by running the real output projection on z with every other head zeroed."""
    o = model.adapter.layers[layer].o_proj
    bias = o.bias if o.bias is not None else 0
    outs = []
    for h in range(model.cfg.n_heads):
        only = torch.zeros_like(z)
        only[..., h, :] = z[..., h, :]
        outs.append(o(only.flatten(-2)) - bias)
    return torch.stack(outs)


@pytest.mark.parametrize("family", FAMILIES)
def test_stack_head_results(family):
    model, _, cache, _ = run(family)
    heads, labels = cache.stack_head_results(return_labels=True)
    assert labels == [f"L{l}H{h}" for l in range(2) for h in range(4)]
    assert heads.shape == (8, 2, 7, 32)
    # From z alone (no hook_result cached) the same numbers come out.
    without_result = ActivationCache({k: v for k, v in cache.items() if "hook_result" not in k}, model=model)
    torch.testing.assert_close(without_result.stack_head_results(), heads, atol=1e-6, rtol=0)
    with torch.no_grad():
        _, z_only = model.run_with_cache(TOKENS, names_filter=lambda n: n.endswith("attn.hook_z"))
        for l in range(2):
            block = heads[4 * l : 4 * l + 4]
            torch.testing.assert_close(block, per_head_reference(model, cache[f"blocks.{l}.attn.hook_z"], l), atol=1e-5, rtol=0)
            b_O = model.b_O(l)
            # Llama and GPT-2 add the attention output to the residual unnormalised: that is hook_attn_out.
            torch.testing.assert_close(block.sum(0) + (b_O if b_O is not None else 0), cache[f"blocks.{l}.hook_attn_out"],
                                       atol=1e-5, rtol=0)
    assert "blocks.0.attn.hook_result" not in z_only
    torch.testing.assert_close(z_only.stack_head_results(), heads, atol=1e-6, rtol=0)
    assert torch.equal(cache.stack_head_results(layer=1), heads[:4])
    assert torch.equal(cache.stack_head_results(pos_slice=-1), heads[:, :, -1])


# ---------------------------------------------------------------------- dict-like API


def test_cache_api_shorthand_batch_device_and_errors():
    model = run("llama")[0]
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS[:1], names_filter=["blocks.0.attn.hook_pattern", "blocks.0.hook_resid_post"])
    pattern = cache["pattern", 0]
    assert pattern is cache["blocks.0.attn.hook_pattern"]
    assert ("pattern", 0) in cache and ("pattern", 1) not in cache
    assert pattern.shape == (1, 4, 7, 7)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, 4, 7))
    assert torch.all(pattern.triu(1) == 0)  # causal

    single = cache.remove_batch_dim()
    assert not single.has_batch_dim and single["pattern", 0].shape == (4, 7, 7)
    assert torch.equal(single["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"][0])
    assert single.remove_batch_dim() is single
    _, batch2 = model.run_with_cache(TOKENS, names_filter="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="batch size 1"):
        batch2.remove_batch_dim()

    moved = cache.to("cpu")
    assert isinstance(moved, ActivationCache) and moved.model is model
    assert set(moved) == set(cache) and all(torch.equal(moved[k], cache[k]) and moved[k].device.type == "cpu" for k in cache)

    with pytest.raises(KeyError, match="blocks.0.hook_resid_post"):
        cache["blocks.0.hook_resid_psot"]
    with pytest.raises(KeyError, match="empty"):
        ActivationCache({})["hook_embed"]
    with pytest.raises(ValueError, match="needs the model"):
        ActivationCache(dict(cache.items())).accumulated_resid()


def test_a_hook_left_out_of_the_cache_is_named_as_such():
    """An opt-in hook (hook_result) that was not cached is not reported as an unknown name."""
    model = run("llama")[0]
    with torch.no_grad():
        _, default = model.run_with_cache(TOKENS[:1])
        _, embed_only = model.run_with_cache(TOKENS[:1], names_filter="hook_embed")
    name = "blocks.0.attn.hook_result"
    assert name in model.hook_names() and name not in default
    with pytest.raises(KeyError, match=r"exists but was not cached: it is an opt-in hook.*names_filter") as info:
        default[name]
    assert "unknown hook name" not in str(info.value)
    with pytest.raises(KeyError, match="opt-in"):
        default["result", 1]
    with pytest.raises(KeyError, match="exists but was not cached: this run's names_filter left it out"):
        embed_only["blocks.1.hook_resid_post"]
    # An unknown name keeps its suggestions, and the count is the model's, not the cache's.
    with pytest.raises(KeyError, match=rf"Did you mean 'blocks.0.hook_resid_post'.*all {len(model.hook_names())} of them"):
        default["blocks.0.hook_resid_psot"]
    with torch.no_grad():  # and the filter the message suggests records it
        _, asked = model.run_with_cache(TOKENS[:1], names_filter=lambda n: n.endswith("attn.hook_result"))
    assert asked[name].shape == (1, 7, 4, 32)


# ---------------------------------------------------------------------- CacheStore


def resid_filter(n: str) -> bool:
    # resid_pre of layer 1 is the very tensor resid_post of layer 0: the store must cope with shared storage.
    return "resid" in n or n == "hook_embed"


def test_store_round_trip_does_not_rerun_the_model(tmp_path):
    model = run("llama")[0]
    store = CacheStore(tmp_path / "store")
    calls = []
    handle = model.hf_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = store.get_or_compute(model, TOKENS, names_filter=resid_filter)
        assert len(calls) == 1
        second = store.get_or_compute(model, TOKENS, names_filter=resid_filter)
        # Another process opening the same directory, asking with the names in another order.
        names = sorted(model.resolve_names(resid_filter), reverse=True)
        third = CacheStore(tmp_path / "store").get_or_compute(model, TOKENS, names_filter=names)
    finally:
        handle.remove()
    assert len(calls) == 1
    with torch.no_grad():
        _, reference = model.run_with_cache(TOKENS, names_filter=resid_filter)
    assert set(first) == set(second) == set(third) == set(reference)
    for k in reference:
        assert torch.equal(first[k], reference[k]) and torch.equal(second[k], reference[k]) and torch.equal(third[k], reference[k])
    assert isinstance(second, ActivationCache) and second.model is model
    assert torch.equal(second.accumulated_resid(), first.accumulated_resid())

    key = store.key_for(model, TOKENS, reference.keys())
    assert store.keys() == [key]
    entry = json.loads((tmp_path / "store" / "manifest.json").read_text())["entries"][key]
    assert entry["hooks"] == sorted(reference.keys()) and entry["fingerprint"] == model.fingerprint()
    assert not list((tmp_path / "store").glob(".tmp-*"))


def test_cache_key_changes_with_tokens_hooks_dtype_and_weights(tmp_path):
    fp = "f" * 64
    base = cache_key(fp, TOKENS, ["a", "b"], torch.float32)
    assert base == cache_key(fp, TOKENS.clone(), ["b", "a"], "float32")  # order of names and dtype spelling don't matter
    changed = TOKENS.clone()
    changed[1, 3] += 1
    others = [
        cache_key(fp, changed, ["a", "b"], torch.float32),
        cache_key(fp, TOKENS.reshape(1, 14), ["a", "b"], torch.float32),  # same ids, other batch shape
        cache_key(fp, TOKENS, ["a"], torch.float32),
        cache_key(fp, TOKENS, ["a", "c"], torch.float32),
        cache_key(fp, TOKENS, ["a", "b"], torch.bfloat16),
        cache_key("e" * 64, TOKENS, ["a", "b"], torch.float32),
    ]
    assert len({base, *others}) == len(others) + 1

    a, a_again, b = make_tiny("llama", seed=0), make_tiny("llama", seed=0), make_tiny("llama", seed=1)
    assert a.fingerprint() == a_again.fingerprint() != b.fingerprint()
    names = ["blocks.0.hook_resid_post"]
    key_for = CacheStore(tmp_path).key_for
    assert key_for(a, TOKENS, names) == key_for(a_again, TOKENS, names) != key_for(b, TOKENS, names)
    a_again.hf_model.to(torch.bfloat16)
    assert a_again.fingerprint() != a.fingerprint()
    assert key_for(a_again, TOKENS, names) != key_for(a, TOKENS, names)


def acts(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.hook_resid_post": torch.randn(1, 5, 8, generator=g), "hook_embed": torch.randn(1, 5, 8, generator=g)}


def assert_loads(store: CacheStore, key: str, expected: dict[str, torch.Tensor]) -> None:
    got = store.load(key)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_interrupted_data_rename_leaves_store_readable(tmp_path, monkeypatch):
    store = CacheStore(tmp_path)
    store.put("k1", acts(1))
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".safetensors"):
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        store.put("k2", acts(2))
    monkeypatch.undo()
    assert_loads(store, "k1", acts(1))
    assert store.keys() == ["k1"] and "k2" not in store
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "k2.safetensors").exists()
    store.put("k2", acts(2))  # and the store keeps working
    assert_loads(store, "k2", acts(2))


def test_killed_while_writing_data_or_manifest(tmp_path, monkeypatch):
    store = CacheStore(tmp_path)
    store.put("k1", acts(1))

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{")  # a truncated header
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        store.put("k2", acts(2))
    monkeypatch.undo()
    assert store.keys() == ["k1"] and not list(tmp_path.glob(".tmp-*"))
    assert_loads(store, "k1", acts(1))

    # Killed after the data file is in place but before the manifest names it: the entry does not exist.
    real_replace = os.replace
    monkeypatch.setattr(atomic_mod.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("killed"))
                        if str(d).endswith("manifest.json") else real_replace(s, d))
    with pytest.raises(OSError, match="killed"):
        store.put("k3", acts(3))
    monkeypatch.undo()
    assert store.keys() == ["k1"] and not list(tmp_path.glob(".tmp-*"))
    store.put("k3", acts(3))
    assert_loads(store, "k3", acts(3))
    assert_loads(store, "k1", acts(1))


def test_corrupt_file_is_refused_and_never_overwritten(tmp_path):
    store = CacheStore(tmp_path)
    path = store.put("k1", acts(1))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a bit flip inside the tensor bytes: still parses as safetensors
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        store.load("k1")
    with pytest.raises(CacheError, match="checksum"):
        store.put("k1", acts(1))
    assert path.read_bytes() == bytes(data)
    with pytest.raises(KeyError):
        store.load("absent")

    path.unlink()
    with pytest.raises(CacheError, match="missing"):
        store.load("k1")


def test_mismatched_key_is_refused_and_damaged_manifest_rebuilt(tmp_path):
    store = CacheStore(tmp_path)
    store.put("k1", acts(1))
    store.put("k2", acts(2))
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # k1's entry pointing at k2's (intact, checksum-valid) file: the key embedded in the file gives it away.
    manifest["entries"]["k1"] = dict(manifest["entries"]["k2"])
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="holds key 'k2'"):
        store.load("k1")
    assert_loads(store, "k2", acts(2))

    # An unreadable manifest is moved aside (never overwritten) and rebuilt from the entry files,
    # which carry their own keys: every intact entry survives, whichever call meets it first.
    for garbled in ('{"version": 1, "entries": {', "[]"):
        for action in (store.keys, lambda: store.load("k2"), lambda: "k2" in store, lambda: store.put("k3", acts(3))):
            manifest_path.write_text(garbled)
            action()
            assert {"k1", "k2"} <= set(store.keys())
            assert_loads(store, "k1", acts(1))
            assert_loads(store, "k2", acts(2))
            assert garbled in [p.read_text() for p in (tmp_path / "damaged").glob("manifest.json*")]
    assert_loads(store, "k3", acts(3))
    manifest_path.write_text(json.dumps({"version": 99, "entries": {}}))  # a newer toolkit's store: refused, not rebuilt
    with pytest.raises(CacheError, match="version"):
        store.keys()
