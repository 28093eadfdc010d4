"""Plotly figures of the vocabulary frames: the head lens and direct logit attribution.

They read the frames' named columns only (as `interp.viz` does) and return a
`plotly.graph_objects.Figure`; `interp.viz.save_html(fig, path)` writes one to a file. Signed values
get a diverging scale centred at 0 (red negative, blue positive); layers run top to bottom.

    head_lens_heatmap(head_lens(model, prompt)).show()
    dla_head_heatmap(direct_logit_attribution(model, pairs, by="head")).show()
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..viz import DIVERGING, SEQUENTIAL, _require


def _colour(z: np.ndarray) -> dict:
    finite = z[np.isfinite(z)]
    if finite.size and finite.min() < 0 < finite.max():
        bound = float(np.abs(finite).max())
        return dict(colorscale=DIVERGING, zmid=0.0, zmin=-bound, zmax=bound)
    return dict(colorscale=SEQUENTIAL)


def _layer_head_figure(table: pd.DataFrame, title: str, value: str, **extra) -> go.Figure:
    z = table.to_numpy(dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=[str(h) for h in table.columns], y=[str(l) for l in table.index],
                               colorbar=dict(title=value), **_colour(z), **extra))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", template="plotly_white")
    return fig


def head_lens_heatmap(frame: pd.DataFrame, pos: Optional[int] = None, title: Optional[str] = None) -> go.Figure:
    """A layer x head heatmap of a `head_lens` frame at one position (default: the last in the frame).

    Colour: the logit of each head's top token (rank 0); cell text: that token; hover: every rank
    in the frame, "rank: 'token' (logit)".
    """
    _require(frame, ["layer", "head", "pos", "rank", "token", "logit"], "head_lens_heatmap")
    pos = int(frame["pos"].max()) if pos is None else pos
    at = frame[frame["pos"] == pos]
    if at.empty:
        raise ValueError(f"the frame has no rows at pos {pos}; its positions are {sorted(frame['pos'].unique().tolist())}")
    top = at[at["rank"] == 0].pivot(index="layer", columns="head", values="logit").sort_index().sort_index(axis=1)
    first = at[at["rank"] == 0].pivot(index="layer", columns="head", values="token").reindex_like(top)
    lines = (at.sort_values("rank").assign(line=lambda d: [f"{r}: {t!r} ({v:.3g})" for r, t, v in zip(d["rank"], d["token"], d["logit"])])
             .groupby(["layer", "head"])["line"].agg("<br>".join).unstack("head").reindex_like(top))
    tokens = frame.attrs.get("tokens")
    where = f"pos {pos}" + (f" ({tokens[pos]!r})" if tokens and 0 <= pos < len(tokens) else "")
    return _layer_head_figure(
        top, title or f"head lens | {where} | top token per head", "top logit",
        text=[[repr(t) for t in row] for row in first.to_numpy()], texttemplate="%{text}",
        customdata=lines.to_numpy(), hovertemplate="layer %{y}, head %{x}<br>%{customdata}<extra></extra>",
    )


def dla_head_heatmap(frame: pd.DataFrame, title: Optional[str] = None) -> go.Figure:
    """A layer x head heatmap of head DLA from `direct_logit_attribution(..., by="head")`.

    Source positions (per_position=True) are summed; prompts (reduce="none") are averaged.
    """
    _require(frame, ["component", "layer", "head", "dla"], "dla_head_heatmap")
    heads = frame[frame["component"] == "head"]
    if heads.empty:
        raise ValueError("the frame has no head rows: make it with direct_logit_attribution(..., by='head')")
    keys = ["prompt", "layer", "head"] if "prompt" in heads.columns else ["layer", "head"]
    per_head = heads.groupby(keys)["dla"].sum().groupby(["layer", "head"]).mean().reset_index()
    table = per_head.pivot(index="layer", columns="head", values="dla").sort_index().sort_index(axis=1)
    metric = frame.attrs.get("metric", "logit")
    return _layer_head_figure(table, title or f"direct logit attribution per head ({metric})", "DLA")


def dla_bar(frame: pd.DataFrame, components: Optional[Sequence[str]] = None, title: Optional[str] = None) -> go.Figure:
    """A bar per row label of a DLA frame, in the frame's order (embed, then layers): the component view.

    components: which `component` kinds to show (default all but head and neuron rows, which are
    too many for bars). Prompts (reduce="none") and source positions are averaged / summed per label.
    """
    _require(frame, ["component", "label", "dla"], "dla_bar")
    keep = [c for c in frame["component"].unique() if c not in ("head", "neuron")] if components is None else list(components)
    rows = frame[frame["component"].isin(keep)]
    if rows.empty:
        raise ValueError(f"no rows with component in {keep}; the frame has {sorted(frame['component'].unique())}")
    keys = ["prompt", "label"] if "prompt" in rows.columns else ["label"]
    order = list(dict.fromkeys(rows["label"]))
    values = rows.groupby(keys, sort=False)["dla"].sum().groupby("label", sort=False).mean().reindex(order)
    colours = np.where(values.to_numpy() < 0, "#d6604d", "#4393c3")
    fig = go.Figure(go.Bar(x=order, y=values.to_numpy(), marker_color=colours))
    metric = frame.attrs.get("metric", "logit")
    fig.update_layout(title=title or f"direct logit attribution ({metric})", xaxis_title="component", yaxis_title="DLA",
                      template="plotly_white")
    fig.update_xaxes(type="category")
    return fig
