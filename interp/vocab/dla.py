"""Direct logit attribution (DLA): how much each part of the residual stream adds to a logit.

The residual stream at the last layer is a sum of what each part wrote: the embeddings, each
layer's attention (a sum over heads, plus the output bias) and MLP (a sum over neurons, plus the
output bias). The final norm is not linear, but with its scale s frozen at the value it takes on
the full residual (TransformerLens's `apply_ln_to_stack` convention; Elhage et al. 2021, "A
Mathematical Framework for Transformer Circuits"; Wang et al. 2022, the IOI paper, arXiv:2211.00593)
each part c maps to centre?(c) * s * g, and its direct effect on the answer is

    DLA(c) = (centre?(c) * s * g) . u,    u = W_U[correct] - W_U[wrong]  (or W_U[correct] for one answer)

with g the norm weight (1 + w for Gemma's RMSNorm) and centring only for a LayerNorm (GPT-2,
GPT-NeoX). The parts then sum to the model's logit (difference):

    sum_c DLA(c) + b_norm . u + (b_U[correct] - b_U[wrong]) = logit (difference)

- RMSNorm families (Llama, Qwen2, Mistral, Gemma): exact up to float error; the norm has no bias.
  Gemma's embedding module includes its sqrt(d_model) factor, so `embed` carries it.
- LayerNorm families (GPT-2, GPT-NeoX): centring is linear and the mean of a sum is the sum of the
  means, so centring each part separately keeps the sum exact; the norm's bias, which belongs to no
  part, is its own row (`final_norm_bias`). What centring removes (each part's mean component,
  along the all-ones direction) is attributed to no part: the norm discards it.
- Gemma 2/3 normalise each sublayer's output before adding it (post-norms): a head's or neuron's
  part goes through that norm too, with its scale frozen from the whole sublayer output, so heads
  (neurons) still sum to their layer's attention (MLP) part.
- Final logit soft-capping (Gemma 2: cap * tanh(logit / cap)) is not linear: DLA is defined on the
  logits before it. `df.attrs["model_value"]` is the pre-softcap metric the parts sum to.

The parts are read at each prompt's last real position (the last 1 of the attention mask).
`by` picks the granularity; every frame holds all the rows the sum needs, so `frame.dla.sum()`
equals the metric whatever `by`:

- "component": embed (and pos_embed on GPT-2), `{l}_attn_out` and `{l}_mlp_out` per layer;
- "head": each head's `hook_result` (z @ W_O[h]) per (layer, head) and the output bias
  `{l}_attn_bias` in place of `{l}_attn_out`; `per_position=True` splits each head by the key
  (source) position it reads, pattern[q, k] * v[k] @ W_O[h] (Elhage et al. 2021's OV decomposition),
  in a `src_pos` column; the parts over k sum to the head;
- "neuron": each MLP neuron's activation (`mlp.hook_post`) times its output weight, per
  (layer, neuron), and the MLP's output bias `{l}_mlp_bias` in place of `{l}_mlp_out`.

    frame = direct_logit_attribution(model, pairs)               # PromptPairs: their answers
    frame = direct_logit_attribution(model, tokens, answer_tokens=answers, by="head")
    frame.query("component == 'head'").nlargest(10, "dla")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..hook_points import get_act_name
from ..hooks import HookedModel, Input
from ._frozen import W_out, at, b_out, decoder, final_norm, last_positions, post_norms, unembed_bias, unembed_weight

BY = ("component", "head", "neuron")
REDUCE = ("mean", "none")
Answers = Union[Tensor, Sequence[Any]]
# rows of W_out turned into float64 at once when neurons are read (bounds the copy for wide MLPs)
NEURON_BLOCK = 4096


@dataclass
class Part:
    """Rows of the DLA frame: one component kind at one layer. values: Float[Tensor, "batch n"] (float64)."""

    component: str
    layer: Optional[int]
    labels: list[str]
    values: Tensor
    index: dict[str, np.ndarray] = field(default_factory=dict)  # head / neuron / src_pos per row


# ---------------------------------------------------------------------------- inputs
def _answer_id(model: HookedModel, a: Any) -> int:
    if isinstance(a, str):
        ids = model.require_tokenizer().encode(a, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"answer {a!r} is {len(ids)} tokens, not one; pass a single token (mind the leading space) or its id")
        return ids[0]
    return int(a)


def check_answers(model: HookedModel, answer_tokens: Answers, batch: int) -> Tensor:
    """Answer ids as Long[Tensor, "batch k"], k = 1 (a logit) or 2 (correct, wrong: a logit difference).

    Accepts [batch] or [batch, 2] ids (a tensor or nested lists; single-token strings are encoded).
    """
    if isinstance(answer_tokens, Tensor):
        if answer_tokens.dtype.is_floating_point or answer_tokens.dtype == torch.bool:
            raise TypeError(f"answer_tokens must hold token ids (integers), got {answer_tokens.dtype}")
        t = answer_tokens.detach().cpu().long()
    else:
        rows = [[_answer_id(model, x) for x in r] if isinstance(r, (list, tuple)) else _answer_id(model, r) for r in answer_tokens]
        t = torch.tensor(rows, dtype=torch.long)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[1] not in (1, 2) or t.shape[0] != batch:
        raise ValueError(
            f"answer_tokens must be [batch] (the correct id per prompt) or [batch, 2] (correct, wrong) with batch = {batch}, "
            f"got shape {tuple(t.shape)}"
        )
    if int(t.min()) < 0 or int(t.max()) >= model.cfg.d_vocab:
        raise ValueError(f"answer ids must lie in 0..{model.cfg.d_vocab - 1} (the vocabulary), got {t.unique().tolist()[:8]}")
    return t


def answer_direction(model: HookedModel, answers: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """u = W_U[correct] (- W_U[wrong]) as Float[Tensor, "batch d_model"] and the matching unembedding-bias term
    Float[Tensor, "batch"] (zeros without a bias), both float64."""
    w = unembed_weight(model)
    answers = answers.to(w.device)
    u = w[answers[:, 0]].to(device, torch.float64)
    if answers.shape[1] == 2:
        u = u - w[answers[:, 1]].to(device, torch.float64)
    b = unembed_bias(model)
    if b is None:
        return u, torch.zeros(len(answers), dtype=torch.float64, device=device)
    b = b.to(answers.device)
    bias = b[answers[:, 0]] - (b[answers[:, 1]] if answers.shape[1] == 2 else 0)
    return u, bias.to(device, torch.float64)


def _unpack(tokens: Any, answer_tokens: Optional[Answers], attention_mask: Optional[Tensor]):
    """PromptPairs (or anything with clean_tokens / answer_tokens) stand for their clean prompts and answers."""
    if hasattr(tokens, "clean_tokens") and hasattr(tokens, "answer_tokens"):
        pairs = tokens
        answer_tokens = pairs.answer_tokens if answer_tokens is None else answer_tokens
        attention_mask = getattr(pairs, "attention_mask", None) if attention_mask is None else attention_mask
        tokens = pairs.clean_tokens
    if answer_tokens is None:
        raise ValueError("answer_tokens is required (the correct id per prompt, or [batch, 2] correct/wrong pairs) "
                         "unless tokens is a PromptPairs, whose answers are used")
    return tokens, answer_tokens, attention_mask


# ---------------------------------------------------------------------------- the parts
def _hooks(model: HookedModel, by: str, per_position: bool) -> list[str]:
    n = model.cfg.n_layers
    names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_dict else [])
    for l in range(n):
        names += [get_act_name("attn_out", l), get_act_name("mlp_out", l)]
        if by == "head":
            names.append(get_act_name("z", l))
            if per_position:
                names += [get_act_name("pattern", l), get_act_name("v", l)]
        if by == "neuron":
            names.append(get_act_name("post", l))
    return names + [get_act_name("resid_post", n - 1), "ln_final.hook_normalized"]


def _head_parts(model: HookedModel, cache, l: int, last: Tensor, d: Tensor, per_position: bool) -> list[Part]:
    """Heads of layer l (and the output bias): z @ W_O[h] . d_attn, split by source position if asked."""
    c = model.cfg
    z = at(cache[get_act_name("z", l)], last).double()  # [batch, head, d_head]
    w_o = model.W_O(l).to(z.device, torch.float64)  # [head, d_head, d_model]
    b_o = model.b_O(l)
    b_o = None if b_o is None else b_o.to(z.device, torch.float64)
    post, _ = post_norms(model, l)
    if post is not None:  # Gemma 2/3: through the post-attention norm, its scale frozen on the whole output
        raw = torch.einsum("bhe,hem->bm", z, w_o) + (0 if b_o is None else b_o)
        d = post.pull_back(d, post.scale(raw))
    w_o_d = torch.einsum("hem,bm->bhe", w_o, d)  # [batch, head, d_head]
    heads = np.arange(c.n_heads)
    parts = []
    if per_position:
        pattern = cache[get_act_name("pattern", l)]  # [batch, head, q, k]
        rows = torch.arange(len(last), device=pattern.device)
        pat = pattern[rows, :, last.to(pattern.device)].double()  # [batch, head, k]
        v = cache[get_act_name("v", l)].double().repeat_interleave(c.n_groups, dim=2)  # [batch, k, head, d_head]
        vals = pat * torch.einsum("bkhe,bhe->bhk", v, w_o_d)  # [batch, head, k]
        k = vals.shape[-1]
        labels = [f"L{l}H{h}" for h in heads for _ in range(k)]
        parts.append(Part("head", l, labels, vals.reshape(len(last), -1),
                          {"head": np.repeat(heads, k), "src_pos": np.tile(np.arange(k), c.n_heads)}))
    else:
        vals = (z * w_o_d).sum(-1)  # [batch, head]
        parts.append(Part("head", l, [f"L{l}H{h}" for h in heads], vals, {"head": heads}))
    if b_o is not None:
        parts.append(Part("attn_bias", l, [f"{l}_attn_bias"], (d @ b_o)[:, None]))
    return parts


def _neuron_parts(model: HookedModel, cache, l: int, last: Tensor, d: Tensor) -> list[Part]:
    """Neurons of layer l (and the output bias): post[n] * W_out[n] . d_mlp."""
    post_act = at(cache[get_act_name("post", l)], last).double()  # [batch, d_mlp]
    w = W_out(model, l)
    bias = b_out(model, l)
    bias = None if bias is None else bias.to(post_act.device, torch.float64)
    _, post = post_norms(model, l)
    blocks = [w[s:s + NEURON_BLOCK].to(post_act.device, torch.float64) for s in range(0, w.shape[0], NEURON_BLOCK)]
    if post is not None:  # Gemma 2/3: through the post-feedforward norm, its scale frozen on the whole output
        raw = sum(post_act[:, s * NEURON_BLOCK:(s + 1) * NEURON_BLOCK] @ b for s, b in enumerate(blocks))
        raw = raw + (0 if bias is None else bias)
        d = post.pull_back(d, post.scale(raw))
    w_d = torch.cat([d @ b.T for b in blocks], dim=-1)  # [batch, d_mlp]
    neurons = np.arange(model.cfg.d_mlp)
    parts = [Part("neuron", l, [f"L{l}N{n}" for n in neurons], post_act * w_d, {"neuron": neurons})]
    if bias is not None:
        parts.append(Part("mlp_bias", l, [f"{l}_mlp_bias"], (d @ bias)[:, None]))
    return parts


@torch.no_grad()
def dla_parts(
    model: HookedModel,
    tokens: Input,
    answer_tokens: Optional[Answers] = None,
    by: str = "component",
    per_position: bool = False,
    attention_mask: Optional[Tensor] = None,
) -> tuple[list[Part], dict]:
    """The DLA parts per prompt (float64) and facts about the run; `direct_logit_attribution` makes the frame.

    Returns (parts, info) with info: tokens (Long[Tensor, "batch pos"]), answers (Long[Tensor,
    "batch k"]), last (Long[Tensor, "batch"], the positions read), model_value (Float[Tensor,
    "batch"], the metric from the model's own final-norm output, before any soft-capping).
    """
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, got {by!r}")
    if per_position and by != "head":
        raise ValueError(f"per_position=True splits heads by source position: it needs by='head', got by={by!r}")
    tokens, answer_tokens, attention_mask = _unpack(tokens, answer_tokens, attention_mask)
    tokens, mask = model.prepare_inputs(tokens, attention_mask)
    answers = check_answers(model, answer_tokens, tokens.shape[0])
    _, cache = model.run_with_cache(tokens, names_filter=_hooks(model, by, per_position), attention_mask=mask)
    n = model.cfg.n_layers
    last = last_positions(tokens, mask)
    resid = at(cache[get_act_name("resid_post", n - 1)], last).double()
    u, u_bias = answer_direction(model, answers, resid.device)
    norm = final_norm(model)
    d = norm.pull_back(u, norm.scale(resid))  # DLA(c) = c . d

    def whole(component: str, name: str, layer: Optional[int], label: str) -> Part:
        return Part(component, layer, [label], (at(cache[name], last).double() * d).sum(-1)[:, None])

    parts = [whole("embed", "hook_embed", None, "embed")]
    if "hook_pos_embed" in cache:
        parts.append(whole("pos_embed", "hook_pos_embed", None, "pos_embed"))
    for l in range(n):
        if by == "head":
            parts += _head_parts(model, cache, l, last, d, per_position)
        else:
            parts.append(whole("attn", get_act_name("attn_out", l), l, f"{l}_attn_out"))
        if by == "neuron":
            parts += _neuron_parts(model, cache, l, last, d)
        else:
            parts.append(whole("mlp", get_act_name("mlp_out", l), l, f"{l}_mlp_out"))
    if norm.bias is not None:
        parts.append(Part("final_norm_bias", None, ["final_norm_bias"], (u @ norm.bias.to(u.device, torch.float64))[:, None]))
    if unembed_bias(model) is not None:
        parts.append(Part("unembed_bias", None, ["unembed_bias"], u_bias[:, None]))
    normed = at(cache["ln_final.hook_normalized"], last).double()
    info = dict(tokens=tokens, answers=answers, last=last, model_value=(normed * u).sum(-1) + u_bias)
    return parts, info


# ---------------------------------------------------------------------------- the frame
def _int_column(parts: list[Part], key: str, repeat: int) -> pd.arrays.IntegerArray:
    """A nullable integer column (layer, head, neuron or src_pos): NA where a part has none."""
    chunks = [np.full(len(p.labels), -1 if p.layer is None else p.layer) if key == "layer"
              else p.index.get(key, np.full(len(p.labels), -1)) for p in parts]
    flat = np.tile(np.concatenate(chunks).astype(np.int64), repeat)
    return pd.arrays.IntegerArray(flat, flat < 0)


def parts_frame(parts: list[Part], reduce: str = "mean", per_position: bool = False) -> pd.DataFrame:
    """The tidy frame of DLA parts: component, layer, head, neuron, [src_pos], label, dla (and prompt for reduce='none')."""
    if reduce not in REDUCE:
        raise ValueError(f"reduce must be one of {REDUCE}, got {reduce!r}")
    values = torch.cat([p.values for p in parts], dim=1).cpu().numpy()  # [batch, rows]
    batch = values.shape[0]
    repeat = 1 if reduce == "mean" else batch
    cols: dict[str, Any] = {}
    if reduce == "none":
        cols["prompt"] = np.repeat(np.arange(batch), values.shape[1])
    cols["component"] = np.tile(np.concatenate([[p.component] * len(p.labels) for p in parts]), repeat)
    for key in ("layer", "head", "neuron") + (("src_pos",) if per_position else ()):
        cols[key] = _int_column(parts, key, repeat)
    cols["label"] = np.tile(np.concatenate([p.labels for p in parts]), repeat)
    cols["dla"] = values.mean(0) if reduce == "mean" else values.reshape(-1)
    return pd.DataFrame(cols)


def direct_logit_attribution(
    model: HookedModel,
    tokens: Input,
    answer_tokens: Optional[Answers] = None,
    by: str = "component",
    per_position: bool = False,
    attention_mask: Optional[Tensor] = None,
    reduce: str = "mean",
) -> pd.DataFrame:
    """Direct logit attribution at each prompt's last real position, as a tidy frame (see the module docstring).

    tokens: prompts (strings or Long[Tensor, "batch pos"]) or a PromptPairs (its clean prompts,
        answers and mask). answer_tokens: Long[Tensor, "batch"] (a logit) or [batch, 2] (correct,
        wrong: a logit difference), or lists of ids / single-token strings.
    by: "component", "head" or "neuron"; per_position (by="head" only): split heads by source position.
    reduce: "mean" over prompts (default) or "none" (one row per prompt and part, a `prompt` column).

    Columns: component (embed, pos_embed, attn, mlp, head, attn_bias, neuron, mlp_bias,
    final_norm_bias, unembed_bias), layer, head, neuron, [src_pos] (nullable ints), label, dla.
    The rows sum to the metric: `frame.dla.sum() == frame.attrs["model_value"]` up to float error.
    attrs: by, metric ("logit" or "logit_diff"), metric_name, model_value (mean over prompts of the
    model's pre-softcap metric), model_values (per prompt), positions (the last positions read),
    answers (decoded), softcap, tokens (str tokens, one prompt only).
    """
    parts, info = dla_parts(model, tokens, answer_tokens, by=by, per_position=per_position, attention_mask=attention_mask)
    frame = parts_frame(parts, reduce, per_position)
    decode = decoder(model)
    answers = info["answers"]
    values = info["model_value"].cpu()
    frame.attrs.update(
        by=by, per_position=per_position, metric="logit_diff" if answers.shape[1] == 2 else "logit",
        metric_name="direct logit attribution", model_value=float(values.mean()), model_values=values.tolist(),
        positions=info["last"].tolist(), answers=[[decode(i) for i in row] for row in answers.tolist()],
        softcap=model.adapter.final_logit_softcapping,
    )
    if info["tokens"].shape[0] == 1:
        frame.attrs["tokens"] = [decode(i) for i in info["tokens"][0].tolist()]
    return frame
