"""Function vectors (Todd et al. 2024, "Function Vectors in Large Language Models", ICLR 2024).

    groups = length_groups(model, make_prompts(model, task, 8, 10))
    stats = head_stats(model, groups)                         # mean z at the final token, accuracy
    corrupted = length_groups(model, make_prompts(model, task, 8, 10, shuffled=True))
    aie = average_indirect_effect(model, stats.last_mean, corrupted)      # [layer, head]
    fv = function_vector(model, stats.last_mean, top_heads(aie, 10))      # [d_model]
    acc = fv_accuracy_by_layer(model, zero_shot_groups, fv, layers=range(model.cfg.n_layers))

- A head's task mean is its output z (`attn.hook_z`) at the final token, averaged over clean
  N-shot prompts: Float[Tensor, "layer head d_head"].
- Its average indirect effect (AIE): on prompts whose demonstration labels are shuffled, replace
  the head's final-token z by its task mean; AIE = mean over prompts of the gain in P(answer).
- The function vector is the sum of the top-k heads' means written through W_O (biases left out),
  Float[Tensor, "d_model"]; it is added to the residual stream entering block `layer` at the
  final token (`blocks.{layer}.hook_resid_pre`).

The AIE sweep is batched: per group of equal-length prompts one capture (`runs.capture`), then
per layer one forward from that layer at the final position with the layer's head patches
stacked along the batch (copy j patches head j), as `interp.patching` and
`interp.heads.stacked` do. `average_indirect_effect(..., method="naive")` is one full
`run_with_hooks` per prompt and head: the oracle, and the cost it saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from ..heads.ablate import Head
from ..heads.stacked import chunk_heads, row_heads
from ..hook_points import HookPoint, get_act_name
from ..hooks import HookedModel, HookSpec
from .runs import Group, answer_probs, capture, correct, resume_last


@dataclass
class HeadStats:
    """What one clean pass over prompts gives.

    last_mean: Float[Tensor, "layer head d_head"], each head's z at the final token, averaged over prompts;
    all_mean: Float[Tensor, "layer head d_head"], z averaged over prompts and positions (a mean-ablation reference);
    probs: Float[Tensor, "prompt"], P(answer); correct: Bool[Tensor, "prompt"], answer is the top token.
    """

    last_mean: Tensor
    all_mean: Tensor
    probs: Tensor
    correct: Tensor

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())


@torch.no_grad()
def head_stats(model: HookedModel, groups: Sequence[Group]) -> HeadStats:
    """One forward per group recording every layer's z: the final-token and all-position means, P(answer), accuracy."""
    L = model.cfg.n_layers
    names = [get_act_name("z", l) for l in range(L)]
    n = sum(len(g.index) for g in groups)
    last_sum, all_sum, n_pos = None, None, 0
    probs, right = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    for g in groups:
        logits, cache = model.run_with_cache(g.tokens, names_filter=names, logits_to_keep=1)
        z = torch.stack([cache[nm].float() for nm in names], dim=1)  # [batch, layer, pos, head, d_head]
        last, every = z[:, :, -1].sum(0), z.sum((0, 2))
        last_sum = last if last_sum is None else last_sum + last
        all_sum = every if all_sum is None else all_sum + every
        n_pos += z.shape[0] * z.shape[2]
        probs[g.index], right[g.index] = answer_probs(logits, g.answers).cpu(), correct(logits, g.answers)
    return HeadStats(last_sum / n, all_sum / n_pos, probs, right)


def _check_means(model: HookedModel, means: Tensor) -> None:
    c = model.cfg
    if tuple(means.shape) != (c.n_layers, c.n_heads, c.d_head):
        raise ValueError(f"head means must be [n_layers, n_heads, d_head] = {[c.n_layers, c.n_heads, c.d_head]}, got {list(means.shape)}")


def _patch_last(sel: Tensor, mean: Tensor) -> Callable[[Tensor, HookPoint], Tensor]:
    """A hook_z function setting, on each row, the heads `sel` [rows, head] at the final position to `mean` [head, d_head]."""
    def fn(z: Tensor, hook: HookPoint) -> Tensor:
        z = z.clone()
        z[:, -1] = torch.where(sel.to(z.device)[:, :, None], mean.to(z.device, z.dtype)[None], z[:, -1])
        return z

    return fn


