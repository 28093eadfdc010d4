"""Retrieval heads of SmolLM2-135M-Instruct (Wu et al. 2024), NIAH accuracy, and the causal check.

What it does (all greedy, float32, CPU by default, reproducible from the seeds):

1. Scoring set: one passkey haystack (interp.data.haystack) per (length, depth, repeat), by
   default lengths 1K/2K/4K x depths 0, .25, .5, .75, 1. Decodes each (prefill with SDPA, decode
   step by step with a KV cache and a read hook on every layer's current query row) and reports
   NIAH accuracy per (length, depth) and the retrieval score of all 270 query heads (mean over
   correctly answered samples), the number above 0.1 (Wu et al.'s threshold) and above 0.5, and
   their share of the heads.
2. Causal check on a separate ablation set (other seeds, --ablation-length): NIAH accuracy with
   the top-k retrieval heads masked (query zeroed = uniform attention, as in Wu et al.'s code) vs
   k random non-retrieval heads, --draws random draws per k.

    python benchmarks/retrieval_smollm2.py [--lengths 1024 2048 4096] [--ks 1 2 3 ...] [--draws 3]

Prints tables and appends a dated section to benchmarks/RESULTS.md (--no-record to skip).
--threads defaults to 1: on a shared 2-core machine one thread ran a 1K prefill 5x faster than two.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch

import interp
from interp.heads.niah import make_samples, niah_accuracy
from interp.heads.retrieval import retrieval_ablation_curves, retrieval_heads, score_retrieval
from interp.viz import niah_heatmap

RESULTS = Path(__file__).with_name("RESULTS.md")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def md_table(df, floatfmt: str = "{:.2f}") -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(floatfmt.format(v) if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--per-cell", type=int, default=1)
    p.add_argument("--ablation-length", type=int, default=1024)
    p.add_argument("--ablation-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 10, 12, 16])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--heatmap", type=str, default=None, help="write the NIAH heatmap to this HTML file")
    p.add_argument("--save-scores", type=str, default=None, help="write the per-head scores (CSV) here")
    p.add_argument("--load-scores", type=str, default=None,
                   help="skip scoring: take per-head scores (CSV: layer, head, retrieval_score) from this file")
    p.add_argument("--skip-ablation", action="store_true")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    t0 = time.time()

    model = interp.load("smollm2-135m")
    if args.load_scores:
        scores = pd.read_csv(args.load_scores)
        return ablation_only(model, scores, args, load0)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    samples = make_samples(model.tokenizer, args.lengths, args.depths, args.per_cell, seed=args.seed)
    res = score_retrieval(model, samples)
    t_score = time.time() - t0
    if args.save_scores:
        res.scores.to_csv(args.save_scores, index=False)
    acc = niah_accuracy(res.samples)
    print(res.samples[["n_tokens", "depth", "actual_depth", "answer", "response", "correct"]].to_string())
    print("\nNIAH accuracy (rows: tokens, columns: depth)\n", acc.to_string())
    if args.heatmap:
        niah_heatmap(acc, "SmolLM2-135M-Instruct passkey NIAH").write_html(args.heatmap)
    above = {th: len(retrieval_heads(res.scores, th)) for th in (0.1, 0.5)}
    top = retrieval_heads(res.scores, 0.0).head(20)
    n_counted = int(res.samples.correct.sum())
    print(f"\ncounted samples: {n_counted} / {len(samples)}")
    for th, n in above.items():
        print(f"heads with retrieval score > {th}: {n} / {n_heads} = {100 * n / n_heads:.1f}%")
    print(top.to_string())

    ablation_md = "" if args.skip_ablation else ablation_section(model, res.scores, args)
    load1 = os.getloadavg()[0]

    if args.no_record:
        return
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    acc_md = acc.copy()
    acc_md.columns = [f"depth {c:g}" for c in acc_md.columns]
    acc_md.insert(0, "tokens", acc_md.index)
    top_md = top.head(15).copy()
    top_md["retrieval_score"] = top_md.retrieval_score.astype(float)
    text = f"""
## retrieval_smollm2.py, {stamp}

- device: CPU {cpu_name()}, {args.threads} torch thread(s); load average (1 min) start / end: {load0:.2f} / {load1:.2f}
- torch {torch.__version__}; model SmolLM2-135M-Instruct (bundled), float32, greedy
- task: 5-digit passkey needle " The special magic number is NNNNN." in seeded filler prose
  (interp.data.haystack), question " What is the special magic number? The special magic number is";
  decode up to 8 tokens, stop at newline/EOS; correct = ROUGE-1 recall > 0.5
- scoring set: lengths {args.lengths} x depths {args.depths} x {args.per_cell} sample(s), seed {args.seed};
  {t_score:.0f} s (model load included)
- retrieval score: Wu et al. (needle = the 5 digit tokens, 0.2 per copied digit; mean over the
  {n_counted} correctly answered samples of {len(samples)})

NIAH accuracy (scoring set):

{md_table(acc_md.reset_index(drop=True))}

- heads with retrieval score > 0.1: **{above[0.1]} / {n_heads} = {100 * above[0.1] / n_heads:.1f}%**
- heads with retrieval score > 0.5: {above[0.5]} / {n_heads} = {100 * above[0.5] / n_heads:.1f}%

Top heads:

{md_table(top_md[["layer", "head", "retrieval_score"]], "{:.3f}")}

{ablation_md}"""
    with RESULTS.open("a") as f:
        f.write(text)
    print(f"\nappended to {RESULTS}")


def ablation_section(model, scores: pd.DataFrame, args) -> str:
    """Run the causal check; print its table and return it as markdown."""
    abl_samples = make_samples(model.tokenizer, [args.ablation_length], args.ablation_depths, 1, seed=args.seed + 1)
    t1 = time.time()
    curves = retrieval_ablation_curves(model, scores, args.ks, args.draws, abl_samples, seed=args.seed)
    t_abl = time.time() - t1
    view = curves.pivot_table(index="k", columns="kind", values="accuracy").reset_index()
    std = curves[curves.kind == "random"].set_index("k").accuracy_std
    view["random_std"] = view.k.map(std).fillna(0.0)
    print("\nablation (NIAH accuracy on the ablation set)\n", view.to_string(index=False))
    top = curves[curves.kind == "retrieval"].set_index("k").heads
    return f"""
Causal check: ablation set {len(abl_samples)} samples at {args.ablation_length} tokens (depths
{args.ablation_depths}, seed {args.seed + 1}); masked heads' queries zeroed (uniform attention,
interp.heads.ablation, how="uniform"); random = {args.draws} draws of k heads with score <= 0.1
outside the top {max(args.ks)}; {t_abl:.0f} s. Top-{max(args.ks)} heads masked: {top[max(args.ks)]}.

{md_table(view.rename(columns={"retrieval": "top-k retrieval masked", "random": "k random masked (mean)"}), "{:.3f}")}
"""


def ablation_only(model, scores: pd.DataFrame, args, load0: float) -> None:
    text = ablation_section(model, scores, args)
    if args.no_record:
        return
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with RESULTS.open("a") as f:
        f.write(f"""
## retrieval_smollm2.py (causal check only), {stamp}

- device: CPU {cpu_name()}, {args.threads} torch thread(s); load average (1 min) start / end: {load0:.2f} / {os.getloadavg()[0]:.2f}
- per-head retrieval scores from {args.load_scores}
{text}""")
    print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
