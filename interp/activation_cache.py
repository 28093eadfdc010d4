"""The in-memory activation cache: hook name -> tensor, with the residual-stream views the field uses.

`ActivationCache` is what `HookedModel.run_with_cache` returns (TransformerLens vocabulary):
`accumulated_resid`, `decompose_resid`, `stack_head_results`, `apply_ln_to_stack`. The views
that need the model ask it through `CacheModel`, the few `HookedModel` methods they use, so this
module depends on the hook-point names only, never on `interp.hooks` (which builds caches).
On disk: `interp.store.CacheStore`.
"""

from __future__ import annotations

import difflib
import re
from typing import Callable, ItemsView, Iterator, KeysView, Optional, Protocol, Sequence, Union, ValuesView

import torch
from torch import Tensor

from .hook_points import get_act_name, unknown_hook_error
from .models.adapters import ModelConfig

# What a cache key may be: a hook name, or TransformerLens's shorthand tuple ("pattern", 3).
CacheKey = Union[str, tuple]
# pos_slice of the views: None (all), a position (the dimension is dropped), a slice, or a list of positions.
PosSlice = Union[None, int, slice, Sequence[int], Tensor]


class CacheModel(Protocol):
    """What the cache asks of the model that made it (`HookedModel` provides all of it)."""

    cfg: ModelConfig

    def hook_names(self) -> list[str]: ...

    def resolve_names(self, names_filter: Union[None, str, Sequence[str], Callable[[str], bool]]) -> list[str]: ...

    def W_O(self, layer: int) -> Tensor: ...

    def apply_final_norm(self, resid: Tensor) -> Tensor: ...

    def apply_final_norm_frozen(self, stack: Tensor, resid: Tensor) -> Tensor: ...


