"""Models loaded with accelerate's device_map (split over devices, offloaded to CPU RAM or disk)
against the same checkpoint loaded in memory: logits, every hook point, the weights the adapter
reads, patching, head analyses and circuits must be equal (docs/big-models.md)."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.circuits.eap import edge_attribution
from interp.circuits.tasks.base import PromptPairs
from interp.heads.loss import LMLoss
from interp.heads.sinks import sink_table
from interp.heads.sweeps import single_head_ablation
from interp.metrics import LogitDiff
from interp.patching import activation_patch
from interp.resume import capture_run, forward_from

from conftest import make_hf, word_tokenizer

CUDA2 = torch.cuda.device_count() >= 2

# Embedding, layer 1, final norm and unembedding on disk; layer 0 (and the rotary table) in memory.
DISK_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.rotary_emb": "cpu",
            "model.norm": "disk", "lm_head": "disk"}
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen2 (GQA, q/k/v biases) saved as safetensors, with a word-level tokenizer."""
    directory = tmp_path_factory.mktemp("qwen2")
    make_hf("qwen2").save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ref(checkpoint):
    return interp.load(checkpoint)


@pytest.fixture(scope="module")
def on_disk(checkpoint, tmp_path_factory):
    return interp.load(checkpoint, device_map=DISK_MAP, offload_folder=tmp_path_factory.mktemp("offload"))


@pytest.fixture(scope="module")
def planned(checkpoint, tmp_path_factory):
    """max_memory lets the embedding and about one layer stay in RAM; accelerate sends the rest to disk."""
    return interp.load(checkpoint, device_map="auto", max_memory={"cpu": 60_000}, offload_folder=tmp_path_factory.mktemp("auto"))


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(3)
    return torch.randint(4, 100, (2, 7), generator=g)


