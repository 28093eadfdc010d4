"""Exact activation patching: one component at every (layer, pos), (layer, head) or (layer, pos, head).

See the package docstring (`interp.patching`) for the method and how the sweep is made fast:
patches stacked along the batch, forwards resumed at the patch's layer and first changed
position (`interp.resume`), no-op patches not run.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..cache import CacheStore
from ..hook_points import HookPoint
from ..hooks import HookedModel, Input
from ..metrics import Metric, keep_last, metric_name
from ..resume import RunState, capture_run, forward_from
from .components import LAYOUTS, Component, Layout, PatchGroup, component
from .inputs import Prompts, baselines, patch_inputs, row_bytes, source_activations, str_tokens
from .result import PatchResult


def changed_positions(src: Tensor, run: Tensor, layout: Union[str, Layout]) -> Tensor:
    """Where a patch would change the run: Bool[Tensor, "pos head"] ("pos 1" for the residual stream).

    src / run: one layer's activation of the source and run sets, in `layout` (a Layout or its
    name); for a pattern the position is the query row. Prompt pairs that differ in one token
    share every activation before it (attention is causal), so this is False there.
    """
    return (LAYOUTS[layout] if isinstance(layout, str) else layout).changed_positions(src, run)


def first_change(changed: Tensor, pos: Optional[int], head: Optional[int]) -> Optional[int]:
    """The first position the patch at (pos, head) changes, or None when it changes nothing.

    changed: Bool[Tensor, "pos head"] from `changed_positions`.
    """
    column = changed[:, 0 if head is None else head]
    if pos is not None:
        return pos if bool(column[pos]) else None
    hits = column.nonzero()
    return int(hits[0]) if len(hits) else None


def chunks(items: list[int], starts: dict[int, int], max_items: int, buckets: int) -> list[list[int]]:
    """Split items (sorted by start position) into at most about `buckets` contiguous runs, never
    between two items with the same start, and cut each run to at most max_items."""
    per_bucket = math.ceil(len(items) / max(1, buckets))
    runs: list[list[int]] = []
    for item in items:
        if runs and (len(runs[-1]) < per_bucket or starts[item] == starts[runs[-1][-1]]):
            runs[-1].append(item)
        else:
            runs.append([item])
    return [run[i : i + max_items] for run in runs for i in range(0, len(run), max_items)]


def activation_patch(
    model: HookedModel,
    component_name: Union[str, Component],
    clean: Prompts,
    corrupted: Optional[Input] = None,
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

    component_name: "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out" (by "pos"),
    "z", "q", "k", "v" or "pattern" (by "head" or "pos_head"), or a Component.
    clean / corrupted: prompt sets of equal token length, or one PromptPairs as `clean`
    (`activation_patch(model, "z", pairs, metric="logit_diff", by="head")`), which brings its
    answers and attention mask. metric: "logit_diff" or "prob" (with `answer_tokens`
    Int[Tensor, "prompt 2"]), "kl" (to the clean run), or any callable mapping logits
    Float[Tensor, "prompt pos d_vocab"] to a scalar. `store`: a CacheStore the source
    activations are read from (and written to). `memory_budget_mb` bounds the stacked batch;
    `position_buckets` trades forwards for positions skipped (1 = never skip positions).

    Patches that write the value already there (source equals run, e.g. before the first token
    where the prompt pairs differ) are not run: their metric is the run's own, and every other
    patch starts at the first position it changes. `skip_unchanged=False` runs every patch, from
    its own position (by position) or from position 0 (by head), as if the pairs shared nothing.

    Padding (supported): a right-padded batch (strings of unequal length, or token ids with
    `attention_mask=`) gives each prompt's metric at its own last real token, as if run alone;
    the metric must read only the final position. A patch past a prompt's last real token leaves
    that prompt's metric unchanged. Left padding is refused (see `interp.patching`).
    `progress`: a tqdm bar over the patches (on stderr).

    Returns a PatchResult with values Float[Tensor, "layer pos"], "layer head" or
    "layer pos head" ("layer head pos" for a pattern by position).
    """
    comp = component(component_name)
    by = comp.check_by(by)
    inputs = patch_inputs(model, clean, corrupted, answer_tokens, attention_mask, "activation_patch")
    last = inputs.last
    metric, clean_m, corrupted_m = baselines(model, inputs, metric, "activation_patch")
    run_t, source_t = inputs.run_and_source(direction)
    n, n_pos = run_t.shape
    names = comp.hook_names(model.cfg.n_layers)
    sources = source_activations(model, source_t, names, store)
    changed: dict[str, Tensor] = {}  # per layer, a small map rather than a second copy of the activations

    def record_changes(x: Tensor, hook: HookPoint) -> None:
        changed[hook.name] = comp.changed_positions(sources[hook.name], x)

    with model.hooks(fwd_hooks=[(name, record_changes) for name in names] if skip_unchanged else []):
        run = capture_run(model, run_t)
    run_m = corrupted_m if direction == "denoising" else clean_m

    last_only = bool(getattr(metric, "last_position_only", False))
    kept = 1 if last_only else 0
    skip_positions = last_only and run.can_resume_positions
    max_groups = max(1, int(memory_budget_mb * 2**20) // (n * row_bytes(model, n_pos, kept or n_pos, comp.layout.name == "pattern")))

    # A padded batch reads every prompt at its last real token, so no forward may start after one.
    latest_start = int(last.min()) if last is not None else n_pos
    indices = comp.indices(model.cfg, n_pos, by)
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
        for chunk in chunks(members, starts, max_groups, position_buckets if skip_positions else 1):
            groups = [indices[i][1:] for i in chunk]
            start = min(starts[i] for i in chunk)
            values[chunk] = _run_chunk(model, run, comp, layer, groups, sources[comp.hook_name(layer)], start, metric,
                                       kept if last is None else last)
            bar.update(len(chunk))
    bar.close()
    return PatchResult(comp.arrange(values, model.cfg, n_pos, by), comp.name, comp.axes(by), direction,
                       metric_name(metric), clean_m, corrupted_m, str_tokens(model, inputs.clean))


@torch.no_grad()
def _run_chunk(model: HookedModel, run: RunState, comp: Component, layer: int, groups: Sequence[PatchGroup],
               src: Tensor, start: int, metric: Metric, kept: Union[int, Tensor]) -> Tensor:
    """The metric of each patch in `groups`, Float[Tensor, "group"].

    kept: HF's logits_to_keep (an int) for an unpadded batch, or each prompt's last real token
    Long[Tensor, "prompt"] for a padded one.
    """
    def patch(x: Tensor, hook: HookPoint) -> Tensor:
        return comp.patch(x, src, groups, start)

    keep = kept if isinstance(kept, int) else keep_last(kept, start, len(groups))
    with model.hooks(fwd_hooks=[(comp.hook_name(layer), patch)]):
        logits = forward_from(model, run, layer, start, copies=len(groups), logits_to_keep=keep)
    logits = logits.view(len(groups), run.tokens.shape[0], *logits.shape[1:])
    return torch.stack([metric(logits[j]).detach().float().cpu() for j in range(len(groups))])
