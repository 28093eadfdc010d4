"""Tuned lens vs logit lens on SmolLM2-135M: per-layer KL to the final distribution on held-out text.

Trains `interp.vocab.tuned_lens` (Belrose et al. 2023's recipe: SGD, Nesterov 0.9, lr 1.0 with
linear decay, weight decay 1e-3, clipping 1.0) on the training split of the offline corpus
(`interp.vocab.lens_text`: pydoc topics and bundled prompts) and evaluates, on held-out topics
no training step saw, the mean KL(final || lens) in nats and the top-1 agreement with the
model's own next-token prediction at every layer, for the logit lens and the tuned lens.

With the `tuned-lens` package importable (0.2.0; run this with a venv that has it, see
docs/tuned-lens.md), its `TunedLens` is trained too, on the same batches, with its own
optimizer and scheduler builders (`tuned_lens.scripts.ingredients.Optimizer`) and the loss and
step of its `train_loop.py`, and put beside ours.

    python benchmarks/tuned_lens.py [--steps 12] [--batch-size 1] [--seq-len 32] [--eval-chunks 4]

Prints the table and appends a dated section to benchmarks/RESULTS.md (--no-record to skip).
The defaults are sized for a shared 2-core CPU (about 10 minutes): far fewer tokens than the
paper's 250 steps x 2**18 tokens.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import interp
from interp.vocab.lens_text import lens_splits
from interp.vocab.tuned_lens import TrainConfig, batch_indices, lens_kl_table, train_tuned_lens

RESULTS = Path(__file__).with_name("RESULTS.md")


def reference_package():
    """The `tuned-lens` package (ImportError without it). This script's folder comes first on sys.path and its
    name would hide the package, so it is dropped from the path first. tuned-lens 0.2.0 asks
    `isinstance(model, transformer_lens.HookedTransformer)` whenever TransformerLens is installed, and
    TransformerLens 4 removed that class (ImportError): its flag is switched off (our model is an HF model)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import tuned_lens
    from tuned_lens import model_surgery

    model_surgery._transformer_lens_available = False
    return tuned_lens


class ReferenceLens:
    """The `tuned-lens` package's TunedLens behind the `lens_logits(model, resid, layer)` hook."""

    name = "tuned-lens 0.2.0"

    def __init__(self, lens) -> None:
        self.lens = lens

    def lens_logits(self, model, resid: torch.Tensor, layer: int) -> torch.Tensor:
        return self.lens(resid, idx=layer)


def train_reference(model, chunks: torch.Tensor, config: TrainConfig):
    """tuned-lens 0.2.0 trained as its train_loop.py does (KL loss per layer, backward per layer, clip 1.0,
    its SGD/Nesterov optimizer and linear scheduler), on the batches ours saw. fp32 (their autocast is bf16 on GPU)."""
    package = reference_package()
    from tuned_lens.scripts.ingredients import Optimizer

    lens = package.TunedLens.from_model(model.hf_model)
    recipe = Optimizer()  # their defaults: SGD, lr_scale 1.0, momentum 0.9, weight decay 1e-3
    opt = recipe.create_optim([p for p in lens.parameters() if p.requires_grad])
    scheduler = recipe.create_scheduler(opt, config.steps)
    for step in range(config.steps):
        tokens = chunks[batch_indices(len(chunks), step, config.batch_size, config.seed)]
        with torch.no_grad():
            output = model.hf_model(tokens, output_hidden_states=True, use_cache=False)
        labels = output.logits.float().log_softmax(dim=-1)
        for i, h in enumerate(output.hidden_states[:-1]):
            logits = lens(h, idx=i)
            loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        scheduler.step()
    return ReferenceLens(lens)


def md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per layer: KL and top-1 agreement per lens."""
    kl = table.pivot(index="layer", columns="lens", values="kl_to_final")
    top = table.pivot(index="layer", columns="lens", values="top1_agreement")
    order = list(dict.fromkeys(table["lens"]))
    out = pd.DataFrame({"layer": kl.index})
    for name in order:
        out[f"KL {name}"] = kl[name].values
    for name in order:
        out[f"top-1 {name}"] = top[name].values
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--eval-chunks", type=int, default=4, help="held-out windows of --seq-len tokens, spread over the held-out text")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 was 3x faster than 2 on the shared 2-core machine)")
    p.add_argument("--reference", choices=["auto", "yes", "no"], default="auto", help="also train the tuned-lens package's lens")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = interp.load(args.model)
    train, held = lens_splits(model.require_tokenizer(), args.seq_len)
    pick = torch.linspace(0, len(held) - 1, args.eval_chunks).round().long()
    held = held[pick]
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len)
    lenses: dict = {"logit": None}
    t0 = time.perf_counter()
    lenses["tuned (interp)"] = train_tuned_lens(model, train, config, progress=True)
    t_ours = time.perf_counter() - t0
    ref_note = "not run (--reference no)"
    if args.reference != "no":
        try:
            reference_package()
        except ImportError as e:
            if args.reference == "yes":
                raise
            ref_note = f"not run: {e}"
        else:
            t0 = time.perf_counter()
            lenses["tuned-lens 0.2.0"] = train_reference(model, train, config)
            ref_note = f"trained on the same batches in {time.perf_counter() - t0:.0f} s"
    t0 = time.perf_counter()
    table = wide(lens_kl_table(model, held, lenses, batch_size=args.eval_chunks))
    t_eval = time.perf_counter() - t0
    means = table.drop(columns="layer").mean()
    text = md_table(table)
    header = (f"{model.name}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens "
              f"({args.steps * args.batch_size * args.seq_len} training tokens of {train.numel()}); held-out: "
              f"{held.numel()} tokens ({args.eval_chunks} windows) from topics no step saw. {platform.machine()}, "
              f"{args.threads} thread(s), torch {torch.__version__}. interp training {t_ours:.0f} s, evaluation {t_eval:.0f} s; "
              f"tuned-lens package: {ref_note}.")
    summary = "mean over layers: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items())
    print(header, text, summary, sep="\n\n")
    if not args.no_record:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with RESULTS.open("a") as f:
            f.write(f"\n## tuned_lens.py, {stamp}\n\n{header}\n\nKL(final || lens) in nats and top-1 agreement with the "
                    f"model's prediction, per layer (resid_pre; the last block's output is the model itself).\n\n"
                    f"{text}\n\n{summary}\n")
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
