"""Forwards over prompts of unequal length without padding, read at the final token.

Prompts are grouped by token length and each group is one unpadded forward, so every prompt's
final token is the batch's last position (HF's `logits_to_keep=1` then forms only its logits).
Interventions at the final token only change the final position from their layer on, so those
forwards resume there: one capture per group (`interp.resume.capture_run`: the residual stream
entering every layer and the KV cache), then each intervention runs block `layer`.. at the last
position alone (`interp.resume.forward_from`), `copies` interventions stacked along the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..hooks import HookedModel, HookSpec
from ..resume import RunState, capture_run, forward_from
from .tasks import ICLPrompt


@dataclass
class Group:
    """Prompts of one token length: their indices in the prompt list, tokens Long[Tensor, "batch pos"], answers Long[Tensor, "batch"]."""

    index: list[int]
    tokens: Tensor
    answers: Tensor


def length_groups(model: HookedModel, prompts: Sequence[ICLPrompt], max_batch: int = 16) -> list[Group]:
    """The prompts tokenized and grouped by length (at most `max_batch` per group), in first-seen order."""
    if not prompts:
        raise ValueError("no prompts")
    by_len: dict[int, list[tuple[int, Tensor]]] = {}
    for i, p in enumerate(prompts):
        ids = model.to_tokens(p.text)[0]
        by_len.setdefault(len(ids), []).append((i, ids))
    groups = []
    for members in by_len.values():
        for s in range(0, len(members), max_batch):
            chunk = members[s : s + max_batch]
            groups.append(Group([i for i, _ in chunk], torch.stack([t for _, t in chunk]),
                                torch.tensor([prompts[i].answer_id for i, _ in chunk], device=model.device)))
    return groups


def answer_probs(logits: Tensor, answers: Tensor) -> Tensor:
    """P(answer) at the last position: logits Float[Tensor, "batch pos d_vocab"], answers Long[Tensor, "batch"] -> Float[Tensor, "batch"]."""
    return torch.softmax(logits[:, -1].float(), dim=-1).gather(1, answers[:, None].to(logits.device))[:, 0]


def correct(logits: Tensor, answers: Tensor) -> Tensor:
    """Bool[Tensor, "batch"]: the last position's top token is the answer."""
    return logits[:, -1].argmax(-1).cpu() == answers.cpu()


@torch.no_grad()
def last_token_logits(model: HookedModel, groups: Sequence[Group], fwd_hooks: HookSpec = ()) -> tuple[Tensor, Tensor]:
    """Full forwards (with `fwd_hooks`): (P(answer) Float[Tensor, "prompt"], correct Bool[Tensor, "prompt"]) in prompt order."""
    n = sum(len(g.index) for g in groups)
    probs, right = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    for g in groups:
        logits = model.run_with_hooks(g.tokens, fwd_hooks=fwd_hooks, logits_to_keep=1)
        probs[g.index], right[g.index] = answer_probs(logits, g.answers).cpu(), correct(logits, g.answers)
    return probs, right


def capture(model: HookedModel, group: Group) -> RunState:
    """The run a last-token intervention resumes from (residual stream at every layer, KV cache)."""
    return capture_run(model, group.tokens)


def last_start(run: RunState) -> int:
    """Where a final-token intervention resumes: the last position, or 0 when the model cannot resume mid-sequence."""
    return run.tokens.shape[1] - 1 if run.can_resume_positions else 0


@torch.no_grad()
def resume_last(model: HookedModel, run: RunState, layer: int, copies: int = 1, fwd_hooks: HookSpec = ()) -> Tensor:
    """Logits Float[Tensor, "copies*batch 1 d_vocab"] at the final token, from block `layer` on (copy-major rows).

    Hooks at layers >= `layer` see the final position alone (or every position, for a model that
    cannot resume mid-sequence): edit position -1.
    """
    with model.hooks(fwd_hooks=fwd_hooks):
        return forward_from(model, run, layer, last_start(run), copies=copies, logits_to_keep=1)
