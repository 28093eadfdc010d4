"""The head table: one row per (layer, head) with every head score, as a resumable, shardable job.

    interp heads smollm2-135m --analyses sink,ablation,importance,retrieval --out heads.parquet
    interp heads smollm2-135m ... --out heads.parquet --shard 0/2     # and 1/2, anywhere
    interp merge heads.parquet.parts [more.parts ...] --out heads.parquet
    torchrun --standalone --nproc_per_node=4 -m interp heads smollm2-135m ... --out heads.parquet

How it stays correct when killed or split:
- every analysis is computed prompt by prompt (one prompt per forward, so a value never depends
  on which other prompts shared its batch), and each prompt's per-head values are written to
  `<out>.parts/<analysis>/<index>.safetensors` atomically as soon as they exist, carrying the
  sha256 of their tensors (and their analysis and index) in the safetensors metadata;
- a restarted job verifies and skips the prompts whose files are intact, so finished work is
  never recomputed or lost; a damaged, truncated or empty part is recomputed (said on stderr),
  and merge names any damaged part instead of reading it; temporary files of a killed job are
  removed; `--shard i/n` takes a contiguous block of each analysis's prompt indices;
- `job.json` in the parts folder holds the model fingerprint and the settings; a job whose
  model or settings differ refuses the folder instead of mixing results;
- the table is computed from the per-prompt files in index order, in float64, so merged shards
  give exactly the table of an unsharded run;
- under torchrun each rank runs shard RANK/WORLD_SIZE into the same parts folder and rank 0
  merges after a barrier (`interp heads` with `interp.distributed`; docs/distributed.md).

Scores (definitions in DESIGN.md; papers cited in each module): sink_score = alpha at the
first token (Gu et al.), sink_share, n_secondary_sinks; ablation_delta = mean change of LM loss
when the head is zero-ablated; importance = Michel et al.'s E|dL/dxi_h| normalised per layer;
retrieval_score = Wu et al.'s score over NIAH samples answered correctly.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..atomic import atomic_write_text, remove_stale_temps
from ..hooks import HookedModel
from ..store import DIGEST_KEY, CacheError, DamagedFile, read_checked, save_checked
from ..tables import write_table
from . import importance, retrieval, sinks
from .loss import LMLoss
from .niah import make_samples
from .sweeps import single_head_ablation

__all__ = [
    "ANALYSES", "HeadJobSettings", "Work", "merge_head_parts", "parse_shard", "parts_dir_for", "run_head_job",
    "shard_indices", "write_table",
]

ANALYSES = ("sink", "ablation", "importance", "retrieval")


@dataclass
class HeadJobSettings:
    """Everything that determines the table's numbers (stored in job.json and in the table)."""

    analyses: tuple[str, ...] = ("sink", "ablation", "importance")
    n_prompts: int = 0  # 0 = every bundled domain prompt
    length: int = sinks.SINK_LENGTH
    eps: float = sinks.EPS
    secondary_threshold: float = sinks.SECONDARY_THRESHOLD
    ablation: str = "zero"
    niah_lengths: tuple[int, ...] = (1024,)
    niah_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    niah_per_cell: int = 1
    niah_seed: int = 0
    max_new_tokens: int = 8
    max_tokens: int = 0  # > 0: the sink analysis reads windows of this many tokens of offline prose (long context)

    def __post_init__(self) -> None:
        """Refuse settings that would fail late or give meaningless numbers.

        Messages start with the field name and a colon (`interp heads` swaps in its flag).
        `length` must be at least max(3, ceil(1 / eps)) (4 for eps = 0.3): query 0 can only attend
        to token 0, so every head's alpha(0) is at least 1 / length, and below that every head
        would be a sink by construction (length 1 gives every head a sink score of 1.0).
        """
        self.analyses = tuple(self.analyses)
        choices = ", ".join(ANALYSES)
        if not self.analyses:
            raise ValueError(f"analyses: none given; choose one or more of {choices}")
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown:
            raise ValueError(f"analyses: unknown analyses {unknown}; choose from {choices}")
        twice = sorted({a for a in self.analyses if self.analyses.count(a) > 1})
        if twice:
            raise ValueError(f"analyses: {twice} listed more than once; list each analysis once")
        n_available = sum(len(texts) for texts in sinks.load_domain_prompts().values())
        if not 0 <= self.n_prompts <= n_available:
            raise ValueError(f"n_prompts: {self.n_prompts} is out of range; use 1 to {n_available} "
                             f"(the first N bundled prompts) or 0 (all {n_available})")
        for name in ("eps", "secondary_threshold"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} is not an attention weight threshold; use a value in (0, 1)")
        import math

        min_length = max(3, math.ceil(1 / self.eps - 1e-9))
        if self.length < min_length:
            raise ValueError(
                f"length: {self.length} is too short; query 0 sees only token 0, so every head gives it at least "
                f"1/length of its attention and, with fewer than {min_length} tokens, passes eps = {self.eps} as a sink; "
                f"use {min_length} or more (Gu et al. use {sinks.SINK_LENGTH})"
            )
        if self.ablation not in ("zero", "uniform"):
            raise ValueError(f"ablation: {self.ablation!r} is not a head-job ablation; use 'zero' (head output zeroed) "
                             "or 'uniform' (query zeroed: uniform attention, Wu et al.)")
        self.niah_lengths = tuple(int(x) for x in self.niah_lengths)
        self.niah_depths = tuple(float(x) for x in self.niah_depths)
        if not self.niah_lengths or min(self.niah_lengths) < 1:
            raise ValueError(f"niah_lengths: {list(self.niah_lengths)}; give one or more haystack lengths in tokens, each >= 1")
        if not self.niah_depths or not all(0.0 <= d <= 1.0 for d in self.niah_depths):
            raise ValueError(f"niah_depths: {list(self.niah_depths)}; give one or more needle depths in [0, 1]")
        if self.max_tokens and self.max_tokens < min_length:
            raise ValueError(f"max_tokens: {self.max_tokens} is too short for the sink analysis; use {min_length} or more, "
                             "or 0 for the bundled prompts at `length` tokens")
        for name in ("niah_per_cell", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)}; use 1 or more")

    def as_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def parse_shard(text: str) -> tuple[int, int]:
    """ "i/n" -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_indices(n_items: int, shard: tuple[int, int]) -> range:
    """A contiguous block of 0..n_items-1 for shard i of n."""
    i, n = shard
    return range(i * n_items // n, (i + 1) * n_items // n)


# ---------------------------------------------------------------------------- per-prompt work
@dataclass
class Work:
    """One analysis: how many prompts it has and how to compute one prompt's tensors."""

    n_items: int
    compute: Callable[[int], dict[str, Tensor]]


