"""Activation caches: in memory (`ActivationCache`) and on disk (`CacheStore`).

`ActivationCache` is a dict of hook name -> tensor with the residual-stream views the field
uses (TransformerLens vocabulary): `accumulated_resid`, `decompose_resid`,
`stack_head_results`, `apply_ln_to_stack`.

`CacheStore` is a directory of safetensors files plus `manifest.json`, keyed by a fingerprint
of (model weights, token ids, hook names, dtype). Writes go through `interp.atomic` (temporary
file, fsync, rename), and the manifest is rewritten the same way only after the data file is
complete, so a killed writer leaves the store readable; the next writer removes its temporary
file. A file whose checksum or key does not match its manifest entry is refused, never
overwritten. Each entry file carries its own key and a checksum of its tensors, so the manifest
can be rebuilt from the files (`CacheStore.repair`, and automatically when it is missing or
unreadable); a damaged file is moved aside into `damaged/`, never deleted.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomic import atomic_write, atomic_write_text, file_lock, remove_stale_temps
from .hook_points import get_act_name, unknown_hook_error

if TYPE_CHECKING:
    from .hooks import HookedModel


class ActivationCache:
    """Cached activations of one forward pass, keyed by hook name.

    `cache["blocks.3.attn.hook_pattern"]` or TransformerLens's shorthand `cache["pattern", 3]`.
    """

    def __init__(self, activations: dict[str, Tensor], model: Optional["HookedModel"] = None, has_batch_dim: bool = True):
        self.cache_dict = dict(activations)
        self.model = model
        self.has_batch_dim = has_batch_dim

    # -------------------------------------------------------------- dict-like
    def _key(self, key) -> str:
        if isinstance(key, tuple):
            key = get_act_name(*key)
        if key not in self.cache_dict:
            raise self._missing(key)
        return key

    def _missing(self, key: str) -> KeyError:
        """The error for a name this cache lacks: a hook of the model left out (opt-in or filtered), or no hook at all."""
        model = self.model
        if model is None:
            if not self.cache_dict:
                return KeyError(f"{key!r}: the cache is empty")
            close = difflib.get_close_matches(key, list(self.cache_dict), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            return KeyError(f"{key!r} is not in this cache.{hint} It holds {len(self)} activations: cache.keys() lists them.")
        if key not in model.hook_names():
            return unknown_hook_error(key, model.hook_names())
        pattern = re.sub(r"^blocks\.\d+\.", "", key)
        ask = f"names_filter=lambda n: n.endswith({pattern!r}) or <your filter>, or a list of names including {key!r}"
        if key not in model.resolve_names(None):
            return KeyError(
                f"{key!r} exists but was not cached: it is an opt-in hook, which run_with_cache records only when "
                f"names_filter asks for it (names_filter=None leaves it out to save memory). Run "
                f"model.run_with_cache(input, {ask})."
            )
        return KeyError(
            f"{key!r} exists but was not cached: this run's names_filter left it out (the cache holds {len(self)} of the "
            f"model's {len(model.hook_names())} hooks). Run model.run_with_cache(input, {ask})."
        )

    def __getitem__(self, key) -> Tensor:
        return self.cache_dict[self._key(key)]

    def __contains__(self, key) -> bool:
        if isinstance(key, tuple):
            key = get_act_name(*key)
        return key in self.cache_dict

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def to(self, device: Union[str, torch.device]) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self.items()}, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> "ActivationCache":
        if not self.has_batch_dim:
            return self
        for k, v in self.items():
            if v.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1; {k} has batch {v.shape[0]}")
        return ActivationCache({k: v[0] for k, v in self.items()}, self.model, has_batch_dim=False)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {list(self.cache_dict)[:4]}{'...' if len(self) > 4 else ''})"

    # -------------------------------------------------------------- residual-stream views
    def _need_model(self) -> "HookedModel":
        if self.model is None:
            raise ValueError("this operation needs the model: build the cache with model.run_with_cache or pass model=")
        return self.model

    def _n_layers(self) -> int:
        return self._need_model().cfg.n_layers

    @staticmethod
    def _pos(t: Tensor, pos_slice, pos_dim: int) -> Tensor:
        """Select positions on dimension `pos_dim` (negative): an int drops the dimension, as in TransformerLens."""
        if pos_slice is None:
            return t
        dim = t.ndim + pos_dim
        if isinstance(pos_slice, int):
            return t.select(dim, pos_slice)
        if isinstance(pos_slice, slice):
            return t[(slice(None),) * dim + (pos_slice,)]
        return t.index_select(dim, torch.as_tensor(pos_slice, device=t.device))

    def accumulated_resid(
        self,
        layer: Optional[int] = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice=None,
        return_labels: bool = False,
    ):
        """The residual stream before each layer < `layer` (all layers plus the final one if None).

        Returns [component, batch, pos, d_model]; labels `0_pre`, `0_mid`, ..., `final_post`.
        `apply_ln` recomputes the final norm on each component (the logit lens convention).
        """
        n = self._n_layers()
        layer = n if layer is None or layer == -1 else layer
        labels, parts = [], []
        for l in range(layer):
            labels.append(f"{l}_pre")
            parts.append(self[f"blocks.{l}.hook_resid_pre"])
            if incl_mid:
                labels.append(f"{l}_mid")
                parts.append(self[f"blocks.{l}.hook_resid_mid"])
        if layer == n:
            labels.append("final_post")
            parts.append(self[f"blocks.{n - 1}.hook_resid_post"])
        stack = torch.stack([self._pos(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, recompute=True)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: Optional[int] = None,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice=None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ):
        """The residual stream before `layer` as a sum of its writers: embed, pos_embed, then each
        layer's attn_out and mlp_out (`mode`: "all", "attn" or "mlp"). [component, batch, pos, d_model].

        `apply_ln` divides by the final norm's scale computed on the whole residual (frozen), which
        keeps the decomposition linear.
        """
        n = self._n_layers()
        layer = n if layer is None or layer == -1 else layer
        labels, parts = [], []
        if incl_embeds:
            labels.append("embed")
            parts.append(self["hook_embed"])
            if "hook_pos_embed" in self:
                labels.append("pos_embed")
                parts.append(self["hook_pos_embed"])
        for l in range(layer):
            if mode in ("all", "attn"):
                labels.append(f"{l}_attn_out")
                parts.append(self[f"blocks.{l}.hook_attn_out"])
            if mode in ("all", "mlp"):
                labels.append(f"{l}_mlp_out")
                parts.append(self[f"blocks.{l}.hook_mlp_out"])
        # hook_pos_embed may have batch size 1 (position ids broadcast over the batch).
        stack = torch.stack(torch.broadcast_tensors(*[self._pos(p, pos_slice, -2) for p in parts]))
        if apply_ln:
            final = self[f"blocks.{n - 1}.hook_resid_post"] if layer == n else self[f"blocks.{layer}.hook_resid_pre"]
            stack = self.apply_ln_to_stack(stack, recompute=False, resid=self._pos(final, pos_slice, -2))
        return (stack, labels) if return_labels else stack

    def stack_head_results(
        self, layer: Optional[int] = None, pos_slice=None, apply_ln: bool = False, return_labels: bool = False
    ):
        """Each head's write to the residual stream, [layer*head, batch, pos, d_model] for layers < `layer`.

        Uses `hook_result` when cached, otherwise z @ W_O per head (biases excluded, as in TransformerLens).
        """
        model = self._need_model()
        n = self._n_layers()
        layer = n if layer is None or layer == -1 else layer
        labels, parts = [], []
        for l in range(layer):
            name = f"blocks.{l}.attn.hook_result"
            if name in self:
                result = self[name]
            else:
                z = self[f"blocks.{l}.attn.hook_z"]
                result = torch.einsum("...phd,hdm->...phm", z, model.W_O(l).to(z.device, z.dtype))
            result = self._pos(result, pos_slice, -3)
            parts.extend(result.movedim(-2, 0))
            labels.extend(f"L{l}H{h}" for h in range(model.cfg.n_heads))
        stack = torch.stack(parts)
        if apply_ln:
            final = self[f"blocks.{n - 1}.hook_resid_post"] if layer == n else self[f"blocks.{layer}.hook_resid_pre"]
            stack = self.apply_ln_to_stack(stack, recompute=False, resid=self._pos(final, pos_slice, -2))
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, stack: Tensor, recompute: bool = True, resid: Optional[Tensor] = None) -> Tensor:
        """Apply the model's final norm to a stack [component, ..., d_model].

        recompute=True: the norm on each component as if it were the residual (logit lens).
        recompute=False: the linear map the norm applies to `resid` (its scale frozen), applied to
        every component, so the components still sum to the normed residual (minus any bias).
        """
        model = self._need_model()
        if recompute:
            return model.apply_final_norm(stack)
        if resid is None:
            raise ValueError("recompute=False needs `resid`, the residual whose norm scale is frozen")
        return frozen_norm(model.adapter.final_norm, stack, resid)


def frozen_norm(norm: torch.nn.Module, stack: Tensor, resid: Tensor) -> Tensor:
    """norm(resid) = resid * s(resid) * w (+ b): apply s(resid) * w to each component (and centre for LayerNorm)."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or getattr(norm, "epsilon", 1e-6)
    x = resid.float()
    if isinstance(norm, torch.nn.LayerNorm):
        centred = stack.float() - stack.float().mean(-1, keepdim=True)
        scale = torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
        return (centred * scale * norm.weight.float()).to(stack.dtype)
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    weight = norm.weight.float()
    if "Gemma" in type(norm).__name__:  # Gemma's RMSNorm multiplies by (1 + w)
        weight = 1.0 + weight
    return (stack.float() * scale * weight).to(stack.dtype)


