"""Plotly figures from the toolkit's tidy DataFrames.

Every function takes a frame with named columns (layer, pos, head and a value column such as
`metric`), pivots it, and returns a `plotly.graph_objects.Figure`: `fig.show()` in a notebook,
`save_html(fig, "out.html")` for a file. Token labels come from `tokens=` or from
`df.attrs["tokens"]` (patching and lens frames set it), written "i: token" on the position axis.
Signed values get a diverging scale centred at 0 (red negative, blue positive); values of one
sign a sequential one. Layers run top to bottom, as in a printed matrix.

    fig = layer_pos_heatmap(result.frame(), tokens=model.to_str_tokens(prompt))
    save_html(fig, "patching.html")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .atomic import atomic_write

DIVERGING = "RdBu"
SEQUENTIAL = "Viridis"


# ------------------------------------------------------------------ frame checks and pivots
def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} takes a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}, missing from the frame; it has columns {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{what} got an empty frame (columns {list(df.columns)})")


def pivot(df: pd.DataFrame, index: str, columns: str, value: str) -> pd.DataFrame:
    """value as a [index x columns] table, rows and columns sorted; missing cells are NaN.

    Raises if a cell has more than one row (the frame has another axis, e.g. head, to facet or filter by).
    """
    dup = df.duplicated([index, columns])
    if dup.any():
        first = df.loc[dup, [index, columns]].iloc[0].tolist()
        others = [c for c in df.columns if c not in (index, columns, value)]
        raise ValueError(
            f"several rows share ({index}, {columns}) = {tuple(first)}: the frame has another axis among {others}; "
            f"filter it to one value or use a faceted figure (e.g. layer_pos_head_grid)"
        )
    return df.pivot(index=index, columns=columns, values=value).sort_index().sort_index(axis=1)


def _tokens(df: pd.DataFrame, tokens: Optional[Sequence[str]]) -> Optional[list[str]]:
    if tokens is None:
        tokens = df.attrs.get("tokens") or None
    return list(tokens) if tokens is not None else None


def token_labels(positions: Sequence[int], tokens: Optional[Sequence[str]]) -> list[str]:
    """Axis labels "i: token" (newlines and tabs shown escaped), or "i" without tokens."""
    if tokens is None:
        return [str(p) for p in positions]
    bad = [p for p in positions if not 0 <= int(p) < len(tokens)]
    if bad:
        raise ValueError(f"positions {bad} have no token: {len(tokens)} tokens were given ({list(tokens)[:8]}...)")
    return [f"{p}: " + tokens[int(p)].replace("\n", "\\n").replace("\t", "\\t") for p in positions]


def _signed(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return finite.size > 0 and finite.min() < 0 < finite.max()


def _colour(values: np.ndarray, signed: Optional[bool]) -> dict:
    """Heatmap colour arguments: diverging and centred at 0 for signed values, else sequential."""
    if signed if signed is not None else _signed(values):
        finite = values[np.isfinite(values)]
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        return dict(colorscale=DIVERGING, zmid=0.0, zmin=-bound, zmax=bound)
    return dict(colorscale=SEQUENTIAL)


def _title(df: pd.DataFrame, value: str, title: Optional[str]) -> str:
    if title is not None:
        return title
    parts = [df.attrs.get("metric_name") or value]
    if df.attrs.get("component"):
        parts.append(str(df.attrs["component"]))
    return " | ".join(parts)


def _layout(fig: go.Figure, title: str, x: str, y: str, reverse_y: bool = True) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white")
    if reverse_y:
        fig.update_yaxes(autorange="reversed")
    return fig


# ------------------------------------------------------------------ figures
def heatmap(df: pd.DataFrame, x: str, y: str, value: str, title: Optional[str] = None, signed: Optional[bool] = None) -> go.Figure:
    """Generic heatmap of `value` over (y rows, x columns), e.g. NIAH accuracy by depth x length."""
    _require(df, [x, y, value], "heatmap")
    table = pivot(df, y, x, value)
    z = table.to_numpy(dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in table.columns], y=[str(i) for i in table.index],
                               colorbar=dict(title=value), **_colour(z, signed)))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return _layout(fig, _title(df, value, title), x, y)


def layer_pos_heatmap(
    df: pd.DataFrame, value: str = "metric", tokens: Optional[Sequence[str]] = None, title: Optional[str] = None,
    signed: Optional[bool] = None,
) -> go.Figure:
    """Layer x position heatmap (e.g. residual-stream patching); positions labelled "i: token"."""
    _require(df, ["layer", "pos", value], "layer_pos_heatmap")
    table = pivot(df, "layer", "pos", value)
    z = table.to_numpy(dtype=float)
    labels = token_labels(list(table.columns), _tokens(df, tokens))
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=list(table.index), colorbar=dict(title=value), **_colour(z, signed),
                               hovertemplate="layer %{y}<br>%{x}<br>" + value + " %{z:.4g}<extra></extra>"))
    fig.update_xaxes(type="category", tickangle=-45)
    return _layout(fig, _title(df, value, title), "position", "layer")


def head_grid(df: pd.DataFrame, value: str = "metric", title: Optional[str] = None, signed: Optional[bool] = None) -> go.Figure:
    """Layer x head heatmap of a per-head score (patching by head, sink or retrieval scores, importance)."""
    _require(df, ["layer", "head", value], "head_grid")
    table = pivot(df, "layer", "head", value)
    z = table.to_numpy(dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=list(table.columns), y=list(table.index), colorbar=dict(title=value),
                               **_colour(z, signed), hovertemplate="L%{y}H%{x}<br>" + value + " %{z:.4g}<extra></extra>"))
    fig.update_xaxes(dtick=1)
    return _layout(fig, _title(df, value, title), "head", "layer")


def layer_pos_head_grid(
    df: pd.DataFrame, value: str = "metric", tokens: Optional[Sequence[str]] = None, title: Optional[str] = None,
    cols: Optional[int] = None, signed: Optional[bool] = None,
) -> go.Figure:
    """One layer x position panel per head, on one shared colour scale.

    Faceted by head, not by layer: models have fewer heads than layers (SmolLM2: 9 vs 30), and a
    head's panel reads like the by-position residual heatmap. Panels are laid out `cols` wide
    (default about the square root of the head count); trace h holds head h's z.
    """
    _require(df, ["layer", "pos", "head", value], "layer_pos_head_grid")
    heads = sorted(df["head"].unique())
    tables = [pivot(df[df["head"] == h], "layer", "pos", value) for h in heads]
    everything = df[value].to_numpy(dtype=float)
    colour = _colour(everything, signed)
    cols = cols or math.ceil(math.sqrt(len(heads)))
    rows = math.ceil(len(heads) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {h}" for h in heads],
                        shared_yaxes=True, horizontal_spacing=0.03, vertical_spacing=0.12 / max(rows, 1))
    toks = _tokens(df, tokens)
    for k, (h, table) in enumerate(zip(heads, tables)):
        fig.add_trace(
            go.Heatmap(z=table.to_numpy(dtype=float), x=token_labels(list(table.columns), toks), y=list(table.index),
                       coloraxis="coloraxis", name=f"head {h}",
                       hovertemplate=f"head {h}<br>layer %{{y}}<br>%{{x}}<br>{value} %{{z:.4g}}<extra></extra>"),
            row=k // cols + 1, col=k % cols + 1,
        )
    axis = dict(colorscale=colour["colorscale"], colorbar=dict(title=value))
    if "zmid" in colour:
        axis.update(cmid=0.0, cmin=colour["zmin"], cmax=colour["zmax"])
    fig.update_layout(coloraxis=axis, height=max(400, 260 * rows))
    fig.update_xaxes(type="category", tickangle=-45)
    return _layout(fig, _title(df, value, title), "", "")


def lens_heatmap(
    frame: pd.DataFrame, value: str = "p1", tokens: Optional[Sequence[str]] = None, text: Optional[str] = "top1",
    title: Optional[str] = None,
) -> go.Figure:
    """Logit-lens heatmap (layer x position) of `value` -- the top token's probability "p1", a
    target column such as "p(' Paris')", or "kl_to_final" -- with each cell showing the lens'
    top token (`text` column; None for no annotations)."""
    _require(frame, ["layer", "pos", value] + ([text] if text else []), "lens_heatmap")
    table = pivot(frame, "layer", "pos", value)
    z = table.to_numpy(dtype=float)
    toks = _tokens(frame, tokens)
    if toks is None and "token" in frame.columns:
        toks = list(frame.drop_duplicates("pos").sort_values("pos")["token"])
    kwargs = {}
    if text:
        words = pivot(frame, "layer", "pos", text).reindex(index=table.index, columns=table.columns)
        kwargs = dict(text=words.fillna("").astype(str).to_numpy(), texttemplate="%{text}", textfont=dict(size=9))
    fig = go.Figure(go.Heatmap(z=z, x=token_labels(list(table.columns), toks), y=list(table.index),
                               colorbar=dict(title=value), colorscale="Blues", **kwargs))
    fig.update_xaxes(type="category", tickangle=-45)
    return _layout(fig, title or f"logit lens: {value}", "position", "layer")


def curve(df: pd.DataFrame, x: str, y: str, color: Optional[str] = None, title: Optional[str] = None) -> go.Figure:
    """Line figure of y over x, one line per value of `color` (Sink_k over k, pruning or ablation curves).

    Points are sorted by x within each line.
    """
    _require(df, [x, y] + ([color] if color else []), "curve")
    groups = df.groupby(color, sort=True) if color else [(None, df)]
    fig = go.Figure()
    for key, part in groups:
        part = part.sort_values(x, kind="stable")
        name = str(key[0] if isinstance(key, tuple) else key) if color else y
        fig.add_trace(go.Scatter(x=part[x].to_numpy(), y=part[y].to_numpy(), mode="lines+markers", name=name))
    fig.update_layout(legend_title=color or "")
    return _layout(fig, title or f"{y} by {x}", x, y, reverse_y=False)


def niah_heatmap(table: pd.DataFrame, title: str = "NIAH accuracy") -> go.Figure:
    """Needle-in-a-haystack accuracy: context length x needle depth, 0..1 red to green, each cell annotated.

    table: `interp.heads.niah.niah_accuracy(...)`, index n_tokens, columns depth, values accuracy.
    """
    fig = go.Figure(
        go.Heatmap(
            z=table.values, x=[f"{d:g}" for d in table.columns], y=[str(n) for n in table.index],
            zmin=0, zmax=1, colorscale="RdYlGn", text=table.round(2).values, texttemplate="%{text}",
        )
    )
    fig.update_layout(title=title, xaxis_title="needle depth", yaxis_title="context tokens")
    return fig


def save_html(fig: go.Figure, path: Union[str, Path], include_plotlyjs: Union[bool, str] = True) -> Path:
    """Write the figure as a standalone HTML file (plotly.js embedded by default, so it opens offline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.write_html(str(tmp), include_plotlyjs=include_plotlyjs), suffix=".html")


