"""Attention sinks and the other extreme-token phenomena, per (layer, head).

Definitions (docs/metrics.md):

- Gu et al. 2024, "When Attention Sink Emerges in Language Models: An Empirical View":
  alpha_h^l(k) = mean over the queries i >= k of A^{l,h}[i, k] = sum_i A[i, k] / (T - k)
  (0-based k; the causal mask makes A[i, k] = 0 for i < k).
  Sink_k^eps = share of (layer, head) pairs with alpha_h^l(k) > eps, in %, eps = 0.3, on prompts
  truncated to T = 64 tokens. As in their `eval_sink_open_source.py`, the threshold is applied per
  prompt and the indicator is then averaged over prompts, layers and heads (alpha is *not*
  averaged over prompts first). The per-head sink score reported in tables is alpha at the
  first token, averaged over prompts. alpha is returned per prompt, [batch, layer, head, T]
  (small), so both orders of averaging stay available. On sliding-window layers the
  denominator stays T - k, as in Gu's code, though fewer queries can see key k there.
- Secondary (non-initial) sinks: keys k > 0 with alpha > 0.1, the threshold of ACT (Yu et al.
  2024, "Unveiling and Harnessing Hidden Attention Sinks"). alpha of the last keys rests on few
  queries (alpha(T-1) = A[T-1, T-1], a head's self-attention), so `secondary_sinks` only looks at
  keys seen by at least `min_queries` queries (16 by default; ACT itself has no such guard).
- Extreme-token phenomena (Guo et al. 2024, "Active-Dormant Attention Heads"): the sink token's
  residual-stream norm against the median token's (residual-state peak), its value-vector norm
  against the median token's (value-state drain), and heads that are sinks on some input domains
  and not on others (active-dormant). Massive activations (Sun et al. 2024): the largest
  |h[t, d]| of a layer's residual stream against the median |h|; "massive" when it is > 100 and
  > 1000x the median.

- Attention entropy per head (a sink head's attention is concentrated: low entropy):
  H^{l,h}(i) = -sum_k A^{l,h}[i, k] log A^{l,h}[i, k] in nats, per query i.

Engine (`interp.heads.reducers`): by default every statistic is streamed by `interp.kernels`
(`stats=`, O(T x block) memory, the PyTorch reference backend on CPU, Triton on CUDA), so no
T x T pattern is ever formed and the analyses run at 32K tokens; `backend="eager"` reduces the
eager pattern inside each layer instead (the oracle of the tests; it forms one layer's
[batch, head, T, T] pattern at a time).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Optional, Sequence, Union

import pandas as pd
import torch
from torch import Tensor

from ..hooks import HookedModel
from ..kernels.spec import sink_alpha
from .reducers import ColSumSource, check_engine, collect_attention_stats, collect_col_sums, reduce_per_layer

EPS = 0.3
SECONDARY_THRESHOLD = 0.1
SINK_LENGTH = 64
MIN_QUERIES = 16  # secondary sinks: only keys seen by at least this many queries count


# ---------------------------------------------------------------------------- prompts
def sink_tokens(model: HookedModel, prompts: Union[Tensor, Sequence[str]], length: int = SINK_LENGTH) -> Tensor:
    """Prompts as ids [n, length]: each text tokenized alone (tokenizer's own BOS convention) and truncated.

    Gu et al. keep only prompts of at least `length` tokens; a shorter one is an error here.
    """
    if isinstance(prompts, Tensor):
        tokens = prompts if prompts.ndim == 2 else prompts[None]
        if tokens.shape[1] < length:
            raise ValueError(f"token prompts have {tokens.shape[1]} positions; need at least length={length}")
        return tokens[:, :length].to(model.device)
    rows = []
    for text in prompts:
        ids = model.to_tokens(text)[0]
        if len(ids) < length:
            raise ValueError(f"prompt has {len(ids)} tokens, fewer than length={length}: {text[:60]!r}...")
        rows.append(ids[:length])
    return torch.stack(rows)


def load_domain_prompts() -> dict[str, list[str]]:
    """The bundled prompt set {domain: [text, ...]} (prose, code, numbers), data/domain_prompts.json."""
    text = resources.files("interp.data").joinpath("domain_prompts.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


# ---------------------------------------------------------------------------- alpha and Sink_k^eps
def alpha_from_col_sums(col_sums: Tensor) -> Tensor:
    """Float[Tensor, "... k"] column sums -> alpha(k) = col_sum(k) / (T - k), float64 (`kernels.spec.sink_alpha`)."""
    return sink_alpha(col_sums.double())


def attention_alpha(model: HookedModel, tokens: Tensor, source: Optional[ColSumSource] = None, batch_size: int = 8,
                    backend: str = "kernel") -> Tensor:
    """alpha_h^l(k) per prompt: Float[Tensor, "batch layer head pos"] (float64), prompts run `batch_size` at a time.

    Column sums from `source`, by default `collect_col_sums` with `backend` ("kernel" or "eager").
    """
    check_engine(backend)
    if source is None:
        def source(m: HookedModel, t: Tensor) -> Tensor:
            return collect_col_sums(m, t, backend=backend)
    parts = [source(model, tokens[i : i + batch_size]) for i in range(0, tokens.shape[0], batch_size)]
    return alpha_from_col_sums(torch.cat(parts))


def sink_and_entropy(model: HookedModel, tokens: Tensor, batch_size: int = 8, backend: str = "kernel") -> tuple[Tensor, Tensor]:
    """alpha_h^l(k) and the attention entropy H^{l,h}(i) from one forward per batch.

    Returns (alpha: Float64[batch, layer, head, key], entropy: Float64[batch, layer, head, query], nats).
    """
    alphas, ents = [], []
    for i in range(0, tokens.shape[0], batch_size):
        st = collect_attention_stats(model, tokens[i : i + batch_size], ("col_sum", "row_entropy"), backend=backend)
        alphas.append(alpha_from_col_sums(st["col_sum"]))
        ents.append(st["row_entropy"].double())
    return torch.cat(alphas), torch.cat(ents)


def attention_entropy(model: HookedModel, tokens: Tensor, batch_size: int = 8, backend: str = "kernel") -> Tensor:
    """Per-query attention entropy -sum_k A[i, k] log A[i, k]: Float64[batch, layer, head, query], nats."""
    parts = [collect_attention_stats(model, tokens[i : i + batch_size], ("row_entropy",), backend=backend)["row_entropy"]
             for i in range(0, tokens.shape[0], batch_size)]
    return torch.cat(parts).double()


def entropy_scores(entropy: Tensor, skip_first: int = 1) -> pd.DataFrame:
    """One row per (layer, head) from entropy [batch, layer, head, T]: mean_entropy (nats, mean over
    prompts and the queries after the first `skip_first`, whose entropy is 0 by causality) and
    normalised_entropy (each query's entropy / log(number of keys it sees), then the mean)."""
    b, L, H, T = entropy.shape
    e = entropy[..., skip_first:]
    n_keys = torch.arange(skip_first + 1, T + 1, dtype=torch.float64)
    norm = e / torch.log(n_keys).clamp(min=1e-12)
    mean, nmean = e.mean((0, 3)), norm.mean((0, 3))
    return pd.DataFrame([{"layer": l, "head": h, "mean_entropy": float(mean[l, h]), "normalised_entropy": float(nmean[l, h])}
                         for l in range(L) for h in range(H)])


def sink_rate(alpha: Tensor, k: int = 0, eps: float = EPS) -> float:
    """Sink_k^eps in %: share of (prompt, layer, head) with alpha(k) > eps (k is 0-based: k=0 is Gu's Sink_1)."""
    return float((alpha[..., k] > eps).double().mean() * 100)


def sink_scores(alpha: Tensor, eps: float = EPS, threshold: float = SECONDARY_THRESHOLD, min_queries: int = MIN_QUERIES) -> pd.DataFrame:
    """One row per (layer, head) from alpha [batch, layer, head, T].

    Columns: sink_score (alpha at the first token, mean over prompts), sink_share (share of prompts
    where it exceeds eps), is_sink (sink_score > eps), n_secondary (non-first keys with alpha >
    threshold, mean per prompt, keys with >= min_queries queries), max_secondary_alpha.
    """
    b, L, H, T = alpha.shape
    first = alpha[..., 0]
    tail = alpha[..., 1 : max(T - min_queries + 1, 1)]
    n_sec = (tail > threshold).double().sum(-1).mean(0)
    max_sec = tail.amax(-1).amax(0) if tail.shape[-1] else torch.zeros(L, H, dtype=torch.float64)
    score = first.mean(0)
    rows = [
        {
            "layer": l,
            "head": h,
            "sink_score": float(score[l, h]),
            "sink_share": float((first[:, l, h] > eps).double().mean()),
            "is_sink": bool(score[l, h] > eps),
            "n_secondary": float(n_sec[l, h]),
            "max_secondary_alpha": float(max_sec[l, h]),
        }
        for l in range(L)
        for h in range(H)
    ]
    return pd.DataFrame(rows)


def sink_table(model: HookedModel, prompts: Union[Tensor, Sequence[str]], length: int = SINK_LENGTH, eps: float = EPS,
               source: Optional[ColSumSource] = None, backend: str = "kernel") -> pd.DataFrame:
    """`sink_scores` on `prompts` truncated to `length` tokens (the head-table entry point)."""
    return sink_scores(attention_alpha(model, sink_tokens(model, prompts, length), source, backend=backend), eps)


def secondary_sinks(
    alpha: Tensor,
    tokens: Optional[Tensor] = None,
    model: Optional[HookedModel] = None,
    threshold: float = SECONDARY_THRESHOLD,
    min_queries: int = MIN_QUERIES,
) -> pd.DataFrame:
    """Non-first keys that some head treats as a sink: one row per (prompt, position).

    Columns: prompt, position, token (when tokens and a tokenizer are given), n_heads (heads with
    alpha > threshold, over all layers), layers (sorted list), first_layer, last_layer, n_layers,
    max_alpha.
    """
    b, L, H, T = alpha.shape
    last = T - min_queries  # keys beyond it are seen by fewer than min_queries queries
    hit = alpha > threshold
    rows = []
    for p, k in torch.nonzero(hit[..., 1 : last + 1].any(dim=(1, 2))).tolist():
        k += 1
        layers = sorted({int(l) for l in torch.nonzero(hit[p, :, :, k].any(-1)).flatten()})
        row = {"prompt": p, "position": k}
        if tokens is not None and model is not None and model.tokenizer is not None:
            row["token"] = model.tokenizer.decode([int(tokens[p, k])])
        row.update(
            n_heads=int(hit[p, :, :, k].sum()),
            layers=layers,
            first_layer=layers[0],
            last_layer=layers[-1],
            n_layers=len(layers),
            max_alpha=float(alpha[p, :, :, k].max()),
        )
        rows.append(row)
    cols = ["prompt", "position"] + (["token"] if tokens is not None and model is not None and model.tokenizer is not None else [])
    return pd.DataFrame(rows, columns=cols + ["n_heads", "layers", "first_layer", "last_layer", "n_layers", "max_alpha"])


def secondary_sink_layers(alpha: Tensor, threshold: float = SECONDARY_THRESHOLD, min_queries: int = MIN_QUERIES) -> pd.DataFrame:
    """Per layer: how many (prompt, head, key > 0) triples have alpha > threshold, and in how many heads."""
    T = alpha.shape[-1]
    hit = alpha[..., 1 : T - min_queries + 1] > threshold  # [b, L, H, keys]
    return pd.DataFrame(
        {
            "layer": range(alpha.shape[1]),
            "n_secondary": hit.sum(dim=(0, 2, 3)).tolist(),
            "heads_with_secondary": hit.any(-1).any(0).sum(-1).tolist(),
            "prompts_with_secondary": hit.any(-1).any(-1).sum(0).tolist(),
        }
    )


# ---------------------------------------------------------------------------- extreme tokens
def _resid_stats(h: Tensor, sink_pos: int) -> Tensor:
    """[batch, pos, d_model] -> [batch, 6]: sink norm, median norm, max |h|, its position, its dim, median |h|."""
    h = h.float()
    norms = h.norm(dim=-1)
    a = h.abs()
    flat = a.flatten(1)
    mx, idx = flat.max(dim=1)
    return torch.stack(
        [norms[:, sink_pos], norms.median(dim=1).values, mx, (idx // h.shape[-1]).float(), (idx % h.shape[-1]).float(),
         flat.median(dim=1).values], dim=1
    )


def _v_stats(v: Tensor, sink_pos: int) -> Tensor:
    """[batch, pos, kv_head, d_head] -> [batch, 2, kv_head]: value norm at the sink token and the median token."""
    n = v.float().norm(dim=-1)  # [b, pos, kv]
    return torch.stack([n[:, sink_pos], n.median(dim=1).values], dim=1)


def extreme_tokens(model: HookedModel, tokens: Tensor, sink_pos: int = 0) -> pd.DataFrame:
    """Residual-state peaks and massive activations per layer (from `hook_resid_post`), averaged over prompts.

    Columns: layer, resid_norm_sink, resid_norm_median, resid_norm_ratio (mean over prompts of
    sink / median), max_abs, max_abs_pos and max_abs_dim (where the largest |h| sits in the first
    prompt), median_abs, massive_ratio (max_abs / median_abs), massive (Sun et al.: > 100 and > 1000x),
    v_norm_ratio (sink / median value norm, mean over KV heads and prompts).
    """
    s = reduce_per_layer(model, tokens, "hook_resid_post", lambda h: _resid_stats(h, sink_pos), logits_to_keep=1)  # [L, b, 6]
    v = reduce_per_layer(model, tokens, "attn.hook_v", lambda x: _v_stats(x, sink_pos), logits_to_keep=1)  # [L, b, 2, kv]
    ratio = s[..., 2] / s[..., 5]
    df = pd.DataFrame(
        {
            "layer": range(model.cfg.n_layers),
            "resid_norm_sink": s[..., 0].mean(1).tolist(),
            "resid_norm_median": s[..., 1].mean(1).tolist(),
            "resid_norm_ratio": (s[..., 0] / s[..., 1]).mean(1).tolist(),
            "max_abs": s[..., 2].amax(1).tolist(),
            "max_abs_pos": s[:, 0, 3].long().tolist(),
            "max_abs_dim": s[:, 0, 4].long().tolist(),
            "median_abs": s[..., 5].mean(1).tolist(),
            "massive_ratio": ratio.mean(1).tolist(),
            "v_norm_ratio": (v[:, :, 0] / v[:, :, 1]).mean((1, 2)).tolist(),
        }
    )
    df["massive"] = (df.max_abs > 100) & (df.massive_ratio > 1000)
    return df


def first_massive_layer(extreme: pd.DataFrame) -> Optional[int]:
    """The first layer flagged `massive` by `extreme_tokens`, or None."""
    hits = extreme.loc[extreme.massive, "layer"]
    return int(hits.iloc[0]) if len(hits) else None


def value_drain(model: HookedModel, tokens: Tensor, sink_pos: int = 0, backend: str = "kernel") -> pd.DataFrame:
    """Value-state drain per (layer, head): the value norm of the sink token against the median token,
    next to the attention the head parks on it.

    Values live on key/value heads; each query head gets the numbers of its KV head (column kv_head),
    so the 3 query heads of a SmolLM2 group share one value. Columns v_norm_sink, v_norm_median,
    v_norm_ratio (sink / median, mean over prompts) and alpha_sink (Gu et al.'s alpha at `sink_pos`,
    mean over prompts). One forward: values read at `attn.hook_v`, alpha from the column sums of
    `backend` ("kernel" streams them with `interp.kernels`, "eager" reduces the pattern).
    """
    c = model.cfg
    vals: dict[int, Tensor] = {}

    def keep_v(x: Tensor, hook) -> None:
        vals[hook.layer()] = _v_stats(x, sink_pos)  # [b, 2, kv]

    with model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_v", keep_v) for l in range(c.n_layers)]):
        col = collect_attention_stats(model, tokens, ("col_sum",), backend=backend)["col_sum"]
    alpha = alpha_from_col_sums(col)[..., sink_pos].mean(0)  # [layer, head]
    v = torch.stack([vals[l] for l in range(c.n_layers)])  # [L, b, 2, kv]
    rows = []
    for l in range(c.n_layers):
        for h in range(c.n_heads):
            kv = h // c.n_groups
            sink, med = v[l, :, 0, kv], v[l, :, 1, kv]
            rows.append({"layer": l, "head": h, "kv_head": kv, "v_norm_sink": float(sink.mean()),
                         "v_norm_median": float(med.mean()), "v_norm_ratio": float((sink / med).mean()),
                         "alpha_sink": float(alpha[l, h])})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- active-dormant heads
def domain_sinks(
    model: HookedModel,
    prompts: Optional[dict[str, Sequence[str]]] = None,
    length: int = SINK_LENGTH,
    eps: float = EPS,
    source: Optional[ColSumSource] = None,
    backend: str = "kernel",
) -> pd.DataFrame:
    """First-token attention mass per head and input domain (Guo et al.'s active-dormant heads).

    One row per (layer, head): `sink_<domain>` = alpha at the first token, mean over that domain's
    prompts; `dormant_<domain>` = sink_<domain> > eps (the head parks its attention on the sink);
    `active_dormant` = dormant in some domains and active in others; `sink_spread` = max - min over
    domains. `prompts` defaults to the bundled set (`load_domain_prompts`). `backend`: see `attention_alpha`.
    """
    prompts = load_domain_prompts() if prompts is None else prompts
    df = None
    for domain, texts in prompts.items():
        alpha = attention_alpha(model, sink_tokens(model, texts, length), source, backend=backend)
        first = alpha[..., 0].mean(0)  # [L, H]
        part = pd.DataFrame(
            [{"layer": l, "head": h, f"sink_{domain}": float(first[l, h])} for l in range(first.shape[0]) for h in range(first.shape[1])]
        )
        df = part if df is None else df.merge(part, on=["layer", "head"])
    cols = [f"sink_{d}" for d in prompts]
    for d in prompts:
        df[f"dormant_{d}"] = df[f"sink_{d}"] > eps
    dormant = df[[f"dormant_{d}" for d in prompts]]
    df["active_dormant"] = dormant.any(axis=1) & ~dormant.all(axis=1)
    df["sink_spread"] = df[cols].max(axis=1) - df[cols].min(axis=1)
    return df
