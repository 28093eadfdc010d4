"""Retrieval heads (Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality", 2024).

Retrieval score, as docs/metrics.md defines it and their Retrieval_Head code computes it
(`retrieval_calculate`): during greedy NIAH decoding, a query head scores a copy event at a
step when the key position it attends to most (top-1 of its current query row) lies inside the
needle span and the prompt token there equals the token generated at that step; each event
adds 1/|needle|. A sample counts only when it was answered right (ROUGE-1 recall > 0.5), and
the score is the mean over counted samples. A retrieval head has score > 0.1.

Choices, following their code:
- "needle" = the answer tokens (their `real_needle`), here the passkey's digits (SmolLM2's
  tokenizer gives one token per digit): |needle| = 5 and each copied digit adds 0.2.
- Events compare tokens, not positions: a head attending to either copy of a digit that
  occurs twice in the passkey scores when that digit is generated. At most one event per head
  per step; a token generated twice can score twice (their code does the same).
- Steps count up to and including the first newline/EOS token, within `max_new_tokens`.
- Query heads (GQA: every query head gets its own score).

Memory: the prompt is prefilled with SDPA and no pattern hook (no statistic is needed there);
the argmax source is attached only for the decode steps. By default (`backend="kernel"`) it is
`KernelArgmax`: every layer's decode-step attention runs through `interp.kernels` with
`stats=("row_argmax",)`, which reduces the query row to its top-1 key without forming it (the
PyTorch reference backend on CPU, Triton on CUDA). `backend="eager"` uses `PatternHookArgmax`,
a read hook on the eager pattern (one [batch, head, 1, k] row per layer), the tests' oracle. The
source is swappable: anything with `__enter__`/`__exit__` and `read(n_keys) -> Long[batch, layer,
head]` of absolute key positions.

Causal check (their `needle_in_haystack_with_mask.py`): mask the top-k retrieval heads by
zeroing their queries (uniform attention) and compare NIAH accuracy with masking k random
non-retrieval heads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..data.haystack import Haystack
from ..hook_points import HookPoint
from ..hooks import HookedModel
from .niah import ArgmaxSource, run_niah
from .reducers import _KERNEL_BACKEND, check_engine, kernel_controls_with_stats, pattern_hooked

THRESHOLD = 0.1


class PatternHookArgmax:
    """Argmax source: a read-only hook on every layer's `attn.hook_pattern`.

    Inside `with`, each forward leaves Long[batch, layer, head] = top-1 key position of the last
    query row (only that row is reduced; nothing of the pattern is kept).
    """

    def __init__(self, model: HookedModel):
        self.model = model
        self.names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
        self._rows: list[Optional[Tensor]] = [None] * model.cfg.n_layers
        self._fn = self._hook  # one bound method: remove_hook matches by identity

    def _hook(self, pattern: Tensor, hook: HookPoint) -> None:
        # pattern: [batch, head, q, k]; torch.argmax returns the first maximum on ties. Stored as
        # distance back from the row's last key: sliding-window layers cache only the last
        # `window` keys, so their row index is not an absolute position.
        self._rows[hook.layer()] = pattern.shape[-1] - 1 - pattern[:, :, -1].argmax(-1)

    def __enter__(self) -> "PatternHookArgmax":
        for n in self.names:
            self.model.add_hook(n, self._fn, "fwd", edits=False)
        return self

    def __exit__(self, *exc: object) -> bool:
        for n in self.names:
            self.model.remove_hook(n, self._fn)
        return False

    def read(self, n_keys: int) -> Tensor:
        """Long[batch, layer, head] absolute key positions from the last forward, whose query was
        the last of `n_keys` positions (prompt + tokens so far); clears the record."""
        if any(r is None for r in self._rows):
            raise RuntimeError("no attention pattern was seen at some layer during the last forward")
        out = (n_keys - 1) - torch.stack(self._rows, 1)
        self._rows = [None] * len(self._rows)
        return out


class KernelArgmax:
    """Argmax source: each layer's attention through `interp.kernels` with `stats=("row_argmax",)`.

    Inside `with`, each forward leaves Long[batch, layer, head] = top-1 key (first on ties) of the
    last query row, from the kernel's statistics (no row of the pattern is formed). Gates or
    uniform heads already set on a layer (`HookedModel.kernel_controls`) stay in force. When a hook
    on the pattern or the scores is attached at entry, those layers run eager attention anyway:
    the source then reads the pattern (`PatternHookArgmax`), so an edited pattern is what counts.
    backend: "kernel" (Triton on CUDA, the reference elsewhere), "reference" or "triton".
    """

    def __init__(self, model: HookedModel, backend: str = "kernel", block_size: Optional[int] = None):
        if check_engine(backend) == "eager":
            raise ValueError("KernelArgmax runs the kernel; for the eager path use PatternHookArgmax(model).")
        self.model, self.backend, self.block_size = model, _KERNEL_BACKEND[backend], block_size
        self._rows: list[Optional[Tensor]] = [None] * model.cfg.n_layers
        self._ctx: Optional[object] = None
        self._fallback: Optional[PatternHookArgmax] = None

    def _keep(self, layer: int, st: object) -> None:
        # row_argmax: [batch, head, q]; stored as distance back from the last key (sliding-window
        # layers cache only the last `window` keys: st.k_len is what this call saw).
        self._rows[layer] = st.k_len - 1 - st.row_argmax[:, :, -1]

    def __enter__(self) -> "KernelArgmax":
        layers = range(self.model.cfg.n_layers)
        if pattern_hooked(self.model, layers):
            self._fallback = PatternHookArgmax(self.model).__enter__()
            return self
        controls = kernel_controls_with_stats(self.model, layers, ("row_argmax",), self._keep, self.backend, self.block_size)
        self._ctx = self.model.kernel_controls(controls)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> bool:
        if self._fallback is not None:
            self._fallback.__exit__(*exc)
            self._fallback = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(*exc)
        return False

    def read(self, n_keys: int) -> Tensor:
        """Long[batch, layer, head] absolute key positions from the last forward, whose query was
        the last of `n_keys` positions (prompt + tokens so far); clears the record."""
        if self._fallback is not None:
            return self._fallback.read(n_keys)
        if any(r is None for r in self._rows):
            raise RuntimeError("the kernel did not run at some layer during the last forward")
        out = (n_keys - 1) - torch.stack(self._rows, 1)
        self._rows = [None] * len(self._rows)
        return out


def make_argmax_source(model: HookedModel, backend: str = "kernel") -> ArgmaxSource:
    """The argmax source of an engine: `KernelArgmax` ("kernel", "reference", "triton") or `PatternHookArgmax` ("eager")."""
    return PatternHookArgmax(model) if check_engine(backend) == "eager" else KernelArgmax(model, backend)


def copy_event_scores(argmax: Tensor, generated: Sequence[int], prompt_ids: Sequence[int], span: tuple[int, int]) -> Tensor:
    """Retrieval score of one sample, per head: Float64[layer, head].

    argmax: Long[steps, layer, head] top-1 key positions; generated: the token produced at each
    step; prompt_ids: the prompt; span: [start, end) of the needle in the prompt.
    score = (number of steps with start <= argmax < end and prompt[argmax] == generated) / (end - start).
    """
    start, end = span
    if argmax.ndim != 3 or argmax.shape[0] != len(generated):
        raise ValueError(f"argmax must be [steps, layer, head] with steps = len(generated) = {len(generated)}, got {tuple(argmax.shape)}")
    if not 0 <= start < end <= len(prompt_ids):
        raise ValueError(f"needle span {span} is not a non-empty range inside the prompt of {len(prompt_ids)} tokens")
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    gen = torch.as_tensor(list(generated), dtype=torch.long)[:, None, None]
    inside = (argmax >= start) & (argmax < end)
    copied = prompt[argmax.clamp(0, len(prompt) - 1)] == gen  # clamp: positions past the prompt are outside anyway
    return (inside & copied).sum(0).to(torch.float64) / (end - start)


@dataclass
class RetrievalResult:
    """samples: one row per sample (see `run_niah`); per_sample: Float64[sample, layer, head];
    scores: one row per (layer, head) with retrieval_score (mean over counted samples), n_counted."""

    samples: pd.DataFrame
    per_sample: Tensor
    scores: pd.DataFrame

    def heads(self, threshold: float = THRESHOLD) -> pd.DataFrame:
        """`retrieval_heads(self.scores, threshold)`."""
        return retrieval_heads(self.scores, threshold)


def scores_frame(per_sample: Tensor, counted: Sequence[bool]) -> pd.DataFrame:
    """Mean over the counted samples, one row per (layer, head); NaN when none counts."""
    mask = torch.as_tensor(list(counted), dtype=torch.bool)
    n = int(mask.sum())
    L, H = per_sample.shape[1:]
    mean = per_sample[mask].mean(0) if n else torch.full((L, H), float("nan"), dtype=torch.float64)
    layer, head = torch.meshgrid(torch.arange(L), torch.arange(H), indexing="ij")
    return pd.DataFrame(
        dict(layer=layer.flatten().numpy(), head=head.flatten().numpy(), retrieval_score=mean.flatten().numpy(), n_counted=n)
    )


def score_retrieval(
    model: HookedModel,
    samples: Sequence[Haystack],
    max_new_tokens: int = 8,
    argmax_source: Optional[ArgmaxSource] = None,
    batch_size: int = 4,
    backend: str = "kernel",
) -> RetrievalResult:
    """Wu et al.'s retrieval score of every query head over NIAH `samples` (see module docstring).

    The top-1 keys come from `argmax_source`, by default `make_argmax_source(model, backend)`: the
    kernel's row_argmax ("kernel") or the eager pattern ("eager").
    """
    source = argmax_source if argmax_source is not None else make_argmax_source(model, backend)
    results, records = run_niah(model, samples, max_new_tokens, source, batch_size)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    per_sample = torch.zeros(len(samples), L, H, dtype=torch.float64)
    for i, s in enumerate(samples):
        per_sample[i] = copy_event_scores(records[i], results.generated[i], s.input_ids, s.answer_span)
    return RetrievalResult(results, per_sample, scores_frame(per_sample, results.correct.tolist()))


def retrieval_heads(scores: pd.DataFrame, threshold: float = THRESHOLD) -> pd.DataFrame:
    """Heads with retrieval_score > threshold, best first."""
    return scores[scores.retrieval_score > threshold].sort_values("retrieval_score", ascending=False).reset_index(drop=True)


def _ranked(scores: pd.DataFrame) -> list[tuple[int, int]]:
    s = scores.fillna({"retrieval_score": 0.0}).sort_values(["retrieval_score", "layer", "head"], ascending=[False, True, True])
    return list(zip(s["layer"].astype(int), s["head"].astype(int)))


def retrieval_ablation_curves(
    model: HookedModel,
    scores: pd.DataFrame,
    ks: Sequence[int],
    n_random_draws: int,
    samples: Sequence[Haystack],
    threshold: float = THRESHOLD,
    seed: int = 0,
    max_new_tokens: int = 8,
    batch_size: int = 4,
) -> pd.DataFrame:
    """NIAH accuracy with the top-k retrieval heads masked vs k random non-retrieval heads.

    Masking = `interp.heads.ablation.ablate_heads(..., how="uniform")` (query zeroed: uniform
    attention, as in Wu et al.'s code). The random heads for each k and draw are drawn from the
    heads with score <= threshold that are not among the top max(ks) ranked heads (their code
    draws outside its top-100 list; with 270 heads we exclude the top max(ks) instead).

    Returns one row per (k, kind): k, kind ("retrieval" | "random"), accuracy (mean over draws
    for random), accuracy_std (over draws; 0 for retrieval), n_draws, heads (the masked heads, or
    the draws' heads joined by ';'). k = 0 (nothing masked) is included as a row of each kind.
    """
    from .ablation import ablate_heads

    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive head counts, got {list(ks)}")
    ranked = _ranked(scores)
    score_of = {(int(r.layer), int(r.head)): r.retrieval_score for r in scores.itertuples()}
    pool = [h for h in ranked[max(ks):] if not score_of.get(h, 0.0) > threshold]
    if len(pool) < max(ks):
        raise ValueError(f"only {len(pool)} non-retrieval heads to draw from, fewer than k = {max(ks)}")

    def accuracy(heads: list[tuple[int, int]]) -> float:
        if not heads:
            res, _ = run_niah(model, samples, max_new_tokens, None, batch_size)
        else:
            with ablate_heads(model, heads=heads, how="uniform"):
                res, _ = run_niah(model, samples, max_new_tokens, None, batch_size)
        return float(res.correct.mean())

    base = accuracy([])
    rng = random.Random(seed)
    rows = [dict(k=0, kind=kind, accuracy=base, accuracy_std=0.0, n_draws=1, heads="") for kind in ("retrieval", "random")]
    for k in ks:
        top = ranked[:k]
        rows.append(dict(k=k, kind="retrieval", accuracy=accuracy(top), accuracy_std=0.0, n_draws=1, heads=_fmt(top)))
        draws = [sorted(rng.sample(pool, k)) for _ in range(n_random_draws)]
        accs = torch.tensor([accuracy(d) for d in draws], dtype=torch.float64)
        rows.append(dict(
            k=k, kind="random", accuracy=float(accs.mean()), accuracy_std=float(accs.std()) if len(accs) > 1 else 0.0,
            n_draws=len(draws), heads=";".join(_fmt(d) for d in draws),
        ))
    return pd.DataFrame(rows)


def _fmt(heads: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{l}.{h}" for l, h in heads)