def circuit_figure(circuit, title: Optional[str] = None) -> go.Figure:
    """A circuit (`interp.circuits.Circuit`) as a figure: x = head index (MLPs at the right),
    y = layer, the input at the top and the logits at the bottom; lines are edges, coloured by the
    sign of their score (blue supports the clean answer, red opposes)."""
    from .circuits.serialize import edge_colour  # here: the circuits package is optional for viz users

    def xy(node) -> tuple[float, float]:
        if node.kind == "input":
            return (circuit.n_heads / 2, -1)
        if node.kind == "logits":
            return (circuit.n_heads / 2, circuit.n_layers)
        if node.kind == "mlp":
            return (circuit.n_heads + 0.5, node.layer + 0.5)
        return (node.index, node.layer)

    fig = go.Figure()
    for e in circuit.drawn_edges():
        (x0, y0), (x1, y1) = xy(e.src), xy(e.dst)
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text", showlegend=False,
                                 text=f"{e.src.name}->{e.dst.name} {e.channel} {e.score:+.3g}",
                                 line=dict(color=edge_colour(e.score), width=1)))
    nodes = circuit.nodes
    pts = [xy(n) for n in nodes]
    fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+text", text=[n.name for n in nodes],
                             textposition="top center", marker=dict(size=10, color="#333"), showlegend=False))
    fig.update_layout(title=title or f"circuit: {len(circuit.edges)} edges, {len(nodes)} nodes",
                      xaxis_title="head (MLP at right)", yaxis_title="layer", template="plotly_white")
    return fig
