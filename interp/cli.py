"""The `interp` command: batch jobs over a model.

    interp lens smollm2-135m --prompt "The Eiffel Tower is in the city of" --target " Paris"
    interp cache smollm2-135m --prompts prompts.txt --hooks "blocks.*.hook_resid_post" --out acts/
    interp hooks smollm2-135m
    torchrun --standalone --nproc_per_node=4 -m interp heads smollm2-135m --out heads.parquet

`interp heads` and `interp cache` started by torchrun take their shard from RANK / WORLD_SIZE and
their device from LOCAL_RANK; rank 0 finishes the job after a barrier (docs/distributed.md).

Bad input (an unknown model, a --target of several tokens, a pattern that matches no hook, a
missing file, an out-of-range number, a wrong --out suffix) is reported as one line on stderr,
`interp: error: <what is wrong>; <what to do>`, with exit status 2 and no traceback; everything
that can be checked without the model is checked before it loads, and before anything is
written. `interp --debug ...` (or `--debug` after the subcommand) shows the traceback instead.

The lens table is printed for reading: tokens quoted (`' Paris'`, `'\\n'`), KL in nats, target
ranks 0-based (0 = the top token), labelled so. `--out` writes the raw values.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import importlib.util
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .tables import TABLE_SUFFIXES, write_table

if TYPE_CHECKING:
    from .distributed import Launch
    from .heads.table import HeadJobSettings
    from .hooks import HookedModel
    from .store import CacheStore
# HeadJobSettings' messages start with the field name; `interp heads` shows its flag instead.
HEAD_FLAGS = {"analyses": "--analyses", "n_prompts": "--prompts", "length": "--length", "ablation": "--ablation",
              "niah_lengths": "--niah-lengths", "niah_depths": "--niah-depths", "niah_per_cell": "--niah-per-cell",
              "max_tokens": "--max-tokens"}


class UsageError(Exception):
    """Bad command-line input: `main` prints the message as one line and exits with status 2."""


# ---------------------------------------------------------------------------- checks before any work
def _check_model_args(args: argparse.Namespace) -> None:
    """--dtype and --device, before the model loads."""
    from .models.loading import DTYPES

    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype!r} is not a dtype this toolkit loads; use one of {', '.join(DTYPES)}")
    if args.device is None:
        return
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device name; use cpu, cuda, cuda:1, ... or leave it out") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {args.device}: no such CUDA device is visible here "
                         f"({torch.cuda.device_count()} visible); use --device cpu or leave --device out")


def _table_path(text: str, what: str) -> Path:
    """An --out path for a table: .csv, or .parquet with a Parquet engine installed."""
    path = Path(text)
    if path.suffix not in TABLE_SUFFIXES:
        example = (path.stem or "table") + ".parquet"
        raise UsageError(f"--out {text!r}: {what} is written as .csv or .parquet, not {path.suffix or 'a file without a suffix'}; "
                         f"name the file e.g. {example}")
    if path.suffix == ".parquet" and not any(importlib.util.find_spec(m) for m in ("pyarrow", "fastparquet")):
        raise UsageError(f"--out {text}: writing Parquet needs pyarrow (pip install pyarrow); or write .csv")
    if path.is_dir():
        raise UsageError(f"--out {text} is a directory; give a file name ending in .csv or .parquet")
    return path


def _patterns(text: str, flag: str) -> list[str]:
    """Comma-separated glob patterns; at least one."""
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    if not patterns:
        raise UsageError(f"{flag} {text!r} holds no pattern; give comma-separated globs such as 'blocks.*.hook_resid_post'")
    return patterns


def _check_cache_args(args: argparse.Namespace) -> None:
    """What `interp cache` is given that can be checked before the model loads (cmd_cache checks the rest)."""
    if getattr(args, "prompts", None) is not None:
        prompts = Path(args.prompts)
        if not prompts.is_file():
            what = "does not exist" if not prompts.exists() else "is not a file"
            raise UsageError(f"--prompts {prompts} {what}; give a text file with one prompt per line")
    if getattr(args, "hooks", None) is not None:
        _patterns(args.hooks, "--hooks")
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file; give a directory for the cache store (created if absent)")


# Checks of commands whose function does not run them itself; `main` runs them before the command.
PRE_CHECKS = {"cache": _check_cache_args}


def _load(args: argparse.Namespace) -> "HookedModel":
    import interp

    return interp.load(args.model, dtype=args.dtype, device=args.device)


def _hook_filter(model: "HookedModel", patterns: str, flag: str = "--hooks") -> list[str]:
    """Comma-separated glob patterns over hook names; an unmatched pattern is an error naming near misses."""
    known = model.hook_names()
    names: list[str] = []
    for pattern in _patterns(patterns, flag):
        hits = [n for n in known if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, known, n=3, cutoff=0.5)
            hint = f" (closest: {', '.join(repr(c) for c in close)})" if close else ""
            raise UsageError(
                f"{flag} pattern {pattern!r} matches none of the model's {len(known)} hook names{hint}; "
                f"globs take * and ?, e.g. 'blocks.*.hook_resid_post'; list the names with: interp hooks {model.name or 'MODEL'}"
            )
        names.extend(h for h in hits if h not in names)
    return names


# ---------------------------------------------------------------------------- lens
def _check_lens_args(args: argparse.Namespace) -> Optional[Path]:
    """Everything but the targets (those need the tokenizer); returns the --out path, if any."""
    if not args.prompt.strip():
        raise UsageError("--prompt is empty; give the text whose next token the lens should read")
    if args.top_k < 0:
        raise UsageError(f"--top-k {args.top_k}: use 0 or more (0 shows no top tokens)")
    if any(t == "" for t in args.target or []):
        raise UsageError("--target '' is empty; pass one token, e.g. --target ' Paris'")
    return _table_path(args.out, "the lens table") if args.out else None


def _check_targets(model: "HookedModel", targets: Sequence[str], top_k: int) -> None:
    """Each --target must be one token; a word given without its leading space gets a note."""
    from .lens import space_variant, target_pieces

    if top_k > model.cfg.d_vocab:
        raise UsageError(f"--top-k {top_k} is larger than the vocabulary ({model.cfg.d_vocab} tokens)")
    for t in targets:
        pieces, spaced = target_pieces(model, t), space_variant(model, t)
        if len(pieces) != 1:
            fix = (f"use --target {spaced!r}: with its leading space it is one token" if spaced
                   else "pass a single token (mind the leading space, e.g. --target ' Paris')")
            raise UsageError(f"--target {t!r} is {len(pieces)} tokens {pieces} for this model, not one; {fix}")
        if spaced and t[0].isalnum():
            print(f"interp: note: --target {t!r} is the token without a leading space; after a space the word is "
                  f"the token {spaced!r} (pass --target {spaced!r} for that)", file=sys.stderr)


def cmd_lens(args: argparse.Namespace) -> int:
    from .lens import logit_lens_table, readable_lens_table
    from .tuned_lens_cli import check_tuned_lens_path, load_tuned_lens_arg

    out = _check_lens_args(args)
    check_tuned_lens_path(args.tuned_lens)  # before the model loads
    model = _load(args)
    _check_targets(model, args.target or [], args.top_k)
    lens = load_tuned_lens_arg(args.tuned_lens, model)
    table = logit_lens_table(model, args.prompt, top_k=args.top_k, targets=args.target or None, lens=lens)
    print(f"{model}\nprompt tokens: {model.to_str_tokens(args.prompt)}")
    print(f"{'tuned' if lens else 'logit'} lens at the last position (tokens in quotes, so ' Paris' starts with a space; rank 0 = the top token):")
    print(readable_lens_table(table))
    if out:  # the raw table: token strings as they are, numeric ranks
        write_table(table, out)
        print(f"wrote {out}")
    return 0


def _launch(args: argparse.Namespace) -> "Optional[Launch]":
    """The torchrun launch this process is a rank of (None when it runs alone); under torchrun,
    --device becomes the rank's device (cuda:LOCAL_RANK unless pinned)."""
    from .distributed import launched, pick_device

    try:
        launch = launched()
        if launch is not None:
            args.device = pick_device(args.device, launch)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return launch


