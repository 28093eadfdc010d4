"""Named hook points: the unit users attach functions to.

A `HookPoint` knows nothing about Hugging Face modules. The sites in `interp.sites` call
`HookPoint.run(tensor)` from inside the real model's forward and put the result back.
Hook functions follow TransformerLens's signature: `fn(tensor, hook) -> tensor | None`.
Returning None keeps the (possibly in-place edited) tensor.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import Tensor

HookFn = Callable[..., Optional[Tensor]]


@dataclass
class _Registered:
    fn: HookFn
    edits: bool  # False for our own read-only functions (caching): lets sites skip write-back work


@dataclass
class HookPoint:
    """One named activation, e.g. `blocks.3.attn.hook_z`."""

    name: str
    fwd: list[_Registered] = field(default_factory=list)
    bwd: list[HookFn] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.fwd or self.bwd)

    @property
    def edits(self) -> bool:
        """True when some attached function may change the activation."""
        return any(r.edits for r in self.fwd)

    def layer(self) -> Optional[int]:
        """The block index in the name, as TransformerLens's `hook.layer()`."""
        m = re.match(r"blocks\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None

    def add(self, fn: HookFn, direction: str = "fwd", edits: bool = True) -> None:
        if direction == "fwd":
            self.fwd.append(_Registered(fn, edits))
        elif direction == "bwd":
            self.bwd.append(fn)
        else:
            raise ValueError(f"hook direction must be 'fwd' or 'bwd', got {direction!r}")

    def remove(self, fn: HookFn, direction: str = "fwd") -> None:
        if direction == "fwd":
            self.fwd = [r for r in self.fwd if r.fn is not fn]
        else:
            self.bwd = [f for f in self.bwd if f is not fn]

    def clear(self) -> None:
        self.fwd.clear()
        self.bwd.clear()

    def run(self, x: Tensor) -> Tensor:
        """Apply the forward functions in order and arm the backward ones on the result."""
        for reg in self.fwd:
            out = reg.fn(x, hook=self)
            if out is not None:
                check_returned(self.name, reg.fn, out, x)
                x = out
        if self.bwd and x.requires_grad:
            # The autograd hook must live on the tensor the model goes on to use.
            x = x.view_as(x)
            for fn in self.bwd:
                x.register_hook(lambda grad, fn=fn: fn(grad, hook=self))
        return x

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, fwd={len(self.fwd)}, bwd={len(self.bwd)})"


def _fn_name(fn: HookFn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def check_returned(name: str, fn: HookFn, out: object, x: Tensor) -> None:
    """Refuse what a hook function returned unless it is a tensor of the activation's shape, dtype and device."""
    where = f"hook function {_fn_name(fn)!r} on {name}"
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{where} returned {got}; it must return None or a tensor of the activation's shape {tuple(x.shape)}")
    if out.dtype != x.dtype:
        raise ValueError(
            f"{where} returned a {out.dtype} tensor; it must return the activation's dtype {x.dtype} "
            f"(convert with .to(x.dtype))"
        )
    if out.device != x.device:
        raise ValueError(
            f"{where} returned a tensor on device {out.device}; it must stay on the activation's device {x.device} "
            f"(move it with .to(x.device))"
        )


def unknown_hook_error(name: str, known: list[str]) -> KeyError:
    """A KeyError that names the closest valid hook names."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(f"unknown hook name {name!r}.{hint} `model.hook_names()` lists all {len(known)} of them.")


def get_act_name(name: str, layer: Optional[int] = None, layer_type: Optional[str] = None) -> str:
    """TransformerLens's shorthand: `get_act_name("pattern", 3) == "blocks.3.attn.hook_pattern"`."""
    attn = {"q", "k", "v", "z", "rot_q", "rot_k", "attn_scores", "pattern", "result"}
    mlp = {"post", "pre"}
    short = name[5:] if name.startswith("hook_") else name
    if layer is None:
        return name if name.startswith("hook_") or "." in name else f"hook_{short}"
    if short in attn:
        return f"blocks.{layer}.attn.hook_{short}"
    if short in mlp:
        return f"blocks.{layer}.mlp.hook_{short}"
    if short in {"normalized", "scale"}:
        return f"blocks.{layer}.{layer_type or 'ln1'}.hook_{short}"
    return f"blocks.{layer}.hook_{short}"
