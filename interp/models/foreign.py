"""Models that come inside another toolkit's object: an nnsight model or a TransformerLens bridge.

`unwrap_model_object` finds the Hugging Face model (and tokenizer) such an object holds, so
`load_hf` can wrap that model without copying a weight. nnsight and transformer_lens are
optional: neither is imported unless the object's class comes from it.

- nnsight (`LanguageModel`, `TransformersModel`, `NNsight`): the HF model is the root envoy's
  `_module`, used as it is. nnsight's per-module `forward` controllers pass straight through
  outside a trace. A model still on the meta device is dispatched when it names a local
  directory; one that names a hub repo is refused (interp never downloads).
- TransformerLens `TransformerBridge`: the bridge rewrites the HF model in place (every
  component becomes a bridge wrapper around the original, attention is re-implemented, the
  unembedding gets a zero bias buffer). interp's hooks on that tree would read wrong values or
  silently never fire (`hook_z`, `hook_pattern`), so this returns a *clean view*: new module
  objects of the original HF classes, holding the very same parameter and buffer tensors, with
  their own config copy. A bridge whose weights were processed (`process_weights`,
  `enable_compatibility_mode`) is refused: its tensors no longer hold the checkpoint's weights.
"""

from __future__ import annotations

import copy
from os import PathLike
from pathlib import Path
from typing import Any, Optional

from torch import nn

ACCEPTED = (
    "a bundled model name, a local path (HF directory, .safetensors, .gguf), a transformers PreTrainedModel, "
    "an nnsight LanguageModel / TransformersModel / NNsight around a transformers model, "
    "or a TransformerLens TransformerBridge (TransformerBridge.boot_transformers)"
)
_BRIDGE_WRAPPED = "_original_component"


def unwrap_model_object(model: Any, tokenizer: Any = None) -> Optional[tuple[nn.Module, Any]]:
    """(HF model, tokenizer) inside an nnsight model or TransformerLens bridge; None for a name, path or plain module.

    tokenizer: used as given, else the object's own. Raises TypeError for any other object, and
    ValueError for an object interp cannot wrap safely (meta weights, processed bridge weights).
    """
    if _from_package(model, "nnsight"):
        return _from_nnsight(model, tokenizer)
    if _from_package(model, "transformer_lens"):
        return _from_transformer_lens(model, tokenizer)
    if isinstance(model, (str, PathLike, nn.Module)):
        return None
    raise TypeError(f"cannot load a {_class_name(model)}: interp.load accepts {ACCEPTED}")


def _from_package(obj: Any, package: str) -> bool:
    """Whether `obj`'s class, or a class it derives from, is defined in `package` (no import needed)."""
    return any(cls.__module__.split(".")[0] == package for cls in type(obj).__mro__)


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------- nnsight
def _from_nnsight(envoy: Any, tokenizer: Any) -> tuple[nn.Module, Any]:
    """The module an nnsight root envoy wraps (dispatched first when it is still on meta)."""
    from nnsight import Envoy

    if not isinstance(envoy, Envoy):
        raise TypeError(f"cannot load a {_class_name(envoy)}: from nnsight, pass the model (LanguageModel, TransformersModel or NNsight)")
    if getattr(envoy, "_parent", None) is not None:
        raise TypeError(f"{_class_name(envoy)} at {envoy.path!r} is a submodule's envoy; pass the nnsight model itself")
    _dispatch(envoy)
    hf = envoy._module
    _check_hf_model(hf, "the nnsight model")
    return hf, tokenizer if tokenizer is not None else getattr(envoy, "tokenizer", None)


def _dispatch(envoy: Any) -> None:
    """Load real weights into an nnsight model built on meta, if they come from a local directory."""
    if getattr(envoy, "dispatched", True):
        return
    source = envoy.args[0] if getattr(envoy, "args", ()) else None
    if isinstance(source, (str, PathLike)) and Path(source).expanduser().is_dir():
        envoy.dispatch()
        return
    raise ValueError(
        f"the nnsight model {source!r} is not dispatched (its weights are still on the meta device) and does not "
        "name a local directory; interp never downloads. Dispatch it first (model.dispatch(), or "
        "LanguageModel(..., dispatch=True)), or build it from a local checkpoint directory."
    )


