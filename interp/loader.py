"""`interp.load`: a checkpoint, however the user holds it, wrapped in a `HookedModel`.

The model layer (`interp.models.loading.load_hf`) finds, converts and loads the checkpoint; this
module, one layer down, builds the hook layer around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from .hooks import HookedModel
from .models.loading import load_hf


def load(
    model: Union[str, Path, nn.Module],
    tokenizer: Any = None,
    dtype: Union[None, str, torch.dtype] = None,
    device: Union[None, str, torch.device] = None,
    attn_implementation: str = "sdpa",
) -> HookedModel:
    """Load a causal LM and wrap it in a `HookedModel`.

    model: bundled name, path (HF directory, .safetensors, .gguf) or a loaded PreTrainedModel.
    tokenizer: used as given (else the checkpoint's own, when it has one).
    dtype: float32 by default (GGUF weights are dequantised to float32).
    attn_implementation: what runs when no hook needs the pattern ('sdpa' or 'eager').
    """
    hf, tok, name = load_hf(model, tokenizer, dtype, device, attn_implementation)
    return HookedModel(hf, tok, name=name)