def pairs(n: int = 2, pos: int = 5):
    """Clean prompts, corrupted copies differing at position 2, and answer pairs."""
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(4, 100, (n, pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(4, 100, (n,), generator=g)
    return clean, corrupted, torch.randint(4, 100, (n, 2), generator=g)


def test_the_maps_really_offload(on_disk, planned):
    assert set(on_disk.hf_model.hf_device_map.values()) == {"cpu", "disk"}
    placed = set(planned.hf_model.hf_device_map.values())
    assert placed == {"cpu", "disk"}, planned.hf_model.hf_device_map
    assert any(p.device.type == "meta" for p in on_disk.hf_model.parameters())


@pytest.mark.parametrize("which", ["on_disk", "planned"])
def test_logits_and_every_hook_point_equal_the_in_memory_model(ref, which, tokens, request):
    model = request.getfixturevalue(which)
    everything = lambda name: True  # the opt-in hook_result too
    logits, cache = model.run_with_cache(tokens, names_filter=everything)
    ref_logits, ref_cache = ref.run_with_cache(tokens, names_filter=everything)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)
    assert sorted(cache.keys()) == sorted(ref.hook_names())
    for name in ref.hook_names():
        torch.testing.assert_close(cache[name], ref_cache[name], atol=1e-6, rtol=0, msg=name)


def test_run_with_cache_gathers_on_the_device_asked(on_disk, ref, tokens):
    _, cache = on_disk.run_with_cache(tokens, device="cpu")
    _, ref_cache = ref.run_with_cache(tokens)
    assert {cache[n].device.type for n in cache.keys()} == {"cpu"}
    for name in ref_cache.keys():
        assert torch.equal(cache[name], ref_cache[name]), name
    # the cache's own views read weights through the adapter (W_O per head, the final norm)
    torch.testing.assert_close(cache.stack_head_results(), ref_cache.stack_head_results(), atol=1e-6, rtol=0)


def test_weights_read_by_the_adapter_are_real(on_disk, ref, tokens):
    """Offloaded parameters sit on `meta` outside their forward: W_O, b_O, the frozen final norm,
    the device inputs go to and the weight fingerprint must read the real values."""
    assert on_disk.device == torch.device("cpu") and on_disk.dtype == ref.dtype
    o_proj = on_disk.hf_model.get_submodule("model.layers.1.self_attn.o_proj")
    assert o_proj._parameters["weight"].device.type == "meta"  # offloaded: accelerate keeps it on meta between forwards
    assert torch.equal(o_proj.weight, ref.hf_model.get_submodule("model.layers.1.self_attn.o_proj").weight)  # read: real
    for layer in range(ref.cfg.n_layers):
        assert torch.equal(on_disk.W_O(layer), ref.W_O(layer))
        assert on_disk.b_O(layer) is None and ref.b_O(layer) is None  # Qwen2's o_proj has no bias
    resid, stack = torch.randn(2, 5, 32), torch.randn(3, 2, 5, 32)
    assert torch.equal(on_disk.apply_final_norm_frozen(stack, resid), ref.apply_final_norm_frozen(stack, resid))
    assert torch.equal(on_disk.unembed(on_disk.apply_final_norm(resid)), ref.unembed(ref.apply_final_norm(resid)))
    assert on_disk.fingerprint() == ref.fingerprint()  # so CacheStore keys match too
    assert on_disk.prepare_inputs(tokens)[0].device == torch.device("cpu")


def test_resumed_forwards_leave_accelerate_hooks_in_place(on_disk, ref, tokens):
    """Resuming at a layer swaps the skipped blocks' forward; accelerate's wrapper must come back."""
    block = on_disk.adapter.layers[1].block
    before = block.__dict__.get("forward")
    got = forward_from(on_disk, capture_run(on_disk, tokens), 1, 0)
    assert block.__dict__.get("forward") is before is not None
    torch.testing.assert_close(got, forward_from(ref, capture_run(ref, tokens), 1, 0), atol=1e-6, rtol=0)
    torch.testing.assert_close(on_disk(tokens), ref(tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("which,component,by", [("on_disk", "resid_pre", "pos"), ("planned", "z", "head")])
def test_patching_sweeps_equal(which, ref, component, by, request):
    model = request.getfixturevalue(which)
    clean, corrupted, answers = pairs()
    got = activation_patch(model, component, clean, corrupted, LogitDiff(answers), by=by, progress=False)
    want = activation_patch(ref, component, clean, corrupted, LogitDiff(answers), by=by, progress=False)
    torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=0)
    assert want.values.abs().max() > 0.01  # a sweep with real effects


def test_head_sinks_and_ablation_equal(planned, ref, tokens):
    got, want = sink_table(planned, tokens, length=7), sink_table(ref, tokens, length=7)
    torch.testing.assert_close(torch.tensor(got["sink_score"].values), torch.tensor(want["sink_score"].values), atol=1e-6, rtol=0)
    got = single_head_ablation(planned, tokens, LMLoss, how="mean", reference=tokens)
    want = single_head_ablation(ref, tokens, LMLoss, how="mean", reference=tokens)
    torch.testing.assert_close(torch.tensor(got["delta"].values), torch.tensor(want["delta"].values), atol=1e-5, rtol=0)


def test_edge_attribution_equals(on_disk, ref):
    """EAP reads q/k/v weight rows and calls ln1 / ln2 outside the forward (circuits/eap.py): on
    meta tensors torch would compute on uninitialised memory without an error."""
    clean, corrupted, answers = pairs()
    task = PromptPairs(clean, corrupted, answers)
    got, want = edge_attribution(on_disk, task, progress=False), edge_attribution(ref, task, progress=False)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=0)
    assert want.scores.abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- errors
def test_device_map_on_a_loaded_module_says_what_to_do():
    with pytest.raises(ValueError, match="already loaded.*from_pretrained\\(..., device_map"):
        interp.load(make_hf("qwen2"), device_map="auto")


@pytest.mark.parametrize("kwargs,match", [
    (dict(device_map="everywhere"), "not a strategy"),
    (dict(device_map="cpu"), "use device='cpu'"),
    (dict(device_map={"model.layers.0": "floppy"}), "is not a device"),
    (dict(device_map=DISK_MAP, max_memory={"cpu": "1GiB"}), "max_memory is only used to plan"),
    (dict(max_memory={"cpu": "1GiB"}), "only applies with a device_map"),
    (dict(offload_folder="x"), "only applies with a device_map"),
    (dict(device_map="auto", device="cpu"), "not both"),
])
def test_bad_placements_are_refused(checkpoint, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        interp.load(checkpoint, **kwargs)


def test_disk_offload_of_a_single_file_needs_an_offload_folder(checkpoint, ref, tokens, tmp_path):
    """A lone .safetensors file is read by accelerate, which must write disk-offloaded weights somewhere."""
    file = checkpoint / "model.safetensors"
    with pytest.raises(ValueError, match="offload_folder"):
        interp.load(file, device_map=DISK_MAP)
    model = interp.load(file, tokenizer=word_tokenizer(), device_map=DISK_MAP, offload_folder=tmp_path)
    torch.testing.assert_close(model(tokens), ref(tokens), atol=1e-6, rtol=0)


def test_a_map_naming_no_module_of_the_model_is_refused(checkpoint):
    """transformers would quietly put a misspelt module on the default device: nothing offloaded."""
    with pytest.raises(ValueError, match="'model.layer.1'.*model.layers.1"):
        interp.load(checkpoint, device_map={"": "cpu", "model.layer.1": "disk"}, offload_folder="x")


# ------------------------------------------------------------------------------------------- two GPUs
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA2, reason="needs 2 CUDA devices")
def test_split_over_two_gpus_gathers_and_matches(checkpoint, ref, tokens):
    split = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    model = interp.load(checkpoint, device_map=split)
    assert model.device == torch.device("cuda:0")
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: True, device="cpu")
    ref_logits, ref_cache = ref.run_with_cache(tokens, names_filter=lambda n: True)
    torch.testing.assert_close(logits.cpu(), ref_logits, atol=1e-4, rtol=1e-4)
    for name in ref.hook_names():
        assert cache[name].device.type == "cpu"
        torch.testing.assert_close(cache[name], ref_cache[name], atol=1e-4, rtol=1e-4, msg=name)
    clean, corrupted, answers = pairs()
    got = activation_patch(model, "resid_pre", clean, corrupted, LogitDiff(answers), by="pos", progress=False)
    want = activation_patch(ref, "resid_pre", clean, corrupted, LogitDiff(answers), by="pos", progress=False)
    torch.testing.assert_close(got.values.cpu(), want.values, atol=1e-4, rtol=0)
