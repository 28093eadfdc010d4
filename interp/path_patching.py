"""Path patching (Wang et al. 2022), kept importable here: the code is `interp.patching.path`.

    from interp.path_patching import path_patch
"""

from __future__ import annotations

from .patching.path import path_patch

__all__ = ["path_patch"]
