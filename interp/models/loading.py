"""Loading a checkpoint, for every way a user holds a model (`interp.load` wraps the result).

Accepted: a bundled name (`smollm2-135m`), a local HF directory, a `.safetensors` file with
its `config.json` beside it, a `.gguf` file, or an already-loaded `PreTrainedModel` (with its
tokenizer). Never a network call: every `from_pretrained` is given `local_files_only=True`, whatever the
HF offline switches say.
This module returns the HF model; `interp.loader.load` builds the `HookedModel` around it, so
the model layer never imports the hook layer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from .adapters import SUPPORTED
from .bundled import BUNDLED, bundled_checkpoint, convert_gguf

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def _dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_hf(
    model: Union[str, Path, nn.Module],
    tokenizer: Any = None,
    dtype: Union[None, str, torch.dtype] = None,
    device: Union[None, str, torch.device] = None,
    attn_implementation: str = "sdpa",
) -> tuple[nn.Module, Any, Optional[str]]:
    """Load a causal LM: (the HF model in eval mode, its tokenizer or None, the name it was loaded under or None).

    model: bundled name, path (HF directory, .safetensors, .gguf) or a loaded PreTrainedModel.
    dtype: float32 by default (GGUF weights are dequantised to float32).
    attn_implementation: what runs when no hook needs the pattern ('sdpa' or 'eager').
    """
    torch_dtype = _dtype(dtype)
    if isinstance(model, nn.Module):
        hf = model.to(dtype=torch_dtype) if dtype is not None else model
        name = getattr(hf.config, "_name_or_path", None)
    else:
        hf, tokenizer, name = _load_path(str(model), tokenizer, torch_dtype, attn_implementation)
    if device is not None:
        hf = hf.to(device)
    return hf, tokenizer, name


def _load_path(spec: str, tokenizer, dtype: torch.dtype, attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec in BUNDLED:
        directory = bundled_checkpoint(spec)
        return _from_dir(directory, tokenizer, dtype, attn) + (spec,)
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(BUNDLED)
        raise FileNotFoundError(
            f"{spec!r} is neither a bundled model ({names}) nor an existing path. Hub names are not "
            "downloaded: this toolkit never goes to the network; pass a local directory or file."
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return _from_dir(path, tokenizer, dtype, attn) + (str(path),)
    if path.suffix == ".gguf":
        directory = convert_gguf(path)
        return _from_dir(directory, tokenizer, dtype, attn) + (str(path),)
    if path.suffix == ".safetensors":
        config_path = path.parent / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{path} needs its config.json beside it ({config_path} is missing)")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config = AutoConfig.from_pretrained(path.parent, local_files_only=True)
        _check_family(config)
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} cannot be read as safetensors ({e}): corrupt or not a checkpoint") from e
        missing, unexpected = hf.load_state_dict(state, strict=False)
        missing = [m for m in missing if not _is_tied(hf, m)]
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        hf.tie_weights()
        tok = tokenizer or _tokenizer_or_none(path.parent)
        return hf.eval(), tok, str(path)
    raise ValueError(f"{path}: expected a model directory, a .safetensors file or a .gguf file")


def _is_tied(hf, name: str) -> bool:
    return name.endswith("lm_head.weight") and bool(getattr(hf.config, "tie_word_embeddings", False))


def _check_family(config) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text.model_type not in SUPPORTED:
        raise ValueError(f"unsupported architecture {text.model_type!r}; supported: {', '.join(SUPPORTED)}")


def _tokenizer_or_none(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _quiet_weight_loading() -> Iterator[None]:
    """No "Loading weights" bar: reading a converted safetensors checkpoint takes under a second."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _from_dir(directory: Path, tokenizer, dtype: torch.dtype, attn: str):
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    _check_family(config)
    try:
        with _quiet_weight_loading():
            hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn, local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"could not load the checkpoint in {directory}: {e}") from e
    return hf.eval(), tokenizer or _tokenizer_or_none(directory)