def _text_prompts(settings: HeadJobSettings) -> list[str]:
    texts = [t for domain in sinks.load_domain_prompts().values() for t in domain]
    return texts[: settings.n_prompts] if settings.n_prompts else texts


LONG_PROMPTS = 4  # long-context sink prompts when n_prompts is 0


def long_sink_tokens(model: HookedModel, max_tokens: int, n_prompts: int) -> Tensor:
    """Long[Tensor, "prompt max_tokens"]: consecutive windows of the offline prose corpus (the Python
    standard library's pydoc topics, then the bundled prompts), for sink scores at long context.
    Each window opens with the tokenizer's BOS when it adds one, as `sink_tokens` prompts do."""
    from ..vocab.lens_text import lens_documents, token_chunks

    tok = model.require_tokenizer()
    bos = tok.encode("x", add_special_tokens=True)[:-len(tok.encode("x", add_special_tokens=False))] or []
    n = n_prompts or LONG_PROMPTS
    chunks = token_chunks(tok, list(lens_documents().values()), max_tokens - len(bos), max_chunks=n)
    if len(chunks) < n:
        raise ValueError(f"max_tokens: the offline corpus holds only {len(chunks)} windows of {max_tokens} tokens; "
                         f"ask for fewer prompts (--prompts {len(chunks)}) or fewer tokens")
    if bos:
        chunks = torch.cat([torch.tensor(bos).expand(len(chunks), -1), chunks], dim=1)
    return chunks.to(model.device)


