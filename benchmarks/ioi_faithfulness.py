"""Faithfulness against circuit size on SmolLM2-135M, IOI: EAP and EAP-IG edge scores, top-n and greedy circuits.

For each scoring method (EAP; EAP-IG with each of --steps), each extraction (top_n, greedy) and
each share of the graph's edges in --fractions, the script builds the circuit with
n = round(share x edges) edges (top_n prunes edges off input -> logits paths, so the circuit
can end up smaller; the table reports the edges it kept) and measures its normalised
faithfulness by exact edge patching: every edge outside the circuit carries its source's
corrupted output, and

    recovered = (metric(circuit run) - metric(corrupted)) / (metric(clean) - metric(corrupted))

with the mean logit difference (IO - S) as the metric (Hanna et al. 2024, arXiv:2403.17806).
Each circuit costs one patched forward over the prompts. Scores and faithfulness use the same
prompts unless --heldout is given (then faithfulness is measured on pairs from another seed).

Corruptions (--corruption): "s2c" replaces S2 by a third name (the task's own, Hanna et al.'s
IOI "corrupted"); "s2io" replaces S2 by the IO name (their "corrupted_hard": the corrupted
prompt then names the other person, so its logit difference is negative and the gap larger).

    OMP_NUM_THREADS=1 python benchmarks/ioi_faithfulness.py --n 16 --methods eap,eap-ig --steps 5,10 \
        --fractions 0.001,0.005,0.01,0.02,0.05,0.1,0.2 [--extractions top_n,greedy] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import time
from pathlib import Path

import torch

import interp
from interp.circuits import Faithfulness, Graph, edge_attribution, greedy, top_n
from interp.circuits.tasks.base import PromptPairs
from interp.circuits.tasks.ioi import ioi_prompts

RESULTS = Path(__file__).with_name("RESULTS.md")
EXTRACT = {"top_n": top_n, "greedy": greedy}


def with_corruption(task: PromptPairs, corruption: str) -> PromptPairs:
    """The task with its corrupted prompts rebuilt: "s2c" (as built) or "s2io" (S2 token -> the IO token)."""
    if corruption == "s2c":
        return task
    if corruption != "s2io":
        raise ValueError(f"corruption must be 's2c' or 's2io', got {corruption!r}")
    corrupted = task.clean_tokens.clone()
    rows = torch.arange(len(task))
    corrupted[rows, task.positions["S2"]] = task.answer_tokens[:, 0]  # column 0: the IO name's token
    return PromptPairs(task.clean_tokens, corrupted, task.answer_tokens, task.clean_prompts, [],
                       task.positions, task.d_vocab, task.name + "-s2io")


def settings(methods: list[str], steps: list[int]) -> list[tuple[str, int]]:
    """(method, steps) pairs to score with: EAP once, EAP-IG once per step count."""
    out = []
    for m in methods:
        out += [(m, 0)] if m == "eap" else [(m, s) for s in steps]
    return out


def run(model, task: PromptPairs, eval_task: PromptPairs, methods: list[str], steps: list[int],
        fractions: list[float], extractions: list[str]) -> tuple[list[dict], Faithfulness]:
    graph = Graph.from_model(model)
    faith = Faithfulness(model, eval_task, graph=graph, batch_size=len(eval_task))
    rows = []
    for method, k in settings(methods, steps):
        start = time.perf_counter()
        scores = edge_attribution(model, task, method=method, steps=max(k, 1), graph=graph)
        t_score = time.perf_counter() - start
        label = method if method == "eap" else f"{method} ({k} steps)"
        print(f"{label}: scored {graph.n_edges} edges in {t_score:.1f} s", flush=True)
        for how in extractions:
            for frac in fractions:
                n = max(1, round(frac * graph.n_edges))
                circuit = EXTRACT[how](scores, n)
                start = time.perf_counter()
                f = faith(circuit)
                rows.append({"method": label, "extraction": how, "share": frac, "n": n, "edges": len(circuit),
                             "kept_share": len(circuit) / graph.n_edges, "recovered": f,
                             "t_eval": time.perf_counter() - start, "t_score": t_score})
                print(f"  {how:6s} {frac:6.3f} n={n:6d} edges={len(circuit):6d} recovered={f:+.3f}", flush=True)
    return rows, faith


def table(rows: list[dict]) -> str:
    lines = ["| method | extraction | share of edges (asked) | edges kept | share kept | recovered |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['extraction']} | {100 * r['share']:.1f}% | {r['edges']} | "
                     f"{100 * r['kept_share']:.2f}% | {r['recovered']:.3f} |")
    return "\n".join(lines)


def first_reaching(rows: list[dict], level: float) -> list[str]:
    """Per (method, extraction): the smallest circuit that recovers at least `level` of the gap."""
    out = []
    for key in dict.fromkeys((r["method"], r["extraction"]) for r in rows):
        ok = [r for r in rows if (r["method"], r["extraction"]) == key and r["recovered"] >= level]
        best = min(ok, key=lambda r: r["edges"]) if ok else None
        out.append(f"- {key[0]}, {key[1]}: " + (f"{best['edges']} edges ({100 * best['kept_share']:.2f}%) -> "
                                                f"{best['recovered']:.3f}" if best else f"never >= {level:.0%} here"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="IOI prompt pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="eap,eap-ig", help="comma list of eap, eap-ig")
    parser.add_argument("--steps", default="5", help="comma list of EAP-IG step counts")
    parser.add_argument("--fractions", default="0.001,0.005,0.01,0.02,0.05,0.1,0.2")
    parser.add_argument("--extractions", default="top_n", help="comma list of top_n, greedy")
    parser.add_argument("--corruption", default="s2c", choices=["s2c", "s2io"])
    parser.add_argument("--heldout", action="store_true", help="measure faithfulness on pairs from seed + 1")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    extractions = [e.strip() for e in args.extractions.split(",") if e.strip()]
    for e in extractions:
        if e not in EXTRACT:
            parser.error(f"unknown extraction {e!r}: use top_n or greedy")

    # The commit the run starts from (the code a long run imported, even if HEAD moves meanwhile).
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    model = interp.load("smollm2-135m")
    task = with_corruption(ioi_prompts(model.tokenizer, args.n, seed=args.seed), args.corruption)
    eval_task = task
    if args.heldout:
        eval_task = with_corruption(ioi_prompts(model.tokenizer, args.n, seed=args.seed + 1), args.corruption)
    start = time.perf_counter()
    rows, faith = run(model, task, eval_task, methods, steps, fractions, extractions)
    total = time.perf_counter() - start

    graph = faith.graph
    summary = [
        f"- model: SmolLM2-135M-Instruct (bundled), graph {graph}: {graph.n_edges} edges",
        f"- task: {args.n} IOI pairs (seed {args.seed}, shipped template, ABBA/BABA mixed, {task.n_pos} tokens), "
        f"corruption {args.corruption}; faithfulness on {'held-out pairs (seed ' + str(args.seed + 1) + ')' if args.heldout else 'the same pairs'}",
        f"- metric: mean logit difference; clean {faith.clean_metric:.3f}, corrupted {faith.corrupted_metric:.3f}",
        "- recovered = (circuit - corrupted) / (clean - corrupted), exact edge patching with corrupted outputs",
        f"- interp at commit {commit}; CPU, torch threads {torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); total {total:.0f} s, "
        f"one faithfulness evaluation {sum(r['t_eval'] for r in rows) / len(rows):.1f} s on average",
    ]
    reach = ["First circuit to recover >= 80% of the gap:", "", *first_reaching(rows, 0.8)]
    text = "\n".join(summary) + "\n\n" + table(rows) + "\n\n" + "\n".join(reach)
    print("\n" + text)
    if not args.no_record:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        head = (f"ioi_faithfulness.py, {stamp}: --n {args.n} --methods {args.methods} --steps {args.steps} "
                f"--extractions {args.extractions} --corruption {args.corruption}" + (" --heldout" if args.heldout else ""))
        with RESULTS.open("a") as f:
            f.write(f"\n## {head}\n\n{text}\n")


if __name__ == "__main__":
    main()
