"""Long-context head analyses on CPU: the kernel engine against a plain forward and the eager hooks.

SmolLM2-135M (`interp.load("smollm2-135m")`, float32, 9 query / 3 KV heads, max_position_embeddings
8192: 16K and 32K run past it with plain RoPE extrapolation -- the statistics are still
computed exactly; what the model does there is not the point) with the sink and entropy
statistics (`interp.heads.sinks.sink_and_entropy`: Gu et al.'s alpha(k) and -sum A log A) at 4K,
8K, 16K and 32K tokens. Each case runs in a FRESH subprocess and reports its peak resident memory
(ru_maxrss, and VmHWM minus the RSS after loading, with the counter reset through
/proc/self/clear_refs) and its time:

  (a) sdpa    hf_model(ids, use_cache=False, logits_to_keep=1): a plain SDPA forward
  (b) eager   sink_and_entropy(..., backend="eager"): today's pattern-hook path, which forms each
              layer's [1, 9, T, T] pattern and its softmax temporaries. Skipped (and said so)
              when its estimated memory, EAGER_COPIES fp32 copies of one layer's pattern, exceeds
              --eager-budget-gb (12 by default): the machine is not run out of memory.
  (c) kernel  sink_and_entropy(...): interp.kernels' reference backend (CPU), O(T x block) memory.

Time ratios (c)/(a) and (b)/(a) are taken within one invocation of this script. NIAH retrieval
scoring (`score_retrieval`, kernel engine) at 8K and 16K reports accuracy and peak memory.

--layers k keeps the first k decoder layers (the others are dropped from the loaded model): each
layer runs the same attention at the same length, so peak memory above the baseline and the time
ratios per layer are those of the whole model, and the run fits in the time this shared 2-core
machine allows. Retrieval always uses the whole model (accuracy needs it).
The Llama-3-8B numbers (32 query / 8 KV heads, head dim 128, bf16) are on paper, from the
kernel's block sizes (interp.kernels.reference.default_rows / SLAB_ELEMENTS).

    python benchmarks/long_context.py [--lengths 4096 8192 16384 32768] [--layers 30] [--niah 8192 16384]
                                      [--case-timeout 900] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
EAGER_COPIES = 3  # scores, pattern, and the reducer's float temporaries of one layer
N_HEADS, N_KV, D_HEAD = 9, 3, 64


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def eager_estimate_gb(T: int, heads: int = N_HEADS, bytes_per: int = 4) -> float:
    """Memory of the eager path's one-layer peak: EAGER_COPIES copies of [1, heads, T, T]."""
    return EAGER_COPIES * heads * T * T * bytes_per / 1e9


def load_model(layers: int):
    import interp

    model = interp.load("smollm2-135m")
    if layers < model.cfg.n_layers:  # benchmark-only surgery: keep the first `layers` decoder layers
        hf = model.hf_model
        hf.model.layers = hf.model.layers[:layers]
        hf.config.num_hidden_layers = layers
        if getattr(hf.config, "layer_types", None):
            hf.config.layer_types = hf.config.layer_types[:layers]
        model = interp.load(hf, tokenizer=model.tokenizer)
    return model


def child(case: str, T: int, layers: int, calls: int = 1) -> dict:
    import torch

    from interp.heads import sinks

    model = load_model(layers if case != "niah" else 10**9)
    ids = torch.randint(100, 40000, (1, T), generator=torch.Generator().manual_seed(0))
    if case == "niah":
        from interp.heads.niah import make_samples

        samples = make_samples(model.tokenizer, [T], [0.25, 0.75], seed=0)
    with torch.no_grad():  # page in the memory-mapped weights: not the case's memory
        model.hf_model(input_ids=ids[:, :32], use_cache=False, logits_to_keep=1)
    gc.collect()
    base = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    extra: dict = {}
    times = []
    for _ in range(calls if case != "niah" else 1):  # call 1 is cold (first touch of every buffer); later calls warm
        t0 = time.perf_counter()
        with torch.no_grad():
            if case == "sdpa":
                model.hf_model(input_ids=ids, use_cache=False, logits_to_keep=1)
            elif case in ("eager", "kernel"):
                alpha, ent = sinks.sink_and_entropy(model, ids, backend=case)
                extra["sink_rate"] = sinks.sink_rate(alpha)
                extra["mean_entropy"] = float(ent.mean())
                del alpha, ent
            elif case == "niah":
                from interp.heads.retrieval import score_retrieval

                res = score_retrieval(model, samples, max_new_tokens=8, batch_size=1)
                extra["accuracy"] = float(res.samples.correct.mean())
                extra["responses"] = res.samples.response.tolist()
                extra["heads_above_0.1"] = int((res.scores.retrieval_score > 0.1).sum())
        times.append(time.perf_counter() - t0)
        gc.collect()
    seconds = times[-1]
    return dict(case=case, T=T, layers=model.cfg.n_layers, seconds=seconds, times=times, base_kib=base, hwm_kib=_status_kib("VmHWM"),
                ru_maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, **extra)


