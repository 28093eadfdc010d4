"""Activation patching and attribution patching over a clean and a corrupted prompt set.

Activation patching (Vig et al. 2020; Meng et al. 2022; Heimersheim & Nanda, "How to use and
interpret activation patching", 2024) replaces one activation of one run by its value in the
other run and measures a metric on the logits. *Denoising* runs the corrupted prompts and
patches in clean activations; *noising* runs the clean prompts and patches in corrupted ones.
Results are normalised so that the corrupted run scores 0 and the clean run 1.

Shapes follow TransformerLens's `get_act_patch_*` functions: [layer, pos] for residual-stream
components, [layer, head] for a head at every position, [layer, pos, head] for a head at one
position. k and v are indexed by key/value head (GQA), everything else by query head.

Speed comes from the design, not from tuning:
- many patches run in one forward, stacked along the batch dimension (copy j of the prompt
  set carries patch j), in chunks that fit `memory_budget_mb`;
- a patch at layer l starts from the run's cached residual stream at layer l, and a patch that
  first changes position p starts at position p with the run's keys and values as a KV cache
  (`interp.resume`), since nothing before (l, p) can change;
- a patch that writes the value already there is not run at all: prompt pairs that differ in
  one token share every activation before it, so most by-position patches there are no-ops;
- metrics that read the last position ask the model for that position's logits only.

Padded batches (prompts of unequal length) are supported when right-padded, which is how
`model.to_tokens` pads a list of strings; pass `attention_mask=` with token ids. Causal attention
means no real token sees the pads after it, so every forward (also those resumed mid-run, which
take no mask) computes each prompt's real positions as the prompt alone would, and the metric is
handed each prompt's logits at its own last real token (HF's `logits_to_keep` with positions).
This needs a metric that reads only the final position (`last_position_only`, as the built-in
ones do). Left padding (whose positions would shift) and other metrics are refused with an
error saying to group prompts by token length.

Attribution patching (Nanda 2023; Syed et al., "Attribution Patching Outperforms Automated
Circuit Discovery", 2023) is the first-order estimate metric(run) + (source - run) . dmetric/dact,
for every component at once from two forwards and one backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .cache import CacheStore
from .hooks import HookedModel, Input
from .metrics import (
    Metric,
    _accumulate,
    keep_last,
    last_real_tokens,
    make_metric,
    metric_name,
    require_last_position,
)
from .resume import RunState, capture_run, forward_from


@dataclass(frozen=True)
class Component:
    """A patchable activation: its hook name per layer and its layout."""

    name: str
    hook: str  # with "{layer}"
    layout: str  # "resid" [b, pos, d_model]; "heads" / "kv_heads" [b, pos, head, d_head]; "pattern" [b, head, q, k]

    def hook_name(self, layer: int) -> str:
        return self.hook.format(layer=layer)


COMPONENTS = {
    c.name: c
    for c in [
        Component("resid_pre", "blocks.{layer}.hook_resid_pre", "resid"),
        Component("resid_mid", "blocks.{layer}.hook_resid_mid", "resid"),
        Component("resid_post", "blocks.{layer}.hook_resid_post", "resid"),
        Component("attn_out", "blocks.{layer}.hook_attn_out", "resid"),
        Component("mlp_out", "blocks.{layer}.hook_mlp_out", "resid"),
        Component("z", "blocks.{layer}.attn.hook_z", "heads"),
        Component("q", "blocks.{layer}.attn.hook_q", "heads"),
        Component("k", "blocks.{layer}.attn.hook_k", "kv_heads"),
        Component("v", "blocks.{layer}.attn.hook_v", "kv_heads"),
        Component("pattern", "blocks.{layer}.attn.hook_pattern", "pattern"),
    ]
}
AXES = {"pos": ("layer", "pos"), "head": ("layer", "head"), "pos_head": ("layer", "pos", "head")}


def axes_of(comp: "Component", by: str) -> tuple[str, ...]:
    """Axis names of a sweep's result; a pattern by position is [layer, head, pos], as in TransformerLens."""
    return ("layer", "head", "pos") if (comp.layout == "pattern" and by == "pos_head") else AXES[by]
DIRECTIONS = ("denoising", "noising")


def component(name: str) -> Component:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; choose one of {sorted(COMPONENTS)}")
    return COMPONENTS[name]


