"""Circuit extraction: choose a circuit's edges from edge scores (Hanna et al. 2024, "Have Faith in
Faithfulness", arXiv:2403.17806, section 3). One algorithm per module:

- `top_n`: the n edges with the largest |score|, pruned to input -> logits paths.
- `greedy`: grow from the logits, one highest-|score| edge into the circuit at a time, then pruned.
- `prune`: keep only the edges on an input -> logits path (used by both).

`EXTRACTIONS` names the algorithms (`Faithfulness.curve(how=...)` looks them up there).
"""

from __future__ import annotations

from .base import Extraction
from .greedy import greedy
from .prune import prune
from .top_n import top_n

EXTRACTIONS: dict[str, Extraction] = {"top_n": top_n, "greedy": greedy}

__all__ = ["EXTRACTIONS", "Extraction", "greedy", "prune", "top_n"]
