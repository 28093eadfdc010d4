"""Activation caches: in memory (`ActivationCache`) and on disk (`CacheStore`).

One import path for both, as notebooks and the experiments use it. Each lives in the module of
its job: `interp.activation_cache` (the in-memory cache and its residual-stream views, which ask
the model for the final norm, frozen or not: `HookedModel.apply_final_norm_frozen`, the
adapter's `apply_norm_frozen`) and `interp.store` (the locked on-disk store and the checksummed
safetensors files it and the head table write).
"""

from __future__ import annotations

from .activation_cache import ActivationCache, CacheKey, CacheModel, PosSlice
from .store import (
    DIGEST_KEY,
    CacheError,
    CacheStore,
    DamagedFile,
    RepairReport,
    cache_key,
    read_checked,
    save_checked,
    tensors_digest,
)

__all__ = [
    "ActivationCache",
    "CacheError",
    "CacheKey",
    "CacheModel",
    "CacheStore",
    "DIGEST_KEY",
    "DamagedFile",
    "PosSlice",
    "RepairReport",
    "cache_key",
    "read_checked",
    "save_checked",
    "tensors_digest",
]
