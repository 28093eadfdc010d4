"""Every single-head ablation of a bundled model: stacked kernel gates from the ablated layer against full forwards.

Both paths are `interp.heads.sweeps.single_head_ablation`, in one process, on the same prompts and
metric, float32, torch.no_grad:

  stacked  backend="stacked" (the default): the ablations of a layer stacked along the batch as
           per-row kernel head gates [copies*batch, head], each forward started at that layer
           from one clean run's residual stream (interp.heads.stacked)
  eager    backend="eager": full forwards with hooks at attn.hook_z, 8 ablations per forward
           (the sweep before issue 15, and the tests' oracle)

for how = zero and mean. --metric picks the metric and the prompts:

  lm_loss     (default) `LMLoss`, the mean next-token loss over every position. The prompts are
              the first --prompts of the bundled domain prompts (interp.data domain_prompts.json,
              prose / code / numbers in turn), each cut to --length tokens; mean ablation
              averages over the next --prompts of them.
  logit_diff  `interp.metrics.LogitDiff`, logit(IO) - logit(S) at the last position, on --prompts
              IOI prompts (`interp.circuits.tasks.ioi.ioi_prompts`, seed 0, the shipped template:
              every prompt one token length, so no padding; --length is not used); mean ablation
              averages over --prompts more IOI prompts (seed 1).

Reported per kind: wall and process CPU seconds of each path, their ratio, and the largest
difference of the per-head metric between the paths. Two "ideal" ratios bound the time ratio:

- decoder-layer rows, eager / stacked: the stacked path skips the layers before the ablated one,
  which over a whole model (SmolLM2: 30 layers x 9 heads) caps the ratio at 30 * 30 / 465 = 1.94
  even with a free unembedding. With lm_loss both paths unembed every position of every row (the
  49152 x 576 unembedding costs about 8 SmolLM2 decoder layers per position), so the time ratio
  stays well below that (1.46-1.57 measured).
- matmul FLOPs, eager / stacked (decoder layers and unembedding; attention scores, norms and the
  metric left out): the same, plus the unembedding. With a last-position metric (logit_diff) the
  stacked path forms only the last position's logits (`logits_to_keep`), while the eager path
  (today's single_head_ablation on an unpadded batch) still unembeds every position; so the
  stacked path also saves (pos - 1) / pos of the unembedding and this bound rises above the
  layer-rows one.

Absolute times depend on the load of the machine; read the ratios.

    python benchmarks/head_ablation.py [--model smollm2-135m] [--metric lm_loss|logit_diff] [--prompts 4] [--length 16]
                                       [--layers 0,15,29] [--threads N] [--no-record]

--layers restricts the sweep to every head of the listed layers (default: every layer, i.e. every
head of the model): on a loaded machine, a few layers spread over the depth (0, 15, 29 of
SmolLM2's 30: mean depth skipped as in the whole sweep) give the same ratio in a tenth of the time.

Results are printed and appended, dated, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import torch

import interp
from interp.heads.loss import LMLoss
from interp.heads.sinks import load_domain_prompts, sink_tokens
from interp.heads.stacked import chunk_heads, default_per_forward
from interp.heads.sweeps import EAGER_BATCH_HEADS, single_head_ablation
from interp.metrics import LogitDiff

RESULTS = Path(__file__).with_name("RESULTS.md")
TARGET = 2.0
KINDS = ("zero", "mean")
METRICS = ("lm_loss", "logit_diff")


def timed(fn):
    """(output, wall seconds, CPU seconds of the process: user + kernel, all threads)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu0 = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, time.process_time() - cpu0


