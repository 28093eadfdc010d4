"""Position bias in multiple choice on the bundled models: harness, PriDe, and the components behind it.

For each model, over the shipped questions (data/mcq_questions.json, every cyclic permutation of
the options; Zheng et al. 2024, arXiv:2309.03882):

  harness    accuracy, selection rate per letter, recall per letter, RStd, permutation consistency
  PriDe      the letter prior from all cyclic permutations of --share of the questions, then
             accuracy / RStd / consistency / selection on the other questions before and after
  lens       the logit lens on the letter tokens: the favoured letter's logit minus the mean of the
             others, and how often it tops the letters, per layer (last layers shown)
  DLA        direct logit attribution of every head and MLP to that bias score at the last token
             (mean over all prompts: the content cancels over cyclic permutations)
  ablation   the top --heads heads and --mlps MLPs by DLA, mean-ablated (mean over the question set) or
             zero-ablated at the last token, the top heads alone, and as a control as many random
             heads and MLPs zero-ablated, on the first
             --ablation-questions questions: selection rates, RStd, accuracy after
             (Li & Gao 2024, "Anchored Answers", arXiv:2405.03205)

One forward pass per prompt serves the harness, PriDe, the lens and DLA (interp.mcq.collect_last);
each ablation condition is one more pass over the ablation questions.

    python benchmarks/position_bias.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--questions 120]
        [--ablation-questions 16] [--heads 5] [--mlps 2] [--share 0.05] [--threads N] [--no-record]

--questions takes that many questions spread evenly over the three topics (the first of each).
Results are printed and appended, dated, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import time
from pathlib import Path

import torch

import interp
from interp.mcq import (
    LetterTable,
    build_prompts,
    collect_last,
    letter_dla,
    letter_ids,
    letter_lens,
    letter_logits,
    load_questions,
    mean_ablation_hooks,
    pride,
    summarize,
    top_components,
)

RESULTS = Path(__file__).with_name("RESULTS.md")
LETTERS = "ABCD"


def pick_questions(n: int):
    """n questions spread over the topics: the first n // 3 (+1 for the first n % 3 topics) of each."""
    qs = load_questions()
    topics = sorted({q.topic for q in qs}, key=[q.topic for q in qs].index)
    per = [n // len(topics) + (i < n % len(topics)) for i in range(len(topics))]
    out = []
    for t, k in zip(topics, per):
        out += [q for q in qs if q.topic == t][:k]
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def sel(s) -> str:
    return " / ".join(pct(v) for v in s.selection)


def run_model(name: str, args) -> dict:
    t0 = time.perf_counter()
    model = interp.load(name)
    ids = letter_ids(model.require_tokenizer())
    questions = pick_questions(args.questions)
    ps = build_prompts(questions)
    acts = collect_last(model, ps, ids, batch_size=args.batch_size)
    t_harness = time.perf_counter() - t0
    table = LetterTable.from_prompts(ps, acts.logits)
    base = summarize(table)
    pr = pride(table, share=args.share, seed=0)
    fav = base.favoured()
    lens = letter_lens(model, acts, fav)
    dla = letter_dla(model, acts, fav)
    heads, mlps = top_components(dla, args.heads, args.mlps)

    # ablation on the first --ablation-questions questions (all their cyclic permutations)
    m = min(args.ablation_questions, len(questions))
    sub = build_prompts(questions[:m])
    sub_base = summarize(table.subset(range(m)))
    rng = random.Random(0)
    all_heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads) if (l, h) not in heads]
    ctrl_heads = rng.sample(all_heads, len(heads))
    ctrl_mlps = rng.sample([l for l in range(model.cfg.n_layers) if l not in mlps], len(mlps))
    conditions = {}
    for label, hs, ms, how in (("top, mean-ablated", heads, mlps, "mean"), ("top, zero-ablated", heads, mlps, "zero"),
                               ("top heads only, zero", heads, [], "zero"), ("random, zero-ablated (control)", ctrl_heads, ctrl_mlps, "zero")):
        lg = letter_logits(model, sub, ids, batch_size=args.batch_size, fwd_hooks=mean_ablation_hooks(model, acts, hs, ms, how))
        conditions[label] = dict(heads=hs, mlps=ms, summary=summarize(LetterTable.from_prompts(sub, lg)))
    return dict(model=name, n_layers=model.cfg.n_layers, questions=len(questions), prompts=len(ps), base=base, pride=pr,
                favoured=LETTERS[fav], lens=lens, dla=dla, heads=heads, mlps=mlps, ablation_questions=m, sub_base=sub_base,
                conditions=conditions, seconds=time.perf_counter() - t0, harness_seconds=t_harness)