# ------------------------------------------------------------------------- TransformerLens
def _from_transformer_lens(bridge: Any, tokenizer: Any) -> tuple[nn.Module, Any]:
    """A clean HF view of the model a TransformerBridge wraps, sharing every tensor with it."""
    if not hasattr(type(bridge), "boot_transformers"):
        raise TypeError(
            f"cannot load a {_class_name(bridge)}: from TransformerLens only a TransformerBridge over a transformers "
            "model is accepted (a HookedTransformer holds converted weights; pass the HF checkpoint instead)"
        )
    if getattr(bridge, "_weights_processed", False):
        raise ValueError(
            "this TransformerBridge has processed weights (process_weights / enable_compatibility_mode folded and "
            "centred them in place), so its tensors no longer compute the checkpoint's function. Boot a fresh bridge "
            "without processing (enable_compatibility_mode(no_processing=True)) or load the checkpoint directly."
        )
    try:
        bridged = bridge.original_model
    except AttributeError as e:
        raise ValueError(f"this TransformerBridge holds no local torch model ({e}); load the checkpoint directly") from e
    hf = _unbridge(bridged)
    _rebind_config(hf, bridged.config)
    _check_hf_model(hf, "the TransformerBridge")
    return hf, tokenizer if tokenizer is not None else getattr(bridge, "tokenizer", None)


def _unbridge(module: nn.Module, memo: Optional[dict[int, nn.Module]] = None) -> nn.Module:
    """A copy of the module tree with every bridge wrapper replaced by the original it wraps.

    Each copy is a new object of the original class whose parameter and buffer dicts hold the
    original tensors (same storage); hook dicts are copied, so hooks added later stay on the copy.
    A module reached twice is copied once (`memo`), so shared submodules stay shared.
    """
    memo = {} if memo is None else memo
    while _is_bridge_component(module):
        module = module._modules[_BRIDGE_WRAPPED]
    if id(module) in memo:
        return memo[id(module)]
    clone = memo[id(module)] = object.__new__(type(module))
    state = dict(module.__dict__)
    for key, value in state.items():
        if "hook" in key and isinstance(value, dict):
            state[key] = type(value)(value)
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = dict(module._buffers)
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {name: None if child is None else _unbridge(child, memo) for name, child in module._modules.items()}
    object.__setattr__(clone, "__dict__", state)
    _drop_bridge_bias(clone)
    return clone


def _is_bridge_component(module: nn.Module) -> bool:
    return _BRIDGE_WRAPPED in module._modules and _from_package(module, "transformer_lens")


def _drop_bridge_bias(module: nn.Module) -> None:
    """Undo the bridge's zero `bias` buffer on a bias-free nn.Linear (its unembedding), on the copy."""
    if isinstance(module, nn.Linear) and "bias" in module._buffers and "bias" not in module._parameters:
        bias = module._buffers["bias"]
        if bias is not None and not bias.is_meta and not bool(bias.any()):
            del module._buffers["bias"]
            module._non_persistent_buffers_set.discard("bias")
            module._parameters["bias"] = None


def _rebind_config(hf: nn.Module, config: Any) -> None:
    """Give the copy its own config, so switching its attention does not change the bridge's."""
    own = copy.deepcopy(config)
    for module in hf.modules():
        for key, value in vars(module).items():
            if value is config:
                module.__dict__[key] = own


# ----------------------------------------------------------------------------------- checks
def _check_hf_model(hf: Any, source: str) -> None:
    from transformers import PreTrainedModel

    if not isinstance(hf, PreTrainedModel):
        raise TypeError(f"{source} wraps a {_class_name(hf)}, not a transformers PreTrainedModel; interp wraps HF causal LMs")
    meta = [name for name, p in hf.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"{source} has {len(meta)} parameters on the meta device (e.g. {meta[0]}); load or dispatch its weights first")
