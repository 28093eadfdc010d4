"""How well attribution patching predicts exact activation patching on SmolLM2-135M, IOI.

For each node type, both methods sweep the same IOI pairs (denoising, logit difference); the
script prints the Pearson correlation of the two result tensors (flattened), the time of each,
and the IOI facts of the exact resid_pre sweep: where the normalised effect sits per layer
(the S1/IO positions early, the END position late). Appends the table to benchmarks/RESULTS.md.

    python benchmarks/attribution_vs_exact.py [--pairs 8] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

import interp
from interp.circuits.tasks.ioi import ioi_prompts
from interp.metrics import LogitDiff
from interp.patching import activation_patch, attribution_patch

RESULTS = Path(__file__).with_name("RESULTS.md")
NODES = {"resid_pre": "pos", "resid_mid": "pos", "attn_out": "pos", "mlp_out": "pos",
         "z": "head", "q": "head", "k": "head", "v": "head", "pattern": "head"}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def resid_pre_story(result, positions: dict, tokens: list[str]) -> list[str]:
    """Per layer: the position with the largest normalised effect, and the S1/IO/S2/END effects."""
    norm = result.normalized
    named = {k: int(v[0]) for k, v in positions.items()}
    lines = ["| layer | argmax pos | " + " | ".join(named) + " |", "|---" * (2 + len(named)) + "|"]
    for layer in range(norm.shape[0]):
        top = int(norm[layer].argmax())
        cells = " | ".join(f"{float(norm[layer, p]):.2f}" for p in named.values())
        lines.append(f"| {layer} | {top} ({tokens[top]!r}) | {cells} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    model = interp.load("smollm2-135m")
    pairs = ioi_prompts(model.tokenizer, args.pairs, seed=0, order="ABBA")
    metric = LogitDiff(pairs.answer_tokens)
    clean, corrupted = pairs.clean_tokens, pairs.corrupted_tokens

    start = time.perf_counter()
    approx = attribution_patch(model, list(NODES), clean, corrupted, metric, by=NODES)
    t_attr = time.perf_counter() - start
    rows, exact_resid = [], None
    for node, by in NODES.items():
        start = time.perf_counter()
        exact = activation_patch(model, node, clean, corrupted, metric, by=by)
        t_exact = time.perf_counter() - start
        exact_resid = exact if node == "resid_pre" else exact_resid
        rows.append(f"| {node} by {by} | {list(exact.values.shape)} | {pearson(approx[node].values, exact.values):.3f} | {t_exact:.1f} |")
    per_prompt = pairs.logit_diff(model(clean)) if hasattr(pairs, "logit_diff") else None
    table = "\n".join(["| node | shape | Pearson r (attribution vs exact) | exact sweep (s) |", "|---|---|---|---|", *rows])
    story = "\n".join(resid_pre_story(exact_resid, pairs.positions, model.to_str_tokens(clean[0])))
    summary = (f"{args.pairs} IOI pairs (ABBA, one template) x {clean.shape[1]} tokens; attribution for all "
               f"{len(NODES)} node types in one pass: {t_attr:.1f} s. Clean logit diff {exact_resid.clean_metric:.2f}, "
               f"corrupted {exact_resid.corrupted_metric:.2f}")
    if per_prompt is not None:
        summary += f"; clean logit diff > 0 on {int((per_prompt > 0).sum())}/{len(per_prompt)} prompts"
    print(summary + "\n\n" + table + "\n\nresid_pre, exact, normalised (prompt 0's positions):\n\n" + story)
    if not args.no_record:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with RESULTS.open("a") as f:
            f.write(f"\n## attribution_vs_exact.py, {stamp}\n\n{summary}.\n\n{table}\n\n"
                    f"Exact resid_pre sweep, normalised (0 = corrupted, 1 = clean), prompt 0's positions:\n\n{story}\n")


if __name__ == "__main__":
    main()
