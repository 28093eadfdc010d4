"""Logit lens: read each layer's residual stream through the model's own final norm and unembedding.

    logits_l = unembed(final_norm(resid_l))

with the final norm recomputed on resid_l (nostalgebraist, "interpreting GPT: the logit lens",
2020; DESIGN.md). Component l < n_layers is the residual stream entering block l
(`blocks.{l}.hook_resid_pre`, so component 0 is the embedding); component n_layers is the last
block's output. That last component goes through exactly the modules the model's forward uses
(its final norm, its unembedding, and any final logit soft-capping) on a tensor of the same
shape, so it equals the model's logits bit for bit.

    frame = logit_lens_frame(model, "The Eiffel Tower is in the city of", targets=[" Paris"])
    interp.viz.lens_heatmap(frame).show()
    print(readable_lens_table(logit_lens_table(model, "The Eiffel Tower is in the city of", targets=[" Paris"])))

Every function takes `lens=`: None for the logit lens, or any object with
`lens_logits(model, resid, layer) -> logits` (a `Lens`), such as a trained tuned lens
(`interp.vocab.tuned_lens.TunedLens`, Belrose et al. 2023), which reads layer l < n_layers
through its translator. The last component is always read as the model's output, unchanged.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional, Protocol, Sequence, Union

import pandas as pd
import torch
from torch import Tensor

from .hook_points import get_act_name
from .hooks import HookedModel, Input

Target = Union[str, int]
# Elements of [pos, d_vocab] float32 log-probabilities held at once per layer (2**24 = 64 MiB).
CHUNK_ELEMENTS = 2**24


class Lens(Protocol):
    """What `lens=` takes: logits read from the residual stream entering block `layer` (n_layers: the last block's output).

    Optionally also `check_model(model)` (raises when the lens was not made for `model`) and `name`.
    """

    def lens_logits(self, model: HookedModel, resid: Tensor, layer: int) -> Tensor: ...


def lens_components(model: HookedModel) -> list[tuple[str, str]]:
    """(label, hook name) per lens component: `{l}_pre` for each layer, then `final_post`."""
    n = model.cfg.n_layers
    return [(f"{l}_pre", get_act_name("resid_pre", l)) for l in range(n)] + [("final_post", get_act_name("resid_post", n - 1))]


def _residuals(model: HookedModel, input: Input, attention_mask: Optional[Tensor]) -> tuple[Tensor, list[Tensor], list[str]]:
    tokens, mask = model.prepare_inputs(input, attention_mask)
    comps = lens_components(model)
    _, cache = model.run_with_cache(tokens, names_filter=[h for _, h in comps], attention_mask=mask)
    return tokens, [cache[h] for _, h in comps], [label for label, _ in comps]


def lens_logits(model: HookedModel, resid: Tensor) -> Tensor:
    """unembed(final_norm(resid)): Float[Tensor, "... d_model"] -> Float[Tensor, "... d_vocab"]."""
    return model.unembed(model.apply_final_norm(resid))


def _read(model: HookedModel, resid: Tensor, layer: int, lens: Optional[Lens]) -> Tensor:
    """Logits of component `layer`: the model's own final norm and unembedding at the last one, else `lens` (or the logit lens)."""
    if lens is None or layer == model.cfg.n_layers:
        return lens_logits(model, resid)
    return lens.lens_logits(model, resid, layer)


def _check_lens(model: HookedModel, lens: Optional[Lens]) -> None:
    check = getattr(lens, "check_model", None)
    if check is not None:
        check(model)


def _lens_name(lens: Optional[Lens]) -> str:
    return "logit lens" if lens is None else getattr(lens, "name", None) or "tuned lens"


@torch.no_grad()
def logit_lens_logits(
    model: HookedModel, input: Input, attention_mask: Optional[Tensor] = None, lens: Optional[Lens] = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Logits read at every component. Returns (Float[Tensor, "component batch pos d_vocab"], tokens, labels).

    Each component is unembedded on its own [batch, pos, d_model] tensor, the shape the model's
    forward uses, so the last one equals `model(tokens)` exactly. This holds n_layers + 1 copies
    of the logits: for long prompts or big vocabularies use `logit_lens_frame`, which works per
    layer and per chunk of positions. `lens`: see `Lens` (default: the logit lens).
    """
    _check_lens(model, lens)
    tokens, resids, labels = _residuals(model, input, attention_mask)
    return torch.stack([_read(model, r, layer, lens) for layer, r in enumerate(resids)]), tokens, labels


def _encode(model: HookedModel, text: str) -> list[int]:
    return model.require_tokenizer().encode(text, add_special_tokens=False)


def target_pieces(model: HookedModel, target: str) -> list[str]:
    """The tokens a target string encodes to, decoded one by one (a usable target has exactly one)."""
    return _decode(model, _encode(model, target))


def space_variant(model: HookedModel, target: str) -> Optional[str]:
    """`" " + target` when that is one token other than `target`: the form a word takes after a space.

    "Paris" and " Paris" are different tokens; in running text ("the city of Paris") the model
    predicts " Paris", so a target written without its space reads as near zero probability.
    """
    if not target or target[0].isspace():
        return None
    spaced = _encode(model, " " + target)
    return " " + target if len(spaced) == 1 and spaced != _encode(model, target) else None


def _target_ids(model: HookedModel, targets: Optional[Sequence[Target]]) -> list[tuple[str, int]]:
    out = []
    for t in targets or []:
        if isinstance(t, int):
            if not 0 <= t < model.cfg.d_vocab:
                raise ValueError(f"target id {t} is outside the vocabulary (d_vocab = {model.cfg.d_vocab})")
            name = model.tokenizer.decode([t]) if model.tokenizer is not None else str(t)
            out.append((name, t))
            continue
        ids = _encode(model, t)
        if len(ids) != 1:
            spaced = space_variant(model, t)
            fix = (f"{spaced!r}, with a leading space, is one token: pass that" if spaced
                   else "pass a single token (mind the leading space, e.g. ' Paris') or its id")
            raise ValueError(f"target {t!r} is {len(ids)} tokens {_decode(model, ids)}, not one; {fix}")
        out.append((t, ids[0]))
    return out


def _chunks(n_pos: int, d_vocab: int, chunk_size: Optional[int]) -> Iterator[slice]:
    size = chunk_size or max(1, CHUNK_ELEMENTS // d_vocab)
    for start in range(0, n_pos, size):
        yield slice(start, min(start + size, n_pos))


def _decode(model: HookedModel, ids: Sequence[int]) -> list[str]:
    if model.tokenizer is None:
        return [str(i) for i in ids]
    return [model.tokenizer.decode([int(i)]) for i in ids]


@torch.no_grad()
def _lens_rows(
    model: HookedModel,
    input: Input,
    positions: Optional[Sequence[int]],
    top_k: int,
    targets: Optional[Sequence[Target]],
    batch_index: int,
    attention_mask: Optional[Tensor],
    chunk_size: Optional[int],
    lens: Optional[Lens] = None,
) -> tuple[list[dict], list[str]]:
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    target_ids = _target_ids(model, targets)
    _check_lens(model, lens)
    tokens, resids, labels = _residuals(model, input, attention_mask)
    if not -tokens.shape[0] <= batch_index < tokens.shape[0]:
        raise ValueError(f"batch_index {batch_index} is out of range for a batch of {tokens.shape[0]} prompts")
    batch_index %= tokens.shape[0]
    n_pos = tokens.shape[1]
    if positions is None:
        positions = list(range(n_pos))
    else:
        bad = [p for p in positions if not -n_pos <= p < n_pos]
        if bad:
            raise ValueError(f"positions {bad} are out of range for a prompt of {n_pos} tokens")
        positions = [p % n_pos for p in positions]
    str_tokens = _decode(model, tokens[batch_index].tolist())
    # One prompt, kept as [1, pos, d_model] so the norm and unembedding see the forward's layout.
    resids = [r[batch_index : batch_index + 1, positions] for r in resids]
    tid = torch.tensor([i for _, i in target_ids], dtype=torch.long, device=tokens.device)
    names: dict[int, str] = {}  # token id -> decoded string, decoded once

    def decode(ids: list[int]) -> list[str]:
        for i in set(ids) - names.keys():
            names[i] = _decode(model, [i])[0]
        return [names[i] for i in ids]

    rows: list[dict] = []
    for sl in _chunks(len(positions), model.cfg.d_vocab, chunk_size):
        chunk_pos = positions[sl]
        final_logits = lens_logits(model, resids[-1][:, sl])[0].float()  # [chunk, vocab]
        final = final_logits.log_softmax(-1)
        final_p = final.exp()
        for layer, (label, resid) in enumerate(zip(labels, resids)):
            logits = final_logits if layer == len(resids) - 1 else _read(model, resid[:, sl], layer, lens)[0].float()
            logprobs = final if layer == len(resids) - 1 else logits.log_softmax(-1)
            cols: dict[str, list] = {
                "layer": [layer] * len(chunk_pos), "label": [label] * len(chunk_pos), "pos": list(chunk_pos),
                "token": [str_tokens[p] for p in chunk_pos],
                "kl_to_final": (final_p * (final - logprobs)).sum(-1).tolist(),  # KL(final || layer), nats
            }
            if top_k:
                top = logprobs.topk(top_k, dim=-1)
                ids, probs = top.indices.tolist(), top.values.exp().tolist()
                for r in range(top_k):
                    cols[f"top{r + 1}"] = decode([row[r] for row in ids])
                    cols[f"p{r + 1}"] = [row[r] for row in probs]
            if len(target_ids):
                t_logits = logits[:, tid]  # [chunk, n_targets]
                ranks = (logits[:, None, :] > t_logits[..., None]).sum(-1).tolist()  # 0 = the top token
                t_probs = logprobs[:, tid].exp().tolist()
                for k, (name, _) in enumerate(target_ids):
                    cols[f"p({name!r})"] = [row[k] for row in t_probs]
                    cols[f"rank({name!r})"] = [row[k] for row in ranks]
            rows.extend(dict(zip(cols, values)) for values in zip(*cols.values()))
    return rows, str_tokens


def logit_lens_frame(
    model: HookedModel,
    input: Input,
    targets: Optional[Sequence[Target]] = None,
    top_k: int = 1,
    batch_index: int = 0,
    positions: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    lens: Optional[Lens] = None,
) -> pd.DataFrame:
    """The logit lens of one prompt as a tidy frame: one row per (layer, pos).

    Columns: layer (0..n_layers; n_layers is the model's output), label (`{l}_pre` /
    `final_post`), pos, token (the input token at pos), kl_to_final (KL(final || layer) of the
    next-token distributions, nats), top1..top{k} and p1..p{k} (the lens' top tokens and their
    probabilities), and per target t: p('t') and rank('t') (0 = top token).

    `targets`: single tokens (strings such as " Paris", or ids). `batch_index` picks the prompt
    of a batch; `positions` a subset of positions (default all). Log-probabilities are computed
    per layer on chunks of positions (`chunk_size`, default 2**24 // d_vocab), so memory stays
    at two [chunk, d_vocab] float32 blocks whatever the prompt length.
    `lens`: read layers l < n_layers through it instead (a trained tuned lens; see `Lens`); a
    lens with `check_model` refuses a model it was not trained for.
    df.attrs: tokens (the prompt's str tokens), component ("resid_pre"), metric_name ("logit lens" / "tuned lens").
    """
    rows, str_tokens = _lens_rows(model, input, positions, top_k, targets, batch_index, attention_mask, chunk_size, lens)
    frame = pd.DataFrame(rows).sort_values(["layer", "pos"], kind="stable").reset_index(drop=True)
    frame.attrs.update(tokens=str_tokens, component="resid_pre", metric_name=_lens_name(lens))
    return frame


def logit_lens_table(
    model: HookedModel,
    input: Input,
    position: int = -1,
    top_k: int = 5,
    targets: Optional[Sequence[Target]] = None,
    lens: Optional[Lens] = None,
) -> pd.DataFrame:
    """One row per layer at one `position` of the first prompt: layer, label, kl_to_final, the
    top-k tokens and probabilities (top1, p1, ...), and p('t') / rank('t') per target token.
    `lens`: as in `logit_lens_frame` (default: the logit lens).
    """
    rows, _ = _lens_rows(model, input, [position], top_k, targets, 0, None, None, lens)
    frame = pd.DataFrame(rows).drop(columns=["pos", "token"])
    return frame


def _is_token_column(name: str) -> bool:
    return name == "token" or re.fullmatch(r"top\d+", name) is not None


def _readable_name(name: str) -> str:
    if name == "kl_to_final":
        return "kl_to_final (nats)"
    rank = re.fullmatch(r"rank\((.*)\)", name)
    return f"rank of {rank.group(1)} (0 = top1)" if rank else name


def _format_p(p: float) -> str:
    """Three decimals, or two significant digits below 0.001, so a small probability never reads as 0."""
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.1e}"


def readable_lens_table(table: pd.DataFrame) -> str:
    """A lens table or frame as text for people (what `interp lens` prints).

    Tokens are quoted with `repr`, so a leading space or a newline shows (`' Paris'`, `'\\n'`);
    `kl_to_final` is headed `kl_to_final (nats)`; `rank('t')` becomes `rank of 't' (0 = top1)`
    (the raw 0-based rank: 0 means t is the top token); probabilities keep two significant
    digits below 0.001. The frame itself is left as it is (raw token strings, numeric values).
    """
    shown = table.copy()
    formatters: dict = {}
    for name in shown.columns:
        if _is_token_column(name):
            shown[name] = [repr(t) for t in shown[name]]
        elif re.fullmatch(r"p(\d+|\(.*\))", name):
            formatters[_readable_name(name)] = _format_p
    shown.columns = [_readable_name(c) for c in shown.columns]
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.max_rows", 500):
        return shown.to_string(index=False, formatters=formatters, float_format=lambda x: f"{x:.3f}")