def report(results: list[dict], args) -> str:
    lines = []
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines.append(f"## position_bias.py, {stamp}\n")
    lines.append(f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}. Questions: data/mcq_questions.json "
                 "(every cyclic permutation of the options, prompt `Question: ..\\nA. ..\\n..\\nAnswer:`, choice = the top of the "
                 "letter tokens ' A'..' D'). Percentages; chance accuracy is 25, an unbiased selection is 25 per letter, RStd 0 "
                 "(Zheng et al. 2024).\n")
    lines.append("| model | questions (prompts) | accuracy | selection A / B / C / D | recall A / B / C / D | RStd | consistency | time s |")
    lines.append("|---|---:|---:|---|---|---:|---:|---:|")
    for r in results:
        b = r["base"]
        rec = " / ".join(pct(v) for v in b.recall)
        lines.append(f"| {r['model']} | {r['questions']} ({r['prompts']}) | {pct(b.accuracy)} | {sel(b)} | {rec} | {pct(b.rstd)} | "
                     f"{pct(b.consistency)} | {r['seconds']:.0f} |")
    lines.append(f"\nPriDe (prior from all cyclic permutations of {args.share:.0%} of the questions, at least 1; metrics on the "
                 "other questions, all their permutations):\n")
    lines.append("| model | estimation / held-out questions | prior A / B / C / D | accuracy before -> after | RStd before -> after | "
                 "consistency before -> after | selection after A / B / C / D |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in results:
        p = r["pride"]
        lines.append(f"| {r['model']} | {len(p.estimation)} / {len(p.held_out)} | {' / '.join(f'{v:.3f}' for v in p.prior)} | "
                     f"{pct(p.before.accuracy)} -> {pct(p.after.accuracy)} | {pct(p.before.rstd)} -> {pct(p.after.rstd)} | "
                     f"{pct(p.before.consistency)} -> {pct(p.after.consistency)} | {sel(p.after)} |")
    for r in results:
        n = r["n_layers"]
        fav = r["favoured"]
        lens = r["lens"]
        lines.append(f"\n{r['model']}: favoured letter {fav}. Logit lens on the letters (bias = logit of {fav} minus the mean of "
                     f"the others, mean over prompts; top = share of prompts where {fav} tops the letters), last layers:\n")
        shown = lens[lens.layer >= n - 7]
        lines.append("| " + " | ".join(shown.label) + " |")
        lines.append("|" + "---:|" * len(shown))
        lines.append("| " + " | ".join(f"{b:+.2f} ({pct(t)})" for b, t in zip(shown.bias, shown.favoured_rate)) + " |")
        dla = r["dla"]
        top = dla.nlargest(8, "bias")
        bottom = dla.nsmallest(3, "bias")
        lines.append(f"\nDLA to the bias score (model's mean bias {dla.attrs['model_bias']:+.2f}; parts sum to it): top "
                     + ", ".join(f"{x.label} {x.bias:+.2f}" for x in top.itertuples())
                     + "; most against: " + ", ".join(f"{x.label} {x.bias:+.2f}" for x in bottom.itertuples()) + ".\n")
        lines.append(f"Ablation at the last token (mean: over the question set), on the first {r['ablation_questions']} questions "
                     f"({4 * r['ablation_questions']} prompts):\n")
        lines.append("| condition | heads | MLPs | accuracy | selection A / B / C / D | RStd | consistency |")
        lines.append("|---|---|---|---:|---|---:|---:|")
        s = r["sub_base"]
        lines.append(f"| none | | | {pct(s.accuracy)} | {sel(s)} | {pct(s.rstd)} | {pct(s.consistency)} |")
        for label, c in r["conditions"].items():
            s = c["summary"]
            hs = ", ".join(f"L{l}H{h}" for l, h in c["heads"])
            ms = ", ".join(str(l) for l in c["mlps"])
            lines.append(f"| {label} | {hs} | {ms} | {pct(s.accuracy)} | {sel(s)} | {pct(s.rstd)} | {pct(s.consistency)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--questions", type=int, default=120)
    p.add_argument("--ablation-questions", type=int, default=16)
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--mlps", type=int, default=2)
    p.add_argument("--share", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run_model(name, args) for name in args.models.split(",")]
    text = report(results, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps([{
            "model": r["model"], "base": r["base"].__dict__, "pride_before": r["pride"].before.__dict__,
            "pride_after": r["pride"].after.__dict__, "prior": r["pride"].prior, "favoured": r["favoured"],
            "heads": r["heads"], "mlps": r["mlps"], "lens": r["lens"].to_dict("records"),
            "dla_top": r["dla"].nlargest(15, "bias")[["label", "bias"]].to_dict("records"),
            "conditions": {k: {"heads": v["heads"], "mlps": v["mlps"], **v["summary"].__dict__} for k, v in r["conditions"].items()},
            "sub_base": r["sub_base"].__dict__, "seconds": r["seconds"]} for r in results], indent=1, default=str))
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
