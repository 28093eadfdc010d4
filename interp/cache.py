"""Activation caches: in memory (`ActivationCache`) and on disk (`CacheStore`).

`ActivationCache` is a dict of hook name -> tensor with the residual-stream views the field
uses (TransformerLens vocabulary): `accumulated_resid`, `decompose_resid`,
`stack_head_results`, `apply_ln_to_stack`.

`CacheStore` is a directory of safetensors files plus `manifest.json`, keyed by a fingerprint
of (model weights, token ids, hook names, dtype). Writes go to a temporary file that is
renamed into place, and the manifest is rewritten the same way only after the data file is
complete, so a killed writer leaves the store readable. A file whose checksum or key does
not match its manifest entry is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

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
            raise unknown_hook_error(key, list(self.cache_dict)) if self.cache_dict else KeyError(f"{key!r}: the cache is empty")
        return key

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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


class CacheStore:
    """A directory of cached activations shared between experiments and processes.

        store = CacheStore("~/.cache/interp/acts")
        cache = store.get_or_compute(model, tokens, names_filter=lambda n: "resid" in n)
    """

    MANIFEST = "manifest.json"
    VERSION = 1

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------- manifest
    @contextlib.contextmanager
    def _locked(self):
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def manifest(self) -> dict:
        path = self.root / self.MANIFEST
        if not path.exists():
            return {"version": self.VERSION, "entries": {}}
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{path} is not valid JSON ({e}); the store is damaged: move it aside, do not reuse it") from e
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise CacheError(f"{path} is not a cache manifest (no 'entries' object); the store is damaged")
        if data.get("version") != self.VERSION:
            raise CacheError(f"{path} has version {data.get('version')!r}; this toolkit reads version {self.VERSION}")
        return data

    def __contains__(self, key: str) -> bool:
        return key in self.manifest()["entries"]

    def keys(self) -> list[str]:
        return list(self.manifest()["entries"])

    # -------------------------------------------------------------- read / write
    def put(self, key: str, activations: dict[str, Tensor], info: Optional[dict] = None) -> Path:
        """Write one cache under `key`. An existing valid entry is kept as is; a damaged one is refused."""
        with self._locked():
            entries = self.manifest()["entries"]
            if key in entries:
                self._verify(key, entries[key])
                return self.root / entries[key]["file"]
            file = f"{key}.safetensors"
            meta = {"key": key, "hooks": json.dumps(sorted(activations)), **{k: str(v) for k, v in (info or {}).items()}}
            tensors = _unshared({k: v.detach().cpu().contiguous() for k, v in activations.items()})
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.root)
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata=meta)
                digest = _sha256_file(Path(tmp))
                os.replace(tmp, self.root / file)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            manifest = self.manifest()
            manifest["entries"][key] = {
                "file": file,
                "sha256": digest,
                "hooks": sorted(activations),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **{k: str(v) for k, v in (info or {}).items()},
            }
            _atomic_write_bytes(self.root / self.MANIFEST, json.dumps(manifest, indent=1).encode())
            return self.root / file

    def _verify(self, key: str, entry: dict) -> Path:
        path = self.root / entry["file"]
        if not path.exists():
            raise CacheError(f"cache entry {key[:12]}… lists {path.name}, which is missing; the store is damaged")
        if _sha256_file(path) != entry["sha256"]:
            raise CacheError(
                f"{path} does not match its manifest checksum (corrupt or changed); refusing to use or overwrite it. "
                "Delete the file and its manifest entry to recompute."
            )
        return path

    def load(self, key: str, device: Union[str, torch.device] = "cpu") -> dict[str, Tensor]:
        entries = self.manifest()["entries"]
        if key not in entries:
            raise KeyError(f"no cache with key {key[:12]}… in {self.root}")
        path = self._verify(key, entries[key])
        try:
            tensors = load_file(path, device=str(device))
            from safetensors import safe_open

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
        tokens = input if isinstance(input, Tensor) else model.to_tokens(input)
        tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
        names = model.resolve_names(names_filter)
        key = self.key_for(model, tokens, names)
        if key in self:
            return ActivationCache(self.load(key, device), model=model)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=names, device=device)
        self.put(key, dict(cache.items()), {"model": model.name, "fingerprint": model.fingerprint(), "n_tokens": tokens.numel()})
        return cache
