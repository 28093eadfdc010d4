"""What can be patched: a `Component` is a hook point per layer with a `Layout`, which says how
its activation is shaped, along which axes it is patched, and how one patch index selects part of it.

Layouts (activation shape; patch axes, the first one the default):

    resid     [batch, pos, d_model]           by "pos"                 resid_pre / mid / post, attn_out, mlp_out
    heads     [batch, pos, head, d_head]      by "head" or "pos_head"  z, q (query heads)
    kv_heads  [batch, pos, kv_head, d_head]   by "head" or "pos_head"  k, v (key/value heads, GQA)
    pattern   [batch, head, query, key]       by "head" or "pos_head"  pattern (the position is the query row)

A sweep's result is [layer, pos], [layer, head] or [layer, pos, head] as in TransformerLens's
`get_act_patch_*`; a pattern by position is [layer, head, pos], as there. Users name components
by string ("resid_pre", "z", ...); `component(name)` turns the string into a `Component` once.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch import Tensor

from ..hook_points import get_act_name
from ..models import ModelConfig

# (layer, pos, head) of one patch; None where the sweep has no such axis.
PatchIndex = tuple[int, Optional[int], Optional[int]]
# (pos, head) of one patch within a layer.
PatchGroup = tuple[Optional[int], Optional[int]]

AXES = {"pos": ("layer", "pos"), "head": ("layer", "head"), "pos_head": ("layer", "pos", "head")}


@dataclass(frozen=True)
class Layout(ABC):
    """How an activation is laid out; the subclasses say how a patch index selects part of it.

    name: "resid", "heads", "kv_heads" or "pattern"; shape: the activation's axes;
    by: the patch axes allowed, the first one the default; head_kind: which heads the "head"
    axis indexes ("query" or "key/value"), None when there is none.
    """

    name: str
    shape: str
    by: tuple[str, ...]
    head_kind: Optional[str] = None

    def n_heads(self, cfg: ModelConfig) -> int:
        """How many heads the "head" axis indexes."""
        return cfg.n_heads

    def axes(self, by: str) -> tuple[str, ...]:
        """The axis names of a sweep's result."""
        return AXES[by]

    def patch(self, x: Tensor, src: Tensor, groups: Sequence[PatchGroup], offset: int) -> Tensor:
        """A copy of x in which copy j of the prompt set (rows j*n .. j*n+n-1) has the source values at groups[j].

        x: the stacked run's activation, seeing positions offset.. only; src: the source
        activation of the n prompts at every position.
        """
        x = x.clone()
        xs = x.view(len(groups), src.shape[0], *x.shape[1:])
        for j, (pos, head) in enumerate(groups):
            self._write(xs[j], src, pos, head, offset)
        return x

    @abstractmethod
    def _write(self, x: Tensor, src: Tensor, pos: Optional[int], head: Optional[int], offset: int) -> None:
        """Write the source values of one patch (position and/or head) into x, in place."""

    @abstractmethod
    def changed_positions(self, src: Tensor, run: Tensor) -> Tensor:
        """Where a patch would change the run: Bool[Tensor, "pos head"] ("pos 1" for the residual stream).

        src / run: one layer's activation of the source and run sets. Prompt pairs that differ in
        one token share every activation before it (attention is causal), so this is False there.
        """

    @abstractmethod
    def attribution(self, delta_grad: Tensor, by: str) -> Tensor:
        """Sum (source - run) * grad over everything but the patch axes (in `axes(by)` order, less the layer)."""


@dataclass(frozen=True)
class ResidLayout(Layout):
    """[batch, pos, d]: one vector per position."""

    def _write(self, x: Tensor, src: Tensor, pos: Optional[int], head: Optional[int], offset: int) -> None:
        x[:, pos - offset] = src[:, pos]

    def changed_positions(self, src: Tensor, run: Tensor) -> Tensor:
        return (src.to(run.device) != run).any(dim=-1).any(dim=0)[:, None]

    def attribution(self, delta_grad: Tensor, by: str) -> Tensor:
        return delta_grad.sum(dim=(0, 2))  # [pos]


@dataclass(frozen=True)
class HeadLayout(Layout):
    """[batch, pos, head, d_head], by query head or by key/value head (GQA), as `head_kind` says."""

    def n_heads(self, cfg: ModelConfig) -> int:
        return cfg.n_kv_heads if self.head_kind == "key/value" else cfg.n_heads

    def _write(self, x: Tensor, src: Tensor, pos: Optional[int], head: Optional[int], offset: int) -> None:
        if pos is None:  # the head at every position
            x[:, :, head] = src[:, offset:, head]
        else:
            x[:, pos - offset, head] = src[:, pos, head]

    def replace_heads(self, x: Tensor, src: Tensor, heads: Sequence[int]) -> Tensor:
        """A copy of x with `heads` taken from src at every row and position (same shapes)."""
        x = x.clone()
        x[:, :, list(heads)] = src[:, :, list(heads)]
        return x

    def changed_positions(self, src: Tensor, run: Tensor) -> Tensor:
        return (src.to(run.device) != run).any(dim=-1).any(dim=0)

    def attribution(self, delta_grad: Tensor, by: str) -> Tensor:
        return delta_grad.sum(dim=(0, 1, 3)) if by == "head" else delta_grad.sum(dim=(0, 3))  # [head] or [pos, head]