class ActivationCache:
    """Cached activations of one forward pass, keyed by hook name.

    `cache["blocks.3.attn.hook_pattern"]` or TransformerLens's shorthand `cache["pattern", 3]`.
    """

    def __init__(self, activations: dict[str, Tensor], model: Optional[CacheModel] = None, has_batch_dim: bool = True):
        self.cache_dict = dict(activations)
        self.model = model
        self.has_batch_dim = has_batch_dim

    # -------------------------------------------------------------- dict-like
    def _key(self, key: CacheKey) -> str:
        if isinstance(key, tuple):
            key = get_act_name(*key)
        if key not in self.cache_dict:
            raise self._missing(key)
        return key

    def _missing(self, key: str) -> KeyError:
        """The error for a name this cache lacks: a hook of the model left out (opt-in or filtered), or no hook at all."""
        model = self.model
        if model is None:
            if not self.cache_dict:
                return KeyError(f"{key!r}: the cache is empty")
            close = difflib.get_close_matches(key, list(self.cache_dict), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            return KeyError(f"{key!r} is not in this cache.{hint} It holds {len(self)} activations: cache.keys() lists them.")
        if key not in model.hook_names():
            return unknown_hook_error(key, model.hook_names())
        pattern = re.sub(r"^blocks\.\d+\.", "", key)
        ask = f"names_filter=lambda n: n.endswith({pattern!r}) or <your filter>, or a list of names including {key!r}"
        if key not in model.resolve_names(None):
            return KeyError(
                f"{key!r} exists but was not cached: it is an opt-in hook, which run_with_cache records only when "
                f"names_filter asks for it (names_filter=None leaves it out to save memory). Run "
                f"model.run_with_cache(input, {ask})."
            )
        return KeyError(
            f"{key!r} exists but was not cached: this run's names_filter left it out (the cache holds {len(self)} of the "
            f"model's {len(model.hook_names())} hooks). Run model.run_with_cache(input, {ask})."
        )

    def __getitem__(self, key: CacheKey) -> Tensor:
        return self.cache_dict[self._key(key)]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, tuple):
            key = get_act_name(*key)
        return key in self.cache_dict

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self) -> KeysView[str]:
        return self.cache_dict.keys()

    def values(self) -> ValuesView[Tensor]:
        return self.cache_dict.values()

    def items(self) -> ItemsView[str, Tensor]:
        return self.cache_dict.items()

    def to(self, device: Union[str, torch.device]) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self.items()}, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> "ActivationCache":
        if not self.has_batch_dim:
            return self
        for k, v in self.items():
            if v.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1; {k} has batch {v.shape[0]}")
        return ActivationCache({k: v[0] for k, v in self.items()}, self.model, has_batch_dim=False)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {list(self.cache_dict)[:4]}{'...' if len(self) > 4 else ''})"

    # -------------------------------------------------------------- residual-stream views
    def _need_model(self) -> CacheModel:
        if self.model is None:
            raise ValueError("this operation needs the model: build the cache with model.run_with_cache or pass model=")
        return self.model

    def _n_layers(self) -> int:
        return self._need_model().cfg.n_layers

    def _final_resid(self, layer: int) -> Tensor:
        """The residual whose final-norm scale is frozen: after the last block, or entering `layer`."""
        n = self._n_layers()
        return self[get_act_name("resid_post", n - 1)] if layer == n else self[get_act_name("resid_pre", layer)]

    @staticmethod
    def _pos(t: Tensor, pos_slice: PosSlice, pos_dim: int) -> Tensor:
        """Select positions on dimension `pos_dim` (negative): an int drops the dimension, as in TransformerLens."""
        if pos_slice is None:
            return t
        dim = t.ndim + pos_dim
        if isinstance(pos_slice, int):
            return t.select(dim, pos_slice)
        if isinstance(pos_slice, slice):
            return t[(slice(None),) * dim + (pos_slice,)]
        return t.index_select(dim, torch.as_tensor(pos_slice, device=t.device))

    def accumulated_resid(
        self,
        layer: Optional[int] = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        return_labels: bool = False,
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """The residual stream before each layer < `layer` (all layers plus the final one if None).

        Returns [component, batch, pos, d_model]; labels `0_pre`, `0_mid`, ..., `final_post`.
        `apply_ln` recomputes the final norm on each component (the logit lens convention).
        """
        n = self._n_layers()
        layer = n if layer is None or layer == -1 else layer
        labels: list[str] = []
        parts: list[Tensor] = []
        for l in range(layer):
            labels.append(f"{l}_pre")
            parts.append(self[get_act_name("resid_pre", l)])
            if incl_mid:
                labels.append(f"{l}_mid")
                parts.append(self[get_act_name("resid_mid", l)])
        if layer == n:
            labels.append("final_post")
            parts.append(self[get_act_name("resid_post", n - 1)])
        stack = torch.stack([self._pos(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, recompute=True)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: Optional[int] = None,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """The residual stream before `layer` as a sum of its writers: embed, pos_embed, then each
        layer's attn_out and mlp_out (`mode`: "all", "attn" or "mlp"). [component, batch, pos, d_model].

        `apply_ln` divides by the final norm's scale computed on the whole residual (frozen), which
        keeps the decomposition linear.
        """
        n = self._n_layers()
        layer = n if layer is None or layer == -1 else layer
        labels: list[str] = []
        parts: list[Tensor] = []
        if incl_embeds:
            labels.append("embed")
            parts.append(self["hook_embed"])
            if "hook_pos_embed" in self:
                labels.append("pos_embed")
                parts.append(self["hook_pos_embed"])
        for l in range(layer):
            if mode in ("all", "attn"):
                labels.append(f"{l}_attn_out")
                parts.append(self[get_act_name("attn_out", l)])
            if mode in ("all", "mlp"):
                labels.append(f"{l}_mlp_out")
                parts.append(self[get_act_name("mlp_out", l)])
        # hook_pos_embed may have batch size 1 (position ids broadcast over the batch).
        stack = torch.stack(torch.broadcast_tensors(*[self._pos(p, pos_slice, -2) for p in parts]))
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, recompute=False, resid=self._pos(self._final_resid(layer), pos_slice, -2))
        return (stack, labels) if return_labels else stack

    def stack_head_results(
        self, layer: Optional[int] = None, pos_slice: PosSlice = None, apply_ln: bool = False, return_labels: bool = False
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """Each head's write to the residual stream, [layer*head, batch, pos, d_model] for layers < `layer`.

        Uses `hook_result` when cached, otherwise z @ W_O per head (biases excluded, as in TransformerLens).
        """
        model = self._need_model()
        n = self._n_layers()
        layer = n if layer is None or layer == -1 else layer
        labels: list[str] = []
        parts: list[Tensor] = []
        for l in range(layer):
            name = get_act_name("result", l)
            if name in self:
                result = self[name]
            else:
                z = self[get_act_name("z", l)]
                result = torch.einsum("...phd,hdm->...phm", z, model.W_O(l).to(z.device, z.dtype))
            result = self._pos(result, pos_slice, -3)
            parts.extend(result.movedim(-2, 0))
            labels.extend(f"L{l}H{h}" for h in range(model.cfg.n_heads))
        stack = torch.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, recompute=False, resid=self._pos(self._final_resid(layer), pos_slice, -2))
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, stack: Tensor, recompute: bool = True, resid: Optional[Tensor] = None) -> Tensor:
        """Apply the model's final norm to a stack [component, ..., d_model].

        recompute=True: the norm on each component as if it were the residual (logit lens).
        recompute=False: the linear map the norm applies to `resid` (its scale frozen), applied to
        every component, so the components still sum to the normed residual (minus any bias).
        """
        model = self._need_model()
        if recompute:
            return model.apply_final_norm(stack)
        if resid is None:
            raise ValueError("recompute=False needs `resid`, the residual whose norm scale is frozen")
        return model.apply_final_norm_frozen(stack, resid)
