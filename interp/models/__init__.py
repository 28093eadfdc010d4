"""Loading models and knowing their architecture (the only place that knows HF internals)."""

from .adapters import Adapter, ModelConfig, build_adapter
from .bundled import BUNDLED
from .loading import load

__all__ = ["Adapter", "ModelConfig", "build_adapter", "BUNDLED", "load"]
