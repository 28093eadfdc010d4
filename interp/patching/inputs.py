"""What every patching experiment does first: turn its inputs into a checked prompt pair, pick the
run and source sets, compute the two baselines, and fetch the activations to patch in.

The prompt pair comes either as a `PromptPairs` (`interp.circuits.tasks`: clean and corrupted
tokens, answers and attention mask in one object) or, as before, as clean and corrupted prompts
with `answer_tokens=` and `attention_mask=` given separately. Both give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor

from ..cache import CacheStore
from ..hooks import HookedModel, Input
from ..metrics import Metric, keep_last, last_real_tokens, make_metric, require_last_position

DIRECTIONS = ("denoising", "noising")


@runtime_checkable
class PromptPairsLike(Protocol):
    """What an experiment reads from `interp.circuits.tasks.PromptPairs` (which satisfies this).

    clean_tokens, corrupted_tokens: Long[Tensor, "n pos"]; answer_tokens: Long[Tensor, "n 2"]
    (correct, wrong); attention_mask: Int[Tensor, "n pos"] or None (right padding only).
    """

    clean_tokens: Tensor
    corrupted_tokens: Tensor
    answer_tokens: Tensor
    attention_mask: Optional[Tensor]


# What an experiment takes as its first prompt argument: a PromptPairs, or the clean prompts.
Prompts = Union[PromptPairsLike, Input]


@dataclass(frozen=True)
class PatchInputs:
    """A checked prompt pair on the model's device.

    clean, corrupted: Long[Tensor, "prompt pos"] of one shape; mask: Int[Tensor, "prompt pos"] or
    None when nothing is padded; answer_tokens: Long[Tensor, "prompt answers"] or None.
    """

    clean: Tensor
    corrupted: Tensor
    mask: Optional[Tensor]
    answer_tokens: Optional[Tensor]

    @property
    def last(self) -> Optional[Tensor]:
        """Each prompt's last real token, Long[Tensor, "prompt"], or None when nothing is padded."""
        return last_real_tokens(self.mask)

    def run_and_source(self, direction: str) -> tuple[Tensor, Tensor]:
        """(run tokens, source tokens): denoising runs the corrupted set with clean activations, noising the reverse."""
        return run_and_source(direction, self.clean, self.corrupted)


def patch_inputs(
    model: HookedModel,
    clean: Prompts,
    corrupted: Optional[Input],
    answer_tokens: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    where: str = "patching",
) -> PatchInputs:
    """The prompt pair of an experiment, from a PromptPairs or from clean and corrupted prompts.

    With a PromptPairs as `clean`, `corrupted`, `answer_tokens` and `attention_mask` must be left
    out (the pairs carry them; pass the metric by keyword). Otherwise `corrupted` is required.
    """
    if isinstance(clean, PromptPairsLike):
        if corrupted is not None:
            raise TypeError(
                f"{where}: the prompt pairs already hold the corrupted prompts; pass the metric by keyword "
                f"({where}(model, ..., pairs, metric=...)), not as the argument after the pairs"
            )
        given = [name for name, value in (("answer_tokens", answer_tokens), ("attention_mask", attention_mask))
                 if value is not None]
        if given:
            raise ValueError(f"{where}: {' and '.join(given)} come from the prompt pairs; do not pass them as well")
        pairs = clean
        clean, corrupted = pairs.clean_tokens, pairs.corrupted_tokens
        answer_tokens, attention_mask = pairs.answer_tokens, pairs.attention_mask
    elif corrupted is None:
        raise TypeError(f"{where}: give the corrupted prompts after the clean ones, or one PromptPairs")
    clean_t, corrupted_t, mask = prompt_pair(model, clean, corrupted, attention_mask)
    return PatchInputs(clean_t, corrupted_t, mask, answer_tokens)


def prompt_pair(
    model: HookedModel, clean: Input, corrupted: Input, attention_mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Token ids of the two prompt sets, which must have the same shape, and their shared mask (None when unpadded).

    `attention_mask` (Int[Tensor, "prompt pos"]) applies to both sets; prompts given as strings
    bring their own, and pair i of the two sets must have the same token length.
    """
    clean_t, clean_mask = model.prepare_inputs(clean, attention_mask)
    corrupted_t, corrupted_mask = model.prepare_inputs(corrupted, attention_mask)
    if clean_t.shape != corrupted_t.shape:
        raise ValueError(
            f"clean tokens {tuple(clean_t.shape)} and corrupted tokens {tuple(corrupted_t.shape)} differ in shape: "
            "patching needs prompt pairs of equal token length (check with model.to_str_tokens)"
        )
    lengths = [m.sum(1) if m is not None else torch.full((clean_t.shape[0],), clean_t.shape[1], device=clean_t.device)
               for m in (clean_mask, corrupted_mask)]
    differ = (lengths[0] != lengths[1]).nonzero()
    if len(differ):
        i = int(differ[0])
        raise ValueError(
            f"clean prompt {i} has {int(lengths[0][i])} tokens but corrupted prompt {i} has {int(lengths[1][i])}: "
            "patching needs each pair to have the same token length (check with model.to_str_tokens)"
        )
    return clean_t, corrupted_t, clean_mask if clean_mask is not None else corrupted_mask


def run_and_source(direction: str, clean: Tensor, corrupted: Tensor) -> tuple[Tensor, Tensor]:
    """(run tokens, source tokens) for "denoising" (run corrupted, patch in clean) or "noising" (the reverse)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return (corrupted, clean) if direction == "denoising" else (clean, corrupted)


@torch.no_grad()
def source_activations(
    model: HookedModel, tokens: Tensor, names: Sequence[str], store: Optional[CacheStore]
) -> dict[str, Tensor]:
    """The activations at hook points `names` of a run of `tokens` (the ones to patch in), from the CacheStore when it holds them."""
    if store is not None:
        cache = store.get_or_compute(model, tokens, list(names), device=model.device)
    else:
        _, cache = model.run_with_cache(tokens, names_filter=list(names))
    return {n: cache[n] for n in names}


@torch.no_grad()
def baselines(
    model: HookedModel,
    inputs: PatchInputs,
    metric: Union[str, Metric],
    where: str = "patching",
) -> tuple[Metric, float, float]:
    """(metric, clean metric, corrupted metric).

    `metric` is built from its name here ("kl" needs the clean logits). With padding the metric
    reads logits [prompt, 1, d_vocab] at each prompt's last real token, so it must say it reads
    only the final position.
    """
    last = inputs.last
    if callable(metric):
        require_last_position(metric, last, where)
    kw = {} if last is None else {"logits_to_keep": keep_last(last)}
    clean_logits = model(inputs.clean, **kw)
    metric = make_metric(metric, inputs.answer_tokens, clean_logits)
    return metric, float(metric(clean_logits)), float(metric(model(inputs.corrupted, **kw)))


def str_tokens(model: HookedModel, tokens: Tensor) -> list[str]:
    """The first prompt's tokens as strings (token ids as strings when the model has no tokenizer)."""
    return model.to_str_tokens(tokens[0]) if model.tokenizer is not None else [str(int(t)) for t in tokens[0]]


def row_bytes(model: HookedModel, n_pos: int, kept: int, eager_pattern: bool) -> int:
    """A rough peak-memory cost of one batch row through a forward (activations of one layer at a time).

    kept: positions unembedded; eager_pattern: whether the attention pattern is materialised.
    """
    cfg = model.cfg
    per_pos = 8 * cfg.d_model + 3 * cfg.d_mlp + (3 * cfg.n_heads * n_pos if eager_pattern else 0)
    return 4 * (n_pos * per_pos + kept * cfg.d_vocab)
