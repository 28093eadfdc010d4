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
from typing import Optional

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from interp.hook_points import HookPoint, get_act_name
from interp.hooks import HookedModel
from interp.metrics import Metric

from .graph import Graph, node_outputs
from .readout import Readout, forward_kwargs, readout
from .tasks.base import PromptPairs


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


def _norm_vjp(norm: nn.Module, x: Tensor, cotangents: Tensor) -> Tensor:
    """d/dx of <norm(x), cotangent> for a stack of cotangents: [R, b, pos, d] -> [R, b, pos, d]."""
    with torch.enable_grad():
        xr = x.detach().unsqueeze(0).expand(cotangents.shape[0], *x.shape).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(norm.forward(xr), xr, cotangents.to(x.dtype))
    return g


def _rows(module: nn.Linear, index: int, d_head: int) -> Tensor:
    """One head's rows of a projection's weight: [d_head, d_model]."""
    return module.weight[index * d_head : (index + 1) * d_head]  # [d_head, d_model]


def receiver_gradients(model: HookedModel, graph: Graph, tokens: Tensor, metric: Metric, embed: Optional[Tensor] = None,
                       last_position_only: Readout = False) -> tuple[Tensor, float]:
    """Gradient of `metric` with respect to every receiver's own input, from one forward and one backward.

    tokens: Long[Tensor, "batch pos"].
    embed: Float[Tensor, "batch pos d_model"] to use in place of the token embeddings (EAP-IG).
    last_position_only: the metric reads the final position only (logits [batch, 1, vocab]); or
    Long[Tensor, "batch"], each row's last real token of a right-padded batch (logits [batch, 1, vocab] there).
    Returns (Float[Tensor, "receiver batch pos d_model"], metric value).
    """
    L = graph.n_layers
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    names = []
    for l in range(L):
        names += [get_act_name(k, l) for k in "qkv"] + [get_act_name("normalized", l, "ln2")]
    last = get_act_name("resid_post", L - 1)
    names.append(last)
    saved = [get_act_name(f"resid_{w}", l) for l in range(L) for w in ("pre", "mid")]

    def save_act(x: Tensor, hook: HookPoint) -> None:
        acts[hook.name] = x.detach()

    def save_grad(g: Tensor, hook: HookPoint) -> None:
        grads[hook.name] = g.detach()

    def leaf_embed(x: Tensor, hook: HookPoint) -> Tensor:
        # Parameters are frozen: the embedding output is made a leaf that requires grad.
        e = x if embed is None else embed.to(x.dtype)
        return e.detach().clone().requires_grad_(True)

    with torch.enable_grad():
        logits = model.run_with_hooks(
            tokens,
            fwd_hooks=[(get_act_name("embed"), leaf_embed)] + [(n, save_act) for n in saved],
            bwd_hooks=[(n, save_grad) for n in names],
            **forward_kwargs(last_position_only),
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
            g = grads[get_act_name(kind, l)]  # [b, pos, head, d_head]
            module = getattr(parts[l].qkv, kind)
            for r in graph.layer_receivers(l, kind):
                i = graph.receivers[r].index
                cots.append(g[:, :, i] @ _rows(module, i, d_head).to(g.dtype))
                idx.append(r)
        out[idx] = _norm_vjp(parts[l].ln1, acts[get_act_name("resid_pre", l)], torch.stack(cots)).float()
        r = graph.layer_receivers(l, "mlp")[0]
        g = grads[get_act_name("normalized", l, "ln2")]
        out[r] = _norm_vjp(parts[l].ln2, acts[get_act_name("resid_mid", l)], g[None])[0].float()
    out[-1] = grads[last].float()
    return out, float(value.detach())


def _task_metric(task: PromptPairs, metric: Optional[Metric]) -> Metric:
    """The caller's metric, else the task's own."""
    return metric if metric is not None else task.metric


def edge_attribution(
    model: HookedModel,
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
        corr_metric = float(metric(model(corrupted, **forward_kwargs(last))))
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
            clean_metric = float(metric(model(clean, **forward_kwargs(last))))
    diff = (corr_out - clean_out).float().flatten(1)  # [node, b*pos*d]
    scores = grad.flatten(1) @ diff.T  # [receiver, node]
    scores = scores * graph.mask.to(scores.device)
    bar.close()
    return EdgeScores(graph, scores.cpu(), method, clean_metric, corr_metric)
