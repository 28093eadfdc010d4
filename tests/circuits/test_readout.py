"""What circuit metrics read (circuits/readout.py): the forward kwargs and the padded-batch rule."""

from __future__ import annotations

import pytest
import torch

from interp.circuits.readout import forward_kwargs, last_only, readout
from interp.circuits.tasks.base import PromptPairs


def _task(mask=None) -> PromptPairs:
    clean = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    return PromptPairs(clean, clean.flip(1), torch.tensor([[5, 6], [7, 8]]), attention_mask=mask)


def test_forward_kwargs():
    assert forward_kwargs(True) == {"logits_to_keep": 1}
    assert forward_kwargs(False) == {}
    last = torch.tensor([3, 2])
    assert torch.equal(forward_kwargs(last)["logits_to_keep"], torch.tensor([[3], [2]]))


def test_readout_of_an_unpadded_task():
    task = _task()
    assert last_only(task) is True
    assert readout(task, None, "here") is True  # the task's own metric reads the final position
    assert readout(task, lambda logits: logits.sum(), "here") is False  # a caller's metric gets every position


def test_readout_of_a_padded_task():
    task = _task(torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    assert torch.equal(readout(task, None, "here"), torch.tensor([3, 2]))

    def metric(logits):
        return logits.sum()

    with pytest.raises(ValueError, match="here: the batch is padded"):
        readout(task, metric, "here")
    metric.last_position_only = True
    assert torch.equal(readout(task, metric, "here"), torch.tensor([3, 2]))
