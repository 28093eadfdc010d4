"""Head ablation: knock out any set of attention heads, and sweep single heads in batches.

    from interp.heads.ablation import ablate_heads
    with ablate_heads(model, heads=[(3, 1), (7, 4)], how="uniform"):
        logits = model(tokens)          # or model.generate(...)

Four ways to remove a head (heads are *query* heads, also under grouped-query attention):

- ``"zero"``: the head's output z (``attn.hook_z``, [batch, pos, head, d_head]) is set to 0,
  which is zeroing its columns of the output projection (Michel et al. 2019 mask a head this way).
- ``"mean"``: z is replaced by its mean over a reference token batch. By default the mean is
  over batch and position (one vector per head, valid at any length and during ``generate``);
  with ``per_position=True`` it is the mean over the batch at each position, and the input must
  have the reference's length. Padding (a reference attention mask) is left out of the mean.
- ``"resample"``: z is replaced by the z the model computes on ``reference`` (another prompt of
  the same length; a batch of 1 is broadcast, otherwise the batch sizes must match).
- ``"uniform"``: the head's query (``attn.hook_q``, before RoPE and any q-norm) is zeroed, so
  every score is 0 and the head attends uniformly over the keys its mask allows. This is the
  "masking" Wu et al. 2024 ("Retrieval Head Mechanistically Explains Long-Context Factuality")
  use for retrieval heads: the head then outputs the mean of the allowed values, not zero.
  RoPE of 0 is 0, and RMS q-norms (Qwen3, Gemma 3) map 0 to 0, so it holds in those families.

Replacements for mean and resample are computed once, on entry, from a clean run of the
reference (with whatever other hooks are attached at that moment). zero, mean and uniform work
during ``model.generate`` (decode steps see pos = 1); resample and per-position mean need the
input's positions to line up with the reference's, so they refuse a decode step with a clear error.

Also here: `single_head_ablation` (every head, several per forward, stacked along the batch)
and attention calibration (ACT, Yu et al. 2024), which re-weights attention to non-initial sinks.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Union

import pandas as pd
import torch
from torch import Tensor

from ..hooks import HookedModel, Input

HOWS = ("zero", "mean", "resample", "uniform")
Head = tuple[int, int]
# metric(logits [batch, pos, d_vocab], tokens [batch, pos]) -> scalar tensor
Metric = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------- metrics
def lm_loss(logits: Tensor, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Mean next-token cross-entropy (nats) over the prompt, in fp32 or wider; padding left out when a mask is given."""
    logp = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).squeeze(-1)
    if attention_mask is None:
        return nll.mean()
    keep = attention_mask[:, 1:].to(nll.device, nll.dtype)
    return (nll * keep).sum() / keep.sum()


# ---------------------------------------------------------------------------- validation
def check_heads(model: HookedModel, heads: Sequence[Head]) -> list[Head]:
    """(layer, head) pairs as ints, each in range; a clear error otherwise."""
    c = model.cfg
    out = []
    for item in heads:
        try:
            layer, head = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ValueError(f"heads must be (layer, head) pairs, got {item!r}") from None
        if not (0 <= layer < c.n_layers and 0 <= head < c.n_heads):
            raise ValueError(
                f"head {(layer, head)} is out of range: the model has {c.n_layers} layers and {c.n_heads} query heads per layer"
            )
        out.append((layer, head))
    return out


def head_mask(model: HookedModel, heads: Sequence[Head]) -> Tensor:
    """Bool [n_layers, n_heads], True where a head is listed."""
    mask = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool, device=model.device)
    for layer, head in check_heads(model, heads):
        mask[layer, head] = True
    return mask


