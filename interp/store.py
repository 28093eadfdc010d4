"""The on-disk activation store: `CacheStore`, and the checksummed safetensors files it and the head table use.

`CacheStore` is a directory of safetensors files plus `manifest.json`, keyed by a fingerprint
of (model weights, token ids, hook names, dtype). Writes go through `interp.atomic` (temporary
file, fsync, rename), and the manifest is rewritten the same way only after the data file is
complete, so a killed writer leaves the store readable; the next writer removes its temporary
file. A file whose checksum or key does not match its manifest entry is refused, never
overwritten. Each entry file carries its own key and a checksum of its tensors, so the manifest
can be rebuilt from the files (`CacheStore.repair`, and automatically when it is missing or
unreadable); a damaged file is moved aside into `damaged/`, never deleted. Writers and the
manifest rebuild hold the store's lock (`<root>/.lock`), and `put` re-reads the manifest under it,
so several processes (the ranks of `torchrun -m interp cache`) can fill one store at once without
losing each other's entries.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ContextManager, Mapping, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .activation_cache import ActivationCache
from .atomic import atomic_write, atomic_write_text, file_lock, remove_stale_temps

if TYPE_CHECKING:  # the store sits above the hook layer; hooks never import it
    from .hooks import HookedModel, Input, NamesFilter


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
    def _locked(self) -> ContextManager[None]:
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
        self, model: "HookedModel", input: "Input", names_filter: "NamesFilter" = None, device: Union[str, torch.device] = "cpu"
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