def _check_by(comp: Component, by: Optional[str]) -> str:
    by = by or ("pos" if comp.layout == "resid" else "head")
    allowed = ("pos",) if comp.layout == "resid" else ("head", "pos_head")
    if by not in allowed:
        raise ValueError(f"component {comp.name!r} is patched by {allowed}, not {by!r}")
    return by


@dataclass
class PatchResult:
    """A sweep's metric per patch index, shaped like TransformerLens's `get_act_patch_*` output.

    values: Float[Tensor, "layer pos"] | Float[Tensor, "layer head"] | Float[Tensor, "layer pos head"].
    `run_metric` is the unpatched run (corrupted when denoising), `source_metric` the run the
    patches come from; `normalized` maps corrupted to 0 and clean to 1.
    """

    values: Tensor
    component: str
    axes: tuple[str, ...]
    direction: str
    metric_name: str
    clean_metric: float
    corrupted_metric: float
    tokens: list[str] = field(default_factory=list)
    method: str = "exact"

    @property
    def normalized(self) -> Tensor:
        gap = self.clean_metric - self.corrupted_metric
        if gap == 0:
            return torch.full_like(self.values, float("nan"))
        return (self.values - self.corrupted_metric) / gap

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per patch index with columns (layer, [pos], [head], metric, normalized)."""
        index = torch.cartesian_prod(*[torch.arange(n) for n in self.values.shape]).reshape(-1, self.values.ndim)
        df = pd.DataFrame(index.numpy(), columns=list(self.axes))
        df["metric"] = self.values.reshape(-1).numpy()
        df["normalized"] = self.normalized.reshape(-1).numpy()
        df.attrs.update(component=self.component, metric_name=self.metric_name, direction=self.direction,
                        method=self.method, tokens=list(self.tokens))
        return df


# ---------------------------------------------------------------------------------------- inputs
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


def _direction(direction: str, clean: Tensor, corrupted: Tensor) -> tuple[Tensor, Tensor]:
    """(run tokens, source tokens)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return (corrupted, clean) if direction == "denoising" else (clean, corrupted)


@torch.no_grad()
def source_activations(model: HookedModel, tokens: Tensor, names: Sequence[str], store: Optional[CacheStore]) -> dict[str, Tensor]:
    """The activations to patch in, from the CacheStore when it holds them."""
    if store is not None:
        cache = store.get_or_compute(model, tokens, list(names), device=model.device)
    else:
        _, cache = model.run_with_cache(tokens, names_filter=list(names))
    return {n: cache[n] for n in names}


@torch.no_grad()
def _baselines(model: HookedModel, clean: Tensor, corrupted: Tensor, metric, answer_tokens,
               last: Optional[Tensor] = None, where: str = "patching") -> tuple[Metric, float, float]:
    """(metric, clean metric, corrupted metric); with padding (`last`: each prompt's last real
    token) the metric reads logits [prompt, 1, d_vocab] at those tokens."""
    if callable(metric):
        require_last_position(metric, last, where)
    kw = {} if last is None else {"logits_to_keep": keep_last(last)}
    clean_logits = model(clean, **kw)
    metric = make_metric(metric, answer_tokens, clean_logits)
    return metric, float(metric(clean_logits)), float(metric(model(corrupted, **kw)))


# ---------------------------------------------------------------------------------------- exact patching
def _indices(model: HookedModel, comp: Component, by: str, n_pos: int) -> list[tuple[int, Optional[int], Optional[int]]]:
    """Every (layer, pos, head) a sweep visits; None where the axis is absent."""
    cfg = model.cfg
    n_heads = cfg.n_kv_heads if comp.layout == "kv_heads" else cfg.n_heads
    positions = range(n_pos) if by in ("pos", "pos_head") else [None]
    heads = range(n_heads) if by in ("head", "pos_head") else [None]
    return [(l, p, h) for l in range(cfg.n_layers) for p in positions for h in heads]


