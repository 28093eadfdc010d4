"""Models that come in another toolkit's object (interp/models/foreign.py): nnsight and TransformerLens.

Each object must hand interp the very tensors it holds (same storage), and interp's hooks on
that model must read what the other toolkit reads.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import interp
from interp.lens import logit_lens_logits
from interp.models.foreign import unwrap_model_object
from interp.patching import activation_patch

from conftest import make_hf, random_prompt_pairs, word_tokenizer

nnsight = pytest.importorskip("nnsight")
# tiny families: where nnsight finds a block and its MLP
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h"}
BRIDGE_SHARED = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                 "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern"]


def language_model(*args, **kwargs):
    """nnsight's LanguageModel, whose construction warns that the name is deprecated (nnsight 0.8)."""
    with pytest.warns(nnsight.NNsightDeprecationWarning, match="LanguageModel is deprecated"):
        return nnsight.LanguageModel(*args, **kwargs)


def pointers(module: nn.Module) -> dict[str, int]:
    return {name: p.data_ptr() for name, p in module.named_parameters()}


def envoy_at(envoy, path: str):
    for part in path.split("."):
        envoy = getattr(envoy, part)
    return envoy


def nnsight_reads(lm, family: str, layer: int, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """An nnsight trace's block output, MLP output and logits."""
    block = envoy_at(lm, BLOCKS[family])[layer]
    with torch.no_grad(), lm.trace(tokens):
        mlp = block.mlp.output.save()
        resid = block.output.save()
        logits = lm.output.logits.save()
    resid = resid[0] if isinstance(resid, tuple) else resid
    return {f"blocks.{layer}.hook_mlp_out": mlp, f"blocks.{layer}.hook_resid_post": resid, "logits": logits}


def interp_reads(model: interp.HookedModel, layer: int, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.hook_resid_post"]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names)
    return {**{n: cache[n] for n in names}, "logits": logits}


def assert_reads_match(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------- nnsight
@pytest.mark.parametrize("family", sorted(BLOCKS))
def test_nnsight_model_shares_its_weights_and_reads_what_interp_hooks_read(family, tokens):
    hf, tok = make_hf(family), word_tokenizer()
    before = pointers(hf)
    lm = language_model(hf, tokenizer=tok)
    got, got_tok = unwrap_model_object(lm)
    assert got is hf and got_tok is tok and pointers(got) == before
    model = interp.HookedModel(got, got_tok)
    assert_reads_match(interp_reads(model, 1, tokens), nnsight_reads(lm, family, 1, tokens))


def test_nnsight_model_through_interp_load_equals_a_direct_load(tmp_path, tokens):
    make_hf("llama").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    direct = interp.load(tmp_path)
    lm = language_model(AutoModelForCausalLM.from_pretrained(tmp_path), tokenizer=word_tokenizer())
    via_nnsight = interp.load(lm)  # the LanguageModel itself
    assert via_nnsight.hf_model is lm._module and via_nnsight.tokenizer is lm.tokenizer
    assert via_nnsight.fingerprint() == direct.fingerprint()
    pairs = random_prompt_pairs()
    ours = activation_patch(via_nnsight, "resid_pre", pairs, progress=False)
    reference = activation_patch(direct, "resid_pre", pairs, progress=False)
    assert torch.equal(ours.values, reference.values)
    assert (ours.clean_metric, ours.corrupted_metric) == (reference.clean_metric, reference.corrupted_metric)
    assert torch.equal(logit_lens_logits(via_nnsight, tokens)[0], logit_lens_logits(direct, tokens)[0])


def test_nnsight_model_on_meta_is_dispatched_from_its_local_directory(tmp_path, tokens):
    make_hf("llama").save_pretrained(tmp_path)
    lm = language_model(str(tmp_path), tokenizer=word_tokenizer(), dtype=torch.float32)
    assert not lm.dispatched
    hf, tok = unwrap_model_object(lm)
    assert lm.dispatched and hf is lm._module and not any(p.is_meta for p in hf.parameters())
    model = interp.HookedModel(hf, tok)
    assert_reads_match(interp_reads(model, 0, tokens), nnsight_reads(lm, "llama", 0, tokens))


def test_nnsight_model_on_meta_without_a_local_checkpoint_is_refused(tmp_path):
    directory = tmp_path / "ckpt"
    make_hf("llama").save_pretrained(directory)
    lm = language_model(str(directory), tokenizer=word_tokenizer())
    directory.rename(tmp_path / "moved")  # as if it named a hub repo: nothing local to dispatch from
    with pytest.raises(ValueError, match="not dispatched.*never downloads"):
        unwrap_model_object(lm)


def test_nnsight_submodule_envoy_is_refused():
    lm = language_model(make_hf("llama"), tokenizer=word_tokenizer())
    with pytest.raises(TypeError, match="submodule's envoy; pass the nnsight model itself"):
        unwrap_model_object(lm.model)


@pytest.mark.bundled
def test_smollm2_through_nnsight_matches_interp_and_a_direct_load(smollm):
    from interp.models.bundled import bundled_checkpoint

    lm = language_model(str(bundled_checkpoint("smollm2-135m")), dtype=torch.float32, dispatch=True)
    hf, tok = unwrap_model_object(lm)
    assert hf is lm._module
    model = interp.load(hf, tokenizer=tok)
    tokens = smollm.to_tokens("The Eiffel Tower is in")
    assert torch.equal(model.to_tokens("The Eiffel Tower is in"), tokens)
    ours = interp_reads(model, 1, tokens)
    assert_reads_match(ours, nnsight_reads(lm, "llama", 1, tokens))
    assert_reads_match(ours, interp_reads(smollm, 1, tokens))  # as if loaded directly


# ------------------------------------------------------------------------- TransformerLens
def boot_bridge(directory, hf: nn.Module):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(directory), hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(directory), device="cpu")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bridge_gives_a_clean_view_of_its_weights_that_matches_the_bridge(family, tmp_path, tokens):
    make_hf(family).save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    hf = make_hf(family)
    before = pointers(hf)
    bridge = boot_bridge(tmp_path, hf)
    view, tok = unwrap_model_object(bridge)
    assert tok is bridge.tokenizer and tok is not None
    assert pointers(view) == before  # the same tensors, under the original HF names
    assert all(not type(m).__module__.startswith("transformer_lens") for m in view.modules())
    model = interp.load(bridge)  # the bridge itself: the same clean view
    assert pointers(model.hf_model) == before
    names = [f"blocks.{l}.{h}" for l in range(model.cfg.n_layers) for h in BRIDGE_SHARED]
    with torch.no_grad():
        our_logits, our_cache = model.run_with_cache(tokens, names_filter=names)
        tl_logits, tl_cache = bridge.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(our_logits, tl_logits, atol=1e-5, rtol=1e-5)
    for name in names:
        torch.testing.assert_close(our_cache[name], tl_cache[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():  # the checkpoint's own function (the bridge left the model on eager attention)
        assert torch.equal(our_logits, make_hf(family, attn="eager")(tokens).logits)


def test_bridge_with_processed_weights_is_refused(tmp_path):
    make_hf("llama").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    bridge = boot_bridge(tmp_path, make_hf("llama"))
    bridge.process_weights()
    with pytest.raises(ValueError, match="processed weights"):
        unwrap_model_object(bridge)


# --------------------------------------------------------------------------------- the rest
def test_names_paths_and_modules_are_left_to_the_loader(tmp_path):
    assert unwrap_model_object("smollm2-135m") is None
    assert unwrap_model_object(tmp_path) is None
    assert unwrap_model_object(make_hf("llama")) is None


@pytest.mark.parametrize("thing", [42, object(), {"model": "x"}])
def test_unknown_objects_get_an_error_listing_what_is_accepted(thing):
    with pytest.raises(TypeError, match="interp.load accepts .*nnsight LanguageModel.*TransformerBridge"):
        unwrap_model_object(thing)
