"""Where the favoured letter comes from: logit lens and direct logit attribution on the letter
tokens, and mean ablation of the components found (Li & Gao 2024, "Anchored Answers: Unravelling
Positional Bias in GPT-2's Multiple-Choice Questions", arXiv:2405.03205).

The bias score of a prompt is the favoured letter's logit minus the mean of the other letters'
logits, read at the last token. Averaged over every cyclic shift of a question set, each option
sits equally often at every letter, so the content's share of the score cancels and what remains
is the position bias.

- `collect_last`: one pass over the prompts that keeps, at the last token only, the residual
  stream entering every block, every head's z, every MLP's output and the embedding.
- `letter_lens`: the logit lens (nostalgebraist 2020) on the letter tokens at every layer:
  unembed(final_norm(resid_l)) restricted to the letters; where in depth the bias appears.
- `letter_dla`: direct logit attribution (Elhage et al. 2021) of every head, MLP and the
  embedding to each letter's logit, the final norm's scale frozen at the full residual
  (the `interp.vocab.dla` convention; the parts sum to the model's letter logits), and the
  bias score per part.
- `mean_ablation_hooks`: replace chosen heads' z and MLPs' outputs at the last token by their
  mean over the question set at the last token ("mean ablation over the question set"), as hooks
  for `interp.mcq.run.letter_logits`; the bias after is measured with `interp.mcq.bias.summarize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..hook_points import HookPoint, get_act_name
from ..hooks import HookedModel, HookSpec
from ..vocab._frozen import final_norm, post_norms, unembed_bias, unembed_weight
from .run import Prompts, letter_logits

Head = tuple[int, int]


@dataclass
class LastActs:
    """Activations at each prompt's last token. logits: Float[Tensor, "prompt letter"]; resid_pre:
    [prompt, n_layers + 1, d_model] (index n_layers: the last block's output); z: [prompt, layer, head, d_head];
    mlp_out: [prompt, layer, d_model]; embed: [prompt, d_model]. All float32 on the CPU."""

    logits: Tensor
    resid_pre: Tensor
    z: Tensor
    mlp_out: Tensor
    embed: Tensor
    letter_ids: list[int]


def _names(model: HookedModel) -> dict[str, str]:
    n = model.cfg.n_layers
    names = {"embed": "hook_embed", f"resid_pre.{n}": get_act_name("resid_post", n - 1)}
    for l in range(n):
        names[f"resid_pre.{l}"] = get_act_name("resid_pre", l)
        names[f"z.{l}"] = get_act_name("z", l)
        names[f"mlp_out.{l}"] = get_act_name("mlp_out", l)
    return names


@torch.no_grad()
def collect_last(model: HookedModel, prompts: Prompts, letter_ids: Sequence[int], batch_size: int = 32) -> LastActs:
    """One pass over `prompts` keeping the last token's activations (see `LastActs`) and the letter logits."""
    names = _names(model)
    rows = len(getattr(prompts, "prompts", prompts))
    store: dict[str, Tensor] = {}
    current: dict[str, list[int]] = {}

    def saver(key: str):
        def fn(x: Tensor, hook: HookPoint) -> None:
            last = x[:, -1].detach().float().cpu()
            if key not in store:
                store[key] = torch.zeros((rows, *last.shape[1:]), dtype=torch.float32)
            store[key][current["idx"]] = last
        return fn

    def on_batch(tokens: Tensor, idx: list[int]) -> None:
        current["idx"] = idx

    hooks = [(name, saver(key)) for key, name in names.items()]
    logits = letter_logits(model, prompts, letter_ids, batch_size, fwd_hooks=hooks, on_batch=on_batch)
    n = model.cfg.n_layers
    return LastActs(
        logits=logits,
        resid_pre=torch.stack([store[f"resid_pre.{l}"] for l in range(n + 1)], 1),
        z=torch.stack([store[f"z.{l}"] for l in range(n)], 1),
        mlp_out=torch.stack([store[f"mlp_out.{l}"] for l in range(n)], 1),
        embed=store["embed"].reshape(rows, -1),
        letter_ids=list(letter_ids),
    )


def _letter_rows(model: HookedModel, letter_ids: Sequence[int]) -> tuple[Tensor, Optional[Tensor]]:
    """W_U rows of the letters, Float[Tensor, "letter d_model"] (float64, CPU), and their unembedding bias or None."""
    ids = torch.tensor(list(letter_ids), dtype=torch.long)
    w = unembed_weight(model)
    rows = w[ids.to(w.device)].detach().to("cpu", torch.float64)
    b = unembed_bias(model)
    return rows, None if b is None else b[ids.to(b.device)].detach().to("cpu", torch.float64)


def bias_scores(letter_values: Tensor, favoured: int) -> Tensor:
    """Float[Tensor, "..."]: value of the favoured letter minus the mean of the others. letter_values: [..., letter]."""
    n = letter_values.shape[-1]
    others = [i for i in range(n) if i != favoured]
    return letter_values[..., favoured] - letter_values[..., others].mean(-1)


@torch.no_grad()
def letter_lens(model: HookedModel, acts: LastActs, favoured: int, letters: Sequence[str] = "ABCD") -> pd.DataFrame:
    """The logit lens on the letter tokens: one row per layer (0..n_layers; n_layers = the model's output).

    Columns: layer, label (`{l}_pre` / `final_post`), logit_{L} per letter (mean over prompts), bias (mean
    favoured-minus-others logit), favoured_rate (share of prompts where the favoured letter tops the letters),
    rate_{L} (share of prompts where letter L tops the letters).
    """
    rows_u, b_u = _letter_rows(model, acts.letter_ids)
    n = model.cfg.n_layers
    out = []
    for l in range(n + 1):
        resid = acts.resid_pre[:, l].to(model.device, model.dtype)
        normed = model.apply_final_norm(resid).detach().to("cpu", torch.float64)  # [prompt, d_model]
        logits = normed @ rows_u.T + (0 if b_u is None else b_u)  # [prompt, letter]
        top = torch.bincount(logits.argmax(-1), minlength=len(rows_u)).double() / len(logits)
        row = {"layer": l, "label": f"{l}_pre" if l < n else "final_post"}
        row.update({f"logit_{L}": float(v) for L, v in zip(letters, logits.mean(0))})
        row["bias"] = float(bias_scores(logits, favoured).mean())
        row["favoured_rate"] = float(top[favoured])
        row.update({f"rate_{L}": float(v) for L, v in zip(letters, top)})
        out.append(row)
    frame = pd.DataFrame(out)
    frame.attrs.update(favoured=letters[favoured], metric_name="logit lens on the answer letters")
    return frame


@torch.no_grad()
def letter_dla(model: HookedModel, acts: LastActs, favoured: int, letters: Sequence[str] = "ABCD") -> pd.DataFrame:
    """Direct logit attribution of every part to each letter's logit, at the last token, and its bias score.

    One row per part: component (embed, head, attn_bias, mlp, unembed_bias), layer, head (nullable),
    label (L3H2, 3_mlp_out), dla_{L} per letter and bias (dla of the favoured letter minus the mean of the
    others), all means over the prompts. The rows sum to the model's letter logits (attrs: model_logits,
    model_bias) up to float error. Gemma 2/3's post-attention norm is applied with its scale frozen on
    the whole attention output, as in `interp.vocab.direct_logit_attribution` (the MLP rows read
    `hook_mlp_out`, which is already past the post-MLP norm). Gemma 2's final logit soft-capping is
    not linear: there the rows sum to the letter logits before the cap.
    """
    n, H = model.cfg.n_layers, model.cfg.n_heads
    norm = final_norm(model)
    rows_u, b_u = _letter_rows(model, acts.letter_ids)
    final = acts.resid_pre[:, n].double()  # [prompt, d_model]
    scale = norm.scale(final)[:, None]  # [prompt, 1, 1]
    d = norm.pull_back(rows_u[None].expand(len(final), -1, -1), scale)  # [prompt, letter, d_model]
    parts: list[tuple[str, Optional[int], Optional[int], str, Tensor]] = []  # values: [prompt, letter]
    parts.append(("embed", None, None, "embed", torch.einsum("bm,blm->bl", acts.embed.double(), d)))
    for l in range(n):
        w_o = model.W_O(l).detach().to("cpu", torch.float64)  # [head, d_head, d_model]
        z = acts.z[:, l].double()
        b_o = model.b_O(l)
        b_o = None if b_o is None else b_o.detach().to("cpu", torch.float64)
        d_attn = d
        post, _ = post_norms(model, l)
        if post is not None:  # Gemma 2/3: the attention output goes through a norm before the residual
            raw = torch.einsum("bhe,hem->bm", z, w_o) + (0 if b_o is None else b_o)
            d_attn = post.pull_back(d, post.scale(raw)[:, None])
        vals = torch.einsum("bhe,hem,blm->bhl", z, w_o, d_attn)  # [prompt, head, letter]
        parts += [("head", l, h, f"L{l}H{h}", vals[:, h]) for h in range(H)]
        if b_o is not None:
            parts.append(("attn_bias", l, None, f"{l}_attn_bias", torch.einsum("m,blm->bl", b_o, d_attn)))
        parts.append(("mlp", l, None, f"{l}_mlp_out", torch.einsum("bm,blm->bl", acts.mlp_out[:, l].double(), d)))
    if norm.bias is not None:
        nb = norm.bias.detach().to("cpu", torch.float64)
        parts.append(("final_norm_bias", None, None, "final_norm_bias", (rows_u @ nb)[None].expand(len(final), -1)))
    if b_u is not None:
        parts.append(("unembed_bias", None, None, "unembed_bias", b_u[None].expand(len(final), -1)))
    values = torch.stack([p[4] for p in parts])  # [part, prompt, letter]
    mean = values.mean(1)
    frame = pd.DataFrame({
        "component": [p[0] for p in parts],
        "layer": pd.array([p[1] for p in parts], dtype="Int64"),
        "head": pd.array([p[2] for p in parts], dtype="Int64"),
        "label": [p[3] for p in parts],
    })
    for i, L in enumerate(letters):
        frame[f"dla_{L}"] = mean[:, i].numpy()
    frame["bias"] = bias_scores(values, favoured).mean(1).numpy()
    model_logits = acts.logits.double().mean(0)
    frame.attrs.update(favoured=letters[favoured], metric_name="direct logit attribution to the answer letters",
                       model_logits=model_logits.tolist(), model_bias=float(bias_scores(acts.logits.double(), favoured).mean()))
    return frame


def top_components(frame: pd.DataFrame, n_heads: int = 5, n_mlps: int = 2) -> tuple[list[Head], list[int]]:
    """The heads and MLPs with the largest positive bias score in a `letter_dla` frame: ([(layer, head)], [layer])."""
    heads = frame[(frame.component == "head") & (frame.bias > 0)].nlargest(n_heads, "bias")
    mlps = frame[(frame.component == "mlp") & (frame.bias > 0)].nlargest(n_mlps, "bias")
    return [(int(r.layer), int(r.head)) for r in heads.itertuples()], [int(x) for x in mlps.layer]


def mean_ablation_hooks(model: HookedModel, acts: LastActs, heads: Sequence[Head] = (), mlps: Sequence[int] = (),
                        how: str = "mean") -> HookSpec:
    """Hooks that set the listed heads' z and MLPs' outputs at the last token to their mean over `acts`' prompts
    (how="mean") or to zero (how="zero").

    A mean ablation keeps what a component writes on average, so it removes a constant push toward a
    letter only as far as the push varies over the prompts; a zero ablation removes it all (and
    everything else the component writes there). Works with `interp.mcq.run.letter_logits`, whose
    batches are unpadded (the last token is position -1).
    """
    if how not in ("mean", "zero"):
        raise ValueError(f'how must be "mean" or "zero", got {how!r}')
    n, H = model.cfg.n_layers, model.cfg.n_heads
    for l, h in heads:
        if not (0 <= l < n and 0 <= h < H):
            raise ValueError(f"head {(l, h)} is out of range: {n} layers x {H} heads")
    for l in mlps:
        if not 0 <= l < n:
            raise ValueError(f"MLP layer {l} is out of range: {n} layers")
    z_mean, mlp_mean = acts.z.mean(0), acts.mlp_out.mean(0)  # [layer, head, d_head], [layer, d_model]
    if how == "zero":
        z_mean, mlp_mean = torch.zeros_like(z_mean), torch.zeros_like(mlp_mean)
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    hooks = []

    def set_z(hs: list[int], value: Tensor):
        def fn(z: Tensor, hook: HookPoint) -> Tensor:  # [batch, pos, head, d_head]
            z = z.clone()
            z[:, -1, hs] = value.to(z.device, z.dtype)
            return z
        return fn

    def set_mlp(value: Tensor):
        def fn(x: Tensor, hook: HookPoint) -> Tensor:  # [batch, pos, d_model]
            x = x.clone()
            x[:, -1] = value.to(x.device, x.dtype)
            return x
        return fn

    for l, hs in sorted(by_layer.items()):
        hooks.append((get_act_name("z", l), set_z(hs, z_mean[l, hs])))
    for l in sorted(set(mlps)):
        hooks.append((get_act_name("mlp_out", l), set_mlp(mlp_mean[l])))
    return hooks