def _work(model: HookedModel, settings: HeadJobSettings, analysis: str) -> Work:
    if analysis == "retrieval":
        samples = make_samples(model.tokenizer, settings.niah_lengths, settings.niah_depths, settings.niah_per_cell,
                               seed=settings.niah_seed)

        def retrieval_(i: int) -> dict[str, Tensor]:
            result = retrieval.score_retrieval(model, [samples[i]], max_new_tokens=settings.max_new_tokens, batch_size=1)
            return {"score": result.per_sample[0], "counted": torch.tensor([bool(result.samples.correct[0])])}

        return Work(len(samples), retrieval_)

    tokens = sinks.sink_tokens(model, _text_prompts(settings), settings.length)
    if analysis == "sink" and settings.max_tokens:
        tokens = long_sink_tokens(model, settings.max_tokens, settings.n_prompts)

    def sink(i: int) -> dict[str, Tensor]:
        # sinks.sink_scores on this prompt alone: its sink_score is alpha at the first token, and its
        # n_secondary counts the keys k > 0 seen by >= sinks.MIN_QUERIES queries with alpha > the threshold
        alpha = sinks.attention_alpha(model, tokens[i : i + 1])  # [1, layer, head, T]
        scores = sinks.sink_scores(alpha, settings.eps, settings.secondary_threshold, sinks.MIN_QUERIES)
        shape = alpha.shape[1:3]
        return {"alpha_first": _column(scores, "sink_score", shape), "n_secondary": _column(scores, "n_secondary", shape)}

    def importance_(i: int) -> dict[str, Tensor]:
        return {"abs_grad": importance.gate_gradients(model, tokens[i : i + 1], LMLoss)[0].abs().double()}

    def ablation_(i: int) -> dict[str, Tensor]:
        df = single_head_ablation(model, tokens[i : i + 1], LMLoss, how=settings.ablation)
        delta = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.float64)
        delta[df.layer.to_numpy().copy(), df["head"].to_numpy().copy()] = torch.tensor(df.delta.to_numpy().copy(), dtype=torch.float64)
        return {"delta": delta}

    return Work(tokens.shape[0], {"sink": sink, "importance": importance_, "ablation": ablation_}[analysis])


# ---------------------------------------------------------------------------- the parts folder
_PART = re.compile(r"^(\d{6})\.safetensors$")


def _part_path(folder: Path, i: int) -> Path:
    return folder / f"{i:06d}.safetensors"


def _save_part(tensors: dict[str, Tensor], folder: Path, i: int) -> None:
    """One prompt's tensors, written atomically with their checksum, analysis and index."""
    save_checked(tensors, _part_path(folder, i), {"analysis": folder.name, "index": str(i)})


def _read_part(path: Path, analysis: str, i: int) -> tuple[dict[str, Tensor], bool]:
    """(tensors, carries a checksum) of one part; DamagedFile when it is damaged or misplaced."""
    tensors, meta = read_checked(path)
    if meta.get("analysis", analysis) != analysis or meta.get("index", str(i)) != str(i):
        raise DamagedFile(path, f"holds {meta.get('analysis')} prompt {meta.get('index')}, not {analysis} prompt {i}")
    return tensors, DIGEST_KEY in meta


def _todo(folder: Path, indices: range) -> list[int]:
    """The indices whose part is absent or damaged (a damaged one is named on stderr); warns of unchecked old parts."""
    todo, unchecked = [], 0
    for i in indices:
        path = _part_path(folder, i)
        if not path.exists():
            todo.append(i)
            continue
        try:
            unchecked += not _read_part(path, folder.name, i)[1]
        except DamagedFile as e:
            print(f"[interp] {e}: recomputing it", file=sys.stderr, flush=True)
            todo.append(i)
    if unchecked:
        print(f"[interp] {unchecked} part(s) in {folder} carry no checksum (written by an older version): kept "
              "because they parse; delete them to recompute", file=sys.stderr, flush=True)
    return todo


