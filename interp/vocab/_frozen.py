"""Shared pieces of the vocabulary readings: frozen norms, answer directions, MLP and unembedding weights.

A norm module computes norm(x) = centre?(x) * s(x) * g (+ b), with s(x) = 1 / sqrt(var(x) or
mean(x^2) + eps) a scalar per position, g the weight (1 + w for Gemma), and centring only for a
LayerNorm. With s frozen at the value it takes on the full residual (TransformerLens's
`apply_ln_to_stack`), the map is linear, so a sum of components maps to a sum of their images.
Every function here works in the dtype it is given (the callers pass float64 where they sum).

Weights are read through the adapter (`model.adapter`, `model.W_O`) and `real_param` (offloaded
weights included). What the adapter does not name yet is read here from its `LayerParts`
modules, one function each: `W_out` / `b_out` (the MLP's down projection) and `post_norms`
(Gemma 2/3's norms on each sublayer's output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..hooks import HookedModel
from ..models.adapters import GEMMA, NormSpec, real_param


@dataclass(frozen=True)
class Norm:
    """A norm's kind (`NormSpec`) with its weight and bias (either may be None)."""

    spec: NormSpec
    weight: Optional[Tensor]
    bias: Optional[Tensor] = None

    def gain(self, like: Tensor) -> Tensor:
        """g as Float[Tensor, "d_model"] in like's dtype and device: w, 1 + w (Gemma), or ones."""
        if self.weight is None:
            return torch.ones(like.shape[-1], dtype=like.dtype, device=like.device)
        w = self.weight.to(like.device, like.dtype)
        return 1.0 + w if self.spec.plus_one else w

    def scale(self, resid: Tensor) -> Tensor:
        """s(resid): Float[Tensor, "... d_model"] -> Float[Tensor, "... 1"], the scale frozen from `resid`."""
        if self.spec.kind == "layernorm":
            return torch.rsqrt(resid.var(-1, keepdim=True, unbiased=False) + self.spec.eps)
        if self.spec.kind == "rmsnorm":
            return torch.rsqrt(resid.pow(2).mean(-1, keepdim=True) + self.spec.eps)
        raise ValueError(f"unknown norm kind {self.spec.kind!r}")

    def apply_frozen(self, stack: Tensor, scale: Tensor) -> Tensor:
        """The frozen map on each component: centre?(c) * scale * g, no bias. scale broadcasts against stack."""
        if self.spec.kind == "layernorm":
            stack = stack - stack.mean(-1, keepdim=True)
        return stack * scale * self.gain(stack)

    def pull_back(self, direction: Tensor, scale: Tensor) -> Tensor:
        """The vector d with frozen(c) . direction = c . d (the map's transpose): centre?(direction * scale * g).

        direction: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"] -> Float[Tensor, "... d_model"].
        """
        d = direction * scale * self.gain(direction)
        return d - d.mean(-1, keepdim=True) if self.spec.kind == "layernorm" else d


def final_norm(model: HookedModel) -> Norm:
    """The model's final norm (`ln_final`): kind, eps, weight and bias, from the adapter."""
    a = model.adapter
    return Norm(a.final_norm_spec, real_param(a.final_norm, "weight"), real_param(a.final_norm, "bias"))


def post_norms(model: HookedModel, layer: int) -> tuple[Optional[Norm], Optional[Norm]]:
    """The norms Gemma 2/3 apply to the attention and MLP outputs before adding them to the residual, else (None, None).

    The adapter's `attn_out` / `mlp_out` module is then that norm, not the sublayer itself.
    """
    parts = model.adapter.layers[layer]
    found = []
    for out, sublayer in ((parts.attn_out, parts.attn), (parts.mlp_out, getattr(parts.block, "mlp", parts.mlp_out))):
        if out is sublayer:
            found.append(None)
            continue
        if model.cfg.family not in GEMMA:
            raise NotImplementedError(
                f"layer {layer} of this {model.cfg.family} model normalises a sublayer's output ({type(out).__name__}) "
                "and only Gemma 2/3's post-norms are known to interp.vocab; add the family's norm to interp/vocab/_frozen.py"
            )
        eps = getattr(out, "eps", None)
        eps = getattr(out, "variance_epsilon", 1e-6) if eps is None else eps
        found.append(Norm(NormSpec("rmsnorm", float(eps), plus_one=True), real_param(out, "weight")))
    return found[0], found[1]


def unembed_weight(model: HookedModel) -> Tensor:
    """W_U as Float[Tensor, "d_vocab d_model"] (the output embedding's own layout, tied or not)."""
    return real_param(model.adapter.unembed, "weight")


def unembed_bias(model: HookedModel) -> Optional[Tensor]:
    """The unembedding's bias, Float[Tensor, "d_vocab"], or None (no supported family has one today)."""
    return real_param(model.adapter.unembed, "bias")


def W_out(model: HookedModel, layer: int) -> Tensor:
    """The MLP's output weights as Float[Tensor, "d_mlp d_model"]: row n is what neuron n writes per unit of
    activation (`mlp.hook_post`). Read from the down projection (Conv1D stores [in, out], Linear [out, in])."""
    down = model.adapter.layers[layer].mlp_down
    weight = real_param(down, "weight")
    w = weight if type(down).__name__ == "Conv1D" else weight.T
    if w.shape != (model.cfg.d_mlp, model.cfg.d_model):
        raise ValueError(f"layer {layer}'s down projection has weight {tuple(weight.shape)}, expected d_mlp x d_model "
                         f"= {model.cfg.d_mlp} x {model.cfg.d_model} in some order")
    return w


def b_out(model: HookedModel, layer: int) -> Optional[Tensor]:
    """The MLP's output bias, Float[Tensor, "d_model"], or None."""
    return real_param(model.adapter.layers[layer].mlp_down, "bias")


def last_positions(tokens: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Long[Tensor, "batch"]: each prompt's last real position (the last 1 of its mask; padding on either side)."""
    if mask is None:
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
    return (mask.shape[1] - 1 - mask.flip(1).to(torch.long).argmax(1)).to(tokens.device)


def at(t: Tensor, pos: Tensor) -> Tensor:
    """t[b, pos[b]] for Float[Tensor, "batch pos ..."] (a batch of 1, e.g. hook_pos_embed, is broadcast)."""
    if t.shape[0] == 1 and len(pos) > 1:
        t = t.expand(len(pos), *t.shape[1:])
    return t[torch.arange(len(pos), device=t.device), pos.to(t.device)]


def check_layers(model: HookedModel, layers: Optional[Sequence[int] | int]) -> list[int]:
    """Layers as a list of indices in 0..n_layers-1 (negative ones count from the end); None means all."""
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    layers = [layers] if isinstance(layers, int) else list(layers)
    bad = [l for l in layers if not -n <= int(l) < n]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's {n} layers (0..{n - 1})")
    return sorted({int(l) % n for l in layers})


def decoder(model: HookedModel):
    """A memoised id -> string function (the tokenizer's decode of one id; the id as text without a tokenizer)."""
    names: dict[int, str] = {}
    tok = model.tokenizer

    def decode(i: int) -> str:
        i = int(i)
        if i not in names:
            names[i] = tok.decode([i]) if tok is not None else str(i)
        return names[i]

    return decode


def row_chunks(n_rows: int, d_vocab: int, budget: int = 2**24) -> list[slice]:
    """Slices of rows so that rows x d_vocab stays within `budget` elements."""
    size = max(1, budget // max(1, d_vocab))
    return [slice(s, min(s + size, n_rows)) for s in range(0, n_rows, size)]
