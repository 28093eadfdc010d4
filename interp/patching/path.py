"""Path patching: the effect of a sender head that travels only along chosen paths.

Wang et al., "Interpretability in the Wild: a Circuit for Indirect Object Identification in
GPT-2 small" (2022), section 3.1. For each sender head s:

1. run the original prompts with s's output (hook_z) taken from the new prompts and every
   other head frozen to its original output (MLPs recompute unless `freeze_mlps`), and record
   the receivers' inputs: their q, k or v (GQA: k and v belong to key/value heads);
2. run the original prompts again with only the receivers' inputs replaced by the values
   recorded in step 1, and measure the metric.

With receivers=None the path ends at the logits: step 1's logits are measured directly.
"original" is the clean set for noising (the paper's default) and the corrupted set for
denoising. Senders stack along the batch dimension and start at their own layer (`interp.resume`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..cache import CacheStore
from ..hook_points import HookPoint
from ..hooks import HookedModel, Input
from ..metrics import Metric, keep_last, metric_name
from ..resume import RunState, capture_run, forward_from
from .components import COMPONENTS, Component
from .inputs import Prompts, baselines, patch_inputs, row_bytes, source_activations, str_tokens
from .result import PatchResult

SENDER = COMPONENTS["z"]  # a sender head's output
MLP = COMPONENTS["mlp_out"]
RECEIVER_INPUTS = ("q", "k", "v")


def _receiver(model: HookedModel, receivers: Sequence[tuple[int, int]], receiver_input: str) -> Component:
    """The component the receivers read (q, k or v), after checking every receiver is one of its heads."""
    if receiver_input not in RECEIVER_INPUTS:
        raise ValueError(f"receiver_input must be 'q', 'k' or 'v', got {receiver_input!r}")
    receiver = COMPONENTS[receiver_input]
    n_heads = receiver.n_heads(model.cfg)
    for layer, head in receivers:
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < n_heads):
            raise ValueError(f"receiver ({layer}, {head}) is outside {model.cfg.n_layers} layers x {n_heads} "
                             f"{receiver.layout.head_kind} heads")
    return receiver


@torch.no_grad()
def path_patch(
    model: HookedModel,
    clean: Prompts,
    corrupted: Optional[Input] = None,
    metric: Union[str, Metric] = "logit_diff",
    *,
    answer_tokens: Optional[Tensor] = None,
    receivers: Optional[Sequence[tuple[int, int]]] = None,
    receiver_input: str = "q",
    direction: str = "noising",
    freeze_mlps: bool = False,
    store: Optional[CacheStore] = None,
    memory_budget_mb: float = 1024,
    attention_mask: Optional[Tensor] = None,
    progress: bool = True,
) -> PatchResult:
    """Metric after patching each sender head along the paths to `receivers` (or to the logits).

    clean / corrupted: prompt sets of equal token length, or one PromptPairs as `clean`
    (`path_patch(model, pairs, metric="logit_diff", receivers=[(9, 6)])`). receivers: (layer,
    head) pairs whose `receiver_input` ("q", or "k" / "v" by key/value head) carries the path.
    Returns a PatchResult with values Float[Tensor, "layer head"] over sender heads; senders at
    or after the first receiver's layer have no path and are NaN.

    Padding (supported): a right-padded batch (strings of unequal length, or token ids with
    `attention_mask=`) gives each prompt's metric at its own last real token, as if run alone;
    the metric must read only the final position, and left padding is refused (see
    `interp.patching`). `progress`: a tqdm bar over the sender heads (on stderr).
    """
    cfg = model.cfg
    receivers = list(receivers or [])
    receiver = _receiver(model, receivers, receiver_input) if receivers else None
    inputs = patch_inputs(model, clean, corrupted, answer_tokens, attention_mask, "path_patch")
    last = inputs.last
    metric, clean_m, corrupted_m = baselines(model, inputs, metric, "path_patch")
    orig_t, new_t = inputs.run_and_source(direction)
    n, n_pos = orig_t.shape
    z_names = SENDER.hook_names(cfg.n_layers)
    mlp_names = MLP.hook_names(cfg.n_layers) if freeze_mlps else []
    new_z = source_activations(model, new_t, z_names, store)
    orig_acts = source_activations(model, orig_t, z_names + mlp_names, store)
    run = capture_run(model, orig_t)

    last_layer = min((layer for layer, _ in receivers), default=cfg.n_layers)
    values = torch.full((cfg.n_layers, cfg.n_heads), float("nan"))
    kept = 1 if getattr(metric, "last_position_only", False) else 0
    max_heads = max(1, int(memory_budget_mb * 2**20) // (n * row_bytes(model, n_pos, kept or n_pos, False)))
    bar = tqdm(total=last_layer * cfg.n_heads, desc="path patching", disable=not progress)
    for layer in range(last_layer):
        for start in range(0, cfg.n_heads, max_heads):
            heads = list(range(start, min(cfg.n_heads, start + max_heads)))
            keep = kept if last is None else keep_last(last, copies=len(heads))
            values[layer, heads] = _senders(model, run, layer, heads, new_z, orig_acts, receiver, receivers,
                                            freeze_mlps, metric, keep)
            bar.update(len(heads))
    bar.close()
    name = "path_" + (f"{receiver_input}" if receivers else "logits")
    return PatchResult(values, name, ("layer", "head"), direction, metric_name(metric), clean_m, corrupted_m,
                       str_tokens(model, inputs.clean), method="path")


def _senders(
    model: HookedModel,
    run: RunState,
    layer: int,
    heads: list[int],
    new_z: dict[str, Tensor],
    orig_acts: dict[str, Tensor],
    receiver: Optional[Component],
    receivers: list[tuple[int, int]],
    freeze_mlps: bool,
    metric: Metric,
    kept: Union[int, Tensor],
) -> Tensor:
    """Float[Tensor, "sender"]: the metric for each sender head of `layer` in `heads`.

    receiver: the component the `receivers` (layer, head) read, None for the path to the logits.
    kept: HF's logits_to_keep for both forwards (an int, or per-row positions for a padded batch).
    """
    m, n = len(heads), run.tokens.shape[0]

    def freeze(name: str) -> Callable[[Tensor, HookPoint], Tensor]:
        frozen = orig_acts[name].repeat(m, *[1] * (orig_acts[name].ndim - 1))
        return lambda x, hook: frozen

    # Step 1: the sender carries the new value; every other head (and MLP, if asked) is frozen.
    sender = SENDER.hook_name(layer)
    hooks = [(sender, lambda x, hook: SENDER.patch(x, new_z[sender], [(None, h) for h in heads], 0))]
    hooks += [(name, freeze(name)) for name in SENDER.hook_names(model.cfg.n_layers)[layer + 1 :]]
    if freeze_mlps:
        hooks += [(name, freeze(name)) for name in MLP.hook_names(model.cfg.n_layers)[layer:]]
    recorded: dict[str, Tensor] = {}

    def record(x: Tensor, hook: HookPoint) -> None:
        recorded[hook.name] = x.clone()

    receiver_layers = sorted({layer for layer, _ in receivers})
    if receiver is not None:
        hooks += [(receiver.hook_name(layer), record) for layer in receiver_layers]
    with model.hooks(fwd_hooks=hooks):
        logits = forward_from(model, run, layer, copies=m, logits_to_keep=kept)

    if receiver is not None and receivers:
        # Step 2: only the receivers' inputs change; everything else recomputes from the original run.
        def patch_receivers(x: Tensor, hook: HookPoint) -> Tensor:
            layer_heads = [h for layer, h in receivers if receiver.hook_name(layer) == hook.name]
            return receiver.replace_heads(x, recorded[hook.name], layer_heads)

        with model.hooks(fwd_hooks=[(receiver.hook_name(layer), patch_receivers) for layer in receiver_layers]):
            logits = forward_from(model, run, receiver_layers[0], copies=m, logits_to_keep=kept)
    logits = logits.view(m, n, *logits.shape[1:])
    return torch.stack([metric(logits[j]).float().cpu() for j in range(m)])
