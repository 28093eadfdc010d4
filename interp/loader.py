"""`interp.load`: a checkpoint, however the user holds it, wrapped in a `HookedModel`.

The model layer (`interp.models.loading.load_hf`) finds, converts and loads the checkpoint; this
module, one layer down, builds the hook layer around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .hooks import HookedModel
from .models.loading import DeviceMap, MaxMemory, load_hf


def load(
    model: Union[str, Path, nn.Module, Any],
    tokenizer: Any = None,
    dtype: Union[None, str, torch.dtype] = None,
    device: Union[None, str, torch.device] = None,
    attn_implementation: str = "sdpa",
    device_map: Optional[DeviceMap] = None,
    max_memory: Optional[MaxMemory] = None,
    offload_folder: Union[None, str, Path] = None,
) -> HookedModel:
    """Load a causal LM and wrap it in a `HookedModel`.

    model: bundled name, path (HF directory, .safetensors, .gguf), a loaded PreTrainedModel, an nnsight
    LanguageModel or a TransformerLens TransformerBridge (same modules, no weights copied; docs/model-objects.md).
    tokenizer: used as given (else the checkpoint's own, when it has one).
    dtype: float32 by default (GGUF weights are dequantised to float32).
    attn_implementation: what runs when no hook needs the pattern ('sdpa' or 'eager').
    device_map: split the model over devices or offload part of it, through accelerate (a bundled name or
    a path only): "auto", "balanced", "sequential" (planned from the free memory or `max_memory`), or
    {module name: device} with devices 0, "cuda:1", "cpu", "disk".
    max_memory: {0: "20GiB", "cpu": "8GiB"}: what a planned device_map may put on each device; the rest goes to disk.
    offload_folder: where weights sent to "disk" are written when they cannot be read from the checkpoint itself.
    Every hook point stays live and exact on such a model; see docs/big-models.md.
    """
    hf, tok, name = load_hf(model, tokenizer, dtype, device, attn_implementation, device_map, max_memory, offload_folder)
    return HookedModel(hf, tok, name=name)
