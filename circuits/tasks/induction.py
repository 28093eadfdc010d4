"""Induction on repeated random tokens (Elhage et al. 2021, "A Mathematical Framework for
Transformer Circuits"; Olsson et al. 2022, "In-context Learning and Induction Heads").

Clean prompt: [prefix] + R + R, R a sequence of `length` random tokens: on the second repeat the
next token can be copied from the first, so the loss there drops far below the first repeat's.
Corrupted prompt: [prefix] + R' + R with R' fresh random tokens, so the second half is no longer a
repeat (same length, the same tokens at the positions the metric reads).

Metric: mean log-probability of the next token over the second repeat (higher is better; it is
minus the in-context loss there), so circuit discovery and faithfulness work as for
logit-difference tasks. `answer_tokens` (for PromptPairs' final-position logit difference) are
(R[0], a random token): at the last position a continuing repeat would give R[0].

Also here: the induction score of every head (mean attention from a position of the second
repeat to the token after its earlier occurrence), and the in-context loss drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import pandas as pd
import torch
from torch import Tensor

from interp.hook_points import get_act_name

from .base import PromptPairs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from interp.hooks import HookedModel


@dataclass
class InductionPairs(PromptPairs):
    """PromptPairs whose metric reads the second repeat. `length`: tokens per repeat; `prefix`: tokens before R."""

    length: int = 0
    prefix: int = 0
    last_position_only = False  # class attribute: the metric reads every position of the second repeat

    @property
    def second_repeat(self) -> slice:
        """Positions whose next token lies in the second repeat: the last token of the first repeat
        up to the second-to-last token (their targets are R[0] .. R[-1])."""
        start = self.prefix + self.length - 1
        return slice(start, self.prefix + 2 * self.length - 1)

    def token_log_probs(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """log p(next token) at every position: Float[Tensor, "n pos-1"]."""
        logp = logits[:, :-1].float().log_softmax(-1)
        return logp.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]

    def metric(self, logits: Tensor) -> Tensor:
        """Mean log p(next token) over the second repeat of the clean sequence (targets are the clean tokens)."""
        if logits.ndim != 3 or logits.shape[:2] != self.clean_tokens.shape:
            raise ValueError(f"induction metric needs full logits [n, pos, vocab] with [n, pos] = "
                             f"{tuple(self.clean_tokens.shape)}, got {tuple(logits.shape)}")
        return self.token_log_probs(logits, self.clean_tokens)[:, self.second_repeat].mean()

    def _like(self, sub: PromptPairs) -> "InductionPairs":
        return InductionPairs(**{k: getattr(sub, k) for k in PromptPairs.__dataclass_fields__}, length=self.length, prefix=self.prefix)

    def __getitem__(self, index) -> "InductionPairs":
        return self._like(PromptPairs.__getitem__(self, index))

    def to(self, device: Union[str, torch.device]) -> "InductionPairs":
        return self._like(PromptPairs.to(self, device))


def induction_prompts(tokenizer: PreTrainedTokenizerBase, n: int, length: int = 20, seed: int = 0, low: int = 1000, high: int = 20000,
                      prefix_token: Optional[int] = None) -> InductionPairs:
    """`n` clean/corrupted pairs of repeated random tokens for `tokenizer`, deterministic in `seed`.

    Tokens are drawn without replacement within a sequence from ids [low, high) (ordinary
    vocabulary, away from special tokens); `prefix_token` (default: the tokenizer's BOS, if any)
    is put first so position 0 is not part of the pattern.
    """
    vocab = len(tokenizer)
    high = min(high, vocab)
    if not 0 <= low < high or high - low < 2 * length:
        raise ValueError(f"need at least {2 * length} token ids in [low, high) = [{low}, {high}) for this vocabulary of {vocab}")
    if length < 2 or n < 1:
        raise ValueError(f"need length >= 2 and n >= 1, got length={length}, n={n}")
    if prefix_token is None:
        prefix_token = tokenizer.bos_token_id
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack([low + torch.randperm(high - low, generator=g)[: 2 * length] for _ in range(n)])
    first, other = draws[:, :length], draws[:, length:]
    pre = torch.full((n, 1), prefix_token, dtype=torch.long) if prefix_token is not None else torch.zeros(n, 0, dtype=torch.long)
    clean = torch.cat([pre, first, first], 1)
    corrupted = torch.cat([pre, other, first], 1)
    wrong = other[:, 0]
    answers = torch.stack([first[:, 0], wrong], 1)
    return InductionPairs(clean, corrupted, answers, d_vocab=vocab, name="induction", length=length, prefix=pre.shape[1])


@torch.no_grad()
def induction_loss(
    model: HookedModel, task: InductionPairs, fwd_hooks: Sequence[tuple[str, Callable]] = ()
) -> dict[str, float]:
    """Mean next-token loss on the first and the second repeat of the clean sequences, and the drop between them."""
    tokens = task.clean_tokens.to(model.device)
    logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks)) if fwd_hooks else model(tokens)
    lp = task.token_log_probs(logits, tokens)
    first = slice(task.prefix, task.prefix + task.length - 1)  # targets R[1] .. R[-1] of the first repeat
    second = task.second_repeat
    out = {"loss_first": float(-lp[:, first].mean()), "loss_second": float(-lp[:, second].mean())}
    out["loss_drop"] = out["loss_first"] - out["loss_second"]
    out["second_top1"] = float((logits[:, second].argmax(-1) == tokens[:, second.start + 1 : second.stop + 1]).float().mean())
    return out


def check_induction(model: HookedModel, task: InductionPairs) -> dict[str, float]:
    """Does the model do induction? Accuracy = top-1 next-token accuracy on the second repeat."""
    out = induction_loss(model, task)
    out["accuracy"] = out["second_top1"]
    out["n"] = len(task)
    return out


@torch.no_grad()
def induction_scores(model: HookedModel, task: InductionPairs) -> pd.DataFrame:
    """Induction score per head: mean attention from each position of the second repeat to the
    position just after that token's occurrence in the first repeat (Olsson et al. 2022).

    Returns one row per (layer, head) with column ``induction_score``.
    """
    L, H, T = model.cfg.n_layers, model.cfg.n_heads, task.length
    names = [get_act_name("pattern", layer) for layer in range(L)]
    _, cache = model.run_with_cache(task.clean_tokens.to(model.device), names_filter=names)
    q = torch.arange(task.prefix + T, task.prefix + 2 * T)
    k = q - T + 1
    rows = []
    for l in range(L):
        p = cache[names[l]]  # [b, head, q, k]
        s = p[:, :, q, k].mean((0, 2))
        rows += [{"layer": l, "head": h, "induction_score": float(s[h])} for h in range(H)]
    return pd.DataFrame(rows)

