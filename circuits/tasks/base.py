"""PromptPairs: the typed object every task hands to patching and circuit discovery.

A task is a set of clean prompts, corrupted prompts of the same token length (position i of
one lines up with position i of the other), and per prompt two answer tokens: the correct one
and a wrong one. Its metric is the logit difference at the final position,
logit(correct) - logit(wrong), the metric of the IOI paper (Wang et al. 2022,
arXiv:2211.00593) and of the activation-patching literature after it.

The task builders make prompts of one token length, with no padding. A hand-built set of
prompts of unequal length may be right-padded and given an `attention_mask`: its metric is then
read at each prompt's last real token, and EAP, EAP-IG and faithfulness treat each prompt as
if run alone (see `PromptPairs`).

Patching takes the pairs as they are: `activation_patch(model, "z", pairs, metric="logit_diff",
by="head")`, `attribution_patch(model, ["z", "mlp_out"], pairs)`, `path_patch(model, pairs)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from interp.hooks import HookedModel


@dataclass
class PromptPairs:
    """Clean and corrupted prompts with their answers.

    clean_tokens, corrupted_tokens: Long[Tensor, "n pos"] (same shape, no padding)
    answer_tokens: Long[Tensor, "n 2"] -- column 0 the correct answer, column 1 the wrong one
    clean_prompts, corrupted_prompts: the n prompt strings
    positions: name -> Long[Tensor, "n"], token positions of interest (e.g. IO, S1, S2, END)
    d_vocab: the tokenizer's vocabulary size, when known (answer ids are checked against it)
    name: a short task name for tables and figure titles
    attention_mask: Int[Tensor, "n pos"] or None, shared by both sets: right padding only (real
        tokens first). The metric reads each prompt at its last real token (`last_positions`);
        metrics that read other positions refuse a padded set.
    """

    clean_tokens: Tensor
    corrupted_tokens: Tensor
    answer_tokens: Tensor
    clean_prompts: list[str] = field(default_factory=list)
    corrupted_prompts: list[str] = field(default_factory=list)
    positions: dict[str, Tensor] = field(default_factory=dict)
    d_vocab: Optional[int] = None
    name: str = "task"
    attention_mask: Optional[Tensor] = None
    last_position_only = True  # class attribute: the metric reads the final position only

    def __post_init__(self) -> None:
        for label in ("clean_tokens", "corrupted_tokens", "answer_tokens"):
            t = getattr(self, label)
            if not isinstance(t, Tensor):
                raise TypeError(f"{label} must be a torch.Tensor of token ids, got {type(t).__name__}")
            if t.dtype != torch.long:
                raise TypeError(f"{label} must hold token ids (torch.long), got {t.dtype}")
        c, k, a = self.clean_tokens, self.corrupted_tokens, self.answer_tokens
        if c.ndim != 2:
            raise ValueError(f"clean_tokens must be [n, pos], got shape {tuple(c.shape)}")
        if c.shape != k.shape:
            raise ValueError(
                f"clean and corrupted prompts must have the same shape [n, pos] (position i of one lines up "
                f"with position i of the other): clean_tokens {tuple(c.shape)} vs corrupted_tokens {tuple(k.shape)}"
            )
        if a.shape != (c.shape[0], 2):
            raise ValueError(
                f"answer_tokens must be [n, 2] (correct, wrong) with n = {c.shape[0]} prompts, got shape {tuple(a.shape)}"
            )
        ids = torch.cat([c.reshape(-1), k.reshape(-1), a.reshape(-1)])
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"token ids must be >= 0, found {int(ids.min())}")
        if self.d_vocab is not None and ids.numel() and int(ids.max()) >= self.d_vocab:
            raise ValueError(f"token id {int(ids.max())} is outside the vocabulary (d_vocab = {self.d_vocab})")
        for label in ("clean_prompts", "corrupted_prompts"):
            p = getattr(self, label)
            if p and len(p) != c.shape[0]:
                raise ValueError(f"{label} has {len(p)} strings for {c.shape[0]} token rows")
        for key, pos in self.positions.items():
            if pos.shape != (c.shape[0],):
                raise ValueError(f"positions[{key!r}] must be [n] = [{c.shape[0]}], got shape {tuple(pos.shape)}")
            if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= c.shape[1]):
                raise ValueError(f"positions[{key!r}] must lie in [0, {c.shape[1]}), got {pos.tolist()}")
        self._check_mask()

    def _check_mask(self) -> None:
        from interp.metrics import last_real_tokens

        m = self.attention_mask
        if m is None:
            return
        if not isinstance(m, Tensor) or m.shape != self.clean_tokens.shape:
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"attention_mask must be [n, pos] = {tuple(self.clean_tokens.shape)} like the tokens, got {got}")
        if not bool(((m == 0) | (m == 1)).all()) or bool((m.sum(1) == 0).any()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (token), with at least one token per prompt")
        last_real_tokens(m)  # refuses left padding
        if not self.last_position_only and not bool(m.bool().all()):
            raise ValueError(
                f"{type(self).__name__}'s metric reads more than the final position, so its prompts cannot be padded: "
                "build the task from prompts of one token length"
            )

    def __len__(self) -> int:
        return self.clean_tokens.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean_tokens.shape[1]

    @property
    def padded(self) -> bool:
        """Whether some prompt is shorter than n_pos (its attention_mask has zeros)."""
        return self.attention_mask is not None and not bool(self.attention_mask.bool().all())

    @property
    def last_positions(self) -> Tensor:
        """Long[Tensor, "n"]: each prompt's last real token (n_pos - 1 for every prompt when unpadded)."""
        if self.attention_mask is None:
            return torch.full((len(self),), self.n_pos - 1, dtype=torch.long, device=self.clean_tokens.device)
        return self.attention_mask.long().sum(1) - 1

    def final_logits(self, logits: Tensor) -> Tensor:
        """Float[Tensor, "n d_vocab"]: each prompt's logits at its last real token, from full logits
        [n, pos, d_vocab] or from logits already taken there ([n, 1, d_vocab], as `logits_to_keep`
        with `last_positions` gives, or [n, d_vocab])."""
        if logits.ndim == 3 and self.padded and logits.shape[1] == self.n_pos:
            return logits[torch.arange(len(self), device=logits.device), self.last_positions.to(logits.device)]
        if logits.ndim == 3 and self.padded and logits.shape[1] != 1:
            raise ValueError(
                f"this task is padded: pass full logits [n, pos, d_vocab] = [{len(self)}, {self.n_pos}, d_vocab] or logits "
                f"at each prompt's last real token [n, 1, d_vocab], got shape {tuple(logits.shape)}"
            )
        return logits[:, -1] if logits.ndim == 3 else logits

    def to(self, device: Union[str, torch.device]) -> "PromptPairs":
        """A copy with every tensor on `device`."""
        return PromptPairs(
            self.clean_tokens.to(device), self.corrupted_tokens.to(device), self.answer_tokens.to(device),
            list(self.clean_prompts), list(self.corrupted_prompts),
            {k: v.to(device) for k, v in self.positions.items()}, self.d_vocab, self.name,
            self.attention_mask.to(device) if self.attention_mask is not None else None,
        )

    def __getitem__(self, index: Union[int, slice, Sequence[int], Tensor]) -> "PromptPairs":
        """The pairs selected by a slice, a list of indices or a boolean mask."""
        idx = torch.arange(len(self))[index].reshape(-1)
        pick = lambda seq: [seq[i] for i in idx.tolist()] if seq else []
        return PromptPairs(
            self.clean_tokens[idx], self.corrupted_tokens[idx], self.answer_tokens[idx],
            pick(self.clean_prompts), pick(self.corrupted_prompts),
            {k: v[idx.to(v.device)] for k, v in self.positions.items()}, self.d_vocab, self.name,
            self.attention_mask[idx.to(self.attention_mask.device)] if self.attention_mask is not None else None,
        )

    def logit_diff(self, logits: Tensor) -> Tensor:
        """logit(correct) - logit(wrong) at the final position (each prompt's last real token when padded), per prompt.

        logits: Float[Tensor, "n pos d_vocab"] or Float[Tensor, "n d_vocab"] (already at the final
        position). Returns Float[Tensor, "n"], differentiable.
        """
        if logits.ndim == 3 and logits.shape[0] == len(self):
            logits = self.final_logits(logits)
        elif logits.ndim == 3:
            logits = logits[:, -1]
        if logits.ndim != 2 or logits.shape[0] != len(self):
            raise ValueError(
                f"logits must be [n, pos, d_vocab] or [n, d_vocab] with n = {len(self)} prompts, got shape {tuple(logits.shape)}"
            )
        answers = self.answer_tokens.to(logits.device)
        if int(answers.max()) >= logits.shape[-1]:
            raise ValueError(f"answer id {int(answers.max())} is outside the logits' vocabulary of {logits.shape[-1]}")
        picked = logits.gather(-1, answers)  # [n, 2]
        return picked[:, 0] - picked[:, 1]

    def metric(self, logits: Tensor) -> Tensor:
        """The task metric: mean logit difference over the prompts (a scalar)."""
        return self.logit_diff(logits).mean()