def _cache_prompts(model: "HookedModel", store: "CacheStore", prompts: Sequence[str], indices: range, names: list[str],
                   quiet: bool) -> str:
    """Cache prompts[i] for i in `indices` (verified entries reused); returns the summary counts."""
    from tqdm import tqdm

    new, cached, redone = 0, 0, {"damaged": 0, "missing": 0}
    for i in tqdm(indices, desc="caching", unit="prompt", disable=quiet):
        tokens = model.to_tokens(prompts[i])
        key = store.key_for(model, tokens, names)
        status = store.status(key)  # resumable: an entry counts as done only once its checksum is verified
        if status == "ok":
            cached += 1
            continue
        if status == "absent":
            new += 1
        else:  # damaged or missing: drop the entry (a damaged file is moved aside, never overwritten), say so
            redone[status] += 1
            moved = store.evict(key)
            what = f"failed its checksum; moved the file to {moved}" if moved else "lost its file"
            print(f"interp: the cache entry of prompt {i + 1} ({key[:12]}…) {what}; recomputing it", file=sys.stderr)
        store.get_or_compute(model, tokens, names_filter=names)
    again = sum(redone.values())
    recomputed = f", {again} recomputed ({redone['damaged']} damaged, {redone['missing']} missing)" if again else ""
    return f"{new} new, {cached} already cached{recomputed}"


