"""Edge attribution patching: EAP (Syed et al. 2023, "Attribution Patching Outperforms Automated
Circuit Discovery", arXiv:2310.10348) and EAP-IG (Hanna et al. 2024, "Have Faith in
Faithfulness", arXiv:2403.17806).

Score of edge u -> r (receiver r of a downstream node, see `interp.circuits.graph`):

    score(u -> r) = (corrupted_out_u - clean_out_u) . d metric / d in_r

summed over prompts' positions and d_model and averaged over prompts (the metric is a mean):
the first-order estimate of how much the metric changes when that one edge carries the
corrupted output. Negative means the edge supports the clean behaviour. Circuits rank edges by
|score|.

EAP evaluates the gradient on the clean run. EAP-IG averages it over `steps` runs whose input
embeddings are interpolated between the corrupted and the clean ones,
``e(alpha) = corrupted + alpha (clean - corrupted)``, at the midpoints ``alpha = (k + 1/2) / steps``
(Hanna et al.'s "IG on the inputs"): an integrated-gradients path (Sundararajan et al. 2017).

Cost: two forwards for the clean and corrupted node outputs, then one forward and one backward
for EAP (``steps`` of each for EAP-IG), whatever the number of edges. Per-receiver input
gradients come from that single backward: the gradient at ``attn.hook_q`` for query head h,
mapped back through head h's rows of W_Q and the ln1 norm's Jacobian at the run's resid_pre
(a vector-Jacobian product, batched over the layer's receivers), likewise for k/v heads; the
gradient at ``ln2.hook_normalized`` through ln2's Jacobian for the MLP; the gradient at the
last ``hook_resid_post`` for the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.metrics import require_last_position

from .graph import Graph, node_outputs
from .tasks.base import PromptPairs

Metric = Callable[[Tensor], Tensor]


@dataclass
class EdgeScores:
    """Scores of every edge of a graph.

    scores: Float[Tensor, "receiver node"] (0 where no edge); method: "eap" or "eap-ig";
    clean_metric / corrupted_metric: the metric on the two unpatched runs.
    """

    graph: Graph
    scores: Tensor
    method: str
    clean_metric: float
    corrupted_metric: float

    def frame(self) -> pd.DataFrame:
        """One row per edge (edge, src, dst, channel, score, abs_score), largest |score| first."""
        df = self.graph.edges_frame(self.scores)
        return df.sort_values("abs_score", ascending=False, kind="stable").reset_index(drop=True)


def _norm_vjp(norm: torch.nn.Module, x: Tensor, cotangents: Tensor) -> Tensor:
    """d/dx of <norm(x), cotangent> for a stack of cotangents: [R, b, pos, d] -> [R, b, pos, d]."""
    with torch.enable_grad():
        xr = x.detach().unsqueeze(0).expand(cotangents.shape[0], *x.shape).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(norm.forward(xr), xr, cotangents.to(x.dtype))
    return g


def _rows(module: torch.nn.Linear, index: int, d_head: int) -> Tensor:
    return module.weight[index * d_head : (index + 1) * d_head]  # [d_head, d_model]


def last_only(task) -> bool:
    """Whether a task's metric reads only the final position (then the model unembeds that position alone)."""
    return bool(getattr(task, "last_position_only", True))


def _kw(last: Union[bool, Tensor]) -> dict:
    """Forward kwargs for what the metric reads: the final position (True), every position (False),
    or each row's last real token (Long[Tensor, "batch"], a padded batch)."""
    if isinstance(last, Tensor):
        return {"logits_to_keep": last[:, None]}
    return {"logits_to_keep": 1} if last else {}


def readout(task, metric: Optional[Metric], where: str) -> Union[bool, Tensor]:
    """What the metric is handed (see `_kw`): a padded task is read at each prompt's last real token,
    which a caller's metric must accept by saying `last_position_only = True`; else refused."""
    if getattr(task, "padded", False):
        last = task.last_positions
        if metric is not None:
            require_last_position(metric, last, where)
        return last
    return last_only(task) if metric is None else False