@torch.no_grad()
def check_task(model: HookedModel, pairs: PromptPairs, batch_size: int = 32) -> dict[str, float]:
    """Does the model do the task? Runs clean and corrupted prompts.

    Returns accuracy (share of clean prompts with logit_diff > 0), the mean logit difference on
    clean and on corrupted prompts, and the corrupted accuracy.
    """
    d_vocab = model.cfg.d_vocab
    if int(pairs.answer_tokens.max()) >= d_vocab:
        raise ValueError(f"answer id {int(pairs.answer_tokens.max())} is outside the model's vocabulary (d_vocab = {d_vocab})")
    out = {}
    for which, tokens in (("clean", pairs.clean_tokens), ("corrupted", pairs.corrupted_tokens)):
        diffs = []
        for start in range(0, len(pairs), batch_size):
            sub = pairs[start : start + batch_size]
            logits = model(tokens[start : start + batch_size].to(model.device))
            diffs.append(sub.logit_diff(sub.final_logits(logits).float()).cpu())
        d = torch.cat(diffs)
        out[f"{which}_accuracy"] = float((d > 0).float().mean())
        out[f"{which}_logit_diff"] = float(d.mean())
    out["accuracy"] = out["clean_accuracy"]
    out["n"] = len(pairs)
    return out