def cmd_cache(args: argparse.Namespace) -> int:
    from .distributed import process_group
    from .heads.table import shard_indices
    from .store import CacheStore

    prompts_path = Path(args.prompts)
    if not prompts_path.exists():
        raise SystemExit(f"interp: prompts file {prompts_path} does not exist")
    prompts = [line.rstrip("\n") for line in prompts_path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"interp: {prompts_path} has no prompts (one per line)")
    launch = _launch(args)
    model = _load(args)
    names = _hook_filter(model, args.hooks)
    store = CacheStore(args.out)
    with process_group(launch, model.device) as group:
        if args.repair and group.is_main:
            print(f"interp: repaired {store.root / store.MANIFEST}: {store.repair().summary()}", file=sys.stderr)
        group.barrier()  # under torchrun: no rank writes before the repair is done
        # every writer of the store holds its lock for the file and the manifest, so ranks share one store
        indices = shard_indices(len(prompts), launch.shard) if launch else range(len(prompts))
        counts = _cache_prompts(model, store, prompts, indices, names, args.quiet or not group.is_main)
        span = f"prompts {indices.start + 1}-{indices.stop} of {len(prompts)}" if indices else f"none of the {len(prompts)} prompts"
        tag = f"{launch.tag()} {span}: " if launch else ""
        print(f"{tag}{counts}; {len(names)} hooks per prompt; store: {store.root}", flush=True)
        group.barrier()
        if launch is not None and group.is_main:
            print(f"all {launch.world_size} ranks done; store: {store.root} ({len(store.keys())} entries)")
    return 0


def cmd_hooks(args: argparse.Namespace) -> int:
    if args.filter is not None:
        _patterns(args.filter, "--filter")
    model = _load(args)
    names = _hook_filter(model, args.filter, "--filter") if args.filter is not None else model.hook_names()
    print("\n".join(names))
    return 0


