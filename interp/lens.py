"""Logit lens: read each layer's residual stream through the model's own final norm and unembedding.

logits_l = unembed(final_norm(resid_l)), with the final norm recomputed on resid_l
(nostalgebraist 2020; DESIGN.md). At the last layer this is exactly the model's logits.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import pandas as pd
import torch
from torch import Tensor

from .hooks import HookedModel, Input


@torch.no_grad()
def logit_lens_logits(model: HookedModel, input: Input) -> tuple[Tensor, Tensor, list[str]]:
    """Logits read at every layer. Returns (lens_logits [n_layers + 1, batch, pos, d_vocab], tokens, labels).

    Component i < n_layers is the residual stream before layer i; the last is the final residual.
    """
    tokens, _ = model._prepare(input, None)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_pre") or n == f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    return model.unembed(stack), tokens, labels


def logit_lens_table(model: HookedModel, input: Input, position: int = -1, top_k: int = 5, targets: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per (layer, rank): the top-k tokens the residual stream predicts at `position` of the
    first prompt, their probabilities, and the final layer's KL divergence from this layer.

    `targets`: extra token strings whose probability and rank are reported per layer.
    """
    logits, tokens, labels = logit_lens_logits(model, input)
    logits = logits[:, 0, position].float()  # [component, vocab]
    logprobs = logits.log_softmax(-1)
    final = logprobs[-1]
    kl = (final.exp() * (final - logprobs)).sum(-1)  # KL(final || layer)
    top = logprobs.topk(top_k, dim=-1)
    rows = []
    target_ids = [model.tokenizer.encode(t, add_special_tokens=False)[0] for t in (targets or [])]
    ranks = (logprobs[:, None, :] > logprobs[:, target_ids][..., None]).sum(-1) if target_ids else None
    for i, label in enumerate(labels):
        row = {"layer": i, "label": label, "kl_to_final": float(kl[i])}
        for r in range(top_k):
            tid = int(top.indices[i, r])
            row[f"top{r + 1}"] = model.tokenizer.decode([tid]) if model.tokenizer else tid
            row[f"p{r + 1}"] = float(top.values[i, r].exp())
        for j, t in enumerate(targets or []):
            row[f"p({t!r})"] = float(logprobs[i, target_ids[j]].exp())
            row[f"rank({t!r})"] = int(ranks[i, j])
        rows.append(row)
    return pd.DataFrame(rows)
