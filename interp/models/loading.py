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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from .adapters import SUPPORTED
from .bundled import BUNDLED, bundled_checkpoint, convert_gguf
from .foreign import unwrap_model_object

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


DeviceMap = Union[str, dict[str, Union[int, str, torch.device]]]
MaxMemory = dict[Union[int, str], Union[int, str]]
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """Where the weights go: accelerate's big-model inference (`from_pretrained`'s arguments of the same names).

    device_map: "auto" / "balanced" / "balanced_low_0" / "sequential" (accelerate plans it from the free memory,
    or from `max_memory`), or {module name: device} with devices 0, "cuda:1", "cpu", "disk" ("" names the whole
    model). max_memory: {0: "20GiB", "cpu": "8GiB"}, the most each device may hold when a strategy plans the map.
    offload_folder: where weights that go to "disk" are written when they cannot be read from the checkpoint itself.
    """

    device_map: Optional[DeviceMap] = None
    max_memory: Optional[MaxMemory] = None
    offload_folder: Union[None, str, Path] = None

    def kwargs(self) -> dict:
        """The keyword arguments for `from_pretrained` ({} without a device_map)."""
        if self.device_map is None:
            return {}
        out: dict = {"device_map": self.device_map}
        if self.max_memory is not None:
            out["max_memory"] = self.max_memory
        if self.offload_folder is not None:
            out["offload_folder"] = str(self.offload_folder)
        return out


def check_placement(device_map: Optional[DeviceMap], max_memory: Optional[MaxMemory], offload_folder, device) -> Placement:
    """Refuse combinations that cannot mean anything, with what to do instead; return the placement."""
    if device_map is None:
        for given, what in ((max_memory, "max_memory"), (offload_folder, "offload_folder")):
            if given is not None:
                raise ValueError(f"{what} only applies with a device_map: pass device_map='auto' (or a dict) as well")
        return Placement()
    if device is not None:
        raise ValueError(
            f"pass device or device_map, not both (got device={device!r} and a device_map): device puts the whole model "
            "on one device; device_map={'': 'cuda:0'} does the same through accelerate"
        )
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(
                f"device_map {device_map!r} is not a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) and not a dict; "
                f"for one device use device={device_map!r}"
            )
    elif isinstance(device_map, dict):
        _check_device_map_dict(device_map)
        if max_memory is not None:
            raise ValueError(
                "max_memory is only used to plan a device_map ('auto', 'balanced', 'sequential'); with an explicit "
                "dict it would be ignored: drop max_memory or pass device_map='auto'"
            )
    else:
        raise TypeError(f"device_map must be a strategy name or a dict {{module name: device}}, got {type(device_map).__name__}")
    if max_memory is not None and not isinstance(max_memory, dict):
        raise TypeError(f"max_memory must be a dict such as {{0: '20GiB', 'cpu': '8GiB'}}, got {type(max_memory).__name__}")
    return Placement(device_map, max_memory, offload_folder)


def _check_device_map_dict(device_map: dict) -> None:
    for name, dev in device_map.items():
        if not isinstance(name, str):
            raise TypeError(f"device_map keys are module names (strings, '' for the whole model), got {name!r}")
        if dev in ("cpu", "disk", "meta") or isinstance(dev, (int, torch.device)):
            continue
        try:
            torch.device(dev)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"device_map[{name!r}] = {dev!r} is not a device: use a GPU index (0), 'cuda:1', 'cpu' or 'disk'"
            ) from None


def load_hf(
    model: Union[str, Path, nn.Module, Any],
    tokenizer: Any = None,
    dtype: Union[None, str, torch.dtype] = None,
    device: Union[None, str, torch.device] = None,
    attn_implementation: str = "sdpa",
    device_map: Optional[DeviceMap] = None,
    max_memory: Optional[MaxMemory] = None,
    offload_folder: Union[None, str, Path] = None,
) -> tuple[nn.Module, Any, Optional[str]]:
    """Load a causal LM: (the HF model in eval mode, its tokenizer or None, the name it was loaded under or None).

    model: bundled name, path (HF directory, .safetensors, .gguf), a loaded PreTrainedModel, an nnsight
    LanguageModel or a TransformerLens TransformerBridge (their HF modules are used, never copied:
    docs/model-objects.md).
    dtype: float32 by default (GGUF weights are dequantised to float32).
    attn_implementation: what runs when no hook needs the pattern ('sdpa' or 'eager').
    device_map, max_memory, offload_folder: split the model over devices, or offload part of it to CPU
    RAM or disk, through accelerate (see `Placement` and docs/big-models.md).
    """
    torch_dtype = _dtype(dtype)
    placement = check_placement(device_map, max_memory, offload_folder, device)
    unwrapped = unwrap_model_object(model, tokenizer)
    if unwrapped is not None:
        model, tokenizer = unwrapped
    if isinstance(model, nn.Module):
        if placement.device_map is not None:
            raise ValueError(
                "device_map applies when interp.load reads the weights (a bundled name or a path); this model is already "
                "loaded. Pass its path instead, or load it yourself with from_pretrained(..., device_map=...) (or spread it "
                "with accelerate.dispatch_model(model, device_map=...)) and pass the result without device_map"
            )
        hf = model.to(dtype=torch_dtype) if dtype is not None else model
        name = getattr(hf.config, "_name_or_path", None)
    else:
        hf, tokenizer, name = _load_path(str(model), tokenizer, torch_dtype, attn_implementation, placement)
    if device is not None:
        hf = hf.to(device)
    return hf, tokenizer, name


