"""Needle-in-a-haystack harness: prompts, greedy decoding with a KV cache, accuracy tables.

The set-up follows Wu et al., "Retrieval Head Mechanistically Explains Long-Context
Factuality" (2024) and their Retrieval_Head code: prefill the prompt minus its last token,
then decode greedily one token at a time starting from the last prompt token, so every
generated token comes from a decode step whose (single) query row can be inspected. An answer
is right when its ROUGE-1 recall against the needle's answer is > 0.5.

Haystacks come from the seeded generator in `interp.data.haystack` (no downloaded corpus).
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..data.haystack import Haystack, build_haystack, passkey_task
from ..hooks import HookedModel
from ..models.kv_cache import decode_step, prefill

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CORRECT_RECALL = 0.5  # Wu et al.: a sample counts when ROUGE-1 recall > 50 (%)


def _unigrams(text: str) -> list[str]:
    # rouge_score's default tokenizer: lowercase, non-alphanumerics are separators.
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge1_recall(prediction: str, reference: str) -> float:
    """ROUGE-1 recall: clipped unigram overlap / unigrams in `reference` (0.0 for an empty reference).

    As rouge_score's `rouge1` recall without its Porter stemmer (the answers here are numbers and
    short phrases; stemming would only merge inflections).
    """
    ref, pred = Counter(_unigrams(reference)), Counter(_unigrams(prediction))
    total = sum(ref.values())
    return sum(min(c, pred[w]) for w, c in ref.items()) / total if total else 0.0


class NeedleTask(Protocol):
    """A needle to hide, the question after the haystack, the answer (`interp.data.haystack.PasskeyTask`)."""

    @property
    def needle(self) -> str: ...

    @property
    def question(self) -> str: ...

    @property
    def answer(self) -> str: ...


def make_samples(
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_per_cell: int = 1,
    seed: int = 0,
    task: Callable[[int], NeedleTask] = passkey_task,
) -> list[Haystack]:
    """One passkey haystack per (length, depth, repeat); each gets its own seed (filler and key)."""
    samples = []
    for i, (n, d) in enumerate((n, d) for n in lengths for d in depths for _ in range(n_per_cell)):
        s = seed * 1_000_003 + i
        t = task(s)
        samples.append(build_haystack(tokenizer, n, d, t.needle, t.question, seed=s, answer=t.answer))
    return samples


@dataclass
class Decoded:
    """Greedy continuations of a batch of equal-length prompts.

    tokens: Long[batch, steps]; argmax: Long[steps, batch, layer, head] (top-1 key position of
    each query head at each decode step) or None when no argmax source was given.
    """

    tokens: Tensor
    argmax: Optional[Tensor]


class ArgmaxSource(Protocol):
    """What `greedy_decode` enters around the decode steps (`retrieval.KernelArgmax`, the default of
    `score_retrieval`, or `retrieval.PatternHookArgmax`, the eager oracle)."""

    def __enter__(self) -> object: ...

    def __exit__(self, *exc: object) -> Optional[bool]: ...

    def read(self, n_keys: int) -> Tensor:
        """Long[Tensor, "batch layer head"]: each query head's top-1 key position in the last step (of `n_keys` keys)."""
        ...


@torch.no_grad()
def greedy_decode(
    model: HookedModel, input_ids: Tensor, max_new_tokens: int, argmax_source: Optional[ArgmaxSource] = None
) -> Decoded:
    """Prefill `input_ids[:, :-1]` (no pattern hooks: SDPA, no T x T), then decode step by step.

    input_ids: Long[batch, pos] without padding. `argmax_source` (e.g. `KernelArgmax(model)`, which
    streams each row's argmax through `interp.kernels`, or `PatternHookArgmax(model)`, which reads
    single eager rows [b, head, 1, k]) is entered only around the decode steps; its
    `read(n_keys)` gives Long[batch, layer, head] absolute key positions after each step.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, pos] with pos >= 2, got shape {tuple(input_ids.shape)}")
    hf = model.hf_model
    ids = input_ids.to(model.device)
    past = prefill(hf, ids[:, :-1])
    step_in = ids[:, -1:]
    tokens, rows = [], []
    ctx = argmax_source if argmax_source is not None else contextlib.nullcontext()
    with ctx:
        for step in range(max_new_tokens):
            logits, past = decode_step(hf, step_in, past)
            nxt = logits.argmax(-1)
            tokens.append(nxt)
            if argmax_source is not None:
                rows.append(argmax_source.read(ids.shape[1] + step))
            step_in = nxt[:, None]
    return Decoded(torch.stack(tokens, 1).cpu(), torch.stack(rows).cpu() if rows else None)


def answer_length(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[int]) -> int:
    """Steps up to and including the first newline or EOS token (Wu et al. stop at a newline)."""
    eos = tokenizer.eos_token_id
    for i, t in enumerate(tokens):
        if t == eos or "\n" in tokenizer.decode([int(t)]):
            return i + 1
    return len(tokens)


def _batches(samples: Sequence[Haystack], batch_size: int) -> list[list[int]]:
    """Indices grouped by prompt length (equal lengths batch without padding)."""
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_len.setdefault(s.n_tokens, []).append(i)
    return [idx[j : j + batch_size] for idx in by_len.values() for j in range(0, len(idx), batch_size)]


def run_niah(
    model: HookedModel,
    samples: Sequence[Haystack],
    max_new_tokens: int = 8,
    argmax_source: Optional[ArgmaxSource] = None,
    batch_size: int = 4,
) -> tuple[pd.DataFrame, list[Optional[Tensor]]]:
    """Decode every sample; returns (one row per sample, the per-sample argmax records).

    Row columns: sample, n_tokens, depth, actual_depth, seed, answer, response, rouge1_recall,
    correct, n_steps (decode steps kept: up to the first newline/EOS). The argmax record of
    sample i is Long[n_steps, layer, head] (None without an argmax source).
    """
    if not samples:
        raise ValueError("no samples: build some with make_samples(tokenizer, lengths, depths)")
    rows: list[Optional[dict]] = [None] * len(samples)
    records: list[Optional[Tensor]] = [None] * len(samples)
    for idx in _batches(samples, batch_size):
        ids = torch.tensor([samples[i].input_ids for i in idx], dtype=torch.long)
        dec = greedy_decode(model, ids, max_new_tokens, argmax_source)
        for b, i in enumerate(idx):
            s, gen = samples[i], dec.tokens[b].tolist()
            n = answer_length(model.tokenizer, gen)
            response = model.tokenizer.decode(gen[:n])
            recall = rouge1_recall(response, s.answer)
            rows[i] = dict(
                sample=i, n_tokens=s.n_tokens, depth=s.depth, actual_depth=s.actual_depth, seed=s.seed,
                answer=s.answer, response=response, rouge1_recall=recall, correct=recall > CORRECT_RECALL,
                n_steps=n, generated=gen[:n],
            )
            records[i] = dec.argmax[:n, b] if dec.argmax is not None else None
    return pd.DataFrame(rows), records


def niah_accuracy(results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy table: rows n_tokens, columns depth, values mean of `correct`."""
    return results.pivot_table(index="n_tokens", columns="depth", values="correct", aggfunc="mean")
