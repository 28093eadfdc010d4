"""Driving a Hugging Face causal LM's forward: with and without a KV cache, prefill and decode steps.

The only module that builds a KV cache. Experiments that run the HF forward themselves, outside
`HookedModel.forward` (`interp.resume`, `interp.heads.niah`), do it through these functions.

transformers 5.24 renamed the forward argument `past_key_values` to `cache` (the old name warns
and goes away in 5.40) and the output field with it; earlier 5.x releases know only the old
name. Which one a model takes is read once from its forward's signature, so the toolkit calls
the supported API on every release in its range and never triggers the deprecation.

Keys and values are `Float[Tensor, "batch kv_head pos d_head"]`, as attention saw them (after
RoPE and any q/k norm).
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Optional, Sequence

from torch import Tensor, nn
from transformers import DynamicCache


@lru_cache(maxsize=None)
def _cache_argument_of(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(hf_model: nn.Module) -> str:
    """The name under which `hf_model.forward` takes (and its output returns) the KV cache."""
    return _cache_argument_of(type(hf_model))


def forward_without_cache(hf_model: nn.Module, input_ids: Tensor, **kwargs: Any) -> Any:
    """`hf_model(input_ids, use_cache=False, **kwargs)`: the HF output (`.logits`), no cache built.

    input_ids: Long[Tensor, "batch pos"]; `kwargs` go to the HF forward as they are
    (`logits_to_keep`, `attention_mask`, ...).
    """
    return hf_model(input_ids=input_ids, use_cache=False, **kwargs)


def forward_with_cache(hf_model: nn.Module, input_ids: Tensor, cache: Optional[Any], **kwargs: Any) -> tuple[Any, Optional[Any]]:
    """`hf_model(input_ids, <cache>=cache, use_cache=True, **kwargs)`: (the output, the updated cache).

    `cache=None` starts a new cache (a prefill). `kwargs` go to the HF forward as they are
    (`logits_to_keep`, `attention_mask`, ...).
    """
    name = cache_argument(hf_model)
    out = hf_model(input_ids=input_ids, use_cache=True, **{name: cache}, **kwargs)
    return out, getattr(out, name)


def prefill(hf_model: nn.Module, input_ids: Tensor) -> Any:
    """Run the prompt Long[Tensor, "batch pos"] and return its KV cache (only the last logits are formed)."""
    return forward_with_cache(hf_model, input_ids, None, logits_to_keep=1)[1]


def decode_step(hf_model: nn.Module, input_ids: Tensor, cache: Any) -> tuple[Tensor, Any]:
    """One decoding step: (logits of the step's last position Float[Tensor, "batch d_vocab"], the updated cache).

    input_ids: Long[Tensor, "batch new"], the tokens that follow the cache's positions (one in greedy decoding).
    """
    out, cache = forward_with_cache(hf_model, input_ids, cache)
    return out.logits[:, -1], cache


def key_values(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """Per layer (keys, values), each `Float[Tensor, "batch kv_head pos d_head"]`."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_key_values(key_values_per_layer: Sequence[tuple[Tensor, Tensor]], hf_model: nn.Module) -> Any:
    """A cache holding the given per-layer (keys, values), ready to pass to `forward_with_cache`."""
    return DynamicCache(ddp_cache_data=list(key_values_per_layer), config=hf_model.config)
