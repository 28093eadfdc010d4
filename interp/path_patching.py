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

from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .cache import CacheStore
from .hooks import HookedModel, Input
from .metrics import Metric, keep_last, last_real_tokens, metric_name
from .patching import (
    PatchResult,
    _baselines,
    _direction,
    _patch,
    _row_bytes,
    _tokens,
    prompt_pair,
    source_activations,
)
from .resume import capture_run, forward_from

Z = "blocks.{}.attn.hook_z"
MLP = "blocks.{}.hook_mlp_out"


def _check_receivers(model: HookedModel, receivers: Sequence[tuple[int, int]], receiver_input: str) -> None:
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"receiver_input must be 'q', 'k' or 'v', got {receiver_input!r}")
    n_heads = model.cfg.n_heads if receiver_input == "q" else model.cfg.n_kv_heads
    for layer, head in receivers:
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < n_heads):
            kind = "query" if receiver_input == "q" else "key/value"
            raise ValueError(f"receiver ({layer}, {head}) is outside {model.cfg.n_layers} layers x {n_heads} {kind} heads")


@torch.no_grad()
def path_patch(
    model: HookedModel,
    clean: Input,
    corrupted: Input,
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

    Returns a PatchResult with values Float[Tensor, "layer head"] over sender heads; senders at
    or after the first receiver's layer have no path and are NaN.

    Padding (supported): a right-padded batch (strings of unequal length, or token ids with
    `attention_mask=`) gives each prompt's metric at its own last real token, as if run alone;
    the metric must read only the final position, and left padding is refused (see
    `interp.patching`). `progress`: a tqdm bar over the sender heads (on stderr).
    """
    cfg = model.cfg
    receivers = list(receivers or [])
    if receivers:
        _check_receivers(model, receivers, receiver_input)
    clean_t, corrupted_t, mask = prompt_pair(model, clean, corrupted, attention_mask)
    last = last_real_tokens(mask)
    metric, clean_m, corrupted_m = _baselines(model, clean_t, corrupted_t, metric, answer_tokens, last, "path_patch")
    orig_t, new_t = _direction(direction, clean_t, corrupted_t)  # (run, source)
    n, n_pos = orig_t.shape
    z_names = [Z.format(l) for l in range(cfg.n_layers)]
    mlp_names = [MLP.format(l) for l in range(cfg.n_layers)] if freeze_mlps else []
    new_z = source_activations(model, new_t, z_names, store)
    orig_acts = source_activations(model, orig_t, z_names + mlp_names, store)
    run = capture_run(model, orig_t)

    last_layer = min((l for l, _ in receivers), default=cfg.n_layers)
    values = torch.full((cfg.n_layers, cfg.n_heads), float("nan"))
    kept = 1 if getattr(metric, "last_position_only", False) else 0
    max_heads = max(1, int(memory_budget_mb * 2**20) // (n * _row_bytes(model, n_pos, kept or n_pos, False)))
    bar = tqdm(total=last_layer * cfg.n_heads, desc="path patching", disable=not progress)
    for layer in range(last_layer):
        for start in range(0, cfg.n_heads, max_heads):
            heads = list(range(start, min(cfg.n_heads, start + max_heads)))
            keep = kept if last is None else keep_last(last, copies=len(heads))
            values[layer, heads] = _senders(model, run, layer, heads, new_z, orig_acts, receivers, receiver_input,
                                            freeze_mlps, metric, keep)
            bar.update(len(heads))
    bar.close()
    name = "path_" + (f"{receiver_input}" if receivers else "logits")
    return PatchResult(values, name, ("layer", "head"), direction, metric_name(metric), clean_m, corrupted_m,
                       _tokens(model, clean_t), method="path")


def _senders(model, run, layer, heads, new_z, orig_acts, receivers, receiver_input, freeze_mlps, metric,
             kept: Union[int, Tensor]) -> Tensor:
    """Float[Tensor, "sender"]: the metric for each sender head of `layer` in `heads`.

    kept: HF's logits_to_keep for both forwards (an int, or per-row positions for a padded batch).
    """
    m, n = len(heads), run.tokens.shape[0]
    hook_input = "blocks.{}.attn.hook_" + receiver_input

    def freeze(name: str):
        frozen = orig_acts[name].repeat(m, *[1] * (orig_acts[name].ndim - 1))
        return lambda x, hook: frozen

    # Step 1: the sender carries the new value; every other head (and MLP, if asked) is frozen.
    sender = Z.format(layer)
    hooks = [(sender, lambda x, hook: _patch(x, new_z[sender], [(None, h) for h in heads], "heads", 0))]
    hooks += [(Z.format(l), freeze(Z.format(l))) for l in range(layer + 1, model.cfg.n_layers)]
    if freeze_mlps:
        hooks += [(MLP.format(l), freeze(MLP.format(l))) for l in range(layer, model.cfg.n_layers)]
    recorded: dict[str, Tensor] = {}

    def record(x: Tensor, hook) -> None:
        recorded[hook.name] = x.clone()

    receiver_layers = sorted({l for l, _ in receivers})
    hooks += [(hook_input.format(l), record) for l in receiver_layers]
    with model.hooks(fwd_hooks=hooks):
        logits = forward_from(model, run, layer, copies=m, logits_to_keep=kept)

    if receivers:
        # Step 2: only the receivers' inputs change; everything else recomputes from the original run.
        def patch_receivers(x: Tensor, hook) -> Tensor:
            x = x.clone()
            layer_heads = [h for l, h in receivers if hook_input.format(l) == hook.name]
            x[:, :, layer_heads] = recorded[hook.name][:, :, layer_heads]
            return x

        with model.hooks(fwd_hooks=[(hook_input.format(l), patch_receivers) for l in receiver_layers]):
            logits = forward_from(model, run, receiver_layers[0], copies=m, logits_to_keep=kept)
    logits = logits.view(m, n, *logits.shape[1:])
    return torch.stack([metric(logits[j]).float().cpu() for j in range(m)])
