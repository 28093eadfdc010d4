"""Function vectors (Todd et al. 2024) and induction heads against function-vector heads
(Yin & Steinhardt 2025) on the bundled models.

Per model, in one process, float32, torch.no_grad (interp.icl):

1. 10-shot accuracy of every shipped task (data/icl_tasks.json) on --prompts prompts; tasks below
   --chance are dropped from what follows. The same forward gives each head's mean z at the final
   token (the task mean) and over all positions (the mean-ablation reference).
2. AIE of every head on the first --aie-tasks kept tasks (--trials shuffled-label prompts each),
   averaged over those tasks; the batched sweep (stacked patches, resumed at the layer's final
   token) is timed, and the naive loop (one full run_with_hooks per head) is timed on --naive-heads
   heads of the middle layer of the same prompts, with the largest difference between the two.
3. The function vector of the top --k AIE heads, per task, added at the final token entering
   each of every --layer-step-th layer, on zero-shot prompts and on shuffled-label 10-shot prompts:
   accuracy by layer against the baseline without it.
4. Composition: antonym then capitalise ("hot" -> "Cold"), zero-shot, with FV(antonym),
   FV(capitalize), their sum, and the composed task's own FV, at the best layer of step 3.
5. Induction scores on --rep-batch sequences of --rep-len repeated random tokens; the top --k
   induction heads against the top --k AIE heads (overlap); each set mean-ablated: 10-shot accuracy
   on the first --ablate-tasks kept tasks and the in-context loss drop (loss on the first copy
   minus loss on the second).

    python benchmarks/function_vectors.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--prompts 4] [--no-record]

Results are printed and appended, dated, to benchmarks/RESULTS.md. Absolute times depend on the
load of the machine; read the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

import interp
from interp.icl import (
    ablated_accuracy,
    ablated_repeat_losses,
    average_indirect_effect,
    function_vector,
    fv_accuracy_by_layer,
    head_stats,
    length_groups,
    load_tasks,
    make_prompts,
    overlap,
    repeat_run,
    repeated_tokens,
    top_heads,
)

RESULTS = Path(__file__).with_name("RESULTS.md")


class Lines(list):
    """Report lines, printed as they are added (a long run shows its progress)."""

    def __init__(self, lines: list[str]):
        super().__init__()
        self += lines

    def __iadd__(self, lines):
        print("\n".join(lines), flush=True)
        self.extend(lines)
        return self

    def append(self, line: str) -> None:
        self += [line]


def fmt_heads(heads) -> str:
    return " ".join(f"L{l}H{h}" for l, h in heads)


@torch.no_grad()
def run_model(name: str, a: argparse.Namespace) -> list[str]:
    t0 = time.perf_counter()
    model = interp.load(name)
    c = model.cfg
    tasks = load_tasks()
    out = Lines([f"### {name} ({c.n_layers} layers x {c.n_heads} heads)", ""])

    # 1. 10-shot accuracy and task means
    stats, groups = {}, {}
    for t in tasks.values():
        groups[t.name] = length_groups(model, make_prompts(model, t, a.prompts, a.shots, seed=1))
        stats[t.name] = head_stats(model, groups[t.name])
    kept = [n for n in tasks if stats[n].accuracy >= a.chance]
    out += [f"10-shot accuracy ({a.prompts} prompts per task; kept: accuracy >= {a.chance}):", "",
            "| task | 10-shot accuracy | mean P(answer) | kept |", "|---|---:|---:|---|"]
    out += [f"| {n} | {stats[n].accuracy:.2f} | {float(stats[n].probs.mean()):.3f} | {'yes' if n in kept else 'no'} |" for n in tasks]

    # 2. AIE, batched, and the naive loop on a few heads
    aie_tasks = kept[: a.aie_tasks]
    corrupt = {n: length_groups(model, make_prompts(model, tasks[n], a.trials, a.shots, seed=2, shuffled=True)) for n in kept}
    s = time.perf_counter()
    aies = [average_indirect_effect(model, stats[n].last_mean, corrupt[n]) for n in aie_tasks]
    t_batched = time.perf_counter() - s
    aie = torch.stack(aies).mean(0)
    fv_heads = top_heads(aie, a.k)
    mid = c.n_layers // 2
    probe = [(mid, h) for h in range(min(a.naive_heads, c.n_heads))]
    s = time.perf_counter()
    naive = average_indirect_effect(model, stats[aie_tasks[0]].last_mean, corrupt[aie_tasks[0]], heads=probe, method="naive")
    t_naive = time.perf_counter() - s
    diff = max(abs(float(naive[l, h]) - float(aies[0][l, h])) for l, h in probe)
    n_trials = len(aie_tasks) * a.trials
    per_head_naive = t_naive / (len(probe) * a.trials)
    naive_all = per_head_naive * c.n_layers * c.n_heads * n_trials
    out += ["", f"AIE (mean over {aie_tasks}, {a.trials} shuffled-label trials each); top {a.k} heads: "
            + ", ".join(f"L{l}H{h} {float(aie[l, h]):+.3f}" for l, h in fv_heads), "",
            "| AIE sweep | heads | trials | seconds | s per head-trial |", "|---|---:|---:|---:|---:|",
            f"| batched (stacked, resumed at the final token) | {c.n_layers * c.n_heads} | {n_trials} | {t_batched:.1f} | "
            f"{t_batched / (c.n_layers * c.n_heads * n_trials):.4f} |",
            f"| naive (run_with_hooks per head), measured on {len(probe)} heads of layer {mid} | {len(probe)} | {a.trials} | "
            f"{t_naive:.1f} | {per_head_naive:.4f} |",
            "", f"naive for the whole sweep, extrapolated: {naive_all:.0f} s, {naive_all / t_batched:.1f}x the batched sweep; "
            f"largest |AIE batched - naive| on the measured heads: {diff:.1e}"]

    # 3. function vectors by layer
    layers = list(range(0, c.n_layers, a.layer_step))
    out += ["", f"Function vector (top {a.k} AIE heads) added at the final token entering layer l; accuracy "
            f"({a.zero_shot} zero-shot prompts, {a.trials} shuffled-label {a.shots}-shot prompts per task):", "",
            "| task | prompts | baseline | " + " | ".join(f"l={l}" for l in layers) + " |",
            "|---|---|---:|" + "---:|" * len(layers)]
    fvs, best_layer = {}, {}
    for n in kept[: a.fv_tasks]:
        fvs[n] = function_vector(model, stats[n].last_mean, fv_heads)
        zs = length_groups(model, make_prompts(model, tasks[n], a.zero_shot, 0, seed=3))
        for label, g in (("zero-shot", zs), ("shuffled", corrupt[n])):
            base = fv_accuracy_by_layer(model, g, None, [c.n_layers - 1])[c.n_layers - 1]
            acc = fv_accuracy_by_layer(model, g, fvs[n], layers)
            if label == "zero-shot":
                best_layer[n] = max(layers, key=lambda l: acc[l])
            out.append(f"| {n} | {label} | {base:.2f} | " + " | ".join(f"{acc[l]:.2f}" for l in layers) + " |")

    # 4. composition: antonym then capitalise
    if {"antonym", "capitalize"} <= set(kept):
        comp = tasks["antonym"].map_outputs(str.capitalize, "capitalised antonym")
        cstats = head_stats(model, length_groups(model, make_prompts(model, comp, a.prompts, a.shots, seed=1)))
        for n in ("antonym", "capitalize"):
            fvs.setdefault(n, function_vector(model, stats[n].last_mean, fv_heads))
        l = best_layer.get("antonym", c.n_layers // 3)
        zs = length_groups(model, make_prompts(model, comp, a.zero_shot, 0, seed=3))
        rows = [("none", None), ("FV(antonym)", fvs["antonym"]), ("FV(capitalize)", fvs["capitalize"]),
                ("FV(antonym) + FV(capitalize)", fvs["antonym"] + fvs["capitalize"]),
                ("FV(capitalised antonym)", function_vector(model, cstats.last_mean, fv_heads))]
        out += ["", f"Composition, antonym then capitalise (hot -> Cold): {a.shots}-shot accuracy {cstats.accuracy:.2f}; "
                f"zero-shot accuracy ({a.zero_shot} prompts) with vectors added at layer {l}:", "",
                "| vector | zero-shot accuracy |", "|---|---:|"]
        out += [f"| {lbl} | {fv_accuracy_by_layer(model, zs, v, [l])[l]:.2f} |" for lbl, v in rows]

    # 5. induction heads against FV heads
    rep = repeat_run(model, repeated_tokens(model, a.rep_len, a.rep_batch, seed=0), a.rep_len)
    ind_heads = top_heads(rep.scores, a.k)
    both = overlap(ind_heads, fv_heads)
    abl_tasks = kept[: a.ablate_tasks]
    icl_mean = torch.stack([stats[n].all_mean for n in abl_tasks]).mean(0)
    clean_acc = sum(stats[n].accuracy for n in abl_tasks) / len(abl_tasks)
    out += ["", f"Induction scores ({a.rep_batch} x {a.rep_len} repeated random tokens); top {a.k}: "
            + ", ".join(f"L{l}H{h} {float(rep.scores[l, h]):.2f}" for l, h in ind_heads),
            f"overlap with the top {a.k} AIE heads: {len(both)} ({fmt_heads(both) or '-'}); "
            f"AIE of the induction heads: mean {float(aie[tuple(zip(*ind_heads))].mean()):+.4f}; "
            f"induction score of the FV heads: mean {float(rep.scores[tuple(zip(*fv_heads))].mean()):.3f}", "",
            f"Mean ablation (z mean over the tasks' prompts for accuracy, over the repeated tokens for the loss); "
            f"accuracy on {abl_tasks}:", "",
            "| ablated | heads | 10-shot accuracy | loss 1st copy | loss 2nd copy | in-context loss drop |", "|---|---:|---:|---:|---:|---:|",
            f"| nothing | 0 | {clean_acc:.2f} | {rep.loss_first:.3f} | {rep.loss_second:.3f} | {rep.loss_drop:.3f} |"]
    for label, hs in (("top induction heads", ind_heads), ("top FV (AIE) heads", fv_heads)):
        acc = sum(ablated_accuracy(model, hs, groups[n], icl_mean) for n in abl_tasks) / len(abl_tasks)
        f, s2 = ablated_repeat_losses(model, hs, rep)
        out.append(f"| {label} | {len(hs)} | {acc:.2f} | {f:.3f} | {s2:.3f} | {f - s2:.3f} |")
    out += ["", f"({time.perf_counter() - t0:.0f} s for this model)", ""]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--prompts", type=int, default=4, help="10-shot prompts per task (accuracy, task means)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--chance", type=float, default=0.25, help="tasks below this 10-shot accuracy are dropped")
    p.add_argument("--aie-tasks", type=int, default=2)
    p.add_argument("--trials", type=int, default=2, help="shuffled-label prompts per task (AIE, FV on shuffled prompts)")
    p.add_argument("--naive-heads", type=int, default=3)
    p.add_argument("--k", type=int, default=10, help="heads in the FV set and in the induction set")
    p.add_argument("--fv-tasks", type=int, default=2)
    p.add_argument("--zero-shot", type=int, default=8)
    p.add_argument("--layer-step", type=int, default=3)
    p.add_argument("--rep-len", type=int, default=20)
    p.add_argument("--rep-batch", type=int, default=4)
    p.add_argument("--ablate-tasks", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    lines = [f"## Function vectors and induction heads ({datetime.date.today()}, benchmarks/function_vectors.py)", "",
             f"Sizes: {a.prompts} prompts x {a.shots} shots per task, AIE on {a.aie_tasks} tasks x {a.trials} trials, "
             f"k = {a.k}, FV layers every {a.layer_step}, {a.zero_shot} zero-shot prompts, repeated tokens {a.rep_batch} x {a.rep_len}; "
             f"torch threads {torch.get_num_threads()}, a shared, loaded CPU.", ""]
    for name in a.models.split(","):
        lines += run_model(name, a)
    if not a.no_record:
        with RESULTS.open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