def _patch(x: Tensor, src: Tensor, groups: list[tuple[Optional[int], Optional[int]]], layout: str, offset: int) -> Tensor:
    """Copy j of the prompt set (rows j*n .. j*n+n-1 of x) gets source values at groups[j] = (pos, head).

    x sees positions offset.. only; src covers every position of the n prompts.
    """
    x = x.clone()
    xs = x.view(len(groups), src.shape[0], *x.shape[1:])
    for j, (pos, head) in enumerate(groups):
        if layout == "resid":
            xs[j, :, pos - offset] = src[:, pos]
        elif layout in ("heads", "kv_heads"):
            if pos is None:
                xs[j, :, :, head] = src[:, offset:, head]
            else:
                xs[j, :, pos - offset, head] = src[:, pos, head]
        elif pos is None:  # pattern, every query row of the head
            xs[j, :, head] = src[:, head, offset:]
        else:  # pattern, the query row `pos`
            xs[j, :, head, pos - offset] = src[:, head, pos]
    return x


def _row_bytes(model: HookedModel, n_pos: int, kept: int, eager_pattern: bool) -> int:
    """A rough peak-memory cost of one batch row through a forward (activations of one layer at a time)."""
    cfg = model.cfg
    d_mlp = getattr(model.hf_model.config, "intermediate_size", None) or 4 * cfg.d_model
    per_pos = 8 * cfg.d_model + 3 * d_mlp + (3 * cfg.n_heads * n_pos if eager_pattern else 0)
    return 4 * (n_pos * per_pos + kept * cfg.d_vocab)


def changed_positions(src: Tensor, run: Tensor, layout: str) -> Tensor:
    """Where a patch would change the run: Bool[Tensor, "pos head"] ("pos 1" for the residual stream).

    src / run: one layer's activation of the source and run sets, in `layout`; for a pattern the
    position is the query row. Prompt pairs that differ in one token share every activation
    before it (attention is causal), so this is False there.
    """
    differs = src.to(run.device) != run
    if layout == "resid":  # [b, pos, d]
        return differs.any(dim=-1).any(dim=0)[:, None]
    if layout == "pattern":  # [b, head, q, k]
        return differs.any(dim=-1).any(dim=0).T
    return differs.any(dim=-1).any(dim=0)  # [b, pos, head, d]


def first_change(changed: Tensor, pos: Optional[int], head: Optional[int]) -> Optional[int]:
    """The first position the patch at (pos, head) changes, or None when it changes nothing."""
    column = changed[:, 0 if head is None else head]
    if pos is not None:
        return pos if bool(column[pos]) else None
    hits = column.nonzero()
    return int(hits[0]) if len(hits) else None


def _chunks(items: list, starts: dict, max_items: int, buckets: int) -> list[list]:
    """Split items (sorted by start position) into at most about `buckets` contiguous runs, never
    between two items with the same start, and cut each run to at most max_items."""
    per_bucket = math.ceil(len(items) / max(1, buckets))
    runs: list[list] = []
    for item in items:
        if runs and (len(runs[-1]) < per_bucket or starts[item] == starts[runs[-1][-1]]):
            runs[-1].append(item)
        else:
            runs.append([item])
    return [run[i : i + max_items] for run in runs for i in range(0, len(run), max_items)]