# ---------------------------------------------------------------------- on disk


class CacheError(RuntimeError):
    """A cache file or manifest that does not match what was asked for, or is damaged."""


class DamagedFile(CacheError):
    """A checksummed safetensors file that is missing, empty, unreadable or changed on disk."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} {reason}")
        self.path = Path(path)
        self.reason = reason


def cache_key(model_fingerprint: str, tokens: Tensor, hook_names: Sequence[str], dtype: Union[str, torch.dtype]) -> str:
    """The content key: sha256 of (weights fingerprint, token ids, sorted hook names, dtype)."""
    h = hashlib.sha256()
    h.update(model_fingerprint.encode())
    t = tokens.detach().cpu().to(torch.int64).contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    h.update(json.dumps(sorted(hook_names)).encode())
    h.update(str(dtype).removeprefix("torch.").encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The metadata field in which a checksummed safetensors file carries the sha256 of its tensors.
DIGEST_KEY = "tensors_sha256"


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_checked(tensors: Mapping[str, Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> str:
    """Write a safetensors file atomically, carrying the checksum of its tensors. Returns the file's sha256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), DIGEST_KEY: tensors_digest(tensors)}
    digest = []

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=meta)
        digest.append(_sha256_file(tmp))

    atomic_write(path, write)
    return digest[0]


