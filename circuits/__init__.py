"""interp.circuits: tasks and circuit discovery built on the hook layer (installed as interp.circuits).

    from interp.circuits import Graph, edge_attribution, top_n, Faithfulness
    from interp.circuits.tasks.ioi import ioi_prompts
    task = ioi_prompts(model.tokenizer, 16)
    scores = edge_attribution(model, task, method="eap-ig", steps=5)
    circuit = top_n(scores, 500)
    Faithfulness(model, task)(circuit)         # share of the clean-corrupted gap recovered
    circuit.save("ioi.json"); circuit.to_dot(); circuit.figure()

Modules: `types` (Node, Edge), `graph` (the graph, exact edge patching), `eap` (edge scores),
`circuit` (the Circuit data type), `serialize` (JSON, dot), `extract` (top_n, greedy, prune: one
algorithm per module), `faithfulness`, `readout` (what a metric reads), `tasks` (prompt pairs).
"""

from __future__ import annotations

import pandas as pd

from interp.hooks import HookedModel

from .circuit import Circuit
from .eap import EdgeScores, edge_attribution, receiver_gradients
from .extract import EXTRACTIONS, greedy, prune, top_n
from .faithfulness import Faithfulness, faithfulness
from .graph import Graph, node_outputs, patched_logits
from .types import Edge, Node

__all__ = [
    "Node", "Edge", "Graph", "node_outputs", "patched_logits", "EdgeScores", "edge_attribution", "receiver_gradients",
    "Circuit", "top_n", "greedy", "prune", "EXTRACTIONS", "Faithfulness", "faithfulness", "task_report",
]


def task_report(model: HookedModel, n: int = 16, seed: int = 0, threshold: float = 0.8) -> pd.DataFrame:
    """Build every task for `model`'s tokenizer and check the model does it.

    One row per task: accuracy (clean logit difference > 0; for induction, top-1 accuracy on
    the second repeat), clean and corrupted metric, and `does_task`: accuracy >= threshold and
    clean metric > corrupted metric (for induction: the in-context loss drop from the first to the
    second repeat is at least 1 nat, since top-1 accuracy on random tokens is a harsher test). Tasks the tokenizer cannot express get an `error` instead.
    """
    import torch

    from .tasks.base import check_task
    from .tasks.factual import factual_prompts
    from .tasks.greater_than import greater_than_prompts
    from .tasks.induction import check_induction, induction_prompts
    from .tasks.ioi import ioi_prompts
    from .tasks.multiple_choice import multiple_choice_prompts

    tok = model.tokenizer
    builders = {
        "ioi": lambda: ioi_prompts(tok, n, seed),
        "induction": lambda: induction_prompts(tok, n, seed=seed),
        "greater_than": lambda: greater_than_prompts(tok, n, seed),
        "factual": lambda: factual_prompts(tok, n, seed, model=model),
        "multiple_choice": lambda: multiple_choice_prompts(tok, n, seed),
    }
    rows = []
    for name, build in builders.items():
        try:
            task = build()
        except ValueError as e:
            rows.append({"task": name, "n": 0, "error": str(e), "does_task": False})
            continue
        check = check_induction(model, task) if name == "induction" else check_task(model, task)
        with torch.no_grad():
            clean = float(task.metric(model(task.clean_tokens.to(model.device))))
            corrupted = float(task.metric(model(task.corrupted_tokens.to(model.device))))
        ok = check["loss_drop"] >= 1.0 if name == "induction" else check["accuracy"] >= threshold
        rows.append({"task": name, "n": len(task), "accuracy": check["accuracy"], "clean_metric": clean,
                     "corrupted_metric": corrupted, "does_task": bool(ok and clean > corrupted), "error": ""})
    return pd.DataFrame(rows)