def _load_path(spec: str, tokenizer, dtype: torch.dtype, attn: str, placement: Placement = Placement()):
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec in BUNDLED:
        directory = bundled_checkpoint(spec)
        return _from_dir(directory, tokenizer, dtype, attn, placement) + (spec,)
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
        return _from_dir(path, tokenizer, dtype, attn, placement) + (str(path),)
    if path.suffix == ".gguf":
        directory = convert_gguf(path)
        return _from_dir(directory, tokenizer, dtype, attn, placement) + (str(path),)
    if path.suffix == ".safetensors":
        config_path = path.parent / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{path} needs its config.json beside it ({config_path} is missing)")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config = AutoConfig.from_pretrained(path.parent, local_files_only=True)
        _check_family(config)
        if placement.device_map is not None:
            hf = _dispatch_file(path, config, dtype, attn, placement)
            return hf.eval(), tokenizer or _tokenizer_or_none(path.parent), str(path)
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


def _from_dir(directory: Path, tokenizer, dtype: torch.dtype, attn: str, placement: Placement = Placement()):
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    _check_family(config)
    if isinstance(placement.device_map, dict):
        _check_map_names(_meta_model(config, dtype, attn), placement.device_map)
    try:
        with _quiet_weight_loading():
            hf = AutoModelForCausalLM.from_pretrained(
                directory, dtype=dtype, attn_implementation=attn, local_files_only=True, **placement.kwargs()
            )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise _placement_error(e, placement) or ValueError(f"could not load the checkpoint in {directory}: {e}") from e
    return hf.eval(), tokenizer or _tokenizer_or_none(directory)


def _placement_error(e: Exception, placement: Placement) -> Optional[Exception]:
    """A clearer error for a load that failed because of its device_map, else None."""
    if placement.device_map is None:
        return None
    text = str(e)
    if "offload" in text and placement.offload_folder is None:
        return ValueError(
            f"this device_map sends weights to disk and they need an offload folder: pass offload_folder=... "
            f"(a directory with room for the offloaded weights) ({text})"
        )
    if "does not give any device" in text or "device_map" in text:
        names = ", ".join(repr(k) for k in placement.device_map) if isinstance(placement.device_map, dict) else placement.device_map
        return ValueError(
            f"device_map {names} does not fit this model ({text}); name modules as in model.named_modules() "
            "(e.g. 'model.embed_tokens', 'model.layers.0', 'model.norm', 'lm_head'), cover every parameter, "
            "or use device_map='auto' with max_memory"
        )
    return None


def _meta_model(config, dtype: torch.dtype, attn: str) -> nn.Module:
    """The model built on the meta device: its module names and sizes, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)


def _check_map_names(model: nn.Module, device_map: dict) -> None:
    """Refuse device_map keys that name no module or parameter of the model (transformers would quietly
    put what they meant on the default device)."""
    import difflib

    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    unknown = [k for k in device_map if k not in names]
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, names, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    top = sorted(n for n in names if n and n.count(".") <= 1 and not n.endswith((".weight", ".bias")))
    raise ValueError(
        f"device_map names what this model does not have: {', '.join(hints)}. Keys are module names as in "
        f"model.named_modules() ('' for the whole model); this model has {', '.join(repr(n) for n in top[:8])}, ..."
    )


def _dispatch_file(path: Path, config, dtype: torch.dtype, attn: str, placement: Placement) -> nn.Module:
    """A single .safetensors file loaded with a device_map: built on the meta device, then accelerate's
    `load_checkpoint_and_dispatch` reads each weight straight to its device (or the offload folder)."""
    from accelerate import load_checkpoint_and_dispatch

    hf = _meta_model(config, dtype, attn)
    hf.tie_weights()
    device_map = placement.device_map
    if isinstance(device_map, dict):
        _check_map_names(hf, device_map)
    offloads = device_map == "disk" or (isinstance(device_map, dict) and "disk" in device_map.values())
    if offloads and placement.offload_folder is None:
        raise ValueError("this device_map sends weights to disk: pass offload_folder=... (a directory with room for them)")
    try:
        return load_checkpoint_and_dispatch(
            hf, str(path), device_map=device_map, max_memory=placement.max_memory,
            no_split_module_classes=getattr(hf, "_no_split_modules", None), offload_folder=placement.offload_folder,
            dtype=dtype,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise _placement_error(e, placement) or ValueError(f"could not load {path} with device_map {device_map!r}: {e}") from e
