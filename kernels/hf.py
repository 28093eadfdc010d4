"""The kernel as a transformers attention implementation ("interp_kernel"), with per-module controls.

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="interp_kernel")
    set_controls(model.model.layers[3].self_attn, KernelControls(head_gate=torch.tensor([1., 0, 1, 1])))
    rec = StatsRecorder(); set_controls(attn, KernelControls(stats=("col_sum",), on_stats=rec))

transformers 5 looks the attention function up by `config._attn_implementation` in
`AttentionInterface` and the mask builder under the same name in `AttentionMaskInterface`;
both are registered here (without the mask entry the function would get no mask and
attention would silently turn non-causal). We register `sdpa_mask`: it returns None when plain
causal attention is right (no padding, q_len == k_len or q_len == 1) -- then the kernel runs
causal with no mask tensor at all -- and a boolean [batch, 1, q, k] mask otherwise (padding,
sliding windows, static caches), which the kernel reads tile by tile.

Controls live in a WeakKeyDictionary keyed by the attention module (as interp/attention.py keeps
its hooks): a module with no controls runs plain attention, bit-for-bit the semantics of SDPA.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .api import attention
from .spec import AttentionStats

NAME = "interp_kernel"


@dataclass
class KernelControls:
    """Interventions and statistics for one attention module (semantics: interp.kernels.attention).

    head_gate:    [n_heads] or [batch, n_heads]; multiplies each head's output (0 = ablation).
    head_uniform: bool [n_heads] or [batch, n_heads]; uniform attention (Wu et al.'s query masking).
    temperature:  [n_heads] or [batch, n_heads]; divides the scores.
    stats:        statistics to compute on every call, handed to `on_stats(module, AttentionStats)`
                  (one call per forward; during generation, one per decoding step).
    backend:      "auto", "reference" or "triton"; block_size: see interp.kernels.attention.
    """

    head_gate: Optional[Tensor] = None
    head_uniform: Optional[Tensor] = None
    temperature: Optional[Tensor] = None
    stats: Sequence[str] = ()
    on_stats: Optional[Callable[[nn.Module, AttentionStats], None]] = None
    backend: str = "auto"
    block_size: Optional[int] = None


_CONTROLS: "weakref.WeakKeyDictionary[nn.Module, KernelControls]" = weakref.WeakKeyDictionary()


def set_controls(module: nn.Module, controls: KernelControls) -> None:
    """Attach controls to one attention module (replacing any it had)."""
    if not isinstance(controls, KernelControls):
        raise TypeError(f"controls must be a KernelControls, got {type(controls).__name__}.")
    _CONTROLS[module] = controls


def get_controls(module: nn.Module) -> Optional[KernelControls]:
    return _CONTROLS.get(module)


def clear_controls(module: Optional[nn.Module] = None) -> None:
    """Remove one module's controls, or every module's when `module` is None."""
    if module is None:
        _CONTROLS.clear()
    else:
        _CONTROLS.pop(module, None)


@contextmanager
def controlled(controls: Mapping[nn.Module, KernelControls]) -> Iterator[None]:
    """Apply controls for the duration of a `with` block, then restore what each module had."""
    saved = {m: _CONTROLS.get(m) for m in controls}
    try:
        for m, c in controls.items():
            set_controls(m, c)
        yield
    finally:
        for m, c in saved.items():
            if c is None:
                _CONTROLS.pop(m, None)
            else:
                _CONTROLS[m] = c


class StatsRecorder:
    """An `on_stats` sink: `recorder[layer_idx]` is the list of AttentionStats, one per call."""

    def __init__(self) -> None:
        self.records: dict[int, list[AttentionStats]] = defaultdict(list)

    def __call__(self, module: nn.Module, stats: AttentionStats) -> None:
        self.records[getattr(module, "layer_idx", -1)].append(stats)

    def __getitem__(self, layer: int) -> list[AttentionStats]:
        return self.records[layer]

    def clear(self) -> None:
        self.records.clear()


def _kernel_mask(mask: Optional[Tensor], k_len: int) -> Optional[Tensor]:
    """transformers' mask as a boolean keep-mask (sdpa_mask gives bool; eager masks are 0 / large negative)."""
    if mask is None or mask.dtype == torch.bool:
        return None if mask is None else mask[..., :k_len]
    mask = mask[..., :k_len]
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | blocked).all()):
        raise ValueError("interp_kernel takes boolean or 0 / -inf masks; this additive mask carries a bias "
                         "(e.g. ALiBi), which the kernel does not implement. Use attn_implementation='eager'.")
    return ~blocked


def kernel_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query [B, Hq, S, D], key/value [B, Hkv, K, D]
    (after RoPE and the KV cache) -> (out [B, S, Hq, D], None). Attention weights are never formed."""
    if dropout and module.training:
        raise ValueError("interp_kernel is inference-only (no attention dropout); call model.eval().")
    for name in ("s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"interp_kernel does not implement `{name}` (used by this architecture); "
                                      "load the model with attn_implementation='sdpa' or 'eager'.")
    mask = _kernel_mask(attention_mask, key.shape[2])
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    c = _CONTROLS.get(module)
    stats = tuple(c.stats) if c is not None and c.on_stats is not None else ()
    result = attention(
        query, key, value,
        causal=bool(is_causal) and mask is None,  # a mask from transformers already holds causality
        scale=scaling,
        softcap=kwargs.get("softcap"),
        mask=mask,
        head_gate=None if c is None else c.head_gate,
        head_uniform=None if c is None else c.head_uniform,
        temperature=None if c is None else c.temperature,
        stats=stats,
        backend="auto" if c is None else c.backend,
        block_size=None if c is None else c.block_size,
    )
    if stats:
        out, st = result
        c.on_stats(module, st)
    else:
        out = result
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register the function and its mask builder under `name` (idempotent); returns the name."""
    AttentionInterface.register(name, kernel_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


register()