@torch.no_grad()
def average_indirect_effect(
    model: HookedModel,
    means: Tensor,
    groups: Sequence[Group],
    heads: Optional[Sequence[Head]] = None,
    method: str = "batched",
    batch_heads: Optional[int] = None,
) -> Tensor:
    """AIE of each head, Float[Tensor, "layer head"] (NaN for heads not in `heads`).

    means: the heads' task means at the final token [layer, head, d_head] (`head_stats(...).last_mean`);
    groups: the corrupted (shuffled-label) prompts. AIE = mean over prompts of P(answer | head patched)
    - P(answer). method: "batched" (stacked patches, forwards resumed at the layer's final token)
    or "naive" (one full forward per prompt group and head). batch_heads: patches per forward.
    """
    _check_means(model, means)
    c = model.cfg
    heads = [(l, h) for l in range(c.n_layers) for h in range(c.n_heads)] if heads is None else list(heads)
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    gain = torch.full((c.n_layers, c.n_heads), float("nan"))
    for l, hs in by_layer.items():
        gain[l, hs] = 0.0
    n = sum(len(g.index) for g in groups)
    if method not in ("batched", "naive"):
        raise ValueError(f"method must be 'batched' or 'naive', got {method!r}")
    for g in groups:
        B = len(g.index)
        if method == "naive":
            base = answer_probs(model(g.tokens, logits_to_keep=1), g.answers).cpu()
            for l, hs in by_layer.items():
                for h in hs:
                    sel = torch.zeros(B, c.n_heads, dtype=torch.bool)
                    sel[:, h] = True
                    logits = model.run_with_hooks(g.tokens, fwd_hooks=[(get_act_name("z", l), _patch_last(sel, means[l]))],
                                                  logits_to_keep=1)
                    gain[l, h] += float((answer_probs(logits, g.answers).cpu() - base).sum())
            continue
        run = capture(model, g)
        base = answer_probs(resume_last(model, run, c.n_layers - 1), g.answers).cpu()
        for l, hs in by_layer.items():
            for chunk in chunk_heads(hs, batch_heads or c.n_heads):
                sel = row_heads(chunk, B, c.n_heads, "cpu")
                logits = resume_last(model, run, l, len(chunk), [(get_act_name("z", l), _patch_last(sel, means[l]))])
                p = answer_probs(logits, g.answers.repeat(len(chunk))).cpu().view(len(chunk), B)
                gain[l, chunk] += (p - base[None]).sum(1)
    return gain / n


def top_heads(scores: Tensor, k: int) -> list[Head]:
    """The k (layer, head) pairs of highest score (NaN last), best first. scores: Float[Tensor, "layer head"]."""
    flat = torch.nan_to_num(scores.float(), nan=float("-inf")).flatten()
    idx = flat.topk(min(k, flat.numel())).indices.tolist()
    H = scores.shape[1]
    return [(i // H, i % H) for i in idx]


def function_vector(model: HookedModel, means: Tensor, heads: Iterable[Head]) -> Tensor:
    """The sum of the heads' mean outputs through W_O (no bias): Float[Tensor, "d_model"]."""
    _check_means(model, means)
    fv = torch.zeros(model.cfg.d_model)
    for l, h in heads:
        fv += (means[l, h].float().to(model.device) @ model.W_O(l)[h].float()).cpu()
    return fv


def add_at_last_token(layer: int, vector: Tensor) -> HookSpec:
    """Hooks adding `vector` [d_model] (or [rows, d_model]) to the residual stream entering block `layer`, final position only."""
    def fn(x: Tensor, hook: HookPoint) -> Tensor:
        x = x.clone()
        x[:, -1] += vector.to(x.device, x.dtype)
        return x

    return [(get_act_name("resid_pre", layer), fn)]


@torch.no_grad()
def fv_accuracy_by_layer(model: HookedModel, groups: Sequence[Group], vector: Optional[Tensor], layers: Iterable[int]) -> dict[int, float]:
    """Accuracy with `vector` added at the final token entering each of `layers`: {layer: accuracy}.

    One capture per group; each layer is one forward from that layer at the final position
    (`vector=None`: the same forwards without it, the baseline).
    """
    layers = list(layers)
    n = sum(len(g.index) for g in groups)
    hits = dict.fromkeys(layers, 0)
    for g in groups:
        run = capture(model, g)
        for l in layers:
            hooks = add_at_last_token(l, vector) if vector is not None else []
            hits[l] += int(correct(resume_last(model, run, l, 1, hooks), g.answers).sum())
    return {l: hits[l] / n for l in layers}