def read_checked(path: Path, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a safetensors file and verify the checksum it carries (files without one only parse).

    Raises `DamagedFile`, naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.exists():
        raise DamagedFile(path, "is missing")
    if path.stat().st_size == 0:
        raise DamagedFile(path, "is empty (0 bytes)")
    try:
        with safe_open(path, "pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DamagedFile(path, f"cannot be read as safetensors, truncated or corrupt ({e})") from e
    if DIGEST_KEY in meta and tensors_digest(tensors) != meta[DIGEST_KEY]:
        raise DamagedFile(path, "does not match the checksum it carries: its bytes changed on disk")
    return tensors, meta


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies where two tensors share storage: safetensors refuses shared tensors, and a cache
    often holds one tensor under two names (blocks.0.hook_resid_post is blocks.1.hook_resid_pre)."""
    seen, out = set(), {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def _say(message: str) -> None:
    print(f"[interp] {message}", file=sys.stderr, flush=True)


class _Garbled(Exception):
    """The manifest exists but cannot be used (not JSON, not a manifest)."""


@dataclass
class RepairReport:
    """What `CacheStore.repair` found: entries kept, files moved aside, manifest entries dropped."""

    kept: int = 0
    moved: list[tuple[Path, Path, str]] = field(default_factory=list)  # (file, moved to, why)
    dropped: list[str] = field(default_factory=list)  # manifest keys whose file was missing
    unverified: list[str] = field(default_factory=list)  # files with no checksum to check them against
    manifest_moved: Optional[Path] = None  # where an unreadable manifest went

    def summary(self) -> str:
        parts = [f"{self.kept} intact entr{'y' if self.kept == 1 else 'ies'} kept"]
        if self.moved:
            parts.append(f"{len(self.moved)} damaged file(s) moved aside: "
                         + "; ".join(f"{src.name} -> {dst} ({why})" for src, dst, why in self.moved))
        if self.dropped:
            parts.append(f"{len(self.dropped)} manifest entr{'y' if len(self.dropped) == 1 else 'ies'} without a file dropped")
        if self.unverified:
            parts.append(f"{len(self.unverified)} older file(s) carry no checksum and were kept after parsing")
        if self.manifest_moved is not None:
            parts.append(f"the unreadable manifest was moved to {self.manifest_moved}")
        return "; ".join(parts)


class CacheStore:
    """A directory of cached activations shared between experiments and processes.

        store = CacheStore("~/.cache/interp/acts")
        cache = store.get_or_compute(model, tokens, names_filter=lambda n: "resid" in n)
    """

    MANIFEST = "manifest.json"
    VERSION = 1
    DAMAGED = "damaged"  # subfolder that damaged files and manifests are moved into, never deleted

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------- manifest
    def _locked(self):
        return file_lock(self.root / ".lock")

    def _read_manifest(self) -> Optional[dict]:
        """The manifest as stored; None when there is none. Raises _Garbled, or CacheError for another version."""
        path = self.root / self.MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Garbled(f"{path} is not valid JSON ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise _Garbled(f"{path} is not a cache manifest (no 'entries' object)")
        if data.get("version") != self.VERSION:
            raise CacheError(f"{path} has version {data.get('version')!r}; this toolkit reads version {self.VERSION}")
        if not all(isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("sha256"), str)
                   for e in data["entries"].values()):
            raise _Garbled(f"{path} has entries without a file name or checksum")
        return data

    def _manifest(self, locked: bool) -> dict:
        """The manifest, rebuilt from the entry files when it is missing (and entries exist) or unreadable."""
        try:
            data = self._read_manifest()
        except _Garbled as e:
            reason = str(e)
        else:
            if data is not None:
                return data
            if not self._entry_files():
                return {"version": self.VERSION, "entries": {}}
            reason = f"{self.root / self.MANIFEST} is missing"
        if not locked:
            with self._locked():
                return self._manifest(locked=True)  # another process may have rebuilt it meanwhile
        report = self._rebuild({})
        _say(f"{reason}: rebuilt it from the entry files ({report.summary()})")
        return self._read_manifest() or {"version": self.VERSION, "entries": {}}

    def manifest(self) -> dict:
        """The manifest; rebuilt from the entry files, with a message, when it is missing or unreadable."""
        return self._manifest(locked=False)

    def __contains__(self, key: str) -> bool:
        return key in self.manifest()["entries"]

    def keys(self) -> list[str]:
        return list(self.manifest()["entries"])

    def _entry_files(self) -> list[Path]:
        return sorted(p for p in self.root.glob("*.safetensors") if not p.name.startswith("."))

    def _move_aside(self, path: Path) -> Path:
        """Move a damaged file into `damaged/` under a name that overwrites nothing."""
        folder = self.root / self.DAMAGED
        folder.mkdir(exist_ok=True)
        dest, n = folder / path.name, 1
        while dest.exists():
            dest, n = folder / f"{path.name}.{n}", n + 1
        path.rename(dest)
        return dest

    # -------------------------------------------------------------- repair
    def repair(self) -> RepairReport:
        """Rebuild the manifest from the entry files: keep every intact entry, move damaged files
        into `damaged/`, drop entries whose file is gone. Also removes temporary files of killed writers."""
        with self._locked():
            try:
                old = (self._read_manifest() or {}).get("entries", {})
            except _Garbled:
                old = {}
            return self._rebuild(old)

    def _rebuild(self, old: dict) -> RepairReport:
        """Under the lock: write a manifest listing the intact entry files. `old` entries verify files without a checksum."""
        remove_stale_temps(self.root, all_dead=True, legacy=(".tmp-*",))
        report = RepairReport()
        manifest_path = self.root / self.MANIFEST
        try:
            self._read_manifest()
        except _Garbled:
            report.manifest_moved = self._move_aside(manifest_path)
        entries = {}
        for path in self._entry_files():
            try:
                key, entry, verified = self._entry_from_file(path, old)
            except CacheError as e:
                why = e.reason if isinstance(e, DamagedFile) else str(e)
                report.moved.append((path, self._move_aside(path), why))
                continue
            entries[key] = entry
            if not verified:
                report.unverified.append(key)
        report.kept = len(entries)
        report.dropped = [k for k in old if k not in entries and not (self.root / old[k]["file"]).exists()]
        atomic_write_text(manifest_path, json.dumps({"version": self.VERSION, "entries": entries}, indent=1))
        return report

    def _entry_from_file(self, path: Path, old: dict) -> tuple[str, dict, bool]:
        """(key, manifest entry, verified) of one entry file; CacheError when it is damaged or misnamed."""
        tensors, meta = read_checked(path)
        key = meta.get("key")
        if not key or path.name != f"{key}.safetensors":
            raise CacheError(f"holds key {key!r}, which does not match its name")
        digest = _sha256_file(path)
        previous = old.get(key, {})
        if DIGEST_KEY not in meta and previous.get("sha256") not in (None, digest):
            raise DamagedFile(path, "does not match the checksum its manifest recorded")
        hooks = json.loads(meta["hooks"]) if "hooks" in meta else sorted(tensors)
        created = previous.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime))
        info = {k: v for k, v in meta.items() if k not in ("key", "hooks", DIGEST_KEY)}
        entry = {"file": path.name, "sha256": digest, "hooks": hooks, "created": created, **info}
        return key, entry, DIGEST_KEY in meta or "sha256" in previous

    # -------------------------------------------------------------- read / write
    def put(self, key: str, activations: dict[str, Tensor], info: Optional[dict] = None) -> Path:
        """Write one cache under `key`. An existing valid entry is kept as is; a damaged one is refused."""
        with self._locked():
            remove_stale_temps(self.root, all_dead=True, legacy=(".tmp-*",))
            manifest = self._manifest(locked=True)  # read before the new file exists: no one else writes meanwhile
            entries = manifest["entries"]
            if key in entries:
                if (self.root / entries[key]["file"]).exists():
                    self._verify(key, entries[key])
                    return self.root / entries[key]["file"]
                _say(f"cache entry {key[:12]}… was listed but its file {entries[key]['file']} is missing; writing it again")
            file = f"{key}.safetensors"
            meta = {"key": key, "hooks": json.dumps(sorted(activations)), **{k: str(v) for k, v in (info or {}).items()}}
            digest = save_checked(_unshared({k: v.detach().cpu().contiguous() for k, v in activations.items()}),
                                  self.root / file, meta)
            entries[key] = {
                "file": file,
                "sha256": digest,
                "hooks": sorted(activations),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **{k: str(v) for k, v in (info or {}).items()},
            }
            atomic_write_text(self.root / self.MANIFEST, json.dumps(manifest, indent=1))
            return self.root / file

    def _verify(self, key: str, entry: dict) -> Path:
        path = self.root / entry["file"]
        if not path.exists():
            raise CacheError(
                f"cache entry {key[:12]}… lists {path}, which is missing; the store is damaged. "
                "`interp cache` recomputes it; or call CacheStore.repair() to drop the entry."
            )
        if _sha256_file(path) != entry["sha256"]:
            raise CacheError(
                f"{path} does not match its manifest checksum (corrupt or changed); refusing to use or overwrite it. "
                f"`interp cache` (or CacheStore.evict({key[:12]!r}…)) moves it into {self.root / self.DAMAGED} and recomputes it."
            )
        return path

    def status(self, key: str) -> str:
        """'ok' (listed, checksum verified), 'missing' (listed, file gone), 'damaged' (checksum differs) or 'absent'."""
        entry = self.manifest()["entries"].get(key)
        if entry is None:
            return "absent"
        path = self.root / entry["file"]
        if not path.exists():
            return "missing"
        return "ok" if _sha256_file(path) == entry["sha256"] else "damaged"

    def evict(self, key: str) -> Optional[Path]:
        """Drop `key` from the manifest, moving its file (if any) into `damaged/`. Returns where it went."""
        with self._locked():
            manifest = self._manifest(locked=True)
            entry = manifest["entries"].pop(key, None)
            if entry is None:
                return None
            path = self.root / entry["file"]
            moved = self._move_aside(path) if path.exists() else None
            atomic_write_text(self.root / self.MANIFEST, json.dumps(manifest, indent=1))
            return moved

    def load(self, key: str, device: Union[str, torch.device] = "cpu") -> dict[str, Tensor]:
        entries = self.manifest()["entries"]
        if key not in entries:
            raise KeyError(f"no cache with key {key[:12]}… in {self.root}")
        path = self._verify(key, entries[key])
        try:
            tensors = load_file(path, device=str(device))
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise CacheError(f"{path} cannot be read as safetensors ({e}); refusing it") from e
        if meta.get("key") != key:
            raise CacheError(f"{path} holds key {meta.get('key')!r}, not {key!r}: mismatched cache, refusing it")
        return tensors

    # -------------------------------------------------------------- model-level helpers
    def key_for(self, model: "HookedModel", tokens: Tensor, names: Sequence[str]) -> str:
        return cache_key(model.fingerprint(), tokens, names, model.dtype)

    def get_or_compute(
        self, model: "HookedModel", input, names_filter=None, device: Union[str, torch.device] = "cpu"
    ) -> ActivationCache:
        """The cached activations of `input` under `names_filter`, computed and stored if absent."""
        tokens, _ = model.prepare_inputs(input)  # checked: [batch, pos] ids inside the vocabulary
        tokens = tokens.cpu()
        names = model.resolve_names(names_filter)
        key = self.key_for(model, tokens, names)
        if key in self:
            return ActivationCache(self.load(key, device), model=model)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=names, device=device)
        self.put(key, dict(cache.items()), {"model": model.name, "fingerprint": model.fingerprint(), "n_tokens": tokens.numel()})
        return cache
