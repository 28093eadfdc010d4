"""Forward-pass overhead of the hook layer on a bundled model, against bare HF and TransformerLens.

What it measures: wall-clock time of one forward pass over a batch of random token ids
(fixed seed; default 8 x 256), float32, under torch.no_grad, for

  (a) bare HF          the HF model, its own instance, attn_implementation="sdpa", not wrapped
  (b) hooked, no hooks interp's HookedModel with nothing attached: model(tokens)
  (c) run_with_cache   names_filter=None: every hook point but the opt-in hook_result (as in
                       TransformerLens); patterns make attention run eager
  (d) cache, no pattern the same set less hook_pattern / hook_attn_scores (attention stays SDPA)
  (e) TL bridge        TransformerLens's TransformerBridge.run_with_cache (caches everything)

The model is a bundled name (--model, default smollm2-135m); bare HF and the bridge load its
converted checkpoint (interp.models.bundled.bundled_checkpoint).

Each variant runs once to warm up, then the variants are interleaved round-robin for --reps
rounds, so drift in machine load hits all of them alike. Reported: median seconds and the ratio
to (a) from this same run (the minimum too, as a hint of how noisy the machine was), and the
median kernel CPU time per call: caching gigabytes touches fresh memory, and the page faults land
on whichever variant grows the process's heap past what the allocator kept from the one before
(on a VM they are expensive), so a large kernel time means part of that variant's time is the
allocator's, not compute. It also reports the median CPU seconds (user + kernel, all threads) and
their ratio to (a): on a machine shared with other jobs the wall clock includes waiting for a core,
the CPU time does not. The script also checks that (b)'s logits equal (a)'s exactly.

The bridge's cache is estimated first from a one-row run; if the full batch would not fit in
--mem-budget-gib, the bridge runs at the largest batch that does, and the table says so.

    python benchmarks/hook_overhead.py [--model smollm2-135m] [--batch 8] [--seq 256] [--reps 5] [--device cpu|cuda]
        [--threads N]

Results are printed and appended, dated, to benchmarks/RESULTS.md (--no-record to skip).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import resource
import statistics
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import interp
from interp.models.bundled import bundled_checkpoint

RESULTS = Path(__file__).with_name("RESULTS.md")
NO_PATTERN = ("hook_pattern", "hook_attn_scores")
TARGET_NO_HOOKS = 1.05  # (b) / (a)
TARGET_FULL_CACHE = 1.3  # (c) / (a), and (c) faster than (e)


def device_string(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads"


def git_state() -> str:
    """HEAD of the checkout, marked dirty when interp's own files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "interp", "circuits", "kernels"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' (interp files modified)' if dirty else ''}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float, object]:
    """Wall seconds, kernel CPU seconds (mostly first-touch page faults of fresh memory), CPU seconds
    (user + kernel, all of the process's threads), output."""
    sync(device)
    r0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn()
    sync(device)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return time.perf_counter() - start, r1.ru_stime - r0.ru_stime, cpu, out


def logits_of(out) -> torch.Tensor:
    """Variants return logits, an HF output, or (logits, cache)."""
    if isinstance(out, tuple):
        out = out[0]
    return out.logits if hasattr(out, "logits") else out


