"""Head ablation: knock out any set of attention heads for the duration of a `with` block.

    from interp.heads.ablation import ablate_heads
    with ablate_heads(model, heads=[(3, 1), (7, 4)], how="uniform"):
        logits = model(tokens)          # or model.generate(...)

Four ways to remove a head, the `AblationKind`s (heads are *query* heads, also under grouped-query
attention):

- ``"zero"``: the head's output z (``attn.hook_z``, [batch, pos, head, d_head]) is set to 0,
  which is zeroing its columns of the output projection (Michel et al. 2019 mask a head this way).
- ``"mean"``: z is replaced by its mean over a reference token batch. By default the mean is
  over batch and position (one vector per head, valid at any length and during ``generate``);
  with ``per_position=True`` it is the mean over the batch at each position, and the input must
  have the reference's length. Padding (a reference attention mask) is left out of the mean.
- ``"resample"``: z is replaced by the z the model computes on ``reference`` (another prompt of
  the same length; a batch of 1 is broadcast, otherwise the batch sizes must match).
- ``"uniform"``: the head's query (``attn.hook_q``, before RoPE and any q-norm) is zeroed, so
  every score is 0 and the head attends uniformly over the keys its mask allows. This is the
  "masking" Wu et al. 2024 ("Retrieval Head Mechanistically Explains Long-Context Factuality")
  use for retrieval heads: the head then outputs the mean of the allowed values, not zero.
  RoPE of 0 is 0, and RMS q-norms (Qwen3, Gemma 3) map 0 to 0, so it holds in those families.

Replacements for mean and resample are computed once, on entry, from a clean run of the
reference (with whatever other hooks are attached at that moment). zero, mean and uniform work
during ``model.generate`` (decode steps see pos = 1); resample and per-position mean need the
input's positions to line up with the reference's, so they refuse a decode step with a clear error.
"""

from __future__ import annotations

import contextlib
from enum import Enum
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from ..hook_points import HookPoint, get_act_name
from ..hooks import HookedModel, HookSpec, Input

Head = tuple[int, int]  # (layer, query head)


class AblationKind(str, Enum):
    """How a head is removed (see the module docstring). Compares equal to its name: `AblationKind.ZERO == "zero"`."""

    ZERO = "zero"
    MEAN = "mean"
    RESAMPLE = "resample"
    UNIFORM = "uniform"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, how: Union[str, "AblationKind"]) -> "AblationKind":
        """The kind named by `how` (a string or a kind); a ValueError listing the kinds otherwise."""
        try:
            return cls(how)
        except ValueError:
            raise ValueError(f"how must be one of {HOWS}, got {how!r}") from None

    @property
    def needs_reference_activations(self) -> bool:
        """True when the replacement comes from a run of reference tokens (mean, resample)."""
        return self in (AblationKind.MEAN, AblationKind.RESAMPLE)

    @property
    def acts_on(self) -> str:
        """"query" (uniform: the head's q is zeroed) or "output" (the head's z is zeroed or replaced)."""
        return "query" if self is AblationKind.UNIFORM else "output"

    @property
    def zeroes(self) -> bool:
        """True when the hooked activation is set to 0 (zero, uniform); False when it is replaced (mean, resample)."""
        return not self.needs_reference_activations

    def hook_name(self, layer: int) -> str:
        """The hook point the kind edits at `layer`: `attn.hook_q` for uniform, `attn.hook_z` otherwise."""
        return get_act_name("q" if self.acts_on == "query" else "z", layer)


HOWS = tuple(k.value for k in AblationKind)


# ---------------------------------------------------------------------------- validation
def check_heads(model: HookedModel, heads: Sequence[Head]) -> list[Head]:
    """(layer, head) pairs as ints, each in range; a clear error otherwise."""
    c = model.cfg
    out = []
    for item in heads:
        try:
            layer, head = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ValueError(f"heads must be (layer, head) pairs, got {item!r}") from None
        if not (0 <= layer < c.n_layers and 0 <= head < c.n_heads):
            raise ValueError(
                f"head {(layer, head)} is out of range: the model has {c.n_layers} layers and {c.n_heads} query heads per layer"
            )
        out.append((layer, head))
    return out


def head_mask(model: HookedModel, heads: Sequence[Head]) -> Tensor:
    """Bool [n_layers, n_heads], True where a head is listed."""
    mask = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool, device=model.device)
    for layer, head in check_heads(model, heads):
        mask[layer, head] = True
    return mask


def all_heads(model: HookedModel, heads: Optional[Sequence[Head]] = None) -> list[Head]:
    """`heads` checked, or every (layer, head) of the model in order when None."""
    if heads is not None:
        return check_heads(model, heads)
    return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


