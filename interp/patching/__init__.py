"""Activation, attribution and path patching over a clean and a corrupted prompt set (or one PromptPairs).

Activation patching (Vig et al. 2020; Meng et al. 2022; Heimersheim & Nanda, "How to use and
interpret activation patching", 2024) replaces one activation of one run by its value in the
other run and measures a metric on the logits. *Denoising* runs the corrupted prompts and
patches in clean activations; *noising* runs the clean prompts and patches in corrupted ones.
Results are normalised so that the corrupted run scores 0 and the clean run 1.

Shapes follow TransformerLens's `get_act_patch_*` functions: [layer, pos] for residual-stream
components, [layer, head] for a head at every position, [layer, pos, head] for a head at one
position. k and v are indexed by key/value head (GQA), everything else by query head.

The package (one module per job; the shared parts are public to its siblings):

    components.py    Component and Layout: hook name, patch axes, result shape, how a patch writes
    inputs.py        prompt pairs (or one PromptPairs), direction, baselines, source activations
    result.py        PatchResult
    activation.py    activation_patch (exact)
    attribution.py   attribution_patch
    path.py          path_patch (also importable from interp.path_patching)

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

from .activation import activation_patch, changed_positions, first_change
from .attribution import attribution_patch
from .components import AXES, COMPONENTS, Component, Layout, axes_of, component
from .inputs import DIRECTIONS, PatchInputs, PromptPairsLike, patch_inputs, prompt_pair, source_activations
from .path import path_patch
from .result import PatchResult

__all__ = [
    "activation_patch", "attribution_patch", "path_patch", "PatchResult",
    "Component", "Layout", "COMPONENTS", "AXES", "component", "axes_of",
    "DIRECTIONS", "PatchInputs", "PromptPairsLike", "patch_inputs", "prompt_pair", "source_activations",
    "changed_positions", "first_change",
]
