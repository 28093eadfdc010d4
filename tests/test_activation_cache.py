"""interp/activation_cache.py on its own: it needs only the `CacheModel` methods, never interp.hooks.

The residual-stream views against HF and hand-computed references are in tests/test_cache.py.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import interp
import interp.cache
import interp.store
from interp.activation_cache import ActivationCache


class StubModel:
    """A CacheModel with 2 layers, 2 heads: the final norm doubles, the frozen one multiplies by resid's mean."""

    cfg = SimpleNamespace(n_layers=2, n_heads=2)

    def __init__(self):
        self.frozen_calls = []

    def hook_names(self) -> list[str]:
        return [f"blocks.{l}.{n}" for l in range(2) for n in ("hook_resid_pre", "hook_resid_post", "attn.hook_z", "attn.hook_result")]

    def resolve_names(self, names_filter):
        return [n for n in self.hook_names() if not n.endswith("attn.hook_result")]

    def W_O(self, layer: int) -> torch.Tensor:
        return torch.ones(2, 3, 4) * (layer + 1)

    def apply_final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        return resid * 2

    def apply_final_norm_frozen(self, stack: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        self.frozen_calls.append(resid)
        return stack * resid.mean(-1, keepdim=True)


def _cache(model=None) -> ActivationCache:
    g = torch.Generator().manual_seed(0)
    acts = {}
    for l in range(2):
        acts[f"blocks.{l}.hook_resid_pre"] = torch.randn(1, 5, 4, generator=g)
        acts[f"blocks.{l}.hook_resid_post"] = torch.randn(1, 5, 4, generator=g)
        acts[f"blocks.{l}.attn.hook_z"] = torch.randn(1, 5, 2, 3, generator=g)
    return ActivationCache(acts, model=model)


def test_views_ask_the_model_through_the_protocol():
    model = StubModel()
    cache = _cache(model)
    stack = cache.accumulated_resid(apply_ln=True)
    assert torch.equal(stack[-1], 2 * cache["blocks.1.hook_resid_post"])
    heads, labels = cache.stack_head_results(layer=1, apply_ln=True, return_labels=True)
    assert labels == ["L0H0", "L0H1"]
    assert torch.equal(model.frozen_calls[-1], cache["blocks.1.hook_resid_pre"])  # frozen at the residual entering layer 1
    z = cache["z", 0]
    expected = torch.einsum("bphd,hdm->hbpm", z, model.W_O(0)) * cache["blocks.1.hook_resid_pre"].mean(-1, keepdim=True)
    torch.testing.assert_close(heads, expected)
    cache.stack_head_results(apply_ln=True, pos_slice=-1)
    assert torch.equal(model.frozen_calls[-1], cache["blocks.1.hook_resid_post"][:, -1])  # after the last block


def test_missing_names_are_explained():
    cache = _cache(StubModel())
    with pytest.raises(KeyError, match="opt-in hook"):
        cache["blocks.0.attn.hook_result"]
    with pytest.raises(KeyError, match="Did you mean 'blocks.0.hook_resid_pre'"):
        cache["blocks.0.hook_resid_pr"]
    alone = _cache()
    with pytest.raises(KeyError, match="is not in this cache. Did you mean 'blocks.1.attn.hook_z'"):
        alone["blocks.1.attn.hook_zz"]
    with pytest.raises(ValueError, match="needs the model"):
        alone.accumulated_resid()
    assert ("z", 1) in alone and ("result", 1) not in alone


def test_module_depends_on_hook_names_only_and_the_old_paths_still_work():
    tree = ast.parse(Path(interp.activation_cache.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert imported == {"hook_points", "models.adapters"}
    assert interp.cache.ActivationCache is ActivationCache is interp.ActivationCache
    assert interp.cache.CacheStore is interp.store.CacheStore is interp.CacheStore
    assert interp.cache.CacheError is interp.store.CacheError
