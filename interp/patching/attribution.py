"""Attribution patching (Nanda 2023; Syed et al., "Attribution Patching Outperforms Automated
Circuit Discovery", 2023): the first-order estimate metric(run) + (source - run) . dmetric/dact,
for every component at once from two forwards and one backward."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..cache import CacheStore
from ..hook_points import HookPoint
from ..hooks import HookedModel, Input
from ..metrics import Metric, accumulate, keep_last, metric_name
from .components import Component, component
from .inputs import Prompts, baselines, patch_inputs, source_activations, str_tokens
from .result import PatchResult


def attribution_patch(
    model: HookedModel,
    components: Union[str, Component, Sequence[Union[str, Component]]],
    clean: Prompts,
    corrupted: Optional[Input] = None,
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
    set, for every component asked for at once. Same inputs (prompt sets or one PromptPairs),
    shapes and normalisation as `activation_patch`, so a screen here can be confirmed there.
    `by` is one value or a dict per component name. Returns a PatchResult, or a dict of them
    keyed by component name when `components` is a list.

    Padding (supported): as in `activation_patch`, each prompt is read at its own last real
    token; positions past it get zero gradient, so they add nothing.
    `progress`: a tqdm bar over the stages (source run, run with backward, one per component).
    """
    single = isinstance(components, (str, Component))
    comps = [component(c) for c in ([components] if single else components)]
    bys = {c.name: c.check_by(by.get(c.name) if isinstance(by, dict) else by) for c in comps}
    inputs = patch_inputs(model, clean, corrupted, answer_tokens, attention_mask, "attribution_patch")
    last = inputs.last
    metric, clean_m, corrupted_m = baselines(model, inputs, metric, "attribution_patch")
    run_t, source_t = inputs.run_and_source(direction)
    hooks = [name for c in comps for name in c.hook_names(model.cfg.n_layers)]
    bar = tqdm(total=2 + len(comps), desc="attribution patching", disable=not progress)
    sources = source_activations(model, source_t, hooks, store)
    bar.update(1)

    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def save_act(x: Tensor, hook: HookPoint) -> None:
        acts[hook.name] = x.detach()

    def save_grad(g: Tensor, hook: HookPoint) -> None:
        grads[hook.name] = g.detach()

    with torch.enable_grad(), model.hooks(fwd_hooks=[(h, save_act) for h in hooks], bwd_hooks=[(h, save_grad) for h in hooks]):
        value = metric(model(run_t) if last is None else model(run_t, logits_to_keep=keep_last(last)))
        value.backward()
    run_m = float(value.detach())
    bar.update(1)

    results = {}
    for c in comps:
        per_layer = [
            c.attribution(accumulate(sources[name] - acts[name]) * accumulate(grads[name]), bys[c.name])
            for name in c.hook_names(model.cfg.n_layers)
        ]
        results[c.name] = PatchResult((run_m + torch.stack(per_layer)).float().cpu(), c.name, c.axes(bys[c.name]), direction,
                                      metric_name(metric), clean_m, corrupted_m, str_tokens(model, inputs.clean),
                                      method="attribution")
        bar.update(1)
    bar.close()
    return results[comps[0].name] if single else results