def _job_record(model: HookedModel, settings: HeadJobSettings, n_items: dict[str, int]) -> dict:
    return {"model": model.name, "fingerprint": model.fingerprint(), "settings": settings.as_json(), "n_items": n_items}


def _open_parts(parts: Path, record: dict) -> None:
    """Create the parts folder, or check that an existing one belongs to the same model and settings."""
    parts.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(parts, legacy=("job.tmp",))
    meta = parts / "job.json"
    if meta.exists():
        old = _read_job(parts)
        for key in ("fingerprint", "settings", "n_items"):
            if old.get(key) != record.get(key):
                raise CacheError(
                    f"{parts} holds a job with a different {key} ({old.get(key)!r} vs {record.get(key)!r}); "
                    "refusing to mix results: choose another --out or delete that folder"
                )
        return
    atomic_write_text(meta, json.dumps(record, indent=1))


def _read_job(parts: Path) -> dict:
    """The job record of a parts folder, or a CacheError that names the folder."""
    meta = parts / "job.json"
    if not meta.exists():
        raise CacheError(f"{parts} has no job.json: not a parts folder written by `interp heads`")
    try:
        record = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{meta} is not valid JSON ({e}); the parts folder is damaged: move it aside and rerun") from e
    if not isinstance(record, dict):
        raise CacheError(f"{meta} is not a job record; the parts folder is damaged: move it aside and rerun")
    return record