# ---------------------------------------------------------------------------- replacements
def _reference_tokens(model: HookedModel, reference: Input, reference_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    if isinstance(reference, Tensor):
        tokens = reference if reference.ndim == 2 else reference.unsqueeze(0)
        return tokens.to(model.device), reference_mask
    tokens, mask = model.to_tokens_and_mask(reference)
    return tokens, (reference_mask if reference_mask is not None else mask)


@torch.no_grad()
def reference_z(
    model: HookedModel, reference: Input, layers: Sequence[int], reference_mask: Optional[Tensor] = None
) -> tuple[dict[int, Tensor], Optional[Tensor]]:
    """z of every head at `layers` on a clean run of `reference`: {layer: [batch, pos, head, d_head]}, and its mask."""
    tokens, mask = _reference_tokens(model, reference, reference_mask)
    _, cache = model.run_with_cache(tokens, names_filter=[get_act_name("z", l) for l in layers], attention_mask=mask)
    return {l: cache[get_act_name("z", l)] for l in layers}, mask


def replacements(
    model: HookedModel,
    how: Union[str, AblationKind],
    layers: Sequence[int],
    reference: Optional[Input],
    reference_mask: Optional[Tensor] = None,
    per_position: bool = False,
) -> dict[int, Tensor]:
    """What an ablated head's z becomes, per layer: [1 or batch, 1 or pos, head, d_head]. Empty for zero/uniform."""
    kind = AblationKind.parse(how)
    if not kind.needs_reference_activations or not layers:
        return {}
    if reference is None:
        raise ValueError(f'how="{kind.value}" needs `reference` tokens (a prompt batch to take the {kind.value} from)')
    zs, mask = reference_z(model, reference, layers, reference_mask)
    if kind is AblationKind.RESAMPLE:
        return zs
    out = {}
    for l, z in zs.items():
        w = torch.ones(z.shape[:2], dtype=torch.float32, device=z.device) if mask is None else mask.to(z.device, torch.float32)
        wz = z.float() * w[:, :, None, None]
        if per_position:
            if mask is not None and bool((w.sum(0) == 0).any()):
                raise ValueError("per_position mean: some position is padding in every reference prompt")
            mean = wz.sum(0, keepdim=True) / w.sum(0)[None, :, None, None]
        else:
            mean = wz.sum((0, 1), keepdim=True) / w.sum()
        out[l] = mean.to(z.dtype)
    return out


def _fit(repl: Tensor, z: Tensor, name: str, kind: AblationKind) -> Tensor:
    """Check that a replacement [b', p', head, d] broadcasts onto z [b, p, head, d]."""
    b, p = z.shape[:2]
    rb, rp = repl.shape[:2]
    if rp not in (1, p):
        raise ValueError(
            f'{kind.value} ablation at {name}: the reference has {rp} positions but the input has {p} '
            f"(z {tuple(z.shape)} vs reference {tuple(repl.shape)}). Use a reference of the input's length"
            + (", or the position-averaged mean; these cannot follow KV-cache decode steps" if p == 1 else "")
        )
    if rb not in (1, b):
        raise ValueError(
            f"{kind.value} ablation at {name}: reference batch {rb} does not match input batch {b} "
            f"(z {tuple(z.shape)} vs reference {tuple(repl.shape)}); pass a reference batch of 1 or {b}"
        )
    return repl.to(z.dtype)


# ---------------------------------------------------------------------------- hooks
def ablation_hooks(
    model: HookedModel, mask: Tensor, how: Union[str, AblationKind], repl: Optional[dict[int, Tensor]] = None
) -> HookSpec:
    """Forward hooks that ablate heads per sample.

    mask: bool [1 or batch, n_layers, n_heads] (True = ablate that head in that sample).
    repl: {layer: replacement z} for mean/resample (see `replacements`).
    Layers with nothing to ablate get no hook, so they keep their fast attention path.
    """
    kind = AblationKind.parse(how)
    if mask.ndim == 2:
        mask = mask[None]
    expected = (model.cfg.n_layers, model.cfg.n_heads)
    if mask.ndim != 3 or tuple(mask.shape[1:]) != expected:
        raise ValueError(f"head mask must be [batch, n_layers, n_heads] = [*, {expected[0]}, {expected[1]}], got {tuple(mask.shape)}")
    repl = repl or {}
    hooks = []
    for layer in range(model.cfg.n_layers):
        sel = mask[:, layer]  # [b, head]
        if not bool(sel.any()):
            continue
        fn = _zero_hook(sel) if kind.zeroes else _replace_hook(sel, repl[layer], kind)
        hooks.append((kind.hook_name(layer), fn))
    return hooks


def _broadcast_sel(sel: Tensor, x: Tensor, name: str) -> Tensor:
    if sel.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"head mask batch {sel.shape[0]} does not match the input batch {x.shape[0]} at {name}")
    return sel.to(x.device)[:, None, :, None]  # [b, 1, head, 1]


def _zero_hook(sel: Tensor) -> Callable[[Tensor, HookPoint], Tensor]:
    def fn(x: Tensor, hook: HookPoint) -> Tensor:  # x: [batch, pos, head, d_head] (hook_z or hook_q)
        return x.masked_fill(_broadcast_sel(sel, x, hook.name), 0.0)

    return fn


def _replace_hook(sel: Tensor, repl: Tensor, kind: AblationKind) -> Callable[[Tensor, HookPoint], Tensor]:
    def fn(z: Tensor, hook: HookPoint) -> Tensor:
        return torch.where(_broadcast_sel(sel, z, hook.name), _fit(repl, z, hook.name, kind), z)

    return fn


@contextlib.contextmanager
def ablate_heads(
    model: HookedModel,
    heads: Sequence[Head],
    how: Union[str, AblationKind] = "zero",
    reference: Optional[Input] = None,
    reference_mask: Optional[Tensor] = None,
    per_position: bool = False,
) -> Iterator[HookedModel]:
    """Ablate `heads` ([(layer, query_head), ...]) for the duration of the `with` block.

    how: "zero" | "mean" | "resample" | "uniform", or an `AblationKind` (see the module docstring).
    reference: token ids [batch, pos] or text, needed by mean and resample.
    reference_mask: attention mask of the reference (padding is left out of a mean).
    per_position: mean per position instead of over batch and position.
    """
    kind = AblationKind.parse(how)
    mask = head_mask(model, heads)
    layers = [l for l in range(model.cfg.n_layers) if bool(mask[l].any())]
    repl = replacements(model, kind, layers, reference, reference_mask, per_position)
    with model.hooks(fwd_hooks=ablation_hooks(model, mask, kind, repl)):
        yield model