def cache_bytes(cache) -> int:
    """Bytes held by a cache's tensors, counting shared storage once (TL aliases hook_in/hook_out)."""
    storages = {}
    for t in cache.values():
        s = t.untyped_storage()
        storages[(s.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())


def boot_bridge(directory: Path, device: torch.device):
    from transformer_lens.model_bridge import TransformerBridge

    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").to(device)
    tok = AutoTokenizer.from_pretrained(directory)
    return TransformerBridge.boot_transformers(str(directory), hf_model=hf, tokenizer=tok, device=str(device))


def bridge_batch(bridge, tokens: torch.Tensor, budget: float) -> tuple[int, float]:
    """Largest batch whose full bridge cache fits in `budget` bytes, estimated from one row."""
    _, cache = bridge.run_with_cache(tokens[:1])
    per_row = cache_bytes(cache)
    del cache
    return max(0, min(tokens.shape[0], int(budget // per_row))), per_row


def record(args, device: torch.device, rows: list[dict], checks: list[str], verdicts: list[str]) -> str:
    lines = [
        f"## hook_overhead.py, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- device: {device_string(device)}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, "
        f"transformer-lens {version('transformer-lens')}, interp {interp.__version__}",
        f"- interp at commit {git_state()}",
        f"- model: {args.model} (bundled, converted checkpoint), float32",
        f"- input: batch {args.batch} x seq {args.seq} random token ids (seed {args.seed}), float32, no_grad",
        f"- {args.reps} interleaved repetitions after one warm-up each; median seconds; ratio to (a) of this run",
        f"- load average (1 min) at start / end: {args.load_start:.2f} / {os.getloadavg()[0]:.2f} (2 cores)",
        f"- peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB",
        "",
        "| variant | median s | ratio to bare HF | min s | kernel CPU s | CPU s | CPU ratio | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sec = f"{r['median']:.3f}" if r["median"] is not None else "-"
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        low = f"{r['min']:.3f}" if r["min"] is not None else "-"
        ksec = f"{r['sys']:.2f}" if r["sys"] is not None else "-"
        csec = f"{r['cpu']:.2f}" if r.get("cpu") is not None else "-"
        cratio = f"{r['cpu_ratio']:.3f}" if r.get("cpu_ratio") is not None else "-"
        lines.append(f"| {r['name']} | {sec} | {ratio} | {low} | {ksec} | {csec} | {cratio} | {r['note']} |")
    lines += ["", *[f"- {c}" for c in checks], "", "Targets (from the issue):", "", *[f"- {v}" for v in verdicts], ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled model name (interp.models.bundled.BUNDLED)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's own default)")
    p.add_argument("--mem-budget-gib", type=float, default=10.0, help="largest bridge cache allowed")
    p.add_argument("--no-record", action="store_true", help="print only; don't append to RESULTS.md")
    args = p.parse_args()
    args.load_start = os.getloadavg()[0]
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    directory = bundled_checkpoint(args.model)  # converts once, then returns the cached directory
    bare = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").to(device).eval()
    model = interp.load(args.model, device=device)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, bare.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    everything = model.resolve_names(None)
    no_pattern = [n for n in everything if not n.endswith(NO_PATTERN)]

    variants: dict[str, Callable[[], object]] = {
        "(a) bare HF": lambda: bare(input_ids=tokens, use_cache=False),
        "(b) hooked, no hooks": lambda: model(tokens),
        "(c) run_with_cache, names_filter=None": lambda: model.run_with_cache(tokens),
        "(d) run_with_cache, no pattern/scores": lambda: model.run_with_cache(tokens, names_filter=no_pattern),
    }
    notes = {
        "(a) bare HF": "AutoModelForCausalLM, sdpa",
        "(b) hooked, no hooks": "model(tokens)",
        "(c) run_with_cache, names_filter=None": f"{len(everything)} of {len(model.hook_names())} hook points",
        "(d) run_with_cache, no pattern/scores": f"{len(no_pattern)} hook points, attention on SDPA",
    }
    failed: dict[str, str] = {}
    smaller_batch: set[str] = set()  # variants run on fewer rows: no ratio
    bridge_name = "(e) TL bridge run_with_cache"
    try:
        bridge = boot_bridge(directory, device)
        n, per_row = bridge_batch(bridge, tokens, args.mem_budget_gib * 2**30)
        est = per_row * args.batch / 2**30
        print(f"bridge cache estimate: {per_row / 2**20:.0f} MiB per row -> {est:.1f} GiB at batch {args.batch}")
        if n == 0:
            raise MemoryError(f"one row's cache ({per_row / 2**30:.1f} GiB) exceeds the {args.mem_budget_gib} GiB budget")
        bridge_tokens = tokens[:n]
        if n < args.batch:
            bridge_name = f"(e) TL bridge run_with_cache, batch {n}"
            smaller_batch.add(bridge_name)
            notes[bridge_name] = f"full batch would cache {est:.1f} GiB > {args.mem_budget_gib} GiB budget; not comparable"
        variants[bridge_name] = lambda: bridge.run_with_cache(bridge_tokens)
        notes.setdefault(bridge_name, f"caches everything ({est:.1f} GiB est.)")
    except Exception as e:  # report why in the table rather than crash
        failed[bridge_name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}"

    # Warm up once each. Logits are compared with (a)'s as they come; caches are dropped at once.
    checks: list[str] = []
    a = None
    for name, fn in list(variants.items()):
        try:
            *_, out = timed(fn, device)
        except Exception as e:
            failed[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
            del variants[name]
            continue
        logits = logits_of(out)
        if a is None:
            a = logits
        elif name.startswith(("(b)", "(d)")):
            checks.append(f"{name[:3]} logits == (a) logits exactly: {torch.equal(logits, a)}")
        elif logits.shape == a.shape:
            diff = (logits.float() - a.float()).abs().max().item()
            checks.append(f"{name[:3]} max |logits - (a) logits|: {diff:.2e}")
        del out, logits
        gc.collect()
    del a
    for c in checks:
        print(c)

    times: dict[str, list[float]] = {name: [] for name in variants}
    kernel: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.reps):
        for name, fn in variants.items():
            seconds, sys_seconds, cpu_seconds, out = timed(fn, device)
            del out
            gc.collect()
            times[name].append(seconds)
            kernel[name].append(sys_seconds)
            cpu[name].append(cpu_seconds)
            print(f"rep {rep + 1}/{args.reps}  {name:<40} {seconds:8.3f} s  (kernel {sys_seconds:.2f} s, CPU {cpu_seconds:.2f} s)",
                  flush=True)

    base = statistics.median(times["(a) bare HF"])
    base_cpu = statistics.median(cpu["(a) bare HF"])
    rows = []
    for name in [*variants, *failed]:
        med = statistics.median(times[name]) if name in times else None
        comparable = med is not None and name not in smaller_batch
        low = min(times[name]) if name in times else None
        sys_med = statistics.median(kernel[name]) if name in kernel else None
        cpu_med = statistics.median(cpu[name]) if name in cpu else None
        rows.append(dict(name=name, median=med, ratio=med / base if comparable else None, min=low, sys=sys_med, cpu=cpu_med,
                         cpu_ratio=cpu_med / base_cpu if comparable else None,
                         note=failed.get(name, notes.get(name, ""))))
    print(f"\n{'variant':<42} {'median s':>9} {'ratio':>7} {'min s':>8} {'kernel s':>9} {'CPU s':>7} {'CPU ratio':>9}")
    for r in rows:
        sec = f"{r['median']:.3f}" if r["median"] is not None else "-"
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        low = f"{r['min']:.3f}" if r["min"] is not None else "-"
        ksec = f"{r['sys']:.2f}" if r["sys"] is not None else "-"
        csec = f"{r['cpu']:.2f}" if r["cpu"] is not None else "-"
        cratio = f"{r['cpu_ratio']:.3f}" if r["cpu_ratio"] is not None else "-"
        print(f"{r['name']:<42} {sec:>9} {ratio:>7} {low:>8} {ksec:>9} {csec:>7} {cratio:>9}  {r['note']}")

    ratio = {r["name"][:3]: r["ratio"] for r in rows}
    med = {r["name"][:3]: r["median"] for r in rows}
    cpu_ratio = {r["name"][:3]: r["cpu_ratio"] for r in rows}
    verdicts = [
        f"no-hook overhead < 5%: (b)/(a) = {ratio['(b)']:.3f} -> {'met' if ratio['(b)'] < TARGET_NO_HOOKS else 'NOT met'}",
        f"full run_with_cache < {TARGET_FULL_CACHE}x bare forward: (c)/(a) = {ratio['(c)']:.3f} -> "
        f"{'met' if ratio['(c)'] < TARGET_FULL_CACHE else 'NOT met'}",
    ]
    if ratio.get("(e)") is not None:
        verdicts.append(f"full run_with_cache faster than the bridge's: (c) {med['(c)']:.3f} s vs (e) {med['(e)']:.3f} s -> "
                        f"{'met' if med['(c)'] < med['(e)'] else 'NOT met'}")
    else:
        verdicts.append("full run_with_cache faster than the bridge's: not assessed (the bridge did not run at this batch)")
    # On a shared machine the wall clock includes time spent waiting for a core; the process's CPU
    # time does not. Both are from this run, the wall clock first (the targets' own measure).
    cpu_verdicts = [f"on CPU time: (b)/(a) = {cpu_ratio['(b)']:.3f}, (c)/(a) = {cpu_ratio['(c)']:.3f}"
                    + (f", (e)/(a) = {cpu_ratio['(e)']:.3f}" if cpu_ratio.get("(e)") is not None else "")]
    verdicts += cpu_verdicts
    print()
    for v in verdicts:
        print(v)
    if not args.no_record:
        section = record(args, device, rows, checks, verdicts)
        header = "" if RESULTS.exists() else "# Benchmark results\n\nSections are appended by the scripts in this folder, newest last.\n\n"
        with RESULTS.open("a") as f:
            f.write(header + section + "\n")
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
