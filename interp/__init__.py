"""interp: mechanistic interpretability on Hugging Face checkpoints as they are.

    import interp
    model = interp.load("smollm2-135m")
    logits, cache = model.run_with_cache("The Eiffel Tower is in")
"""

import os

# Never reach for the network: everything loads from local files or packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .cache import ActivationCache, CacheStore  # noqa: E402
from .hook_points import HookPoint, get_act_name  # noqa: E402
from .hooks import HookedModel  # noqa: E402
from .models import ModelConfig, load  # noqa: E402

__all__ = ["ActivationCache", "CacheStore", "HookPoint", "HookedModel", "ModelConfig", "get_act_name", "load"]
__version__ = "0.1.0"
