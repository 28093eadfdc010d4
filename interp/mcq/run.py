"""Run a model over multiple-choice prompts and read the answer letters' logits at the last token.

Prompts are grouped by token length, so no batch is padded: the answer is read at position -1 and
hooks that edit the last position (`interp.mcq.mechanism`) may index it as [:, -1]. Only the last
position is unembedded (HF's `logits_to_keep=1`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..hooks import HookedModel, HookSpec

Prompts = Any  # a list of texts, or a PromptSet (anything with .prompts)


def tokenize(model: HookedModel, prompts: Prompts) -> list[list[int]]:
    """Token ids of each prompt (the tokenizer's own BOS convention)."""
    texts = list(getattr(prompts, "prompts", prompts))
    tok = model.require_tokenizer()
    return [tok(t, add_special_tokens=True)["input_ids"] for t in texts]


def length_batches(rows: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of `rows` grouped into batches of equal length (at most batch_size each), longest first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_len[len(r)].append(i)
    return [idx[k:k + batch_size] for n in sorted(by_len, reverse=True) for idx in [by_len[n]] for k in range(0, len(idx), batch_size)]


@torch.no_grad()
def letter_logits(
    model: HookedModel,
    prompts: Prompts,
    letter_ids: Sequence[int],
    batch_size: int = 32,
    fwd_hooks: HookSpec = (),
    on_batch: Optional[Callable[[Tensor, list[int]], None]] = None,
) -> Tensor:
    """Float[Tensor, "prompt letter"]: the next-token logits of the letter tokens after each prompt (float32, CPU).

    fwd_hooks: attached for every forward (e.g. mean ablations at the last position).
    on_batch(tokens, indices): called with each batch's Long[Tensor, "batch pos"] before it runs.
    """
    rows = tokenize(model, prompts)
    ids = torch.tensor(list(letter_ids), dtype=torch.long)
    out = torch.empty(len(rows), len(ids), dtype=torch.float32)
    with model.hooks(fwd_hooks=fwd_hooks):
        for idx in length_batches(rows, batch_size):
            tokens = torch.tensor([rows[i] for i in idx], dtype=torch.long, device=model.device)
            if on_batch is not None:
                on_batch(tokens, idx)
            logits = model(tokens, logits_to_keep=1)[:, -1]  # [batch, d_vocab]
            out[idx] = logits[:, ids.to(logits.device)].float().cpu()
    return out
