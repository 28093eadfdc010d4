"""Faithfulness of a circuit: run the clean prompts with every edge outside the circuit carrying its
source's corrupted output (exact edge-level patching, `interp.circuits.graph.patched_logits`),
and report the share of the clean - corrupted metric gap the circuit recovers:

    faithfulness = (metric(circuit run) - metric(corrupted)) / (metric(clean) - metric(corrupted))

0 = no better than the corrupted run, 1 = the clean run (Wang et al. 2022; Hanna et al. 2024,
"Have Faith in Faithfulness", arXiv:2403.17806, who call this the normalised faithfulness).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.hooks import HookedModel
from interp.metrics import Metric

from .circuit import Circuit
from .eap import EdgeScores
from .extract import EXTRACTIONS
from .graph import Graph, node_outputs, patched_logits
from .readout import forward_kwargs, readout
from .tasks.base import PromptPairs


class Faithfulness:
    """Evaluates circuits on one task; the corrupted outputs and the two baselines are computed once.

    `batch_size` splits the prompts (each batch is one patched forward per circuit).

    Padding (supported): a task with a right-padded `attention_mask` is read at each prompt's
    last real token, as if each prompt ran alone (a caller's metric must then have
    `last_position_only = True` and gets logits [n, 1, vocab] there).
    """

    def __init__(self, model: HookedModel, task: PromptPairs, metric: Optional[Metric] = None, graph: Optional[Graph] = None,
                 batch_size: int = 32):
        self.model, self.task = model, task
        self.metric = metric if metric is not None else task.metric
        self.graph = graph or Graph.from_model(model)
        # A caller's metric sees the whole prompt set at once; the task's own is split by batch.
        self.batch_size = batch_size if metric is None else len(task)
        self._own_metric = metric is None
        self._reads = readout(task, metric, "Faithfulness")
        dev = model.device
        self._batches = [slice(i, min(i + self.batch_size, len(task))) for i in range(0, len(task), self.batch_size)]
        self._corr = [node_outputs(model, task.corrupted_tokens[b].to(dev), self.graph) for b in self._batches]
        with torch.no_grad():
            self.clean_metric = self._mean(lambda b, i: model(task.clean_tokens[b].to(dev), **self._kw(b)))
            self.corrupted_metric = self._mean(lambda b, i: model(task.corrupted_tokens[b].to(dev), **self._kw(b)))
        if abs(self.clean_metric - self.corrupted_metric) < 1e-6:
            raise ValueError(
                f"clean and corrupted runs score the same ({self.clean_metric:.4g}): there is no gap for a circuit to recover"
            )

    def _kw(self, b: slice) -> dict:
        """Forward kwargs for the prompts of batch `b` (see `interp.circuits.readout.forward_kwargs`)."""
        reads = self._reads
        return forward_kwargs(reads[b].to(self.model.device) if isinstance(reads, Tensor) else reads)

    def _mean(self, logits_of: Callable[[slice, int], Tensor]) -> float:
        """The metric averaged over prompts; logits_of(batch slice, batch number) gives that batch's logits."""
        total = 0.0
        for i, b in enumerate(self._batches):
            sub = self.task[b] if self._own_metric else None
            value = sub.metric(logits_of(b, i)) if self._own_metric else self.metric(logits_of(b, i))
            total += float(value) * (b.stop - b.start)
        return total / len(self.task)

    def metric_of(self, corrupt: Tensor) -> float:
        """The metric on the clean prompts with the edges in `corrupt` (Bool["receiver node"]) corrupted."""
        dev = self.model.device
        return self._mean(lambda b, i: patched_logits(self.model, self.graph, self.task.clean_tokens[b].to(dev),
                                                      self._corr[i], corrupt, **self._kw(b)))

    def __call__(self, circuit: Circuit) -> float:
        """Normalised faithfulness of `circuit` (0 = corrupted, 1 = clean)."""
        keep = circuit.edge_mask(self.graph)
        value = self.metric_of(self.graph.mask & ~keep)
        return (value - self.corrupted_metric) / (self.clean_metric - self.corrupted_metric)

    def curve(self, scores: EdgeScores, sizes: Sequence[int], how: str = "top_n", progress: bool = True) -> pd.DataFrame:
        """Faithfulness against circuit size: one row per n with n_edges (after pruning), share_of_edges,
        faithfulness and metric. `progress`: a tqdm bar over the sizes (on stderr)."""
        if how not in EXTRACTIONS:
            raise ValueError(f"how must be {' or '.join(map(repr, EXTRACTIONS))}, got {how!r}")
        rows = []
        for n in tqdm(list(sizes), desc=f"faithfulness ({how})", disable=not progress):
            c = EXTRACTIONS[how](scores, int(n))
            f = self(c)
            rows.append({"n": int(n), "n_edges": len(c), "share_of_edges": len(c) / self.graph.n_edges,
                         "faithfulness": f, "method": scores.method, "extraction": how})
        return pd.DataFrame(rows)


def faithfulness(model: HookedModel, task: PromptPairs, circuit: Circuit, metric: Optional[Metric] = None) -> float:
    """One-shot: the normalised faithfulness of `circuit` on `task`."""
    return Faithfulness(model, task, metric)(circuit)