def activation_patch(
    model: HookedModel,
    component_name: str,
    clean: Input,
    corrupted: Input,
    metric: Union[str, Metric] = "logit_diff",
    *,
    answer_tokens: Optional[Tensor] = None,
    by: Optional[str] = None,
    direction: str = "denoising",
    store: Optional[CacheStore] = None,
    memory_budget_mb: float = 1024,
    position_buckets: int = 4,
    skip_unchanged: bool = True,
    attention_mask: Optional[Tensor] = None,
    progress: bool = True,
) -> PatchResult:
    """Exact activation patching of one component at every (layer, pos), (layer, head) or (layer, pos, head).

    clean / corrupted: prompt sets of equal token length. metric: "logit_diff" or "prob" (with
    `answer_tokens` Int[Tensor, "prompt 2"]), "kl" (to the clean run), or any callable mapping
    logits Float[Tensor, "prompt pos d_vocab"] to a scalar. `store`: a CacheStore the source
    activations are read from (and written to). `memory_budget_mb` bounds the stacked batch;
    `position_buckets` trades forwards for positions skipped (1 = never skip positions).

    Patches that write the value already there (source equals run, e.g. before the first token
    where the prompt pairs differ) are not run: their metric is the run's own, and every other
    patch starts at the first position it changes. `skip_unchanged=False` runs every patch, from
    its own position (by position) or from position 0 (by head), as if the pairs shared nothing.

    Padding (supported): a right-padded batch (strings of unequal length, or token ids with
    `attention_mask=`) gives each prompt's metric at its own last real token, as if run alone;
    the metric must read only the final position. A patch past a prompt's last real token leaves
    that prompt's metric unchanged. Left padding is refused (see the module docstring).
    `progress`: a tqdm bar over the patches (on stderr).
    """
    comp = component(component_name)
    by = _check_by(comp, by)
    clean_t, corrupted_t, mask = prompt_pair(model, clean, corrupted, attention_mask)
    last = last_real_tokens(mask)
    metric, clean_m, corrupted_m = _baselines(model, clean_t, corrupted_t, metric, answer_tokens, last, "activation_patch")
    run_t, source_t = _direction(direction, clean_t, corrupted_t)
    n, n_pos = run_t.shape
    names = [comp.hook_name(l) for l in range(model.cfg.n_layers)]
    sources = source_activations(model, source_t, names, store)
    changed: dict[str, Tensor] = {}  # per layer, a small map rather than a second copy of the activations

    def record_changes(x: Tensor, hook) -> None:
        changed[hook.name] = changed_positions(sources[hook.name], x, comp.layout)

    with model.hooks(fwd_hooks=[(name, record_changes) for name in names] if skip_unchanged else []):
        run = capture_run(model, run_t)
    run_m = corrupted_m if direction == "denoising" else clean_m

    last_only = bool(getattr(metric, "last_position_only", False))
    kept = 1 if last_only else 0
    skip_positions = last_only and run.can_resume_positions
    max_groups = max(1, int(memory_budget_mb * 2**20) // (n * _row_bytes(model, n_pos, kept or n_pos, comp.layout == "pattern")))

    # A padded batch reads every prompt at its last real token, so no forward may start after one.
    latest_start = int(last.min()) if last is not None else n_pos
    indices = _indices(model, comp, by, n_pos)
    values = torch.full((len(indices),), run_m)  # no-op patches keep the run's metric
    by_layer: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for i, (layer, pos, head) in enumerate(indices):
        name = comp.hook_name(layer)
        start = first_change(changed[name], pos, head) if skip_unchanged else (pos or 0)
        if start is not None:
            starts[i] = min(start, latest_start) if skip_positions else 0
            by_layer.setdefault(layer, []).append(i)
    bar = tqdm(total=len(indices), desc=f"patching {comp.name}", disable=not progress)
    bar.update(len(indices) - len(starts))
    for layer, members in by_layer.items():
        members.sort(key=lambda i: starts[i])
        for chunk in _chunks(members, starts, max_groups, position_buckets if skip_positions else 1):
            groups = [indices[i][1:] for i in chunk]
            start = min(starts[i] for i in chunk)
            values[chunk] = _run_chunk(model, run, comp, layer, groups, sources[comp.hook_name(layer)], start, metric,
                                       kept if last is None else last)
            bar.update(len(chunk))
    bar.close()
    shape = [model.cfg.n_layers] + [n_pos] * (by != "head") + [_n_heads(model, comp)] * (by != "pos")
    values = values.view(shape)
    if axes_of(comp, by) != AXES[by]:
        values = values.transpose(1, 2).contiguous()
    return PatchResult(values, comp.name, axes_of(comp, by), direction, metric_name(metric), clean_m, corrupted_m,
                       _tokens(model, clean_t))


@torch.no_grad()
def _run_chunk(model, run: RunState, comp: Component, layer: int, groups, src: Tensor, start: int, metric,
               kept: Union[int, Tensor]) -> Tensor:
    """The metric of each patch in `groups`, Float[Tensor, "group"].

    kept: HF's logits_to_keep (an int) for an unpadded batch, or each prompt's last real token
    Long[Tensor, "prompt"] for a padded one.
    """
    def patch(x: Tensor, hook) -> Tensor:
        return _patch(x, src, groups, comp.layout, start)

    keep = kept if isinstance(kept, int) else keep_last(kept, start, len(groups))
    with model.hooks(fwd_hooks=[(comp.hook_name(layer), patch)]):
        logits = forward_from(model, run, layer, start, copies=len(groups), logits_to_keep=keep)
    logits = logits.view(len(groups), run.tokens.shape[0], *logits.shape[1:])
    return torch.stack([metric(logits[j]).detach().float().cpu() for j in range(len(groups))])


def _n_heads(model: HookedModel, comp: Component) -> int:
    return model.cfg.n_kv_heads if comp.layout == "kv_heads" else model.cfg.n_heads


def _tokens(model: HookedModel, tokens: Tensor) -> list[str]:
    return model.to_str_tokens(tokens[0]) if model.tokenizer is not None else [str(int(t)) for t in tokens[0]]


# ---------------------------------------------------------------------------------------- attribution patching
def _attribution(delta_grad: Tensor, layout: str, by: str) -> Tensor:
    """Sum (source - run) * grad over everything but the patch index axes: [pos], [head], [pos, head] or [head, pos]."""
    if layout == "resid":
        return delta_grad.sum(dim=(0, 2))
    if layout in ("heads", "kv_heads"):  # [b, pos, head, d]
        return delta_grad.sum(dim=(0, 1, 3)) if by == "head" else delta_grad.sum(dim=(0, 3))
    # pattern [b, head, q, k]
    return delta_grad.sum(dim=(0, 2, 3)) if by == "head" else delta_grad.sum(dim=(0, 3))  # [head] or [head, pos]


def attribution_patch(
    model: HookedModel,
    components: Union[str, Sequence[str]],
    clean: Input,
    corrupted: Input,
    metric: Union[str, Metric] = "logit_diff",
    *,
    answer_tokens: Optional[Tensor] = None,
    by: Union[None, str, dict[str, str]] = None,
    direction: str = "denoising",
    store: Optional[CacheStore] = None,
    attention_mask: Optional[Tensor] = None,
    progress: bool = True,
) -> Union[PatchResult, dict[str, PatchResult]]:
    """Attribution patching: metric(run) + sum((source - run) * dmetric/dact) per patch index.

    One forward of the source set (or the CacheStore), one forward and one backward of the run
    set, for every component asked for at once. Same shapes and normalisation as
    `activation_patch`, so a screen here can be confirmed there. `by` is one value or a dict per
    component. Returns a PatchResult, or a dict of them when `components` is a list.

    Padding (supported): as in `activation_patch`, each prompt is read at its own last real
    token; positions past it get zero gradient, so they add nothing.
    `progress`: a tqdm bar over the stages (source run, run with backward, one per component).
    """
    names = [components] if isinstance(components, str) else list(components)
    comps = [component(c) for c in names]
    bys = {c.name: _check_by(c, by.get(c.name) if isinstance(by, dict) else by) for c in comps}
    clean_t, corrupted_t, mask = prompt_pair(model, clean, corrupted, attention_mask)
    last = last_real_tokens(mask)
    metric, clean_m, corrupted_m = _baselines(model, clean_t, corrupted_t, metric, answer_tokens, last, "attribution_patch")
    run_t, source_t = _direction(direction, clean_t, corrupted_t)
    hooks = [c.hook_name(l) for c in comps for l in range(model.cfg.n_layers)]
    bar = tqdm(total=2 + len(comps), desc="attribution patching", disable=not progress)
    sources = source_activations(model, source_t, hooks, store)
    bar.update(1)

    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def save_act(x: Tensor, hook) -> None:
        acts[hook.name] = x.detach()

    def save_grad(g: Tensor, hook) -> None:
        grads[hook.name] = g.detach()

    with torch.enable_grad(), model.hooks(fwd_hooks=[(h, save_act) for h in hooks], bwd_hooks=[(h, save_grad) for h in hooks]):
        value = metric(model(run_t) if last is None else model(run_t, logits_to_keep=keep_last(last)))
        value.backward()
    run_m = float(value.detach())
    bar.update(1)

    results = {}
    for c in comps:
        per_layer = [
            _attribution(_accumulate(sources[c.hook_name(l)] - acts[c.hook_name(l)]) * _accumulate(grads[c.hook_name(l)]), c.layout, bys[c.name])
            for l in range(model.cfg.n_layers)
        ]
        results[c.name] = PatchResult((run_m + torch.stack(per_layer)).float().cpu(), c.name, axes_of(c, bys[c.name]), direction,
                                      metric_name(metric), clean_m, corrupted_m, _tokens(model, clean_t), method="attribution")
        bar.update(1)
    bar.close()
    return results[names[0]] if isinstance(components, str) else results
