"""Loading models and knowing their architecture (the only place that knows HF internals)."""

from .adapters import Adapter, ModelConfig, NormSpec, build_adapter
from .bundled import BUNDLED
from .loading import load_hf

__all__ = ["Adapter", "ModelConfig", "NormSpec", "build_adapter", "BUNDLED", "load_hf"]