def run_head_job(
    model: HookedModel,
    parts: Path,
    settings: HeadJobSettings,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict[str, int]:
    """Compute this shard's missing per-prompt files. Returns {analysis: prompts computed now}."""
    parts = Path(parts)
    works = {a: _work(model, settings, a) for a in settings.analyses}
    _open_parts(parts, _job_record(model, settings, {a: w.n_items for a, w in works.items()}))
    done_now, written = {}, 0
    for analysis, work in works.items():
        folder = parts / analysis
        folder.mkdir(exist_ok=True)
        remove_stale_temps(folder, legacy=("*.tmp",))
        todo = _todo(folder, shard_indices(work.n_items, shard))
        for i in tqdm(todo, desc=f"{analysis} (shard {shard[0]}/{shard[1]})", disable=not progress):
            _save_part(work.compute(i), folder, i)
            written += 1
            _crash_for_test(written)
        done_now[analysis] = len(todo)
    return done_now


def _crash_for_test(written: int) -> None:
    """Test hook: with INTERP_TEST_CRASH_AFTER=n set, die (exit status 1, no clean-up) right after the
    n-th part this process writes, only on torchrun's first attempt (TORCHELASTIC_RESTART_COUNT unset
    or 0) and, when INTERP_TEST_CRASH_RANK is set, only on that RANK. tests/test_torchrun.py uses it."""
    after = os.environ.get("INTERP_TEST_CRASH_AFTER")
    if not after or written != int(after) or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if os.environ.get("INTERP_TEST_CRASH_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
        print(f"[interp] INTERP_TEST_CRASH_AFTER={after}: exiting after {written} part(s) (test hook)", file=sys.stderr, flush=True)
        os._exit(1)


def _load_items(parts_dirs: Sequence[Path], analysis: str, n_items: int) -> list[dict[str, Tensor]]:
    items: list[Optional[dict[str, Tensor]]] = [None] * n_items
    for parts in parts_dirs:
        for path in sorted((parts / analysis).glob("*.safetensors")):
            match = _PART.match(path.name)
            if match is None or int(match.group(1)) >= n_items:
                raise CacheError(f"{path} is not one of the {n_items} {analysis} parts of this job; move it out of {parts}")
            i = int(match.group(1))
            try:
                tensors = _read_part(path, analysis, i)[0]
            except DamagedFile as e:
                raise CacheError(
                    f"{e}. Rerun the `interp heads` command that wrote {parts} (same settings, --out and --shard): "
                    "it recomputes damaged parts; then merge again"
                ) from e
            if items[i] is not None and any(not torch.equal(items[i][k], tensors[k]) for k in tensors):
                raise CacheError(f"{path} disagrees with another shard's copy of {analysis} prompt {i}")
            items[i] = tensors
    missing = [i for i, x in enumerate(items) if x is None]
    if missing:
        raise CacheError(f"{analysis}: prompts {missing[:10]}{'...' if len(missing) > 10 else ''} are missing "
                         f"({len(missing)} of {n_items}); run the shards that hold them, then merge again")
    return items  # type: ignore[return-value]


def _stack(items: list[dict[str, Tensor]], key: str) -> Tensor:
    return torch.stack([x[key].double() for x in items])


def _column(frame: pd.DataFrame, name: str, shape: torch.Size) -> Tensor:
    """A per-(layer, head) column of a frame with one row per (layer, head), layer-major, as Float64[layer, head]."""
    return torch.tensor(frame[name].to_numpy(dtype="float64"), dtype=torch.float64).reshape(shape)


def _scores(analysis: str, items: list[dict[str, Tensor]], settings: dict) -> dict[str, Tensor]:
    """Per-(layer, head) columns of one analysis from its per-prompt tensors (the definitions are the analyses' own)."""
    if analysis == "sink":  # as sinks.sink_scores: means over prompts, is_sink = sink_score > eps
        first = _stack(items, "alpha_first")
        return {"sink_score": first.mean(0), "sink_share": (first > settings["eps"]).double().mean(0),
                "is_sink": first.mean(0) > settings["eps"], "n_secondary_sinks": _stack(items, "n_secondary").mean(0)}
    if analysis == "importance":
        raw = _stack(items, "abs_grad").mean(0)
        return {"importance": importance.normalise_per_layer(raw), "importance_raw": raw}
    if analysis == "ablation":
        return {"ablation_delta": _stack(items, "delta").mean(0)}
    per_sample, counted = _stack(items, "score"), torch.cat([x["counted"] for x in items]).bool()
    scores = retrieval.scores_frame(per_sample, counted.tolist())  # mean over the counted samples, NaN when none
    score = _column(scores, "retrieval_score", per_sample.shape[1:])
    return {"retrieval_score": score, "is_retrieval_head": score > retrieval.THRESHOLD,
            "retrieval_samples_counted": torch.full_like(score, float(counted.sum()))}


def merge_head_parts(parts_dirs: Sequence[Path]) -> pd.DataFrame:
    """The head table from one or more parts folders of the same job (shards of it)."""
    parts_dirs = [Path(p) for p in parts_dirs]
    records = [_read_job(p) for p in parts_dirs]
    for p, r in zip(parts_dirs[1:], records[1:]):
        for key in ("fingerprint", "settings", "n_items"):
            if r.get(key) != records[0].get(key):
                raise CacheError(f"{p} is a different job ({key} differs from {parts_dirs[0]}); refusing to merge")
    record = records[0]
    settings = record["settings"]
    columns: dict[str, Tensor] = {}
    for analysis in settings["analyses"]:
        columns.update(_scores(analysis, _load_items(parts_dirs, analysis, record["n_items"][analysis]), settings))
    L, H = next(iter(columns.values())).shape
    layer, head = torch.meshgrid(torch.arange(L), torch.arange(H), indexing="ij")
    table = pd.DataFrame({"layer": layer.flatten().numpy(), "head": head.flatten().numpy()})
    for name, values in columns.items():
        table[name] = values.flatten().numpy()
    table["model"] = record["model"]
    table["fingerprint"] = record["fingerprint"]
    table["settings"] = json.dumps(settings, sort_keys=True)
    return table


def parts_dir_for(out: Path) -> Path:
    """The parts folder of a table written to `out`: `<out>.parts`."""
    return Path(str(out) + ".parts")
