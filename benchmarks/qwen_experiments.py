"""IOI and the head table on a bundled Qwen2.5-Coder model, next to SmolLM2-135M.

What it runs (float32, greedy, CPU by default; every experiment is timed on its own):

1. IOI (interp.circuits.tasks.ioi, the shipped template, ABBA/BABA mixed, seed 0, plain text:
   no chat template even though the models are instruct-tuned): accuracy (clean logit
   difference > 0, and IO as the top-1 next token), the mean clean and corrupted logit
   difference, then two exact denoising sweeps with interp.patching.activation_patch:
   resid_pre by position and z (head output) by head.
2. The head table (interp.heads.table: run_head_job + merge_head_parts, the `interp heads` job),
   one job per analysis so that each gets its own time:
   sink       Gu et al.'s alpha at the first token on the first --prompts bundled prompts
              (--length tokens): Sink_1^0.3 share, sink heads, secondary sinks, top sink heads;
   ablation   mean change of LM loss when a head's output is zeroed, on --ablation-prompts
              prompts of --ablation-length tokens (a sweep of every head, the costliest per
              token, hence its own, shorter setting);
   importance Michel et al.'s E|dL/dxi_h| (normalised per layer) on the sink prompts;
   retrieval  Wu et al.'s retrieval score over passkey NIAH samples (--niah-lengths x
              --niah-depths), NIAH accuracy per length (read from the job's retrieval parts,
              whose format docs/architecture.md gives), heads above 0.1 and their share.
3. The same on a reference model (--reference, default smollm2-135m) with the same settings, in
   the same process, so every number has SmolLM2's next to it; --reference-json reads the
   reference from an earlier run's --save-json instead. Numbers that earlier RESULTS.md sections
   give for SmolLM2 (other settings) are quoted under the table.

    python benchmarks/qwen_experiments.py [--model qwen2.5-coder-1.5b] [--pairs 4] [--prompts 3]
        [--ablation-prompts 1] [--ablation-length 16] [--niah-lengths 1024,2048,4096] [--niah-depths 0.5]
        [--reference smollm2-135m|none] [--reference-json FILE] [--save-json FILE] [--threads 1]
        [--workdir DIR] [--skip ioi,sink,...] [--record-from FILE] [--no-record]

The per-prompt parts go to --workdir (default /tmp/interp_qwen_experiments/<model>/...): a killed
run restarted with the same settings resumes (the table says how many prompts were computed
now). Prints a table and appends a dated section to benchmarks/RESULTS.md (--no-record to skip).
Times are wall seconds on whatever machine and load the run had: compare them only within a run.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch
from safetensors.torch import load_file

import interp
from interp.circuits.tasks.ioi import ioi_prompts
from interp.heads.table import HeadJobSettings, merge_head_parts, run_head_job
from interp.patching import activation_patch

RESULTS = Path(__file__).with_name("RESULTS.md")
LABELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)",
    "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
}
# What earlier sections of RESULTS.md report for SmolLM2-135M (different settings from this run's).
SMOLLM2_IN_RESULTS = [
    "IOI (attribution_vs_exact.py, 8 ABBA pairs): clean logit diff 3.92, corrupted -1.35, clean > 0 on 8/8; "
    "exact resid_pre sweep: S2 carries the effect up to layer 20, END overtakes it at layer 21 of 30",
    "IOI (ioi_faithfulness.py, 16 mixed pairs, seed 0): clean 5.347, corrupted 0.482",
    "retrieval (retrieval_smollm2.py, 1K/2K/4K x 5 depths, 15 samples): NIAH accuracy 1.00 in every cell; "
    "12 / 270 = 4.4% heads > 0.1; top 18.6 0.733, 18.7 0.693, 20.6 0.600, 17.3 0.560, 6.0 0.440",
    "retrieval causal check (4 samples at 512 tokens): masking the top 4 retrieval heads takes NIAH accuracy 1.0 -> 0.0",
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def heads_str(df: pd.DataFrame, column: str, n: int = 5, fmt: str = "{:.3f}") -> str:
    """The n heads with the largest `column`, as 'L.H value' joined by commas."""
    top = df.sort_values(column, ascending=False).head(n)
    return ", ".join(f"{int(r.layer)}.{int(r.head)} {fmt.format(getattr(r, column))}" for r in top.itertuples())


# ---------------------------------------------------------------------------- IOI
def run_ioi(model, n_pairs: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    pairs = ioi_prompts(model, n_pairs, seed=0)
    with torch.no_grad():
        clean_logits = model(pairs.clean_tokens)
        corrupted_logits = model(pairs.corrupted_tokens)
    clean_ld, corrupted_ld = pairs.logit_diff(clean_logits), pairs.logit_diff(corrupted_logits)
    top1 = clean_logits[:, -1].argmax(-1).cpu() == pairs.answer_tokens[:, 0]
    del clean_logits, corrupted_logits
    t_eval = time.perf_counter() - t0

    t0 = time.perf_counter()
    resid = activation_patch(model, "resid_pre", pairs, metric="logit_diff", by="pos", progress=False)
    t_resid = time.perf_counter() - t0
    t0 = time.perf_counter()
    heads = activation_patch(model, "z", pairs, metric="logit_diff", by="head", progress=False)
    t_z = time.perf_counter() - t0

    s2, end = int(pairs.positions["S2"][0]), int(pairs.positions["END"][0])
    norm = resid.normalized
    handover = next((l for l in range(norm.shape[0]) if norm[l, end] > norm[l, s2]), None)
    others = [p for p in range(norm.shape[1]) if p not in (s2, end)]
    frame = heads.frame()
    frame["abs"] = frame.normalized.abs()
    top = frame.sort_values("abs", ascending=False).head(5)
    return {
        "n_pairs": n_pairs, "n_tokens": int(pairs.clean_tokens.shape[1]), "prompt0": pairs.clean_prompts[0],
        "acc_ld": float((clean_ld > 0).float().mean()), "acc_top1": float(top1.float().mean()),
        "clean_ld": float(clean_ld.mean()), "corrupted_ld": float(corrupted_ld.mean()),
        "t_eval": t_eval, "t_resid": t_resid, "t_z": t_z,
        "resid_shape": list(resid.values.shape), "z_shape": list(heads.values.shape),
        "n_layers": int(norm.shape[0]), "handover": handover,
        "s2_first": float(norm[0, s2]), "end_last": float(norm[-1, end]),
        "other_max": float(norm[:, others].abs().max()) if others else 0.0,
        "top_z": ", ".join(f"{int(r.layer)}.{int(r.head)} {r.normalized:+.2f}" for r in top.itertuples()),
    }


# ---------------------------------------------------------------------------- head table
def job_settings(args) -> dict[str, HeadJobSettings]:
    """One head job per analysis, and one retrieval job per haystack length (each is timed, and resumes, alone)."""
    depths = tuple(float(x) for x in args.niah_depths.split(","))
    # cheapest first, so that a run stopped part-way (see --record-from) has the most experiments
    jobs = {
        "sink": HeadJobSettings(analyses=("sink",), n_prompts=args.prompts, length=args.length),
        "importance": HeadJobSettings(analyses=("importance",), n_prompts=args.prompts, length=args.length),
    }
    lengths = [int(x) for x in args.niah_lengths.split(",")]
    for i, n in enumerate(lengths):
        jobs[f"retrieval {n}"] = HeadJobSettings(analyses=("retrieval",), niah_lengths=(n,), niah_depths=depths, niah_per_cell=1)
        if i == 0:
            jobs["ablation"] = HeadJobSettings(analyses=("ablation",), n_prompts=args.ablation_prompts, length=args.ablation_length)
    if not lengths:
        jobs["ablation"] = HeadJobSettings(analyses=("ablation",), n_prompts=args.ablation_prompts, length=args.ablation_length)
    skipped = set(args.skip.split(","))
    return {k: v for k, v in jobs.items() if k.split()[0] not in skipped}


def parts_dir(workdir: Path, name: str, settings: HeadJobSettings) -> Path:
    digest = hashlib.sha256(json.dumps(settings.as_json(), sort_keys=True).encode()).hexdigest()[:12]
    return workdir / f"{name.replace(' ', '-')}-{digest}.parts"


def read_job(out: dict[str, Any], tables: dict[str, pd.DataFrame], name: str, settings: HeadJobSettings, parts: Path) -> None:
    """The merged table of one finished job into `tables`, its NIAH answers into out["niah"]."""
    tables[name] = merge_head_parts([parts]).drop(columns=["model", "fingerprint", "settings"])
    if name.startswith("retrieval"):
        # NIAH: each retrieval part's `counted` flag is its sample's correctness (docs/architecture.md)
        n_samples = settings.niah_per_cell * len(settings.niah_depths)
        correct = [bool(load_file(parts / "retrieval" / f"{i:06d}.safetensors")["counted"][0]) for i in range(n_samples)]
        out.setdefault("niah", {})[name.split()[1]] = [sum(correct), n_samples]


def run_heads(model, args, workdir: Path, partial: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = partial.setdefault("heads", {"times": {}, "computed": {}})
    tables: dict[str, pd.DataFrame] = {}
    for name, settings in job_settings(args).items():
        parts = parts_dir(workdir, name, settings)
        t0 = time.perf_counter()
        done = run_head_job(model, parts, settings, progress=False)
        out["times"][name] = time.perf_counter() - t0
        out["computed"][name] = done["retrieval" if name.startswith("retrieval") else name]
        read_job(out, tables, name, settings, parts)
        print(f"  {name}: {out['times'][name]:.0f} s ({out['computed'][name]} prompt(s) computed now)", flush=True)
        summarise(out, tables, model.cfg.n_layers * model.cfg.n_heads)
        save_partial(args, partial)
    return out


def finished_heads(args, out: dict[str, Any]) -> None:
    """--record-from: the summaries of the head jobs that finished, from their parts folders (no model needed)."""
    workdir = Path(args.workdir or "/tmp/interp_qwen_experiments") / args.model
    tables: dict[str, pd.DataFrame] = {}
    for name, settings in job_settings(args).items():
        parts = parts_dir(workdir, name, settings)
        if name in out.get("times", {}) and parts.exists():
            read_job(out, tables, name, settings, parts)
    if tables:
        summarise(out, tables, len(next(iter(tables.values()))))


def summarise(out: dict[str, Any], tables: dict[str, pd.DataFrame], n: int) -> None:
    """Per-analysis numbers from the merged tables of the jobs finished so far."""
    out["n_heads"] = n
    if "sink" in tables:
        t = tables["sink"]
        # mean over heads of the per-head share of prompts with alpha(0) > eps = Sink_1^eps over (prompt, layer, head)
        out["sink_rate"] = 100 * float(t.sink_share.mean())
        out["n_sink"] = int(t.is_sink.sum())
        out["secondary_mean"] = float(t.n_secondary_sinks.mean())
        out["n_secondary_heads"] = int((t.n_secondary_sinks > 0).sum())
        out["top_sink"] = heads_str(t, "sink_score")
        out["top_secondary"] = heads_str(t, "n_secondary_sinks", fmt="{:.2f}")
    if "ablation" in tables:
        t = tables["ablation"]
        out["ablation_mean"] = float(t.ablation_delta.mean())
        out["top_ablation"] = heads_str(t, "ablation_delta")
    if "importance" in tables:
        t = tables["importance"]
        out["top_importance"] = heads_str(t, "importance")
        out["top_importance_raw"] = heads_str(t, "importance_raw", fmt="{:.4f}")
    retrieval = [t for name, t in tables.items() if name.startswith("retrieval")]
    if retrieval:
        # pooled over the lengths: the mean over every correctly answered sample (as one job over all lengths)
        counted = sum(float(t.retrieval_samples_counted.iloc[0]) for t in retrieval)
        total = sum(t.retrieval_score.fillna(0.0) * float(t.retrieval_samples_counted.iloc[0]) for t in retrieval)
        t = retrieval[0][["layer", "head"]].assign(retrieval_score=total / counted if counted else 0.0)
        out["n_retrieval"] = int((t.retrieval_score > 0.1).sum())
        out["n_retrieval_05"] = int((t.retrieval_score > 0.5).sum())
        out["retrieval_share"] = 100 * out["n_retrieval"] / n
        out["top_retrieval"] = heads_str(t, "retrieval_score")


def save_partial(args, res: dict[str, Any]) -> None:
    """Write the results so far to --save-json (a killed run leaves what it finished)."""
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(res, indent=1))


def run_all(name: str, args, save: bool) -> dict[str, Any]:
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    model = interp.load(name)
    t_load = time.perf_counter() - t0
    cfg = model.cfg
    res: dict[str, Any] = {"model": name, "t_load": t_load,
                           "shape": f"{cfg.n_layers} layers, {cfg.n_heads} query / {cfg.n_kv_heads} KV heads, d_model {cfg.d_model}"}
    res["settings"] = settings_dict(args)
    if "ioi" not in args.skip.split(","):
        res["ioi"] = run_ioi(model, args.pairs)
        i = res["ioi"]
        print(f"  IOI: clean {i['clean_ld']:.3f}, corrupted {i['corrupted_ld']:.3f}, resid_pre {i['t_resid']:.0f} s, "
              f"z {i['t_z']:.0f} s", flush=True)
        if save:
            save_partial(args, res)
    workdir = Path(args.workdir or "/tmp/interp_qwen_experiments") / name
    run_heads(model, args, workdir, res if save else {**res})
    res["t_total"] = time.perf_counter() - t0
    if save:
        save_partial(args, res)
    del model
    return res


def settings_dict(args) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("pairs", "prompts", "length", "ablation_prompts", "ablation_length",
                                          "niah_lengths", "niah_depths", "skip")}


# ---------------------------------------------------------------------------- report
def rows(res: dict[str, Any], ref: Optional[dict[str, Any]], args) -> list[tuple[str, str, str, str]]:
    """(experiment, quantity, this model, reference) rows."""

    def safe(f, r) -> str:
        try:
            return f(r) if r else "-"
        except (KeyError, TypeError):  # an experiment that was skipped or did not finish
            return "-"

    def both(f) -> tuple[str, str]:
        return safe(f, res), safe(f, ref)

    def niah(r) -> str:
        return ", ".join(f"{k}: {c / n:.2f} ({c}/{n})" for k, (c, n) in r["heads"]["niah"].items())

    out = []

    def add(exp: str, what: str, f) -> None:
        out.append((exp, what, *both(f)))

    add("IOI", "pairs x tokens", lambda r: f"{r['ioi']['n_pairs']} x {r['ioi']['n_tokens']}")
    add("IOI", "accuracy: clean logit diff > 0", lambda r: f"{r['ioi']['acc_ld']:.2f}")
    add("IOI", "accuracy: IO is the top-1 token", lambda r: f"{r['ioi']['acc_top1']:.2f}")
    add("IOI", "mean logit diff, clean", lambda r: f"{r['ioi']['clean_ld']:.3f}")
    add("IOI", "mean logit diff, corrupted (S2 -> C)", lambda r: f"{r['ioi']['corrupted_ld']:.3f}")
    add("IOI", "resid_pre by pos: first layer where END > S2", lambda r: f"{r['ioi']['handover']} of {r['ioi']['n_layers']}")
    add("IOI", "resid_pre: S2 at layer 0 / END at the last layer (normalised)",
        lambda r: f"{r['ioi']['s2_first']:.2f} / {r['ioi']['end_last']:.2f}")
    add("IOI", "resid_pre: max abs at any other position", lambda r: f"{r['ioi']['other_max']:.2f}")
    add("IOI", "z by head: top heads (normalised)", lambda r: r["ioi"]["top_z"])
    add("IOI", "time: eval / resid_pre sweep / z sweep (s)",
        lambda r: f"{r['ioi']['t_eval']:.0f} / {r['ioi']['t_resid']:.0f} / {r['ioi']['t_z']:.0f}")
    add("sink", "Sink_1^0.3 (% of prompt x layer x head)", lambda r: f"{r['heads']['sink_rate']:.1f}%")
    add("sink", "heads with sink_score > 0.3", lambda r: f"{r['heads']['n_sink']} / {r['heads']['n_heads']}")
    add("sink", "secondary sinks: mean per head / heads with any",
        lambda r: f"{r['heads']['secondary_mean']:.2f} / {r['heads']['n_secondary_heads']}")
    add("sink", "top sink heads (alpha(0))", lambda r: r["heads"]["top_sink"])
    add("sink", "top secondary-sink heads (keys > 0.1)", lambda r: r["heads"]["top_secondary"])
    add("ablation", "mean loss change, zero-ablated head", lambda r: f"{r['heads']['ablation_mean']:+.4f}")
    add("ablation", "top heads (loss change)", lambda r: r["heads"]["top_ablation"])
    add("importance", "top heads (normalised per layer)", lambda r: r["heads"]["top_importance"])
    add("importance", "top heads (raw E|dL/dxi|)", lambda r: r["heads"]["top_importance_raw"])
    add("retrieval", "NIAH accuracy by length", niah)
    add("retrieval", "retrieval heads > 0.1 (share)",
        lambda r: f"{r['heads']['n_retrieval']} / {r['heads']['n_heads']} = {r['heads']['retrieval_share']:.1f}%")
    add("retrieval", "heads > 0.5", lambda r: str(r["heads"]["n_retrieval_05"]))
    add("retrieval", "top retrieval heads", lambda r: r["heads"]["top_retrieval"])
    for a in ["sink", "ablation", "importance", *(f"retrieval {n}" for n in args.niah_lengths.split(","))]:
        add(a.split()[0], f"time{' at ' + a.split()[1] + ' tokens' if ' ' in a else ''} (s) [prompts computed now]",
            lambda r, a=a: f"{r['heads']['times'][a]:.0f} [{r['heads']['computed'][a]}]")
    add("all", "model load / total time (s)", lambda r: f"{r['t_load']:.0f} / {r['t_total']:.0f}")
    return out


def markdown(res, ref, args, load0: float, load1: float) -> str:
    label = LABELS.get(res["model"], res["model"])
    ref_label = LABELS.get(ref["model"], ref["model"]) if ref else "reference"
    lines = [
        f"## qwen_experiments.py, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: {res['model']}",
        "",
        f"- model: {label}, {res['shape']}; float32, CPU; plain-text prompts (no chat template)",
        f"- reference column: {ref_label if ref else 'none'}, same settings"
        + (f", {'same run' if not args.reference_json else 'from ' + args.reference_json}" if ref else ""),
        f"- settings: {json.dumps(res['settings'])}; IOI seed 0, shipped template, ABBA/BABA mixed, S2 -> C corruption,"
        " denoising, logit difference; sink/importance on the first N bundled prompts; ablation = zero the head's output;"
        " NIAH = passkey haystacks (interp.data.haystack, seed 0), 1 sample per (length, depth)",
        f"- device: CPU {cpu_name()}, {torch.get_num_threads()} torch thread(s); torch {torch.__version__}, interp {interp.__version__};"
        f" load average (1 min) start / end: {load0:.2f} / {load1:.2f} (2 cores shared with other jobs):"
        " the seconds are time on this loaded machine, not comparable across sections",
        "",
        f"| experiment | quantity | {res['model']} | {ref['model'] if ref else 'reference'} |",
        "|---|---|---|---|",
    ]
    lines += [f"| {e} | {w} | {a} | {b} |" for e, w, a, b in rows(res, ref, args)]
    planned = (["ioi"] if "ioi" not in args.skip.split(",") else []) + list(job_settings(args))
    missing = [x for x in planned if (x not in res.get("heads", {}).get("times", {}) if x != "ioi" else "ioi" not in res)]
    if missing:
        lines += ["", f"Not finished in this run (stopped for time; results recorded with --record-from): {', '.join(missing)}."]
    lines += ["", "SmolLM2-135M in earlier RESULTS.md sections (other settings):", ""]
    lines += [f"- {x}" for x in SMOLLM2_IN_RESULTS]
    lines += ["", f"IOI prompt 0: {res['ioi']['prompt0']!r}", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--pairs", type=int, default=4, help="IOI prompt pairs")
    p.add_argument("--prompts", type=int, default=3, help="bundled prompts for sink and importance")
    p.add_argument("--length", type=int, default=64, help="tokens per prompt for sink and importance (Gu et al.: 64)")
    p.add_argument("--ablation-prompts", type=int, default=1)
    p.add_argument("--ablation-length", type=int, default=16)
    p.add_argument("--niah-lengths", default="1024,2048,4096")
    p.add_argument("--niah-depths", default="0.5")
    p.add_argument("--reference", default="smollm2-135m", help="model run with the same settings for comparison, or none")
    p.add_argument("--reference-json", default=None, help="take the reference results from this --save-json file")
    p.add_argument("--save-json", default=None, help="write this run's results (the main model's) as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine two were slower)")
    p.add_argument("--workdir", default=None, help="parent folder of the head jobs' parts folders")
    p.add_argument("--skip", default="", help="comma-separated experiments to leave out: ioi, sink, ablation, importance, retrieval")
    p.add_argument("--record-from", default=None,
                   help="compute nothing: print and record the results a --save-json file holds (e.g. of a run stopped part-way)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    args.skip = ",".join(sorted(x.strip() for x in args.skip.split(",") if x.strip()))
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]

    ref = None
    if args.record_from:  # no computation: the results of a run (perhaps killed part-way) saved with --save-json
        res = json.loads(Path(args.record_from).read_text())
        args.model = res["model"]
        for k, v in res["settings"].items():
            setattr(args, k, v)
        finished_heads(args, res.setdefault("heads", {"times": {}, "computed": {}}))
        res.setdefault("t_total", float("nan"))
    else:
        if not args.reference_json and args.reference.lower() != "none" and args.reference != args.model:
            ref = run_all(args.reference, args, save=False)
        res = run_all(args.model, args, save=True)
    if args.reference_json:  # read at the end, so the reference may be computed alongside this run
        ref = json.loads(Path(args.reference_json).read_text())
        if ref.get("settings") != settings_dict(args):
            raise SystemExit(f"{args.reference_json} was run with settings {ref.get('settings')}, not {settings_dict(args)}")

    table = pd.DataFrame(rows(res, ref, args), columns=["experiment", "quantity", res["model"], ref["model"] if ref else "reference"])
    with pd.option_context("display.width", 250, "display.max_colwidth", 80):
        print(table.to_string(index=False))
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write("\n" + markdown(res, ref, args, load0, os.getloadavg()[0]))
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
