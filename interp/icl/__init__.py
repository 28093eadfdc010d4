"""In-context learning: function vectors (Todd et al. 2024) and induction heads against
function-vector heads (Yin & Steinhardt 2025). See docs/icl.md.

    from interp.icl import load_tasks, make_prompts, length_groups, head_stats, average_indirect_effect
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, as `interp/__init__` does.
_LAZY = {
    "ICLTask": "tasks", "ICLPrompt": "tasks", "load_tasks": "tasks", "make_prompts": "tasks", "format_prompt": "tasks",
    "answer_id": "tasks",
    "Group": "runs", "length_groups": "runs", "last_token_logits": "runs",
    "HeadStats": "function_vectors", "head_stats": "function_vectors", "average_indirect_effect": "function_vectors",
    "top_heads": "function_vectors", "function_vector": "function_vectors", "add_at_last_token": "function_vectors",
    "fv_accuracy_by_layer": "function_vectors",
    "RepeatRun": "induction", "repeated_tokens": "induction", "repeat_run": "induction",
    "induction_score_from_pattern": "induction", "repeat_losses": "induction", "ablated_accuracy": "induction",
    "ablated_repeat_losses": "induction", "overlap": "induction",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'interp.icl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"interp.icl.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
