"""interp: mechanistic interpretability on Hugging Face checkpoints as they are.

    import interp
    model = interp.load("smollm2-135m")
    logits, cache = model.run_with_cache("The Eiffel Tower is in")
"""

import os

# Never reach for the network: everything loads from local files or packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from .activation_cache import ActivationCache  # noqa: E402
from .hook_points import HookPoint, get_act_name  # noqa: E402
from .hooks import HookedModel  # noqa: E402
from .loader import load  # noqa: E402
from .models import ModelConfig  # noqa: E402
from .store import CacheStore  # noqa: E402

if TYPE_CHECKING:
    from . import viz
    from .circuits.tasks.base import PromptPairs
    from .heads.ablation import ablate_heads
    from .lens import logit_lens_frame, logit_lens_table
    from .patching import PatchResult, activation_patch, attribution_patch, path_patch

# Imported on first use (`interp.activation_patch`, `from interp import viz`): they pull in
# plotly, pandas and the experiment modules, which `import interp` alone does not need.
_LAZY = {
    "activation_patch": "interp.patching",
    "attribution_patch": "interp.patching",
    "path_patch": "interp.patching",
    "PatchResult": "interp.patching",
    "logit_lens_frame": "interp.lens",
    "logit_lens_table": "interp.lens",
    "ablate_heads": "interp.heads.ablation",
    "PromptPairs": "interp.circuits.tasks.base",
    "viz": None,  # the module interp.viz itself
}

__all__ = [
    "ActivationCache", "CacheStore", "HookPoint", "HookedModel", "ModelConfig", "get_act_name", "load",
    "activation_patch", "attribution_patch", "path_patch", "PatchResult", "logit_lens_frame", "logit_lens_table",
    "ablate_heads", "PromptPairs", "viz",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'interp' has no attribute {name!r}")
    module = _LAZY[name]
    value = importlib.import_module(f"interp.{name}") if module is None else getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
