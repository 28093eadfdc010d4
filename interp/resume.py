"""Start a forward part-way through the model, from a run that was already computed.

A patch at layer l leaves layers 0..l-1 untouched, and a patch at position p leaves every
position before p untouched (attention is causal). So a patched forward need not start from
the embeddings: it can start at block l from the cached residual stream, and at position p
with the run's own keys and values for positions < p as a KV cache. This is what makes a
patching sweep cheaper than one full forward per patch.

Blocks before `layer` are skipped by the adapter (`Adapter.skip_blocks`: for the duration of
the call they return the cached residual stream); the HF model's own forward does everything
else (embedding, masks, rotary embeddings, final norm, logits), so there is no
re-implementation. The KV cache is built and read by `interp.models.kv_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .hook_points import HookPoint, get_act_name
from .hooks import HookedModel, contiguous_unembed_input
from .models.kv_cache import cache_from_key_values, forward_with_cache, forward_without_cache, key_values


@dataclass
class RunState:
    """A computed run a patched forward can resume from.

    tokens: Int[Tensor, "batch pos"]; resid_pre[l]: Float[Tensor, "batch pos d_model"];
    keys[l] / values[l]: Float[Tensor, "batch kv_head pos d_head"] as attention saw them
    (after RoPE), or None when the model cannot be resumed mid-sequence.
    """

    tokens: Tensor
    resid_pre: list[Tensor]
    keys: Optional[list[Tensor]]
    values: Optional[list[Tensor]]

    @property
    def can_resume_positions(self) -> bool:
        """Whether `forward_from` may start at a position > 0 (the run kept its keys and values)."""
        return self.keys is not None


def _position_resumable(model: HookedModel) -> bool:
    # A sliding-window KV cache keeps only the last window of keys, so slicing it at p is
    # not the run's prefix: such models always resume at position 0.
    cfg = model.cfg
    return cfg.sliding_window is None and not any("sliding" in t for t in (cfg.layer_types or ()))


@torch.no_grad()
def capture_run(model: HookedModel, tokens: Tensor) -> RunState:
    """One forward of `tokens` that records resid_pre at every layer and the KV cache."""
    names = [get_act_name("resid_pre", layer) for layer in range(model.cfg.n_layers)]
    resumable = _position_resumable(model)
    store: dict[str, Tensor] = {}

    def save(x: Tensor, hook: HookPoint) -> None:
        store[hook.name] = x.detach().clone()

    keys = values = None
    with model.hooks(fwd_hooks=[(n, save) for n in names]), contiguous_unembed_input(model.hf_model):
        if resumable:
            _, cache = forward_with_cache(model.hf_model, tokens, None, logits_to_keep=1)
            keys, values = (list(kv) for kv in zip(*key_values(cache)))
        else:
            forward_without_cache(model.hf_model, tokens, logits_to_keep=1)
    return RunState(tokens, [store[n] for n in names], keys, values)


def forward_from(
    model: HookedModel,
    run: RunState,
    layer: int,
    start_pos: int = 0,
    copies: int = 1,
    logits_to_keep: Union[int, Tensor] = 0,
) -> Tensor:
    """Logits of the run's tokens, `copies` times over, computed from block `layer` and position `start_pos`.

    Rows are copy-major: row j * batch + i is copy j of prompt i. Hooks attached to the model
    fire as usual at layers >= `layer`, seeing positions start_pos.. only. Returns
    Float[Tensor, "copies*batch kept d_vocab"], kept = pos - start_pos (or `logits_to_keep`: HF's, an
    int n for the last n positions, 0 for all, or Long[Tensor, "copies*batch 1"] one position per row,
    counted from start_pos, as `interp.metrics.keep_last` makes for a padded batch).
    """
    if start_pos and not run.can_resume_positions:
        raise ValueError(f"{model.cfg.family} uses sliding-window attention: this run can only resume at position 0")
    if not 0 <= start_pos < run.tokens.shape[1]:
        raise ValueError(f"start_pos {start_pos} outside the run's {run.tokens.shape[1]} positions")
    tokens = run.tokens[:, start_pos:].repeat(copies, 1)
    cache = None
    if start_pos:
        # Skipped blocks never read their cache, which only has to tell the model how many
        # positions came before: a one-row view will do there, instead of `copies` copies.
        cache = cache_from_key_values(
            [
                (k[:, :, :start_pos].repeat(copies, 1, 1, 1), v[:, :, :start_pos].repeat(copies, 1, 1, 1)) if i >= layer
                else (k[:1, :, :start_pos], v[:1, :, :start_pos])
                for i, (k, v) in enumerate(zip(run.keys, run.values))
            ],
            model.hf_model,
        )
    resid = run.resid_pre[layer][:, start_pos:].repeat(copies, 1, 1)
    with model.adapter.skip_blocks(layer, resid), contiguous_unembed_input(model.hf_model):
        if cache is None:
            out = forward_without_cache(model.hf_model, tokens, logits_to_keep=logits_to_keep)
        else:
            out, _ = forward_with_cache(model.hf_model, tokens, cache, logits_to_keep=logits_to_keep)
    return out.logits
