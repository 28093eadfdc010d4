"""What a circuit metric reads: the final position, every position, or each prompt's last real token.

Shared by edge attribution (`interp.circuits.eap`) and faithfulness (`interp.circuits.faithfulness`):
`readout` decides it for a task and metric, `forward_kwargs` turns it into the model's
`logits_to_keep` argument.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from interp.metrics import Metric, require_last_position

from .tasks.base import PromptPairs

Readout = Union[bool, Tensor]  # True: final position; False: every position; Long[Tensor, "batch"]: each row's last real token


def last_only(task: PromptPairs) -> bool:
    """Whether a task's metric reads only the final position (then the model unembeds that position alone)."""
    return bool(getattr(task, "last_position_only", True))


def forward_kwargs(last: Readout) -> dict:
    """Forward kwargs for what the metric reads: the final position (True), every position (False),
    or each row's last real token (Long[Tensor, "batch"], a padded batch)."""
    if isinstance(last, Tensor):
        return {"logits_to_keep": last[:, None]}
    return {"logits_to_keep": 1} if last else {}


def readout(task: PromptPairs, metric: Optional[Metric], where: str) -> Readout:
    """What the metric is handed (see `forward_kwargs`): a padded task is read at each prompt's last real token,
    which a caller's metric must accept by saying `last_position_only = True`; else refused."""
    if getattr(task, "padded", False):
        last = task.last_positions
        if metric is not None:
            require_last_position(metric, last, where)
        return last
    return last_only(task) if metric is None else False