# ---------------------------------------------------------------------------- heads and merge
def _numbers(text: str, kind: type, flag: str, example: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated {example}") from None


def _head_settings(args: argparse.Namespace) -> "HeadJobSettings":
    """The job's settings from the flags; HeadJobSettings' own checks, reported with the flag names."""
    from .heads.table import HeadJobSettings

    if args.max_tokens < 0:
        raise UsageError(f"--max-tokens {args.max_tokens}: give a token count (e.g. 32768), or leave it out")
    niah = args.niah_lengths or (str(args.max_tokens) if args.max_tokens else "1024")
    lengths = _numbers(niah, int, "--niah-lengths", "haystack lengths in tokens, e.g. 1024,2048")
    depths = _numbers(args.niah_depths, float, "--niah-depths", "needle depths in [0, 1], e.g. 0,0.5,1")
    try:
        return HeadJobSettings(
            analyses=tuple(a.strip() for a in args.analyses.split(",") if a.strip()),
            n_prompts=args.prompts, length=args.length, ablation=args.ablation,
            niah_lengths=lengths, niah_depths=depths, niah_per_cell=args.niah_per_cell, max_tokens=args.max_tokens,
        )
    except ValueError as e:
        field, sep, rest = str(e).partition(":")
        raise UsageError(f"{HEAD_FLAGS[field]}:{rest}" if sep and field in HEAD_FLAGS else str(e)) from None


def _shard(text: str) -> tuple[int, int]:
    from .heads.table import parse_shard

    try:
        return parse_shard(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_heads(args: argparse.Namespace) -> int:
    from .distributed import process_group
    from .heads.table import merge_head_parts, parts_dir_for, run_head_job

    out = _table_path(args.out, "the head table")
    shard = _shard(args.shard)
    launch = _launch(args)
    if launch is not None:
        if shard != (0, 1):
            raise UsageError(f"--shard {args.shard} under torchrun: each rank computes shard RANK/WORLD_SIZE "
                             f"({launch.rank}/{launch.world_size} here); leave --shard out")
        shard = launch.shard
    settings = _head_settings(args)
    model = _load(args)
    parts = parts_dir_for(out)
    with process_group(launch, model.device) as group:
        done = run_head_job(model, parts, settings, shard, progress=not args.quiet and group.is_main)
        tag = launch.tag() + " " if launch else ""
        print(f"{tag}computed now: " + ", ".join(f"{a} {n}" for a, n in done.items()) + f" (finished prompts are kept in {parts})",
              flush=True)
        if launch is None and shard[1] > 1:
            print(f"shard {shard[0]}/{shard[1]} done; when every shard is: interp merge {parts} [other parts folders] --out {out}")
            return 0
        group.barrier()  # under torchrun: every rank's parts are written
        if not group.is_main:
            return 0
        write_table(merge_head_parts([parts]), out)  # what `interp merge` does
    print(f"wrote {out}" + (f" (merged the parts of {launch.world_size} ranks)" if launch else ""))
    return 0


def _parts_folders(texts: Sequence[str]) -> list[Path]:
    folders = [Path(t) for t in texts]
    for folder in folders:
        if not (folder / "job.json").is_file():
            what = "does not exist" if not folder.exists() else "has no job.json"
            raise UsageError(f"parts folder {folder} {what}; pass the <out>.parts folders that `interp heads` wrote")
    return folders


def cmd_merge(args: argparse.Namespace) -> int:
    from .heads.table import merge_head_parts

    out = _table_path(args.out, "the head table")
    folders = _parts_folders(args.parts)
    table = merge_head_parts(folders)
    write_table(table, out)
    print(f"merged {len(args.parts)} parts folder(s): {len(table)} heads -> {out}")
    return 0


# ---------------------------------------------------------------------------- parser and main
def _debug_flag(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--debug before or after the subcommand (SUPPRESS keeps a subcommand from resetting the global one)."""
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="on an error, show the full traceback instead of one line")


def build_parser() -> argparse.ArgumentParser:
    from .tuned_lens_cli import add_lens_flag, add_tuned_lens_parser

    parser = argparse.ArgumentParser(prog="interp", description="Interpretability jobs on Hugging Face checkpoints (no network).")
    _debug_flag(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="bundled name (smollm2-135m), HF directory, .safetensors or .gguf file")
        p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
        p.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model loads)")
        _debug_flag(p)

    p = sub.add_parser("lens", help="logit lens table of a prompt: top tokens per layer at the last position")
    model_args(p)
    p.add_argument("--prompt", default="The Eiffel Tower is in the city of")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--target", action="append",
                   help="one token whose probability and rank to report (repeatable); mind the leading space: ' Paris'")
    p.add_argument("--out", help="also write the raw table (.csv or .parquet): token strings as they are, rank 0 = top token")
    add_lens_flag(p)
    p.set_defaults(func=cmd_lens)

    p = sub.add_parser("cache", help="build a shared on-disk activation cache for a prompt file")
    model_args(p)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--hooks", required=True, help="comma-separated glob patterns, e.g. 'blocks.*.hook_resid_post'")
    p.add_argument("--out", required=True, help="cache store directory (created if absent; verified entries reused, "
                   "damaged or missing ones recomputed)")
    p.add_argument("--repair", action="store_true", help="first rebuild the store's manifest from its entry files "
                   "(damaged files are moved into <out>/damaged/); done automatically when the manifest is missing or unreadable")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("hooks", help="list the model's hook names")
    model_args(p)
    p.add_argument("--filter", help="comma-separated glob patterns (* and ?), e.g. 'blocks.0.attn.*'")
    p.set_defaults(func=cmd_hooks)

    p = sub.add_parser("heads", help="head table: sink, ablation, importance, retrieval scores per (layer, head); resumable, shardable")
    model_args(p)
    p.add_argument("--analyses", default="sink,ablation,importance", help="comma-separated: sink, ablation, importance, retrieval")
    p.add_argument("--out", required=True, help="table path (.parquet or .csv); per-prompt parts go to <out>.parts/")
    p.add_argument("--shard", default="0/1", help="i/n: compute only block i of n of every prompt set (then interp merge); "
                   "under torchrun leave it out: each rank takes RANK/WORLD_SIZE")
    p.add_argument("--prompts", type=int, default=0, help="use the first N of the 18 bundled prompts (default 0: all)")
    p.add_argument("--length", type=int, default=64,
                   help="tokens per prompt for sink/ablation/importance (Gu et al.: 64; at least 4, below which every head is a sink)")
    p.add_argument("--ablation", default="zero", choices=["zero", "uniform"], help="zero (output) or uniform (zeroed query, Wu et al.)")
    p.add_argument("--niah-lengths", default=None, help="haystack lengths in tokens, comma-separated (default 1024, or --max-tokens)")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="long context: the sink analysis reads N-token windows of offline prose (4 unless --prompts) and "
                        "NIAH haystacks default to N tokens; both run on the streamed-statistics kernel (no T x T pattern)")
    p.add_argument("--niah-depths", default="0,0.5,1", help="needle depths in [0, 1], comma-separated")
    p.add_argument("--niah-per-cell", type=int, default=1, help="samples per (length, depth)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_heads)

    p = sub.add_parser("merge", help="merge the parts folders of a sharded `interp heads` job into one table")
    p.add_argument("parts", nargs="+", help="<out>.parts folders written by the shards")
    p.add_argument("--out", required=True, help="table path (.parquet or .csv)")
    _debug_flag(p)
    p.set_defaults(func=cmd_merge)
    add_tuned_lens_parser(sub, model_args)
    return parser


def _raised_by_interp(error: BaseException) -> bool:
    """Whether the innermost frame of the traceback is the toolkit's own code (a deliberate check, not a bug)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module == "interp" or module.startswith("interp.")


def error_line(error: BaseException) -> Optional[str]:
    """The one-line message for an error caused by the user's input; None for anything else (a bug: traceback)."""
    from .store import CacheError

    if isinstance(error, UsageError):
        return str(error)
    if isinstance(error, OSError) or (isinstance(error, (ValueError, KeyError, CacheError)) and _raised_by_interp(error)):
        return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return None


def _fail(message: str) -> int:
    print("interp: error: " + re.sub(r"\s*\n\s*", " ", message.strip()), file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    if hasattr(args, "model"):
        _check_model_args(args)
    PRE_CHECKS.get(args.command, lambda _: None)(args)
    with torch.inference_mode(False), torch.no_grad():
        return args.func(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command. Bad input: one line on stderr and 2 (with --debug: the exception is raised)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except SystemExit as e:  # a command's own `raise SystemExit("interp: ...")`
        if args.debug or not isinstance(e.code, str):
            raise
        return _fail(e.code.removeprefix("interp: "))
    except Exception as e:
        message = error_line(e)
        if args.debug or message is None:
            raise
        return _fail(message)


if __name__ == "__main__":
    sys.exit(main())
