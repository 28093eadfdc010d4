"""Activation-patching sweeps on SmolLM2-135M: interp against TransformerLens's own functions.

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

    python benchmarks/patching.py [--pairs 8] [--device cpu|cuda] [--no-record]

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

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import interp
from interp.circuits.tasks.ioi import ioi_prompts
from interp.metrics import LogitDiff
from interp.models.bundled import bundled_gguf, converted_dir
from interp.patching import activation_patch

RESULTS = Path(__file__).with_name("RESULTS.md")
TARGET = 5.0
SWEEPS = [
    ("resid_pre", "pos", "get_act_patch_resid_pre"),
    ("z", "head", "get_act_patch_attn_head_out_all_pos"),
]


def device_string(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)

    import transformer_lens.patching as tlp
    from transformer_lens.model_bridge import TransformerBridge

    ours = interp.load("smollm2-135m", device=device)
    directory = converted_dir(bundled_gguf("smollm2-135m"))
    bridge = TransformerBridge.boot_transformers(
        str(directory), hf_model=AutoModelForCausalLM.from_pretrained(directory).to(device),
        tokenizer=AutoTokenizer.from_pretrained(directory), device=str(device),
    )
    pairs = ioi_prompts(ours.tokenizer, args.pairs, seed=0).to(device)
    metric = LogitDiff(pairs.answer_tokens)
    clean, corrupted = pairs.clean_tokens, pairs.corrupted_tokens
    print(f"SmolLM2-135M, {args.pairs} IOI pairs x {clean.shape[1]} tokens, device {device_string(device)}")

    rows = []
    with torch.no_grad():
        _, tl_cache = bridge.run_with_cache(clean)
        for comp, by, tl_name in SWEEPS:
            tl_fn = getattr(tlp, tl_name)
            activation_patch(ours, comp, clean, corrupted, metric, by=by)  # warm-up (allocator, first-call costs)
            theirs, t_theirs = timed(lambda: tl_fn(bridge, corrupted, tl_cache, metric))
            mine, t_mine = timed(lambda: activation_patch(ours, comp, clean, corrupted, metric, by=by))
            every, t_every = timed(lambda: activation_patch(ours, comp, clean, corrupted, metric, by=by, skip_unchanged=False))
            diff = max((r.values.to(theirs.device) - theirs.float()).abs().max().item() for r in (mine, every))
            rows.append((f"{comp} by {by}", tuple(mine.values.shape), t_theirs, t_mine, t_theirs / t_mine, t_every,
                         t_theirs / t_every, diff))

    header = ("| sweep | shape | TL (s) | interp (s) | speed-up | interp, every patch run (s) | speed-up | max abs diff |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = [f"| {name} | {list(shape)} | {a:.1f} | {b:.1f} | **{r:.1f}x** | {e:.1f} | {re:.1f}x | {d:.1e} |"
             for name, shape, a, b, r, e, re, d in rows]
    table = "\n".join([header, *lines])
    print(table)
    verdict = "met" if all(r[4] >= TARGET for r in rows) else "NOT met"
    print(f"target: >= {TARGET}x faster than TransformerLens: {verdict}")
    if not args.no_record:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with RESULTS.open("a") as f:
            f.write(
                f"\n## patching.py, {stamp}\n\n{args.pairs} IOI pairs x {clean.shape[1]} tokens on SmolLM2-135M, "
                f"{device_string(device)}; torch {torch.__version__}, transformer-lens {version('transformer-lens')}. "
                f"TransformerLens = its `transformer_lens.patching` functions on TransformerBridge. "
                f"Target >= {TARGET}x: {verdict}.\n\n{table}\n"
            )


if __name__ == "__main__":
    main()