def run_case(case: str, T: int, layers: int, timeout: float, calls: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--T", str(T), "--layers", str(layers), "--calls", str(calls)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(case=case, T=T, skipped=f"stopped after {timeout:.0f} s (time budget of this run)")
    if out.returncode != 0:
        return dict(case=case, T=T, skipped=f"failed: {out.stderr.strip().splitlines()[-1][:200] if out.stderr else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama3_8b_on_paper(T: int) -> dict:
    """Attention memory of one layer, Llama-3-8B (32 / 8 heads, d 128, bf16), batch 1, on paper."""
    from interp.kernels.reference import MIN_ROWS, SLAB_ELEMENTS

    h, hk, d = 32, 8, 128
    eager = EAGER_COPIES * h * T * T * 2  # bf16 scores / pattern / softmax temporaries
    rows = max(MIN_ROWS, min(SLAB_ELEMENTS // (h * T), T, 1024))
    slab = h * rows * T * 4  # fp32 scores of one query block, softmax in place
    kv_fp32 = 2 * hk * T * d * 4  # K and V cast to the fp32 accumulation dtype
    stats = (h * T * 4) * 3  # col_sum, entropy, lse-sized vectors
    return dict(eager_gb=eager / 1e9, kernel_gb=(2 * slab + kv_fp32 + stats) / 1e9, rows=rows)


def gib(kib: float) -> float:
    return kib / 1024**2


def fmt_row(r: dict, sdpa: dict | None) -> str:
    """One table row: memory, the cold (first) and warm (last) call's seconds and their ratios to (a)'s."""
    if "skipped" in r:
        return f"| {r['T']} | {r['case']} | - | - | - | - | - | - | {r['skipped']} |"
    above = gib(r["hwm_kib"] - r["base_kib"])
    cold, warm = r["times"][0], r["times"][-1]
    ok = sdpa is not None and "times" in sdpa and r is not sdpa
    ratio_cold = f"{cold / sdpa['times'][0]:.2f}" if ok else ("1" if r is sdpa else "-")
    ratio_warm = f"{warm / sdpa['times'][-1]:.2f}" if ok and len(r["times"]) > 1 else ("1" if r is sdpa and len(r["times"]) > 1 else "-")
    warm_s = f"{warm:.1f}" if len(r["times"]) > 1 else "-"
    note = ""
    if "sink_rate" in r:
        note = f"Sink_1^0.3 {r['sink_rate']:.1f}%, mean entropy {r['mean_entropy']:.3f} nats"
    if "accuracy" in r:
        note = f"accuracy {r['accuracy']:.2f} ({r['responses']}), heads > 0.1: {r['heads_above_0.1']}"
    return (f"| {r['T']} | {r['case']} | {gib(r['ru_maxrss_kib']):.2f} | {above:.2f} | {cold:.1f} | {ratio_cold} | "
            f"{warm_s} | {ratio_warm} | {note} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    p.add_argument("--niah", type=int, nargs="*", default=[8192, 16384])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--eager-budget-gb", type=float, default=12.0)
    p.add_argument("--case-timeout", type=float, default=900.0)
    p.add_argument("--calls", type=int, default=2, help="calls per case in its subprocess: the first is cold, the last warm")
    p.add_argument("--warm-max-length", type=int, default=16384,
                   help="longer cases (and the eager path) are called once: cold only, to fit the time of a CPU run")
    p.add_argument("--child", choices=("sdpa", "eager", "kernel", "niah"))
    p.add_argument("--T", type=int)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.T, args.layers, args.calls)))
        return

    start, load0 = time.time(), os.getloadavg()[0]
    lines = ["| T | case | ru_maxrss GiB | peak above loaded model GiB | cold s | cold / (a) | warm s | warm / (a) | note |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    summary = []
    for T in args.lengths:
        calls = args.calls if T <= args.warm_max_length else 1
        res = {"sdpa": run_case("sdpa", T, args.layers, args.case_timeout, calls)}
        est = eager_estimate_gb(T)
        if est > args.eager_budget_gb:
            res["eager"] = dict(case="eager", T=T, skipped=f"skipped: estimated {est:.1f} GB ({EAGER_COPIES} x [1, 9, T, T] fp32) "
                                                            f"> budget {args.eager_budget_gb:.0f} GB")
        else:
            res["eager"] = run_case("eager", T, args.layers, args.case_timeout, 1)
        res["kernel"] = run_case("kernel", T, args.layers, args.case_timeout, calls)
        for r in res.values():
            lines.append(fmt_row(r, res["sdpa"]))
            print(lines[-1], flush=True)
        a, c = res["sdpa"], res["kernel"]
        if "skipped" not in a and "skipped" not in c:
            summary.append(f"- {T}: (c)/(a) peak ru_maxrss {c['ru_maxrss_kib'] / a['ru_maxrss_kib']:.2f}x, peak above the loaded "
                           f"model {(c['hwm_kib'] - c['base_kib']) / max(1, a['hwm_kib'] - a['base_kib']):.2f}x, "
                           f"time {c['times'][0] / a['times'][0]:.2f}x cold"
                           + (f", {c['times'][-1] / a['times'][-1]:.2f}x warm" if calls > 1 else ""))
            print(summary[-1], flush=True)
    niah = []
    for T in args.niah:
        r = run_case("niah", T, args.layers, args.case_timeout)
        niah.append(fmt_row(r, None))
        print(niah[-1], flush=True)
    paper = ["| T | eager: 3 bf16 copies of [32, T, T], GB | kernel: slab + fp32 K/V + stats, GB | query rows per block |",
             "|---:|---:|---:|---:|"]
    for T in (32768, 131072):
        q = llama3_8b_on_paper(T)
        paper.append(f"| {T} | {q['eager_gb']:.1f} | {q['kernel_gb']:.2f} | {q['rows']} |")
    load1 = os.getloadavg()[0]
    print("\n".join(paper))
    if args.no_record:
        return
    import torch

    text = f"""
## long_context.py, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}

- CPU, {os.cpu_count()} cores shared with other jobs (load average 1 min, start / end: {load0:.1f} / {load1:.1f}); torch
  {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M float32; {args.layers} of its 30 decoder layers for the
  sink / entropy cases (see --layers in the script); each case in a fresh subprocess, called {args.calls} times there up
  to {args.warm_max_length} tokens and once beyond (the eager path once everywhere); cold = the first call, warm = the
  last; ratios are to (a) in the same run; total {time.time() - start:.0f} s
- (a) sdpa = plain SDPA forward, logits_to_keep=1; (b) eager = `sink_and_entropy(backend="eager")` (pattern hooks);
  (c) kernel = `sink_and_entropy()` (interp.kernels reference backend); peak above loaded model = VmHWM (reset after
  loading) - VmRSS after loading

{chr(10).join(lines)}

{chr(10).join(summary)}

NIAH retrieval scoring (kernel engine, whole model, 2 haystacks per length at depths 0.25 / 0.75; SmolLM2's
max_position_embeddings is 8192, so 16K is past its trained range):

| T | case | ru_maxrss GiB | peak above loaded model GiB | seconds | - | - | - | note |
|---:|---|---:|---:|---:|---:|---:|---:|---|
{chr(10).join(niah)}

Llama-3-8B on paper (one layer's attention at batch 1; kernel = two fp32 score slabs of the reference's
default query block, K/V cast to fp32, the statistics):

{chr(10).join(paper)}
"""
    with RESULTS.open("a") as f:
        f.write(text)
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
