"""Where hook points attach to the real HF modules.

A `Site` is one torch module hook (pre or post) that serves an ordered list of taps; a tap
pulls one activation out of the module's input or output, runs a hook point on it and puts
the result back. Torch hooks are installed only while some tap of the site is active, so a
model with no hooks attached runs the untouched HF forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .hook_points import HookPoint

# A tap maps the site's tensor to a new one (or the same). `state` is shared per layer.
Tap = Callable[[Tensor, dict], Tensor]


@dataclass
class Site:
    module: nn.Module
    kind: str  # "pre": edits the module's first input; "post": edits its output (first element of a tuple)
    taps: list[tuple[list[HookPoint], Tap]] = field(default_factory=list)
    state: dict = field(default_factory=dict)
    _handle: Optional[torch.utils.hooks.RemovableHandle] = None

    def add(self, points: list[HookPoint], tap: Tap) -> None:
        self.taps.append((points, tap))

    @property
    def active(self) -> bool:
        return any(p.active for points, _ in self.taps for p in points)

    def sync(self) -> None:
        """Install the torch hook if any tap is live, remove it otherwise."""
        if self.active and self._handle is None:
            if self.kind == "pre":
                self._handle = self.module.register_forward_pre_hook(self._pre, with_kwargs=True)
            else:
                self._handle = self.module.register_forward_hook(self._post)
        elif not self.active and self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _apply(self, x: Tensor) -> Tensor:
        for points, tap in self.taps:
            if any(p.active for p in points):
                x = tap(x, self.state)
        return x

    def _pre(self, module, args, kwargs):
        if args:
            return (self._apply(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self._apply(kwargs["hidden_states"])
        return args, kwargs

    def _post(self, module, args, output):
        if isinstance(output, tuple):
            return (self._apply(output[0]), *output[1:])
        return self._apply(output)


def whole(point: HookPoint) -> Tap:
    """The tensor as it is: residual stream, sublayer outputs, norms, MLP hidden."""
    return lambda x, state: point.run(x)


def remember(key: str, point: Optional[HookPoint] = None) -> Tap:
    """Store the tensor in the layer state (for resid_mid), running `point` first if given."""

    def tap(x: Tensor, state: dict) -> Tensor:
        if point is not None and point.active:
            x = point.run(x)
        state[key] = x
        return x

    return tap


def resid_mid(point: HookPoint) -> Tap:
    """resid_mid = resid_pre + attn_out, written back through attn_out.

    Reading is exact: the sum is the one the block computes. An edit to resid_mid becomes
    attn_out' = resid_mid' - resid_pre, so the block's own addition reproduces resid_mid'.
    """

    def tap(attn_out: Tensor, state: dict) -> Tensor:
        # On a model split over devices the block's pre-hook sees resid_pre before accelerate moves
        # it to the block's device; the block adds the moved copy (same values).
        pre = state["resid_pre"].to(attn_out.device)
        mid = pre + attn_out
        new = point.run(mid)
        # Write back when edited, and when a backward hook needs the gradient to flow through `mid`.
        return new - pre if (point.edits or point.bwd) else attn_out

    return tap


def heads(point: HookPoint, n_heads: int, d_head: int) -> Tap:
    """A projection's output [batch, pos, head*d_head] seen as [batch, pos, head, d_head]."""

    def tap(x: Tensor, state: dict) -> Tensor:
        b, s, _ = x.shape
        return point.run(x.view(b, s, n_heads, d_head)).reshape(b, s, n_heads * d_head)

    return tap


def fused_heads(points: list[HookPoint], split: Callable[[Tensor], list[Tensor]], merge: Callable[[list[Tensor]], Tensor]) -> Tap:
    """q, k, v out of one fused projection; each point sees [batch, pos, head, d_head]."""

    def tap(x: Tensor, state: dict) -> Tensor:
        parts = split(x)
        parts = [p.run(t) if p.active else t for p, t in zip(points, parts)]
        return merge(parts)

    return tap


def head_results(
    point: HookPoint, W_O: Callable[[], Tensor], b_O: Callable[[], Optional[Tensor]], n_heads: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """hook_result on the output projection: per-head writes [batch, pos, head, d_model].

    Needs the projection's input, so it is a forward hook with its own signature (see `ResultSite`).
    """

    def compute(z_flat: Tensor, out: Tensor) -> Tensor:
        b, s, _ = z_flat.shape
        z = z_flat.view(b, s, n_heads, -1)
        result = torch.einsum("bphd,hdm->bphm", z, W_O().to(z.dtype))
        result = point.run(result)
        if not point.edits:  # read only: keep the projection's own (bit-identical) output
            return out
        summed = result.sum(dim=2)
        bias = b_O()
        return summed + bias if bias is not None else summed

    return compute


@dataclass
class ResultSite:
    """Replaces the output projection's output by the sum of (hooked) per-head results."""

    module: nn.Module
    point: HookPoint
    compute: Callable[[Tensor, Tensor], Tensor]
    _handle: Optional[torch.utils.hooks.RemovableHandle] = None

    def sync(self) -> None:
        if self.point.active and self._handle is None:
            self._handle = self.module.register_forward_hook(lambda m, args, out: self.compute(args[0], out))
        elif not self.point.active and self._handle is not None:
            self._handle.remove()
            self._handle = None