# ---------------------------------------------------------------------------- replacements
def _z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _reference_tokens(model: HookedModel, reference: Input, reference_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    if isinstance(reference, Tensor):
        tokens = reference if reference.ndim == 2 else reference.unsqueeze(0)
        return tokens.to(model.device), reference_mask
    tokens, mask = model.to_tokens_and_mask(reference)
    return tokens, (reference_mask if reference_mask is not None else mask)


@torch.no_grad()
def reference_z(
    model: HookedModel, reference: Input, layers: Sequence[int], reference_mask: Optional[Tensor] = None
) -> tuple[dict[int, Tensor], Optional[Tensor]]:
    """z of every head at `layers` on a clean run of `reference`: {layer: [batch, pos, head, d_head]}, and its mask."""
    tokens, mask = _reference_tokens(model, reference, reference_mask)
    _, cache = model.run_with_cache(tokens, names_filter=[_z_name(l) for l in layers], attention_mask=mask)
    return {l: cache[_z_name(l)] for l in layers}, mask


def replacements(
    model: HookedModel,
    how: str,
    layers: Sequence[int],
    reference: Optional[Input],
    reference_mask: Optional[Tensor] = None,
    per_position: bool = False,
) -> dict[int, Tensor]:
    """What an ablated head's z becomes, per layer: [1 or batch, 1 or pos, head, d_head]. Empty for zero/uniform."""
    if how in ("zero", "uniform") or not layers:
        return {}
    if reference is None:
        raise ValueError(f'how="{how}" needs `reference` tokens (a prompt batch to take the {how} from)')
    zs, mask = reference_z(model, reference, layers, reference_mask)
    if how == "resample":
        return zs
    out = {}
    for l, z in zs.items():
        w = torch.ones(z.shape[:2], dtype=torch.float32, device=z.device) if mask is None else mask.to(z.device, torch.float32)
        wz = z.float() * w[:, :, None, None]
        if per_position:
            if mask is not None and bool((w.sum(0) == 0).any()):
                raise ValueError("per_position mean: some position is padding in every reference prompt")
            mean = wz.sum(0, keepdim=True) / w.sum(0)[None, :, None, None]
        else:
            mean = wz.sum((0, 1), keepdim=True) / w.sum()
        out[l] = mean.to(z.dtype)
    return out


def _fit(repl: Tensor, z: Tensor, name: str, how: str) -> Tensor:
    """Check that a replacement [b', p', head, d] broadcasts onto z [b, p, head, d]."""
    b, p = z.shape[:2]
    rb, rp = repl.shape[:2]
    if rp not in (1, p):
        raise ValueError(
            f'{how} ablation at {name}: the reference has {rp} positions but the input has {p} '
            f"(z {tuple(z.shape)} vs reference {tuple(repl.shape)}). Use a reference of the input's length"
            + (", or the position-averaged mean; these cannot follow KV-cache decode steps" if p == 1 else "")
        )
    if rb not in (1, b):
        raise ValueError(
            f"{how} ablation at {name}: reference batch {rb} does not match input batch {b} "
            f"(z {tuple(z.shape)} vs reference {tuple(repl.shape)}); pass a reference batch of 1 or {b}"
        )
    return repl.to(z.dtype)


# ---------------------------------------------------------------------------- hooks
def ablation_hooks(model: HookedModel, mask: Tensor, how: str, repl: Optional[dict[int, Tensor]] = None) -> list:
    """Forward hooks that ablate heads per sample.

    mask: bool [1 or batch, n_layers, n_heads] (True = ablate that head in that sample).
    repl: {layer: replacement z} for mean/resample (see `replacements`).
    Layers with nothing to ablate get no hook, so they keep their fast attention path.
    """
    if how not in HOWS:
        raise ValueError(f"how must be one of {HOWS}, got {how!r}")
    if mask.ndim == 2:
        mask = mask[None]
    expected = (model.cfg.n_layers, model.cfg.n_heads)
    if mask.ndim != 3 or tuple(mask.shape[1:]) != expected:
        raise ValueError(f"head mask must be [batch, n_layers, n_heads] = [*, {expected[0]}, {expected[1]}], got {tuple(mask.shape)}")
    repl = repl or {}
    hooks = []
    for layer in range(model.cfg.n_layers):
        sel = mask[:, layer]  # [b, head]
        if not bool(sel.any()):
            continue
        if how == "uniform":
            hooks.append((f"blocks.{layer}.attn.hook_q", _zero_hook(sel)))
        elif how == "zero":
            hooks.append((_z_name(layer), _zero_hook(sel)))
        else:
            hooks.append((_z_name(layer), _replace_hook(sel, repl[layer], how)))
    return hooks


def _broadcast_sel(sel: Tensor, x: Tensor, name: str) -> Tensor:
    if sel.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"head mask batch {sel.shape[0]} does not match the input batch {x.shape[0]} at {name}")
    return sel.to(x.device)[:, None, :, None]  # [b, 1, head, 1]


def _zero_hook(sel: Tensor):
    def fn(x: Tensor, hook) -> Tensor:  # x: [batch, pos, head, d_head] (hook_z or hook_q)
        return x.masked_fill(_broadcast_sel(sel, x, hook.name), 0.0)

    return fn


def _replace_hook(sel: Tensor, repl: Tensor, how: str):
    def fn(z: Tensor, hook) -> Tensor:
        return torch.where(_broadcast_sel(sel, z, hook.name), _fit(repl, z, hook.name, how), z)

    return fn


