"""Tiny random models of every supported family, built from configs (no downloads), and the
bundled SmolLM2 loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

import interp

VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)


def family_config(family: str):
    """A 2-layer config per family; GQA wherever the family has it."""
    if family == "llama":
        return LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    if family == "qwen2":
        return Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    if family == "mistral":
        return MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=None, initializer_range=0.2)
    if family == "gemma2":
        return Gemma2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                            sliding_window=4, initializer_range=0.2)
    if family == "gemma3":
        return Gemma3TextConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                                sliding_window=3, layer_types=["sliding_attention", "full_attention"], initializer_range=0.2)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=2, n_positions=128, initializer_range=0.2)
    if family == "gpt_neox":
        return GPTNeoXConfig(**COMMON, num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=True, initializer_range=0.2)
    raise KeyError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gemma3", "gpt2", "gpt_neox"]
# Gemma 2 soft-caps attention logits, which SDPA cannot do: HF runs it eager.
BASE_ATTN = {"gemma2": "eager"}


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w1", bos_token="w2", eos_token="w3")


def make_hf(family: str, attn: str | None = None, seed: int = 0):
    torch.manual_seed(seed)
    cfg = family_config(family)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn or BASE_ATTN.get(family, "sdpa")).eval()


def make_tiny(family: str, attn: str | None = None, seed: int = 0) -> interp.HookedModel:
    return interp.load(make_hf(family, attn, seed), tokenizer=word_tokenizer())


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, VOCAB, (2, 7), generator=g)


@pytest.fixture(scope="session")
def smollm():
    """The bundled real model (installed by the README's set-up command)."""
    return interp.load("smollm2-135m")


def random_prompt_pairs(n: int = 3, pos: int = 6, seed: int = 0):
    """Random clean prompts and corrupted copies differing at position 2, with random answer pairs."""
    from interp.circuits.tasks.base import PromptPairs

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, 100, (n, pos), generator=g)
    corr = clean.clone()
    corr[:, 2] = torch.randint(4, 100, (n,), generator=g)
    return PromptPairs(clean, corr, torch.randint(4, 100, (n, 2), generator=g))


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch) -> Path:
    """A tiny llama GGUF file written from `make_hf("llama")`; INTERP_CACHE points into tmp_path."""
    from test_loading import write_llama_gguf

    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(make_hf("llama"), path)
    return path
