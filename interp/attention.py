"""The attention function the hook layer registers with transformers.

transformers 5 looks attention up by name (`config._attn_implementation`) in
`AttentionInterface`, and the mask builder by the same name in `AttentionMaskInterface`.
We register `interp_sdpa` (SDPA's boolean/None masks) and `interp_eager` (eager's additive
masks). Without the mask entry the function receives no mask and attention silently
becomes non-causal, so both registrations always go together.

Per call: if a hook at this layer needs the scores or the pattern, we run eager attention
with hook points on scores and pattern; else, if the layer has kernel controls (head gates,
uniform heads, statistics: `HookedModel.kernel_controls`), the fused kernel of
`interp.kernels` runs; otherwise we delegate to the model's own implementation
(bit-identical logits). `hook_rot_q`/`hook_rot_k` (after RoPE and any q/k norm)
and `hook_z` run on both paths.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .hook_points import HookPoint

BASES = {"sdpa": sdpa_mask, "eager": eager_mask}


@dataclass
class AttentionHooks:
    """The hook points that live inside one layer's attention function."""

    rot_q: HookPoint
    rot_k: HookPoint
    attn_scores: HookPoint
    pattern: HookPoint
    z: HookPoint
    base: str  # "sdpa" or "eager": what runs when no pattern is needed

    @property
    def needs_eager(self) -> bool:
        return self.attn_scores.active or self.pattern.active


# Attention modules -> their hooks. Weak keys: a model that is garbage collected leaves no trace.
_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, AttentionHooks]" = weakref.WeakKeyDictionary()


def implementation_name(base: str) -> str:
    """The name ours is registered under for a base implementation: "sdpa" -> "interp_sdpa"."""
    return f"interp_{base}"


def base_implementation(hf_model: nn.Module) -> str:
    """The implementation that runs when no hook needs the pattern: the model's
    `config._attn_implementation` without our "interp_" prefix ("sdpa" when unset)."""
    impl = getattr(hf_model.config, "_attn_implementation", None) or "sdpa"
    return impl.removeprefix("interp_")


def switch_to_hooked(hf_model: nn.Module) -> str:
    """Make `hf_model` run its attention through `interp_attention`; returns the base ("sdpa" or "eager").

    Raises ValueError for any other base implementation (flash attention, flex, ...).
    """
    base = base_implementation(hf_model)
    if base not in BASES:
        raise ValueError(
            f"the model runs attention implementation {base!r}; the hook layer wraps 'sdpa' or 'eager'. "
            "Load it with attn_implementation='sdpa' (default) or 'eager'."
        )
    ensure_registered()
    hf_model.set_attn_implementation(implementation_name(base))
    return base


def register_attention(module: nn.Module, hooks: AttentionHooks) -> None:
    _REGISTRY[module] = hooks


def _model_eager(module: nn.Module) -> Callable:
    """The family's own eager function (transformers keeps one per modeling file)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[batch, kv_head, pos, d] -> [batch, kv_head * groups, pos, d], query-head order."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def additive_mask(mask: Optional[Tensor], q_len: int, k_len: int, dtype: torch.dtype, device: Union[str, torch.device]) -> Tensor:
    """Any mask transformers hands us (None = plain causal, bool = keep, float = additive) as additive."""
    if mask is None:
        offset = k_len - q_len  # queries are the last q_len positions when a KV cache is used
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)
        mask = keep[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask[..., :k_len].to(dtype)


def hooked_eager(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Optional[Tensor],
    hooks: AttentionHooks,
    scaling: Optional[float],
    softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Eager attention with `hook_attn_scores` and `hook_pattern`, same steps as HF's eager.

    query: [batch, head, q, d]; key/value: [batch, kv_head, k, d]. Returns z [batch, q, head, d]
    and the pattern [batch, head, q, k].
    """
    groups = query.shape[1] // key.shape[1]
    k = repeat_kv(key, groups)
    v = repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + additive_mask(mask, query.shape[2], k.shape[2], scores.dtype, scores.device)
    if hooks.attn_scores.active:
        scores = hooks.attn_scores.run(scores)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if hooks.pattern.active:
        pattern = hooks.pattern.run(pattern)
    z = torch.matmul(pattern, v).transpose(1, 2).contiguous()
    return z, pattern


def _heads_view(x: Tensor) -> Tensor:
    return x.transpose(1, 2)  # [batch, head, pos, d] <-> [batch, pos, head, d]


def interp_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Optional[Tensor]]:
    """The function transformers calls under `interp_sdpa` / `interp_eager` (see the module docstring).

    query: [batch, head, q, d]; key/value: [batch, kv_head, k, d]. Returns z [batch, q, head, d]
    and the pattern [batch, head, q, k] when eager attention formed one (else None).
    """
    hooks = _REGISTRY.get(module)
    if hooks is None:  # a module we never wrapped: behave exactly like SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if hooks.rot_q.active:
        query = _heads_view(hooks.rot_q.run(_heads_view(query)))
    if hooks.rot_k.active:
        key = _heads_view(hooks.rot_k.run(_heads_view(key)))
    weights = None
    if hooks.needs_eager:
        z, weights = hooked_eager(module, query, key, value, attention_mask, hooks, scaling, kwargs.get("softcap"))
    elif _kernel_controls(module) is not None:
        # Head gates, uniform heads and streamed statistics run inside the fused kernel (interp.kernels).
        from .kernels.hf import kernel_attention_forward

        z, weights = kernel_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    elif hooks.base == "sdpa":
        z, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    else:
        z, weights = _model_eager(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if hooks.z.active:
        z = hooks.z.run(z)
    return z, weights


def _kernel_controls(module: nn.Module):
    from .kernels.hf import get_controls  # lazy: the kernels package imports triton when installed

    return get_controls(module)


def ensure_registered() -> None:
    """Register our attention and mask functions under both names (idempotent)."""
    for base, mask_fn in BASES.items():
        name = implementation_name(base)
        AttentionInterface.register(name, interp_attention)
        AttentionMaskInterface.register(name, mask_fn)