def receiver_gradients(model, graph: Graph, tokens: Tensor, metric: Metric, embed: Optional[Tensor] = None,
                       last_position_only: Union[bool, Tensor] = False) -> tuple[Tensor, float]:
    """Gradient of `metric` with respect to every receiver's own input, from one forward and one backward.

    embed: Float[Tensor, "batch pos d_model"] to use in place of the token embeddings (EAP-IG).
    last_position_only: the metric reads the final position only (logits [batch, 1, vocab]); or
    Long[Tensor, "batch"], each row's last real token of a right-padded batch (logits [batch, 1, vocab] there).
    Returns (Float[Tensor, "receiver batch pos d_model"], metric value).
    """
    L, H = graph.n_layers, graph.n_heads
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    names = []
    for l in range(L):
        names += [f"blocks.{l}.attn.hook_{k}" for k in "qkv"] + [f"blocks.{l}.ln2.hook_normalized"]
    last = f"blocks.{L - 1}.hook_resid_post"
    names.append(last)
    saved = [f"blocks.{l}.hook_resid_{w}" for l in range(L) for w in ("pre", "mid")]

    def save_act(x, hook):
        acts[hook.name] = x.detach()

    def save_grad(g, hook):
        grads[hook.name] = g.detach()

    def leaf_embed(x, hook):
        # Parameters are frozen: the embedding output is made a leaf that requires grad.
        e = x if embed is None else embed.to(x.dtype)
        return e.detach().clone().requires_grad_(True)

    with torch.enable_grad():
        logits = model.run_with_hooks(
            tokens,
            fwd_hooks=[("hook_embed", leaf_embed)] + [(n, save_act) for n in saved],
            bwd_hooks=[(n, save_grad) for n in names],
            **_kw(last_position_only),
        )
        value = metric(logits)
        value.backward()
    missing = [n for n in names if n not in grads]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:3]}...: the metric does not depend on them")
    parts = model.adapter.layers
    d_head = model.cfg.d_head
    out = torch.zeros(len(graph.receivers), *tokens.shape, model.cfg.d_model, dtype=torch.float32, device=tokens.device)
    for l in range(L):
        cots, idx = [], []
        for kind in "qkv":
            g = grads[f"blocks.{l}.attn.hook_{kind}"]  # [b, pos, head, d_head]
            module = getattr(parts[l].qkv, kind)
            for r in graph.layer_receivers(l, kind):
                i = graph.receivers[r].index
                cots.append(g[:, :, i] @ _rows(module, i, d_head).to(g.dtype))
                idx.append(r)
        out[idx] = _norm_vjp(parts[l].ln1, acts[f"blocks.{l}.hook_resid_pre"], torch.stack(cots)).float()
        r = graph.layer_receivers(l, "mlp")[0]
        g = grads[f"blocks.{l}.ln2.hook_normalized"]
        out[r] = _norm_vjp(parts[l].ln2, acts[f"blocks.{l}.hook_resid_mid"], g[None])[0].float()
    out[-1] = grads[last].float()
    return out, float(value.detach())


def _task_metric(task: PromptPairs, metric: Optional[Metric]) -> Metric:
    return metric if metric is not None else task.metric


def edge_attribution(
    model,
    task: PromptPairs,
    method: str = "eap",
    steps: int = 8,
    metric: Optional[Metric] = None,
    graph: Optional[Graph] = None,
    progress: bool = True,
) -> EdgeScores:
    """Score every edge of the model's graph on a task.

    method: "eap" (gradient at the clean run) or "eap-ig" (mean gradient over `steps` runs with
    input embeddings interpolated from corrupted to clean). metric: a function of the logits of
    the clean prompts returning a scalar (default: the task's own metric; when the task reads
    only the final position, as PromptPairs' logit difference does, the model unembeds that
    position alone). A caller's metric gets the full logits [n, pos, vocab].
    Returns EdgeScores; `.frame()` is the tidy table.

    Padding (supported): a task with a right-padded `attention_mask` is read at each prompt's
    last real token (a caller's metric must then have `last_position_only = True` and gets
    logits [n, 1, vocab] there); positions past it get zero gradient, so the scores equal the
    mean of each prompt's own. `progress`: a tqdm bar over the forwards and gradient steps.
    """
    if method not in ("eap", "eap-ig"):
        raise ValueError(f"method must be 'eap' or 'eap-ig', got {method!r}")
    if method == "eap-ig" and steps < 1:
        raise ValueError(f"steps must be >= 1 for EAP-IG, got {steps}")
    graph = graph or Graph.from_model(model)
    last = readout(task, metric, "edge_attribution")
    last = last.to(model.device) if isinstance(last, Tensor) else last
    metric = _task_metric(task, metric)
    clean = task.clean_tokens.to(model.device)
    corrupted = task.corrupted_tokens.to(model.device)
    n_grads = 1 if method == "eap" else steps
    bar = tqdm(total=2 + n_grads, desc=method.upper(), disable=not progress)
    clean_out = node_outputs(model, clean, graph)
    corr_out = node_outputs(model, corrupted, graph)
    bar.update(2)
    with torch.no_grad():
        corr_metric = float(metric(model(corrupted, **_kw(last))))
    if method == "eap":
        grad, clean_metric = receiver_gradients(model, graph, clean, metric, last_position_only=last)
        bar.update(1)
    else:
        e_clean, e_corr = clean_out[0], corr_out[0]
        grad = None
        for k in range(steps):
            alpha = (k + 0.5) / steps
            g, _ = receiver_gradients(model, graph, clean, metric, embed=e_corr + alpha * (e_clean - e_corr),
                                      last_position_only=last)
            grad = g if grad is None else grad + g
            bar.update(1)
        grad = grad / steps
        with torch.no_grad():
            clean_metric = float(metric(model(clean, **_kw(last))))
    diff = (corr_out - clean_out).float().flatten(1)  # [node, b*pos*d]
    scores = grad.flatten(1) @ diff.T  # [receiver, node]
    scores = scores * graph.mask.to(scores.device)
    bar.close()
    return EdgeScores(graph, scores.cpu(), method, clean_metric, corr_metric)