@dataclass(frozen=True)
class PatternLayout(Layout):
    """[batch, head, query, key]: a patch by position replaces one query row of a head."""

    def axes(self, by: str) -> tuple[str, ...]:
        return ("layer", "head", "pos") if by == "pos_head" else AXES[by]

    def _write(self, x: Tensor, src: Tensor, pos: Optional[int], head: Optional[int], offset: int) -> None:
        if pos is None:  # every query row of the head
            x[:, head] = src[:, head, offset:]
        else:
            x[:, head, pos - offset] = src[:, head, pos]

    def changed_positions(self, src: Tensor, run: Tensor) -> Tensor:
        return (src.to(run.device) != run).any(dim=-1).any(dim=0).T

    def attribution(self, delta_grad: Tensor, by: str) -> Tensor:
        return delta_grad.sum(dim=(0, 2, 3)) if by == "head" else delta_grad.sum(dim=(0, 3))  # [head] or [head, pos]


RESID = ResidLayout("resid", "batch pos d_model", ("pos",))
HEADS = HeadLayout("heads", "batch pos head d_head", ("head", "pos_head"), "query")
KV_HEADS = HeadLayout("kv_heads", "batch pos kv_head d_head", ("head", "pos_head"), "key/value")
PATTERN = PatternLayout("pattern", "batch head query key", ("head", "pos_head"), "query")
LAYOUTS = {layout.name: layout for layout in (RESID, HEADS, KV_HEADS, PATTERN)}


@dataclass(frozen=True)
class Component:
    """A patchable activation: the hook point `name` at every layer, laid out as `layout`."""

    name: str
    layout: Layout

    def hook_name(self, layer: int) -> str:
        """The hook point at `layer`, e.g. "blocks.3.attn.hook_z"."""
        return get_act_name(self.name, layer)

    def hook_names(self, n_layers: int) -> list[str]:
        """The hook point at every layer."""
        return [self.hook_name(layer) for layer in range(n_layers)]

    @property
    def default_by(self) -> str:
        return self.layout.by[0]

    def check_by(self, by: Optional[str]) -> str:
        """`by`, or the default when None; a ValueError when this component is not patched along it."""
        by = by or self.default_by
        if by not in self.layout.by:
            raise ValueError(f"component {self.name!r} is patched by {self.layout.by}, not {by!r}")
        return by

    def axes(self, by: str) -> tuple[str, ...]:
        """The axis names of a sweep's result, e.g. ("layer", "pos")."""
        return self.layout.axes(by)

    def n_heads(self, cfg: ModelConfig) -> int:
        """How many heads the "head" axis indexes (key/value heads for k and v)."""
        return self.layout.n_heads(cfg)

    def indices(self, cfg: ModelConfig, n_pos: int, by: str) -> list[PatchIndex]:
        """Every (layer, pos, head) a sweep visits, layer-major; None where the axis is absent."""
        positions = range(n_pos) if by in ("pos", "pos_head") else [None]
        heads = range(self.n_heads(cfg)) if by in ("head", "pos_head") else [None]
        return [(layer, p, h) for layer in range(cfg.n_layers) for p in positions for h in heads]

    def result_shape(self, cfg: ModelConfig, n_pos: int, by: str) -> tuple[int, ...]:
        """The shape of a sweep's result, in `axes(by)` order."""
        sizes = {"layer": cfg.n_layers, "pos": n_pos, "head": self.n_heads(cfg)}
        return tuple(sizes[axis] for axis in self.axes(by))

    def arrange(self, values: Tensor, cfg: ModelConfig, n_pos: int, by: str) -> Tensor:
        """One value per `indices(...)` entry, Float[Tensor, "index"], shaped as the result (`result_shape`)."""
        index_axes = AXES[by]
        sizes = {"layer": cfg.n_layers, "pos": n_pos, "head": self.n_heads(cfg)}
        values = values.view([sizes[axis] for axis in index_axes])
        if self.axes(by) != index_axes:
            values = values.permute([index_axes.index(axis) for axis in self.axes(by)]).contiguous()
        return values

    def patch(self, x: Tensor, src: Tensor, groups: Sequence[PatchGroup], offset: int = 0) -> Tensor:
        """Copy j of the stacked prompt set gets the source values at groups[j] = (pos, head); see `Layout.patch`."""
        return self.layout.patch(x, src, groups, offset)

    def changed_positions(self, src: Tensor, run: Tensor) -> Tensor:
        """Bool[Tensor, "pos head"]: where a patch would change the run; see `Layout.changed_positions`."""
        return self.layout.changed_positions(src, run)

    def attribution(self, delta_grad: Tensor, by: str) -> Tensor:
        """One layer's attribution scores, in `axes(by)` order less the layer axis."""
        return self.layout.attribution(delta_grad, by)

    def replace_heads(self, x: Tensor, src: Tensor, heads: Sequence[int]) -> Tensor:
        """A copy of x [batch, pos, head, d_head] with `heads` taken from src (z, q, k and v only)."""
        if not isinstance(self.layout, HeadLayout):
            raise TypeError(f"component {self.name!r} is not laid out [batch, pos, head, d_head]")
        return self.layout.replace_heads(x, src, heads)


COMPONENTS = {
    c.name: c
    for c in [
        Component("resid_pre", RESID),
        Component("resid_mid", RESID),
        Component("resid_post", RESID),
        Component("attn_out", RESID),
        Component("mlp_out", RESID),
        Component("z", HEADS),
        Component("q", HEADS),
        Component("k", KV_HEADS),
        Component("v", KV_HEADS),
        Component("pattern", PATTERN),
    ]
}


def component(name: Union[str, Component]) -> Component:
    """The Component a user's name stands for ("resid_pre", "z", ...); a ValueError with the closest names if unknown."""
    if isinstance(name, Component):
        return name
    if name not in COMPONENTS:
        close = difflib.get_close_matches(str(name), list(COMPONENTS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown component {name!r}.{hint} Choose one of {sorted(COMPONENTS)}")
    return COMPONENTS[name]


def axes_of(comp: Component, by: str) -> tuple[str, ...]:
    """Axis names of a sweep's result; the same as `comp.axes(by)`."""
    return comp.axes(by)
