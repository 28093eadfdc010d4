"""Reading heads, MLPs and neurons through the vocabulary (docs/vocabulary.md).

    from interp.vocab import direct_logit_attribution, neuron_vocab_table, head_lens
    frame = direct_logit_attribution(model, pairs, by="head")

Names are imported on first use, so `import interp.vocab` stays light and each module can be
added with one line in `_LAZY`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dla import direct_logit_attribution
    from .figures import dla_bar, dla_head_heatmap, head_lens_heatmap
    from .head_lens import head_lens
    from .neurons import neuron_top_activations, neuron_vocab_projection, neuron_vocab_table

# public name -> module (relative to interp.vocab)
_LAZY = {
    "direct_logit_attribution": "dla",
    "neuron_vocab_projection": "neurons",
    "neuron_top_activations": "neurons",
    "neuron_vocab_table": "neurons",
    "head_lens": "head_lens",
    "head_lens_heatmap": "figures",
    "dla_head_heatmap": "figures",
    "dla_bar": "figures",
    "load_relations": "maps",
    "relation_scores": "maps",
    "dynamic_relation_scores": "maps",
    "static_dynamic_correlation": "maps",
    "ablation_accuracy": "maps",
    "relation_accuracy": "maps",
    "ov_top_mappings": "maps",
    "qk_top_keys": "maps",
    "TunedLens": "tuned_lens",
    "TrainConfig": "tuned_lens",
    "train_tuned_lens": "tuned_lens",
    "lens_kl_table": "tuned_lens",
    "lens_splits": "lens_text",
}

__all__ = [
    "direct_logit_attribution", "neuron_vocab_projection", "neuron_top_activations", "neuron_vocab_table", "head_lens",
    "head_lens_heatmap", "dla_head_heatmap", "dla_bar",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'interp.vocab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
