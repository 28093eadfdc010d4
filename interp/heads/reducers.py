"""Reducers: per-layer attention statistics of one forward, never the [batch, head, q, k] patterns.

The head analyses need per-key attention mass (sinks), per-query entropy and top-1 keys
(retrieval), and per-token norms (extreme tokens). Two engines compute the attention statistics:

- "kernel" (the default, on every device): every layer's attention runs through
  `interp.kernels` with `stats=`, which streams the statistics in O(T x block) memory -- the
  PyTorch reference backend on CPU, Triton on CUDA ("reference" / "triton" force one). The
  forward keeps only the last position's logits (`logits_to_keep=1`).
- "eager": a read hook on each layer's `attn.hook_pattern` reduces the pattern inside the
  forward (the layer runs eager attention and forms its [batch, head, T, T] pattern, which dies
  with the layer). This is the oracle the tests compare the kernel against.

A layer with a hook on `attn.hook_pattern` or `attn.hook_attn_scores` attached runs eager
attention whatever the engine (the hook needs the pattern): then the statistics come from the
eager path, so an edit hook on the pattern is seen by both engines.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..hook_points import HookPoint
from ..hooks import HookedModel

# (model, tokens [batch, pos]) -> per-key column sums [batch, layer, head, pos] (fp32)
ColSumSource = Callable[[HookedModel, Tensor], Tensor]

ENGINES = ("kernel", "eager", "reference", "triton")
STAT_NAMES = ("col_sum", "row_max", "row_argmax", "row_entropy")
_KERNEL_BACKEND = {"kernel": "auto", "reference": "reference", "triton": "triton"}


def check_engine(backend: str) -> str:
    """The engine name, checked: "kernel" (default), "eager", "reference" or "triton"."""
    if backend not in ENGINES:
        raise ValueError(f"backend must be one of {ENGINES}, got {backend!r} ('eager' = the pattern-hook path).")
    return backend


def pattern_hooked(model: HookedModel, layers: Sequence[int]) -> bool:
    """Whether a hook on `attn.hook_pattern` / `attn.hook_attn_scores` of one of `layers` is attached."""
    names = [f"blocks.{l}.attn.hook_{h}" for l in layers for h in ("pattern", "attn_scores")]
    return any(model.hook_dict[n].active for n in names if n in model.hook_dict)


@torch.no_grad()
def reduce_per_layer(
    model: HookedModel,
    tokens: Tensor,
    hook: str,
    reduce: Callable[[Tensor], Tensor],
    layers: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
    logits_to_keep: Optional[int] = None,
) -> Tensor:
    """Run the model once with a read hook on `blocks.{l}.{hook}` that keeps `reduce(activation)`.

    Returns the statistics stacked along a new leading axis: [layer, *reduce's shape].
    `logits_to_keep=1` skips the [batch, pos, vocab] logits (HF's argument).
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    out: dict[int, Tensor] = {}

    def keep(x: Tensor, hook: HookPoint) -> None:
        out[hook.layer()] = reduce(x)

    names = [f"blocks.{l}.{hook}" for l in layers]
    for n in names:
        model.add_hook(n, keep, edits=False)
    try:
        kw = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        model(tokens, attention_mask=attention_mask, **kw)
    finally:
        for n in names:
            model.remove_hook(n, keep)
    missing = [l for l in layers if l not in out]
    if missing:
        raise RuntimeError(f"hook {hook!r} did not fire at layers {missing}")
    return torch.stack([out[l] for l in layers])


def col_sums_of_pattern(pattern: Tensor) -> Tensor:
    """Float[Tensor, "batch head q k"] -> Float[Tensor, "batch head k"]: sum_i A[i, k] in fp32.

    The causal mask already makes A[i, k] = 0 for i < k, so this is the sum over queries i >= k.
    """
    return pattern.float().sum(dim=-2)


def stats_of_pattern(pattern: Tensor, stats: Sequence[str]) -> dict[str, Tensor]:
    """The kernel's statistics from a whole pattern Float[Tensor, "batch head q k"] (fp32).

    col_sum [batch, head, k] = sum_i A[i, k]; row_max, row_argmax (first on ties), row_entropy
    (-sum_k A log A, nats) [batch, head, q] -- the definitions of `interp.kernels.AttentionStats`.
    """
    a = pattern if pattern.dtype == torch.float64 else pattern.float()
    fns = {
        "col_sum": lambda: a.sum(dim=-2),
        "row_max": lambda: a.amax(dim=-1),
        "row_argmax": lambda: a.argmax(dim=-1),
        "row_entropy": lambda: -torch.special.xlogy(a, a).sum(dim=-1),
    }
    return {s: fns[s]() for s in stats}


def _check_stats(stats: Sequence[str]) -> tuple[str, ...]:
    bad = [s for s in stats if s not in STAT_NAMES]
    if bad or not stats:
        raise ValueError(f"stats must be a non-empty subset of {STAT_NAMES}, got {list(stats)}")
    return tuple(dict.fromkeys(stats))


@torch.no_grad()
def collect_attention_stats(
    model: HookedModel,
    tokens: Tensor,
    stats: Sequence[str] = ("col_sum",),
    layers: Optional[Sequence[int]] = None,
    backend: str = "kernel",
    attention_mask: Optional[Tensor] = None,
    block_size: Optional[int] = None,
) -> dict[str, Tensor]:
    """Attention statistics of every layer in one forward: {name: Tensor[batch, layer, head, pos]}.

    stats: from ("col_sum", "row_max", "row_argmax", "row_entropy") (`interp.kernels.AttentionStats`);
    col_sum is per key, the others per query. Floats fp32 (float64 for a float64 model), argmax
    Long. backend: "kernel" (default; `interp.kernels`, O(T x block) memory), "reference" /
    "triton" (one kernel backend), or "eager" (the pattern-hook oracle). `block_size`: the kernel's.
    """
    stats = _check_stats(stats)
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    if check_engine(backend) == "eager" or pattern_hooked(model, layers):
        per_layer = _eager_stats(model, tokens, stats, layers, attention_mask)
    else:
        per_layer = _kernel_stats(model, tokens, stats, layers, _KERNEL_BACKEND[backend], attention_mask, block_size)
    return {s: torch.stack([per_layer[l][s] for l in layers], dim=1) for s in stats}


def _eager_stats(model: HookedModel, tokens: Tensor, stats: tuple[str, ...], layers: list[int],
                 attention_mask: Optional[Tensor]) -> dict[int, dict[str, Tensor]]:
    """The oracle: each layer's pattern reduced inside its `attn.hook_pattern` (full logits, as before)."""
    out: dict[int, dict[str, Tensor]] = {}

    def keep(a: Tensor, hook: HookPoint) -> None:
        out[hook.layer()] = stats_of_pattern(a, stats)

    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    for n in names:
        model.add_hook(n, keep, edits=False)
    try:
        model(tokens, attention_mask=attention_mask)
    finally:
        for n in names:
            model.remove_hook(n, keep)
    missing = [l for l in layers if l not in out]
    if missing:
        raise RuntimeError(f"hook 'attn.hook_pattern' did not fire at layers {missing}")
    return out


def kernel_controls_with_stats(model: HookedModel, layers: Sequence[int], stats: Sequence[str],
                               on_stats: Callable[[int, object], None], backend: str = "auto",
                               block_size: Optional[int] = None) -> dict[int, object]:
    """{layer: KernelControls} asking `layers` for `stats`, keeping any controls already set there
    (head gates, uniform heads, a previous `on_stats`, which is still called). `on_stats(layer, stats)`."""
    from ..kernels.hf import KernelControls, get_controls

    out = {}
    for l in layers:
        module = model.adapter.layers[l].attn
        old = get_controls(module)

        def record(m: nn.Module, st: object, layer: int = l, prev: Optional[Callable] = getattr(old, "on_stats", None)) -> None:
            if prev is not None:
                prev(m, st)
            on_stats(layer, st)

        base = old if old is not None else KernelControls(backend=backend, block_size=block_size)
        wanted = tuple(dict.fromkeys([*(base.stats if old is not None and old.on_stats else ()), *stats]))
        out[l] = dataclasses.replace(base, stats=wanted, on_stats=record)
    return out


def _kernel_stats(model: HookedModel, tokens: Tensor, stats: tuple[str, ...], layers: list[int], backend: str,
                  attention_mask: Optional[Tensor], block_size: Optional[int]) -> dict[int, dict[str, Tensor]]:
    """Every layer through `interp.kernels` with `stats=`; only the last position's logits are formed."""
    got: dict[int, dict[str, Tensor]] = {}
    row = {l: i for i, l in enumerate(layers)}
    store: dict[str, Tensor] = {}

    def keep(layer: int, st: object) -> None:
        # Copied into one tensor per statistic for all layers, allocated once: results allocated
        # layer after layer in the middle of the forward pinned the CPU allocator's heap under each
        # layer's temporaries and grew resident memory over the forward (2x SDPA's peak at 4K).
        kept = {}
        for s in stats:
            t = getattr(st, s)
            if s not in store:
                store[s] = t.new_empty(len(layers), *t.shape)
            kept[s] = store[s][row[layer]].copy_(t) if store[s].shape[1:] == t.shape else t.clone()
        got[layer] = kept

    with model.kernel_controls(kernel_controls_with_stats(model, layers, stats, keep, backend, block_size)):
        model(tokens, attention_mask=attention_mask, logits_to_keep=1)
    missing = [l for l in layers if l not in got]
    if missing:
        raise RuntimeError(f"the kernel did not run at layers {missing}; use backend='eager'")
    return got


def collect_col_sums(model: HookedModel, tokens: Tensor, layers: Optional[Sequence[int]] = None,
                     backend: str = "kernel") -> Tensor:
    """Per-key attention received, summed over queries: Float[Tensor, "batch layer head pos"] (fp32).

    backend "kernel" (default): streamed by `interp.kernels`; "eager": reduced inside each layer's
    `attn.hook_pattern`. Either way no pattern is stored.
    """
    return collect_attention_stats(model, tokens, ("col_sum",), layers, backend)["col_sum"]