def prompt_texts(n: int, offset: int = 0) -> list[str]:
    """n bundled prompts, domains in turn (prose, code, numbers, prose, ...), skipping the first `offset`."""
    domains = load_domain_prompts()
    names = sorted(domains)
    flat = [domains[names[i % len(names)]][i // len(names)] for i in range(offset + n)]
    return flat[offset:]


def ideal_ratio(model, tokens, layers: list[int]) -> float:
    """Decoder-layer rows of the eager sweep over those of the stacked one (clean runs included)."""
    L, H, B = model.cfg.n_layers, model.cfg.n_heads, tokens.shape[0]
    eager = B * L * (1 + len(layers) * H)
    per = default_per_forward(model, tokens)
    stacked = B * L + sum(B * len(c) * (L - l) for l in layers for c in chunk_heads(list(range(H)), per))
    return eager / stacked


def flop_ratio(model, tokens, layers: list[int], last_only: bool) -> float:
    """Matmul FLOPs of the eager sweep over those of the stacked one: decoder-layer weights and the
    unembedding (every position for eager; the last one only for stacked with a last-position metric).

    Attention scores, norms and the metric are left out (small at these lengths).
    """
    c = model.cfg
    L, H, (B, T) = c.n_layers, c.n_heads, tokens.shape
    mlp_mats = 2 if c.family in ("gpt2", "gpt_neox") else 3  # gated MLPs have three matrices
    layer = 2 * c.d_model * c.n_heads * c.d_head + 2 * c.d_model * c.n_kv_heads * c.d_head + mlp_mats * c.d_model * c.d_mlp
    unembed = c.d_model * c.d_vocab
    kept = 1 if last_only else T
    rows = 1 + len(layers) * H  # the clean run and one copy per head, B prompts each
    eager = rows * B * T * (L * layer + unembed)
    stacked = B * (T * L * layer + kept * unembed) + sum(B * H * (T * (L - l) * layer + kept * unembed) for l in layers)
    return eager / stacked


def benchmark_inputs(model, args):
    """(tokens, mean-ablation reference tokens, metric, the header's description of prompts and metric)."""
    if args.metric == "lm_loss":
        tokens = sink_tokens(model, prompt_texts(args.prompts), args.length)
        reference = sink_tokens(model, prompt_texts(args.prompts, offset=args.prompts), args.length)
        B, T = tokens.shape
        return tokens, reference, LMLoss, f"{B} bundled prompts x {T} tokens; LMLoss; mean over the next {B} bundled prompts"
    from interp.circuits.tasks.ioi import ioi_prompts

    # The shipped template with single-token names: every prompt has one token length (ioi_prompts
    # refuses otherwise), so the batch needs no padding and the eager path is today's, unpadded.
    pairs = ioi_prompts(model, args.prompts, seed=0)
    tokens, reference = pairs.clean_tokens.to(model.device), ioi_prompts(model, args.prompts, seed=1).clean_tokens.to(model.device)
    if tokens.shape[1] != reference.shape[1]:
        raise SystemExit(f"IOI prompts of seeds 0 and 1 differ in length ({tokens.shape[1]} vs {reference.shape[1]})")
    B, T = tokens.shape
    return (tokens, reference, LogitDiff(pairs.answer_tokens.to(model.device)),
            f"{B} IOI prompts (interp.circuits.tasks.ioi, seed 0, one length, unpadded) x {T} tokens; "
            f"LogitDiff (IO - S at the last position, last_position_only); mean over {B} more IOI prompts (seed 1)")


def device_string(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def record(args, device, described, rows, ideal, flops, load0, load1) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=RESULTS.parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "interp", "kernels"], capture_output=True, text=True,
                           cwd=RESULTS.parent.parent).stdout.strip()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines = [
        f"## head_ablation.py, {datetime.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"- device: {device_string(device)}",
        f"- torch {torch.__version__}, transformers {version('transformers')}, interp {version('interp')}",
        f"- interp at commit {commit or 'unknown'}{' (interp files modified)' if dirty else ''}",
        f"- model: {args.model}, float32, no_grad; metric {args.metric}: {described}",
        f"- single-head ablations: {len(rows[0]['heads'])} heads ("
        f"{'every head of the model' if args.layers is None else 'every head of layers ' + args.layers}), "
        "one run per path and kind, stacked first",
        f"- ideal ratio (decoder-layer rows, eager / stacked): {ideal:.2f}; with the unembedding (matmul FLOPs, "
        f"eager / stacked{', stacked unembedding the last position only' if args.metric == 'logit_diff' else ''}): "
        f"{flops:.2f}",
        f"- load average (1 min) at start / end: {load0:.2f} / {load1:.2f} ({os.cpu_count()} cores)",
        f"- peak resident memory of the process: {peak:.1f} GiB",
        "",
        "| how | stacked wall s | eager wall s | wall ratio | stacked CPU s | eager CPU s | CPU ratio | max abs diff metric |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['how']} | {r['s_wall']:.1f} | {r['e_wall']:.1f} | {r['e_wall'] / r['s_wall']:.2f} | "
                     f"{r['s_cpu']:.1f} | {r['e_cpu']:.1f} | {r['e_cpu'] / r['s_cpu']:.2f} | {r['diff']:.2e} |")
    lines += ["", f"Target (issue 15): stacked at least {TARGET:.0f}x faster than eager on CPU:"]
    for r in rows:
        ratio = r["e_cpu"] / r["s_cpu"]
        lines.append(f"- {r['how']}: CPU ratio {ratio:.2f}, wall ratio {r['e_wall'] / r['s_wall']:.2f} -> "
                     f"{'met' if ratio >= TARGET else 'NOT met'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled model name")
    p.add_argument("--metric", choices=METRICS, default="lm_loss",
                   help="lm_loss: LMLoss on the bundled prompts; logit_diff: LogitDiff on IOI prompts")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--length", type=int, default=16, help="tokens per prompt (lm_loss only; IOI prompts have their own)")
    p.add_argument("--layers", default=None, help="comma-separated layers to sweep (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-record", action="store_true", help="print only; don't append to RESULTS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load0 = os.getloadavg()[0]
    model = interp.load(args.model, device=device)
    tokens, reference, metric, described = benchmark_inputs(model, args)
    layers = list(range(model.cfg.n_layers)) if args.layers is None else [int(x) for x in args.layers.split(",")]
    heads = [(l, h) for l in layers for h in range(model.cfg.n_heads)]
    ideal = ideal_ratio(model, tokens, layers)
    flops = flop_ratio(model, tokens, layers, getattr(metric, "last_position_only", False))
    print(f"{args.model}: {args.metric}, {len(heads)} heads, {tokens.shape[0]} prompts x {tokens.shape[1]} tokens, "
          f"{device_string(device)}; eager {EAGER_BATCH_HEADS} ablations per forward; ideal ratio {ideal:.2f} "
          f"(layer rows), {flops:.2f} (matmul FLOPs)", flush=True)
    rows = []
    with torch.no_grad():
        for how in KINDS:
            ref = reference if how == "mean" else None
            fast, s_wall, s_cpu = timed(lambda: single_head_ablation(model, tokens, metric, how=how, reference=ref, heads=heads))
            print(f"  {how} stacked: {s_wall:.1f} s wall, {s_cpu:.1f} s CPU", flush=True)
            slow, e_wall, e_cpu = timed(lambda: single_head_ablation(model, tokens, metric, how=how, reference=ref, heads=heads,
                                                                         backend="eager"))
            print(f"  {how} eager:   {e_wall:.1f} s wall, {e_cpu:.1f} s CPU", flush=True)
            assert fast[["layer", "head"]].equals(slow[["layer", "head"]])
            diff = float((fast.metric - slow.metric).abs().max())
            rows.append({"how": how, "heads": list(zip(fast.layer, fast["head"])), "s_wall": s_wall, "s_cpu": s_cpu,
                         "e_wall": e_wall, "e_cpu": e_cpu, "diff": diff})
    text = record(args, device, described, rows, ideal, flops, load0, os.getloadavg()[0])
    print("\n" + text)
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
