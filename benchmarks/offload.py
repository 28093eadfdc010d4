"""A model larger than its memory budget, offloaded to disk through accelerate, against the same model in memory.

Target (issue 14, item 4): `interp.load(..., device_map="auto", max_memory=..., offload_folder=...)`
runs a cache, a patching sweep and a head-table prompt on Qwen2.5-Coder-1.5B (float32, 7.1 GB)
with a `max_memory` that sends most layers to disk; the results equal the in-memory model's; the
peak resident memory is reported against the budget, the time as a ratio to the in-memory model.

Method. Each placement runs in a fresh Python subprocess (its own high-water mark), one after the
other, from ONE invocation of this script, so the time ratios compare runs on the same machine
state (only ratios are recorded, never absolute times across invocations). Each child:

1. loads the model (`offload`: device_map="auto", max_memory={"cpu": BUDGET}, offload_folder in a
   temporary directory; `memory`: a plain load), reads its RSS;
2. times, once each, under torch.no_grad:
   cache     run_with_cache of one prompt, every hook but hook_result, gathered with device="cpu"
   patching  resid_pre patching on one IOI pair (clean and corrupted differ at S2): the clean
             resid_pre written into the corrupted run at 3 layers x 2 positions (S2, last), one
             run_with_hooks forward per patch, logit difference of the answers
   heads     interp.heads.sinks.sink_table on one 64-token prompt (the head table's sink entry)
3. reports ru_maxrss (peak RSS of the process, KiB) and saves its logits / sweep / sink scores;
   the parent checks the two placements agree (max abs difference).

The checkpoint is read from the page cache when it is there (the machine has room for it): "disk"
then costs a copy per forward, not a disk read. Run only one 1.5B process at a time on a shared
machine: `flock /tmp/qwen15.lock python benchmarks/offload.py`.

    python benchmarks/offload.py [--model qwen2.5-coder-1.5b] [--budget 1.5GiB] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
PLACEMENTS = ("memory", "offload")
STEPS = ("load", "cache", "patching", "heads")
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
ANSWERS = (" Mary", " John")
SINK_PROMPT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange grain, salt "
    "and cloth. Over the centuries the town grew into a regional centre with markets, a cathedral, a university and "
    "a port that connected it to the rest of the continent. Merchants from distant lands brought spices, paper and new "
    "ideas, and the families who grew rich from this trade built the stone houses that still line the old streets today."
)


def _child(args) -> None:
    import torch

    import interp
    from interp.heads.sinks import sink_table
    from interp.metrics import LogitDiff

    torch.manual_seed(0)
    out: dict = {"placement": args.child, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="offload-") as folder, torch.no_grad():
        start = time.perf_counter()
        if args.child == "offload":
            model = interp.load(args.model, device_map="auto", max_memory={"cpu": args.budget}, offload_folder=folder)
            device_map = model.hf_model.hf_device_map
            out["device_map"] = {k: str(v) for k, v in device_map.items()}
            out["layers_on_disk"] = sum(_placed(device_map, f"model.layers.{i}") == "disk" for i in range(model.cfg.n_layers))
        else:
            model = interp.load(args.model)
        out["seconds"]["load"] = time.perf_counter() - start
        out["n_layers"] = model.cfg.n_layers
        out["rss_after_load_kib"] = _rss_kib()

        tok = model.tokenizer
        clean, corrupted = model.to_tokens([CLEAN]), model.to_tokens([CORRUPTED])
        assert clean.shape == corrupted.shape, "the IOI pair must tokenize to the same length"
        answers = torch.tensor([[tok.encode(a)[0] for a in ANSWERS]])

        start = time.perf_counter()
        logits, cache = model.run_with_cache(clean, device="cpu")
        out["seconds"]["cache"] = time.perf_counter() - start
        out["cache_entries"] = len(cache.keys())
        resid = cache["blocks.%d.hook_resid_post" % (model.cfg.n_layers - 1)]
        del cache

        start = time.perf_counter()
        sweep = _sweep(model, clean, corrupted, LogitDiff(answers))
        out["seconds"]["patching"] = time.perf_counter() - start
        out["sweep_shape"] = list(sweep.shape)

        start = time.perf_counter()
        sinks = sink_table(model, [SINK_PROMPT], length=64)
        out["seconds"]["heads"] = time.perf_counter() - start

    torch.save({"logits": logits[0, -1].float(), "resid": resid.float(), "sweep": sweep.float(),
                "sinks": torch.tensor(sinks["sink_score"].values)}, args.save)
    out["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps(out), flush=True)


def _sweep(model, clean, corrupted, metric):
    """Float[Tensor, "layer pos"]: the metric with clean resid_pre patched into the corrupted run at (layer, pos)."""
    import torch

    L = model.cfg.n_layers
    layers = [0, L // 2, L - 1]
    s2 = int((clean != corrupted).nonzero()[0, 1])
    positions = [s2, clean.shape[1] - 1]
    names = [f"blocks.{l}.hook_resid_pre" for l in layers]
    _, source = model.run_with_cache(clean, names_filter=names)
    out = torch.zeros(len(layers), len(positions))
    for i, name in enumerate(names):
        for j, p in enumerate(positions):
            def patch(x, hook, p=p, name=name):
                x = x.clone()
                x[:, p] = source[name][:, p]
                return x
            out[i, j] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])).mean()
    return out


def _placed(device_map: dict, module: str):
    """Where a module went: the device of the longest device_map key that contains it ("" is the whole model)."""
    keys = [k for k in device_map if k == "" or module == k or module.startswith(k + ".")]
    return device_map[max(keys, key=len)] if keys else None


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def _run(placement: str, args, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", placement, "--model", args.model, "--budget", args.budget, "--save", str(save)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the {placement} child failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def _gib(text: str) -> float:
    """'1.5GiB' / '1500MB' / bytes -> GiB."""
    units = {"GIB": 2**30, "MIB": 2**20, "GB": 1e9, "MB": 1e6, "KIB": 2**10, "KB": 1e3}
    t = text.strip().upper()
    for unit, size in units.items():
        if t.endswith(unit):
            return float(t[: -len(unit)]) * size / 2**30
    return float(t) / 2**30


def _table(runs: dict, diffs: dict, args) -> str:
    import accelerate
    import torch
    import transformers

    mem, off = runs["memory"], runs["offload"]
    gib = 2**20
    rows = ["| step | offload / memory (time) |", "|---|---|"]
    for step in STEPS:
        rows.append(f"| {step} | **{off['seconds'][step] / mem['seconds'][step]:.2f}x** |")
    work = sum(off["seconds"][s] for s in STEPS[1:]) / sum(mem["seconds"][s] for s in STEPS[1:])
    rows.append(f"| cache + patching + heads | **{work:.2f}x** |")
    lines = [
        f"## offload.py, {datetime.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"{args.model} (float32, {off['n_layers']} layers) on {platform.machine()}, 2-core CPU shared with other jobs, 24 GiB; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}. "
        f"offload = device_map=\"auto\", max_memory={{\"cpu\": \"{args.budget}\"}}: {off['layers_on_disk']} of {off['n_layers']} "
        f"layers on disk (device_map {json.dumps(off['device_map']) if len(off['device_map']) < 6 else 'split by layer'}). "
        "Each placement in a fresh "
        "subprocess, both in this one invocation; times only as ratios.",
        "",
        "| placement | peak RSS (GiB) | RSS after load (GiB) | budget (GiB) |",
        "|---|---|---|---|",
        f"| memory | {mem['ru_maxrss_kib'] / gib:.2f} | {mem['rss_after_load_kib'] / gib:.2f} | - |",
        f"| offload | {off['ru_maxrss_kib'] / gib:.2f} | {off['rss_after_load_kib'] / gib:.2f} | {_gib(args.budget):.2f} |",
        "",
        *rows,
        "",
        f"Steps: cache = run_with_cache of one {len(CLEAN.split())}-word prompt (every hook but hook_result, device=\"cpu\"); "
        f"patching = clean resid_pre patched into the corrupted run of one IOI pair at {off['sweep_shape'][0]} layers x "
        f"{off['sweep_shape'][1]} positions (one run_with_hooks each, plus the clean source cache); heads = sink_table "
        "on one 64-token prompt. Offloaded vs in memory, max abs difference: "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--budget", default="1.5GiB", help="max_memory for the CPU in the offload run")
    parser.add_argument("--no-record", action="store_true", help="print the table, do not append it to RESULTS.md")
    parser.add_argument("--child", choices=PLACEMENTS, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)

    import torch

    with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        runs, saved = {}, {}
        for placement in PLACEMENTS:
            saved[placement] = Path(tmp) / f"{placement}.pt"
            runs[placement] = _run(placement, args, saved[placement])
            print(placement, json.dumps(runs[placement]), flush=True)
        a, b = (torch.load(saved[p]) for p in PLACEMENTS)
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    table = _table(runs, diffs, args)
    print("\n" + table)
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write("\n" + table)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
