"""Stacked single-head ablation: per-row kernel head gates, each forward started at the ablated layer.

    from interp.heads.stacked import stacked_head_ablation
    clean, results = stacked_head_ablation(model, tokens, LMLoss, how="zero")   # [((layer, head), metric)]

For a prompt batch of B rows and k heads of one layer l, the batch is repeated k times (rows are
copy-major: row j * B + i is copy j of prompt i) and copy j removes head j only, through the
attention kernel's per-row controls (`HookedModel.kernel_controls`, `interp.kernels`):

- ``"zero"``: ``head_gate`` [k * B, n_heads] is 0 on the copy's head (the kernel multiplies each
  head's output z by its gate, so gate 0 is the z = 0 of `ablate_heads`).
- ``"uniform"``: ``head_uniform`` on the copy's head (scores set to 0: Wu et al.'s zeroed query).
- ``"mean"`` / ``"resample"``: gate 0, then a hook at ``attn.hook_z`` of layer l adds the head's
  replacement z (`interp.heads.ablate.replacements`) on the copy's rows: 0 + r = r exactly.

Layers before l are the same in every copy and in the clean run, so each forward starts at block
l from the clean run's residual stream (`Adapter.skip_blocks`, as `interp.resume` does for
patching): one clean forward records ``resid_pre`` at the swept layers, and the sweep of layer l
runs blocks l.. only. On CUDA the kernel is the Triton one; elsewhere its PyTorch reference.
`interp.heads.sweeps.single_head_ablation(backend="eager")` is the hook-based oracle.

A metric that reads only the final position (`last_position_only = True`, as `LogitDiff`,
`AnswerProb` and `KLToReference` of `interp.metrics` declare) is handed logits [rows, 1, d_vocab]:
every forward, the clean one included, unembeds only the last position (HF's `logits_to_keep`:
1, or each prompt's last real token in a right-padded batch, `interp.metrics.keep_last`), which
saves the full-vocabulary unembedding of every other position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..hook_points import HookPoint, get_act_name
from ..hooks import HookedModel, HookSpec
from ..metrics import keep_last
from .ablate import AblationKind, Head
from .loss import HeadMetric, sweep_metric

if TYPE_CHECKING:
    from ..kernels.hf import KernelControls

# Bound on the logits of one stacked forward (bytes); sets the default number of ablations per forward.
LOGITS_BUDGET = 1 << 30


# HF's logits_to_keep: 0 (every position), an int n (the last n), or Long[Tensor, "rows 1"] (one position per row).
LogitsToKeep = Union[int, Tensor]


def reads_last_position(metric: object) -> bool:
    """Whether a bound metric reads only the final position (`last_position_only`, `interp.metrics.Metric`)."""
    return bool(getattr(metric, "last_position_only", False))


def logits_to_keep_for(last_only: bool, last: Optional[Tensor], copies: int = 1) -> LogitsToKeep:
    """HF's logits_to_keep for `copies` stacked copies of the prompts (copy-major rows).

    0 (all positions) unless the metric reads only the last position; then 1 for an unpadded
    batch (`last` None), else each row's last real token (`interp.metrics.keep_last`).
    """
    if not last_only:
        return 0
    return 1 if last is None else keep_last(last, 0, copies)


@torch.no_grad()
def clean_resid(
    model: HookedModel,
    tokens: Tensor,
    layers: Sequence[int],
    attention_mask: Optional[Tensor] = None,
    logits_to_keep: LogitsToKeep = 0,
) -> tuple[Tensor, dict[int, Tensor]]:
    """One clean forward: its logits Float[Tensor, "batch kept d_vocab"] (kept = pos unless
    `logits_to_keep`, HF's, selects fewer) and the residual stream entering each of `layers`,
    {layer: Float[Tensor, "batch pos d_model"]}."""
    names = [get_act_name("resid_pre", l) for l in layers]
    logits, cache = model.run_with_cache(tokens, names_filter=names, attention_mask=attention_mask, logits_to_keep=logits_to_keep)
    return logits, {l: cache[n] for l, n in zip(layers, names)}


def chunk_heads(heads: Sequence[int], per_forward: int) -> list[list[int]]:
    """Split one layer's heads into the fewest chunks of at most `per_forward`, as even as possible."""
    if per_forward < 1:
        raise ValueError(f"batch_heads must be >= 1, got {per_forward}")
    n = -(-len(heads) // per_forward)
    size = -(-len(heads) // max(1, n))
    return [list(heads[i : i + size]) for i in range(0, len(heads), size)]


def default_per_forward(model: HookedModel, tokens: Tensor, kept: Optional[int] = None) -> int:
    """Ablations per forward when none is given: every head of a layer, unless the logits would pass LOGITS_BUDGET.

    kept: positions unembedded per prompt (None: all of them; 1 for a last-position metric).
    """
    positions = tokens.shape[1] if kept is None else kept
    one = tokens.shape[0] * positions * model.cfg.d_vocab * torch.finfo(model.dtype).bits // 8
    return max(1, min(model.cfg.n_heads, LOGITS_BUDGET // max(1, one)))


def row_heads(chunk: Sequence[int], batch: int, n_heads: int, device: Union[str, torch.device]) -> Tensor:
    """Bool[Tensor, "copies*batch head"]: True on copy j's head `chunk[j]`, for each of its `batch` rows."""
    sel = torch.zeros(len(chunk), n_heads, dtype=torch.bool, device=device)
    sel[torch.arange(len(chunk), device=device), torch.as_tensor(list(chunk), device=device)] = True
    return sel.repeat_interleave(batch, dim=0)


def kernel_controls_for(kind: AblationKind, sel: Tensor) -> "KernelControls":
    """The kernel controls that remove the heads `sel` [rows, head]: head_uniform for uniform, gate 0 otherwise."""
    from ..kernels.hf import KernelControls  # lazy, as interp.attention: registers with transformers on import

    if kind is AblationKind.UNIFORM:
        return KernelControls(head_uniform=sel)
    return KernelControls(head_gate=(~sel).to(torch.float32))


def z_adder(sel: Tensor, repl: Tensor) -> Callable[[Tensor, HookPoint], Tensor]:
    """A hook_z function adding the replacement z where `sel` [rows, head] is True (z is 0 there: gate 0).

    repl: Float[Tensor, "rows_or_1 pos_or_1 head d_head"], broadcast onto z [rows, pos, head, d_head].
    """
    def fn(z: Tensor, hook: HookPoint) -> Tensor:
        if repl.shape[1] not in (1, z.shape[1]):
            raise ValueError(f"{hook.name}: the reference has {repl.shape[1]} positions but the input has {z.shape[1]}; "
                             "use a reference of the input's length, or the position-averaged mean")
        keep = sel.to(z.device)[:, None, :, None]
        return z + torch.where(keep, repl.to(z.device, z.dtype), torch.zeros((), dtype=z.dtype, device=z.device))

    return fn


def tiled_replacement(repl: Tensor, batch: int, copies: int) -> Tensor:
    """A replacement z [1 or batch, pos_or_1, head, d] for `copies` stacked copies of the batch (copy-major)."""
    if repl.shape[0] == 1:
        return repl
    if repl.shape[0] != batch:
        raise ValueError(f"reference batch {repl.shape[0]} does not match input batch {batch}; pass a reference batch of 1 or {batch}")
    return repl.repeat(copies, 1, 1, 1)


def check_no_pattern_hooks(model: HookedModel, layer: int) -> None:
    """The kernel's controls are skipped on a layer whose scores or pattern are hooked: refuse rather than ignore them."""
    for name in (get_act_name("attn_scores", layer), get_act_name("pattern", layer)):
        if model.hook_dict[name].active:
            raise ValueError(f"{name} has a hook attached, so layer {layer} runs eager attention without kernel "
                             "head gates; remove it, or use backend='eager'")


@torch.no_grad()
def forward_from_layer(
    model: HookedModel,
    layer: int,
    resid: Tensor,
    tokens: Tensor,
    copies: int,
    controls: "KernelControls",
    fwd_hooks: HookSpec = (),
    attention_mask: Optional[Tensor] = None,
    logits_to_keep: LogitsToKeep = 0,
) -> Tensor:
    """Logits Float[Tensor, "copies*batch kept d_vocab"] of `copies` stacked copies, from block `layer` on.

    resid: Float[Tensor, "batch pos d_model"], the clean residual stream entering `layer`;
    controls: the kernel controls of `layer`, their rows [copies*batch, n_heads]. logits_to_keep:
    HF's (0: every position, kept = pos; 1: the last; Long[Tensor, "copies*batch 1"]: one
    position per row, `logits_to_keep_for`).
    """
    check_no_pattern_hooks(model, layer)
    big_mask = attention_mask.repeat(copies, 1) if attention_mask is not None else None
    with model.adapter.skip_blocks(layer, resid.repeat(copies, 1, 1)), model.kernel_controls({layer: controls}), \
            model.hooks(fwd_hooks=fwd_hooks):
        return model(tokens.repeat(copies, 1), attention_mask=big_mask, logits_to_keep=logits_to_keep)


def stacked_head_ablation(
    model: HookedModel,
    tokens: Tensor,
    metric: HeadMetric,
    how: Union[str, AblationKind],
    heads: Sequence[Head],
    repl: Optional[dict[int, Tensor]] = None,
    batch_heads: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
) -> tuple[float, list[tuple[Head, float]]]:
    """Each head of `heads` ablated alone, with stacked kernel controls and forwards started at its layer.

    tokens: Long[Tensor, "batch pos"], already checked (`model.prepare_inputs`); heads: checked
    (layer, head) pairs; repl: {layer: replacement z [1 or batch, 1 or pos, head, d_head]} for mean
    and resample (`interp.heads.ablate.replacements`). batch_heads: ablations per forward (None:
    every head of a layer, within LOGITS_BUDGET). The metric is read per copy with the tokens
    bound (`interp.heads.loss.sweep_metric`: the padding mask reaches token metrics), as
    `interp.heads.sweeps.batched_sweep` does. A metric with `last_position_only` gets logits [batch, 1, d_vocab] from every forward: the last
    position, or in a right-padded batch each prompt's last real token.
    Returns (clean metric, [((layer, head), metric)]) in the order of `heads`.
    """
    kind = AblationKind.parse(how)
    repl = repl or {}
    if kind.needs_reference_activations and any(l not in repl for l, _ in heads):
        raise ValueError(f'how="{kind.value}" needs a replacement z for every swept layer (interp.heads.ablate.replacements)')
    measure, last = sweep_metric(metric, tokens, attention_mask, "stacked_head_ablation")  # last: None unless padded
    last_only = reads_last_position(measure)
    B = tokens.shape[0]
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    logits, resid = clean_resid(model, tokens, sorted(by_layer), attention_mask, logits_to_keep_for(last_only, last))
    clean = float(measure(logits))
    del logits
    per_forward = batch_heads if batch_heads is not None else default_per_forward(model, tokens, 1 if last_only else None)
    found: dict[Head, float] = {}
    for layer, layer_heads in by_layer.items():
        for chunk in chunk_heads(layer_heads, per_forward):
            sel = row_heads(chunk, B, model.cfg.n_heads, model.device)
            hooks = []
            if kind.needs_reference_activations:
                hooks = [(get_act_name("z", layer), z_adder(sel, tiled_replacement(repl[layer], B, len(chunk))))]
            out = forward_from_layer(model, layer, resid[layer], tokens, len(chunk), kernel_controls_for(kind, sel),
                                     hooks, attention_mask, logits_to_keep_for(last_only, last, len(chunk)))
            for j, h in enumerate(chunk):
                found[(layer, h)] = float(measure(out[j * B : (j + 1) * B]))
            del out
    return clean, [((l, h), found[(l, h)]) for l, h in heads]