@contextlib.contextmanager
def ablate_heads(
    model: HookedModel,
    heads: Sequence[Head],
    how: str = "zero",
    reference: Optional[Input] = None,
    reference_mask: Optional[Tensor] = None,
    per_position: bool = False,
) -> Iterator[HookedModel]:
    """Ablate `heads` ([(layer, query_head), ...]) for the duration of the `with` block.

    how: "zero" | "mean" | "resample" | "uniform" (see the module docstring).
    reference: token ids [batch, pos] or text, needed by mean and resample.
    reference_mask: attention mask of the reference (padding is left out of a mean).
    per_position: mean per position instead of over batch and position.
    """
    if how not in HOWS:
        raise ValueError(f"how must be one of {HOWS}, got {how!r}")
    mask = head_mask(model, heads)
    layers = [l for l in range(model.cfg.n_layers) if bool(mask[l].any())]
    repl = replacements(model, how, layers, reference, reference_mask, per_position)
    with model.hooks(fwd_hooks=ablation_hooks(model, mask, how, repl)):
        yield model


# ---------------------------------------------------------------------------- single-head sweep
def _batched_sweep(
    model: HookedModel,
    tokens: Tensor,
    metric: Metric,
    heads: list[Head],
    batch_heads: int,
    hooks_for: Callable[[Tensor, int], list],
    attention_mask: Optional[Tensor],
) -> tuple[float, list[tuple[Head, float]]]:
    """Run `batch_heads` single-head interventions per forward: the prompt batch is repeated and
    copy j gets a head mask with only head j set. hooks_for(mask [k*B, L, H], k) builds the hooks.
    Returns the clean metric and [(head, metric)].
    """
    if batch_heads < 1:
        raise ValueError(f"batch_heads must be >= 1, got {batch_heads}")
    B = tokens.shape[0]
    with torch.no_grad():
        clean = float(metric(model(tokens, attention_mask=attention_mask), tokens))
    out = []
    for start in range(0, len(heads), batch_heads):
        chunk = heads[start : start + batch_heads]
        k = len(chunk)
        mask = torch.zeros(k * B, model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool, device=model.device)
        for j, (l, h) in enumerate(chunk):
            mask[j * B : (j + 1) * B, l, h] = True
        big_mask = attention_mask.repeat(k, 1) if attention_mask is not None else None
        with torch.no_grad(), model.hooks(fwd_hooks=hooks_for(mask, k)):
            logits = model(tokens.repeat(k, 1), attention_mask=big_mask)
        out += [((l, h), float(metric(logits[j * B : (j + 1) * B], tokens))) for j, (l, h) in enumerate(chunk)]
    return clean, out


def _all_heads(model: HookedModel, heads: Optional[Sequence[Head]]) -> list[Head]:
    if heads is not None:
        return check_heads(model, heads)
    return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def single_head_ablation(
    model: HookedModel,
    tokens: Input,
    metric: Metric,
    how: str = "zero",
    batch_heads: int = 8,
    reference: Optional[Input] = None,
    heads: Optional[Sequence[Head]] = None,
    attention_mask: Optional[Tensor] = None,
    reference_mask: Optional[Tensor] = None,
    per_position: bool = False,
) -> pd.DataFrame:
    """Ablate each head alone and measure `metric(logits, tokens)` (a scalar over the prompt batch).

    `batch_heads` head ablations run in one forward: the prompt batch is repeated that many times
    and each copy gets its own head mask inside the hooks. Returns one row per (layer, head) with
    columns layer, head, metric, delta (= metric - clean metric), how.
    """
    tokens, attention_mask = model.prepare_inputs(tokens, attention_mask)
    heads = _all_heads(model, heads)
    B = tokens.shape[0]
    repl = replacements(model, how, sorted({l for l, _ in heads}), reference, reference_mask, per_position)

    def hooks_for(mask: Tensor, k: int) -> list:
        # a reference batch matched to the prompts is tiled like the prompts
        tiled = {l: (r.repeat(k, 1, 1, 1) if r.shape[0] == B and B > 1 else r) for l, r in repl.items()}
        return ablation_hooks(model, mask, how, tiled)

    clean, results = _batched_sweep(model, tokens, metric, heads, batch_heads, hooks_for, attention_mask)
    rows = [{"layer": l, "head": h, "metric": m, "delta": m - clean, "how": how} for (l, h), m in results]
    return pd.DataFrame(rows, columns=["layer", "head", "metric", "delta", "how"])


# ---------------------------------------------------------------------------- attention calibration (ACT)
ACT_BETA = 0.4
ACT_THRESHOLD = 0.1


