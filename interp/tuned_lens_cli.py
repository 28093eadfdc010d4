"""`interp tuned-lens train` and `interp lens --tuned-lens PATH` (docs/tuned-lens.md).

    interp tuned-lens train smollm2-135m --out lenses/smollm2 --steps 100
    interp lens smollm2-135m --prompt "The Eiffel Tower is in the city of" --tuned-lens lenses/smollm2

Training reads the training split of the offline corpus (`interp.vocab.lens_text`: pydoc
topics and the bundled prompts, held-out topics excluded), shows a progress bar, and saves a
checkpoint into --out every --checkpoint-every steps: the same command run again after a kill
continues from the last checkpoint. cli.py wires these in (`add_tuned_lens_parser`,
`--tuned-lens` on `interp lens`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

if TYPE_CHECKING:
    from .hooks import HookedModel
    from .vocab.tuned_lens import TunedLens


def _load(args: argparse.Namespace) -> "HookedModel":
    import interp

    return interp.load(args.model, dtype=args.dtype, device=args.device)


def _train_chunks(model: "HookedModel", seq_len: int, seed: int) -> torch.Tensor:
    from .vocab.lens_text import lens_splits

    return lens_splits(model.require_tokenizer(), seq_len, seed=seed)[0]


def _check_train_args(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the lens (created if absent)")
    for flag in ("steps", "batch_size", "seq_len", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: use 1 or more")
    return out


def cmd_tuned_lens_train(args: argparse.Namespace) -> int:
    """Train (or resume training) a tuned lens into the folder --out."""
    from .vocab.tuned_lens import TrainConfig, train_tuned_lens

    out = _check_train_args(args)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         checkpoint_every=args.checkpoint_every, seed=args.seed)
    model = _load(args)
    chunks = _train_chunks(model, config.seq_len, config.seed)
    print(f"{model}\ntraining a tuned lens: {config.steps} steps x {config.batch_size} x {config.seq_len} tokens "
          f"from {len(chunks)} training chunks; checkpoints in {out}")
    lens = train_tuned_lens(model, chunks, config, checkpoint_dir=out, progress=not args.quiet)
    lens.save(out)
    print(f"wrote {out} (settings: {dataclasses.asdict(config)})")
    return 0


def check_tuned_lens_path(path: Optional[str]) -> None:
    """`--tuned-lens PATH` before the model loads: a folder with config.json and params.safetensors (ValueError if not)."""
    if path is None:
        return
    from .vocab.tuned_lens import CONFIG_NAME, PARAMS_NAME

    folder = Path(path)
    missing = [n for n in (CONFIG_NAME, PARAMS_NAME) if not (folder / n).is_file()]
    if missing:
        what = "does not exist" if not folder.exists() else f"has no {' or '.join(missing)}"
        raise ValueError(f"--tuned-lens {path} {what}; give a folder written by: interp tuned-lens train MODEL --out {path}")


def load_tuned_lens_arg(path: Optional[str], model: "HookedModel") -> "Optional[TunedLens]":
    """`--tuned-lens PATH` of `interp lens`: None without it; a lens trained for another model is refused (ValueError)."""
    if path is None:
        return None
    from .vocab.tuned_lens import TunedLens

    return TunedLens.load(path, model)


def add_lens_flag(p: argparse.ArgumentParser) -> None:
    """`--tuned-lens PATH` for `interp lens`."""
    p.add_argument("--tuned-lens", default=None, metavar="PATH",
                   help="read layers through a trained tuned lens (a folder from `interp tuned-lens train`) instead of the logit lens")


def add_tuned_lens_parser(sub: "argparse._SubParsersAction", model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """`interp tuned-lens train MODEL --out DIR [--steps N] ...`."""
    from .vocab.tuned_lens import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("tuned-lens", help="train a tuned lens (Belrose et al. 2023) for `interp lens --tuned-lens`")
    actions = p.add_subparsers(dest="tuned_lens_command", required=True)
    t = actions.add_parser("train", help="train on the offline corpus (pydoc topics, bundled prompts); resumes after a kill")
    model_args(t)
    t.add_argument("--out", required=True, help="lens folder: params.safetensors, config.json, checkpoint.safetensors")
    t.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps, lr decays linearly to 0 (default {d.steps}, the paper's)")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default {d.batch_size})")
    t.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help=f"steps between checkpoints (default {d.checkpoint_every})")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and of the topic split")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tuned_lens_train)
