"""Activation-patching sweeps on a bundled model: interp against TransformerLens's own functions.

Two sweeps on the same IOI prompt pairs (8 by default, from interp.circuits.tasks.ioi), logit
difference metric, denoising (clean activations into the corrupted run):

  resid_pre   every (layer, position)        TL: get_act_patch_resid_pre
  head z      every (layer, head), all pos   TL: get_act_patch_attn_head_out_all_pos

TransformerLens 4.x runs on its TransformerBridge over a second instance of the same HF
weights (TL 4 has no HookedTransformer). Both sides get the same tokens, the same metric
callable and the same clean activations. Timed in one process, alternating ours and theirs per
sweep, float32, torch.no_grad; the ratio is the thing to read (absolute times depend on load).
The script also reports the largest difference between the two results. A second interp column
runs every patch (`skip_unchanged=False`): the speed-up prompt pairs that share nothing would see,
since IOI pairs differ in one token and share every activation before it.

The model is a bundled name (--model, default smollm2-135m); the bridge loads its converted
checkpoint (interp.models.bundled.bundled_checkpoint).

    python benchmarks/patching.py [--model smollm2-135m] [--pairs 8] [--device cpu|cuda] [--threads N] [--tl-sample N] [--no-record]

Results are printed and appended, dated, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import interp
from interp.circuits.tasks.ioi import ioi_prompts
from interp.metrics import LogitDiff
from interp.models.bundled import bundled_checkpoint
from interp.patching import activation_patch

RESULTS = Path(__file__).with_name("RESULTS.md")
TARGET = 5.0
LABELS = {"smollm2-135m": "SmolLM2-135M"}  # how earlier sections named the default model
SWEEPS = [
    ("resid_pre", "pos", "get_act_patch_resid_pre", ("layer", "pos")),
    ("z", "head", "get_act_patch_attn_head_out_all_pos", ("layer", "head")),
]


def device_string(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def timed(fn):
    """(output, wall seconds, CPU seconds of the process: user + kernel, all threads)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu0 = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, time.process_time() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled model name (interp.models.bundled.BUNDLED)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tl-sample", type=int, default=0,
                        help="time TransformerLens on this many random cells per sweep and scale to the whole sweep "
                             "(one full forward per cell); 0 (default): run its whole sweep")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's own default)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformer_lens.patching as tlp
    from transformer_lens.model_bridge import TransformerBridge

    label = LABELS.get(args.model, args.model)
    ours = interp.load(args.model, device=device)
    directory = bundled_checkpoint(args.model)
    bridge = TransformerBridge.boot_transformers(
        str(directory), hf_model=AutoModelForCausalLM.from_pretrained(directory).to(device),
        tokenizer=AutoTokenizer.from_pretrained(directory), device=str(device),
    )
    pairs = ioi_prompts(ours.tokenizer, args.pairs, seed=0).to(device)
    metric = LogitDiff(pairs.answer_tokens)
    clean, corrupted = pairs.clean_tokens, pairs.corrupted_tokens
    print(f"{label}, {args.pairs} IOI pairs x {clean.shape[1]} tokens, device {device_string(device)}")

    rows, cpu_rows = [], []
    with torch.no_grad():
        _, tl_cache = bridge.run_with_cache(clean)
        for comp, by, tl_name, axes in SWEEPS:
            tl_fn = getattr(tlp, tl_name)
            warm = activation_patch(ours, comp, clean, corrupted, metric, by=by)  # warm-up (allocator, first-call costs)
            cells = torch.cartesian_prod(*[torch.arange(n) for n in warm.values.shape])
            if args.tl_sample and args.tl_sample < len(cells):
                # TL runs one full forward per cell whatever the cell, so its sweep time is the time
                # of a random sample of cells times (cells / sample); its values are compared there
                pick = cells[torch.randperm(len(cells), generator=torch.Generator().manual_seed(0))[: args.tl_sample]]
                index_df = pd.DataFrame(pick.numpy(), columns=list(axes))
                flat, t_sub, c_sub = timed(
                    lambda: tl_fn(bridge, corrupted, tl_cache, metric, index_axis_names=None, index_df=index_df))
                scale = len(cells) / len(pick)
                t_theirs, c_theirs = t_sub * scale, c_sub * scale
            else:
                pick = cells
                theirs, t_theirs, c_theirs = timed(lambda: tl_fn(bridge, corrupted, tl_cache, metric))
                flat = theirs.reshape(-1)
            mine, t_mine, c_mine = timed(lambda: activation_patch(ours, comp, clean, corrupted, metric, by=by))
            every, t_every, c_every = timed(
                lambda: activation_patch(ours, comp, clean, corrupted, metric, by=by, skip_unchanged=False))
            diff = max((r.values[tuple(pick.T)].to(flat.device) - flat.float()).abs().max().item() for r in (mine, every))
            rows.append((f"{comp} by {by}", tuple(mine.values.shape), t_theirs, t_mine, t_theirs / t_mine, t_every,
                         t_theirs / t_every, diff))
            cpu_rows.append((f"{comp} by {by}", c_theirs, c_mine, c_theirs / c_mine, c_every, c_theirs / c_every))

    header = ("| sweep | shape | TL (s) | interp (s) | speed-up | interp, every patch run (s) | speed-up | max abs diff |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = [f"| {name} | {list(shape)} | {a:.1f} | {b:.1f} | **{r:.1f}x** | {e:.1f} | {re:.1f}x | {d:.1e} |"
             for name, shape, a, b, r, e, re, d in rows]
    table = "\n".join([header, *lines])
    # On a machine shared with other jobs the wall clock includes waiting for a core; CPU time does not.
    cpu_header = ("| sweep | TL CPU (s) | interp CPU (s) | speed-up on CPU time | interp, every patch, CPU (s) | speed-up |\n"
                  "|---|---|---|---|---|---|")
    cpu_lines = [f"| {name} | {a:.1f} | {b:.1f} | **{r:.1f}x** | {e:.1f} | {re:.1f}x |" for name, a, b, r, e, re in cpu_rows]
    cpu_table = "\n".join([cpu_header, *cpu_lines])
    print(table)
    print(cpu_table)
    verdict = "met" if all(r[4] >= TARGET for r in rows) else "NOT met"
    print(f"target: >= {TARGET}x faster than TransformerLens: {verdict}")
    if not args.no_record:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with RESULTS.open("a") as f:
            f.write(
                f"\n## patching.py, {stamp}\n\n{args.pairs} IOI pairs x {clean.shape[1]} tokens on {label}, "
                f"{device_string(device)}; torch {torch.__version__}, transformer-lens {version('transformer-lens')}. "
                f"TransformerLens = its `transformer_lens.patching` functions on TransformerBridge. "
                + (f"TL times: {args.tl_sample} random cells per sweep (index_df, seed 0) scaled to the whole sweep; "
                   f"max abs diff over those cells. " if args.tl_sample else "") +
                f"Target >= {TARGET}x: {verdict}.\n\n{table}\n\nThe same sweeps on the process's CPU time:\n\n{cpu_table}\n"
            )


if __name__ == "__main__":
    main()