def calibrate_pattern(pattern: Tensor, sel: Tensor, beta: float = ACT_BETA, threshold: float = ACT_THRESHOLD) -> Tensor:
    """ACT (Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks"), per input.

    pattern: Float[Tensor, "batch head q k"] of a full causal forward (q == k).
    sel: Bool[Tensor, "batch_or_1 head"], the heads to calibrate.
    In each selected head, keys k > 0 with alpha(k) = sum_i A[i, k] / (T - k) > threshold (the
    non-initial sinks of this input) keep `beta` of the attention they get; each row gives the
    removed mass back to its other keys in proportion to their attention (the first token
    included, as in GATECH-EIC/ACT), so rows still sum to 1. A row with no other key is left as is.
    Unlike ACT's code, which drops the first index it finds, the first token is excluded by position.
    """
    b, H, q, k = pattern.shape
    if q != k:
        raise ValueError(
            f"attention calibration needs the full pattern of a forward without KV cache (q == k), got {tuple(pattern.shape)}"
        )
    p = pattern.float()
    alpha = p.sum(-2) / torch.arange(k, 0, -1, device=p.device, dtype=p.dtype)  # [b, H, k]
    sinks = (alpha > threshold) & sel.to(p.device)[:, :, None]
    sinks[..., 0] = False
    cols = sinks[:, :, None, :]  # [b, H, 1, k]
    removed = (p * cols).sum(-1, keepdim=True) * (1 - beta)
    pool = p.masked_fill(cols, 0.0)
    pool_sum = pool.sum(-1, keepdim=True)
    share = torch.where(pool_sum > 0, pool / pool_sum.clamp_min(1e-30), torch.zeros_like(pool))
    new = torch.where(cols, p * beta, p) + removed * share
    new = torch.where(pool_sum > 0, new, p)
    return new.to(pattern.dtype)


def calibration_hooks(model: HookedModel, mask: Tensor, beta: float = ACT_BETA, threshold: float = ACT_THRESHOLD) -> list:
    """Pattern-edit hooks applying `calibrate_pattern` where mask [1 or batch, n_layers, n_heads] is True."""
    if mask.ndim == 2:
        mask = mask[None]
    hooks = []
    for layer in range(model.cfg.n_layers):
        sel = mask[:, layer]
        if bool(sel.any()):
            hooks.append((f"blocks.{layer}.attn.hook_pattern",
                          lambda p, hook, sel=sel: calibrate_pattern(p, sel, beta, threshold)))
    return hooks


@contextlib.contextmanager
def calibrate_heads(model: HookedModel, heads: Sequence[Head], beta: float = ACT_BETA,
                    threshold: float = ACT_THRESHOLD) -> Iterator[HookedModel]:
    """ACT on `heads` for the duration of the `with` block (full forwards only; those layers run eager)."""
    with model.hooks(fwd_hooks=calibration_hooks(model, head_mask(model, heads), beta, threshold)):
        yield model


def act_search(
    model: HookedModel,
    tokens: Input,
    metric: Metric = lm_loss,
    heads: Optional[Sequence[Head]] = None,
    beta: float = ACT_BETA,
    threshold: float = ACT_THRESHOLD,
    batch_heads: int = 8,
    attention_mask: Optional[Tensor] = None,
) -> pd.DataFrame:
    """Calibrate each head alone on a calibration set: one row per (layer, head) with metric and delta."""
    tokens, attention_mask = model.prepare_inputs(tokens, attention_mask)
    heads = _all_heads(model, heads)
    clean, results = _batched_sweep(
        model, tokens, metric, heads, batch_heads, lambda mask, k: calibration_hooks(model, mask, beta, threshold), attention_mask
    )
    return pd.DataFrame([{"layer": l, "head": h, "metric": m, "delta": m - clean} for (l, h), m in results],
                        columns=["layer", "head", "metric", "delta"])


@torch.no_grad()
def act_calibrate(
    model: HookedModel,
    calibration: Input,
    held_out: Input,
    metric: Metric = lm_loss,
    lower_is_better: bool = True,
    beta: float = ACT_BETA,
    threshold: float = ACT_THRESHOLD,
    max_heads: Optional[int] = None,
    batch_heads: int = 8,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pick ACT heads on `calibration` (each head that improves the metric alone, best first, at
    most `max_heads`) and apply them together on both sets.

    Returns (search: per-head frame from `act_search`, summary: one row per set with columns
    set, n_heads, clean, calibrated, delta).
    """
    cal_tokens, _ = model.prepare_inputs(calibration, None)
    held_tokens, _ = model.prepare_inputs(held_out, None)
    search = act_search(model, cal_tokens, metric, None, beta, threshold, batch_heads)
    gain = search.delta if lower_is_better else -search.delta
    chosen = search[gain < 0].assign(gain=gain[gain < 0]).sort_values("gain")
    if max_heads is not None:
        chosen = chosen.head(max_heads)
    heads = [(int(l), int(h)) for l, h in zip(chosen.layer, chosen["head"])]
    rows = []
    for name, toks in (("calibration", cal_tokens), ("held_out", held_tokens)):
        clean = float(metric(model(toks), toks))
        with calibrate_heads(model, heads, beta, threshold):
            cal = float(metric(model(toks), toks))
        rows.append({"set": name, "n_heads": len(heads), "clean": clean, "calibrated": cal, "delta": cal - clean})
    return search, pd.DataFrame(rows)
