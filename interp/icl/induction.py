"""Induction heads on repeated random tokens, and head-set ablations against few-shot accuracy
(Yin & Steinhardt 2025, "Which Attention Heads Matter for In-Context Learning?"; the induction score
of Olsson et al. 2022 as TransformerLens computes it).

    tokens = repeated_tokens(model, seq_len=25, batch=4)          # [batch, 1 + 2 * seq_len]
    rep = repeat_run(model, tokens, seq_len)                      # scores [layer, head], losses, mean z
    drop = ablated(model, heads, groups, rep, icl_mean)           # accuracy and loss with the heads mean-ablated

Sequence: a first token, then S random tokens, then the same S again. A head's induction score is
its attention from each position of the second copy to the token after that token's first
occurrence (key = query - S + 1), averaged over those queries and the batch. The in-context loss
drop is the mean next-token loss on the first copy minus that on the second: a model that copies
from context predicts the second copy far better.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..heads.ablate import Head, ablation_hooks, head_mask
from ..hook_points import HookPoint, get_act_name
from ..hooks import HookedModel
from .runs import Group, last_token_logits


def repeated_tokens(model: HookedModel, seq_len: int = 25, batch: int = 4, seed: int = 0,
                    low: Optional[int] = None, high: Optional[int] = None) -> Tensor:
    """Long[Tensor, "batch 1+2*seq_len"]: a first token (BOS, else EOS, else 0), S random ids in [low, high), repeated.

    Defaults keep away from the special tokens at either end of the vocabulary: [min(1000, d_vocab // 10), min(d_vocab, 30000)).
    """
    V = model.cfg.d_vocab
    high = min(V, 30000) if high is None else high
    low = min(1000, V // 10) if low is None else low
    if not 0 <= low < high <= V:
        raise ValueError(f"token range [{low}, {high}) must lie inside the vocabulary of {V} ids")
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(low, high, (batch, seq_len), generator=g)
    tok = model.tokenizer
    first = next((t for t in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)) if t is not None), 0)
    return torch.cat([torch.full((batch, 1), int(first)), half, half], dim=1).to(model.device)


def induction_score_from_pattern(pattern: Tensor, seq_len: int) -> Tensor:
    """Float[Tensor, "head"]: mean attention from query i to key i - seq_len + 1, over the second copy's queries.

    pattern: Float[Tensor, "batch head q k"] of a sequence [first, r_1..r_S, r_1..r_S] (q = k = 1 + 2S).
    Queries 1+S .. 2S (the second copy) attend, when inducting, to keys 2 .. S+1 (the token after the first occurrence).
    """
    if pattern.shape[-1] != 1 + 2 * seq_len:
        raise ValueError(f"pattern covers {pattern.shape[-1]} positions; a repeated sequence of {seq_len} has {1 + 2 * seq_len}")
    diag = pattern.float().diagonal(offset=-(seq_len - 1), dim1=-2, dim2=-1)  # [batch, head, ...]: entry j is (q=j+S-1, k=j)
    return diag[..., 2:].mean(dim=(0, -1))  # keys 2..S+1 <-> queries S+1..2S


def repeat_losses(logits: Tensor, tokens: Tensor, seq_len: int) -> tuple[float, float]:
    """Mean next-token loss predicting the first copy's tokens 2..S and the second copy's tokens 2..S."""
    lp = F.log_softmax(logits.float(), dim=-1)
    nll = -lp[:, :-1].gather(-1, tokens[:, 1:, None].to(lp.device))[..., 0]  # [batch, pos-1]: nll[:, i] predicts token i+1
    first = nll[:, 1:seq_len]              # predicts tokens 2..S
    second = nll[:, seq_len + 1 : 2 * seq_len]  # predicts tokens S+2..2S
    return float(first.mean()), float(second.mean())


@dataclass
class RepeatRun:
    """The clean run on repeated tokens: induction scores Float[Tensor, "layer head"], the two losses,
    and each head's z averaged over batch and positions Float[Tensor, "layer head d_head"] (a mean-ablation reference)."""

    tokens: Tensor
    seq_len: int
    scores: Tensor
    loss_first: float
    loss_second: float
    z_mean: Tensor

    @property
    def loss_drop(self) -> float:
        return self.loss_first - self.loss_second


@torch.no_grad()
def repeat_run(model: HookedModel, tokens: Tensor, seq_len: int) -> RepeatRun:
    """One forward over repeated tokens recording each layer's pattern (reduced to induction scores on the fly) and z."""
    L = model.cfg.n_layers
    scores = torch.zeros(L, model.cfg.n_heads)
    z_mean = torch.zeros(L, model.cfg.n_heads, model.cfg.d_head)

    def score(pattern: Tensor, hook: HookPoint) -> None:
        scores[hook.layer()] = induction_score_from_pattern(pattern, seq_len).cpu()

    def mean_z(z: Tensor, hook: HookPoint) -> None:
        z_mean[hook.layer()] = z.float().mean((0, 1)).cpu()

    hooks = [(get_act_name("pattern", l), score) for l in range(L)] + [(get_act_name("z", l), mean_z) for l in range(L)]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    first, second = repeat_losses(logits, tokens, seq_len)
    return RepeatRun(tokens, seq_len, scores, first, second, z_mean)


def _mean_hooks(model: HookedModel, heads: Sequence[Head], z_mean: Tensor):
    mask = head_mask(model, heads)
    repl = {l: z_mean[l][None, None].to(model.device, model.dtype) for l in range(model.cfg.n_layers) if bool(mask[l].any())}
    return ablation_hooks(model, mask, "mean", repl)


@torch.no_grad()
def ablated_accuracy(model: HookedModel, heads: Sequence[Head], groups: Sequence[Group], z_mean: Tensor) -> float:
    """Few-shot accuracy with `heads` mean-ablated; z_mean [layer, head, d_head] from the clean prompts (`HeadStats.all_mean`)."""
    return float(last_token_logits(model, groups, _mean_hooks(model, heads, z_mean))[1].float().mean())


@torch.no_grad()
def ablated_repeat_losses(model: HookedModel, heads: Sequence[Head], rep: RepeatRun) -> tuple[float, float]:
    """(first-copy loss, second-copy loss) with `heads` mean-ablated, the mean taken on the repeated tokens (`rep.z_mean`)."""
    logits = model.run_with_hooks(rep.tokens, fwd_hooks=_mean_hooks(model, heads, rep.z_mean))
    return repeat_losses(logits, rep.tokens, rep.seq_len)


def overlap(a: Sequence[Head], b: Sequence[Head]) -> list[Head]:
    """Heads in both sets, in the order of `a`."""
    bs = set(map(tuple, b))
    return [h for h in a if tuple(h) in bs]
