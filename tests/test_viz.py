"""Figures (interp/viz.py): the z matrices are the pivoted frames, axes carry token labels, HTML is written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from plotly.colors import get_colorscale

from interp import viz
from interp.lens import logit_lens_frame

from conftest import make_tiny


def patch_frame(n_layers=3, n_pos=4, heads=None, seed=0):
    rng = np.random.default_rng(seed)
    grid = [(l, p) for l in range(n_layers) for p in range(n_pos)]
    if heads:
        grid = [(l, p, h) for l, p in grid for h in range(heads)]
    df = pd.DataFrame(grid, columns=["layer", "pos"] + (["head"] if heads else []))
    df["metric"] = rng.normal(size=len(df))
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # row order must not matter
    df.attrs.update(component="resid_pre", metric_name="logit diff", tokens=["When", " Mary", " and", "\n"][:n_pos])
    return df


def test_layer_pos_heatmap_is_the_pivot_with_token_labels():
    df = patch_frame()
    fig = viz.layer_pos_heatmap(df)
    expected = np.array([[df[(df.layer == l) & (df.pos == p)].metric.item() for p in range(4)] for l in range(3)])
    trace = fig.data[0]
    assert np.array_equal(np.asarray(trace.z), expected)
    assert list(trace.x) == ["0: When", "1:  Mary", "2:  and", "3: \\n"] and list(trace.y) == [0, 1, 2]
    assert [c[1] for c in trace.colorscale] == [c[1] for c in get_colorscale("RdBu")] and trace.zmid == 0
    assert trace.zmax == pytest.approx(np.abs(expected).max()) and trace.zmin == -trace.zmax
    assert fig.layout.xaxis.title.text == "position" and fig.layout.yaxis.title.text == "layer"
    assert fig.layout.title.text == "logit diff | resid_pre"
    # tokens given explicitly win over attrs; without either, positions are plain numbers
    assert list(viz.layer_pos_heatmap(df, tokens=list("abcd")).data[0].x) == ["0: a", "1: b", "2: c", "3: d"]
    df.attrs.clear()
    assert list(viz.layer_pos_heatmap(df).data[0].x) == ["0", "1", "2", "3"]


def test_unsigned_values_get_a_sequential_scale():
    df = patch_frame()
    df["metric"] = df["metric"].abs()
    trace = viz.layer_pos_heatmap(df).data[0]
    assert trace.zmid is None and [c[1] for c in trace.colorscale] == [c[1] for c in get_colorscale("Viridis")]


def test_head_grid_is_the_pivot():
    df = pd.DataFrame([(l, h, 10 * l + h) for l in range(2) for h in range(3)], columns=["layer", "head", "score"])
    fig = viz.head_grid(df.iloc[::-1], value="score", title="sinks")
    assert np.array_equal(np.asarray(fig.data[0].z), np.array([[0, 1, 2], [10, 11, 12]], dtype=float))
    assert list(fig.data[0].x) == [0, 1, 2] and fig.layout.title.text == "sinks"
    assert fig.layout.xaxis.title.text == "head"


def test_layer_pos_head_grid_one_panel_per_head():
    df = patch_frame(n_layers=2, n_pos=3, heads=4)
    fig = viz.layer_pos_head_grid(df)
    assert len(fig.data) == 4 and [t.name for t in fig.data] == [f"head {h}" for h in range(4)]
    for h, trace in enumerate(fig.data):
        part = df[df["head"] == h]
        expected = np.array([[part[(part.layer == l) & (part.pos == p)].metric.item() for p in range(3)] for l in range(2)])
        assert np.array_equal(np.asarray(trace.z), expected)
        assert list(trace.x) == ["0: When", "1:  Mary", "2:  and"]
    assert fig.layout.coloraxis.cmid == 0 and fig.layout.coloraxis.cmax == pytest.approx(df.metric.abs().max())


def test_lens_heatmap_annotates_top_tokens():
    frame = pd.DataFrame(
        [(l, p, f"t{l}{p}", 0.1 * l + 0.01 * p, f"tok{p}") for l in range(3) for p in range(2)],
        columns=["layer", "pos", "top1", "p1", "token"],
    )
    fig = viz.lens_heatmap(frame)
    trace = fig.data[0]
    assert np.array_equal(np.asarray(trace.z), np.array([[0.1 * l + 0.01 * p for p in range(2)] for l in range(3)]))
    assert np.asarray(trace.text).tolist() == [[f"t{l}{p}" for p in range(2)] for l in range(3)]
    assert list(trace.x) == ["0: tok0", "1: tok1"]


def test_lens_heatmap_of_a_real_lens_frame():
    frame = logit_lens_frame(make_tiny("llama"), "w5 w6 w7 w44", targets=["w9"])
    fig = viz.lens_heatmap(frame, value="p('w9')")
    z = np.asarray(fig.data[0].z)
    assert z.shape == (3, 4) and np.array_equal(z, frame.pivot(index="layer", columns="pos", values="p('w9')").to_numpy())
    assert list(fig.data[0].x) == ["0: w5", "1: w6", "2: w7", "3: w44"]
    assert np.asarray(fig.data[0].text)[2].tolist() == list(frame[frame.layer == 2].top1)


def test_curve_and_generic_heatmap():
    df = pd.DataFrame({"k": [2, 0, 1, 0, 1, 2], "sink": [3.0, 1.0, 2.0, 5.0, 6.0, 7.0], "model": list("aaabbb")})
    fig = viz.curve(df, "k", "sink", color="model")
    assert [t.name for t in fig.data] == ["a", "b"]
    assert list(fig.data[0].x) == [0, 1, 2] and list(fig.data[0].y) == [1.0, 2.0, 3.0]
    assert list(fig.data[1].y) == [5.0, 6.0, 7.0] and fig.layout.xaxis.title.text == "k"
    niah = pd.DataFrame({"length": [1024, 512, 1024, 512], "depth": [0.5, 0.5, 0.0, 0.0], "acc": [0.25, 1.0, 0.5, 0.75]})
    fig = viz.heatmap(niah, x="length", y="depth", value="acc")
    assert np.array_equal(np.asarray(fig.data[0].z), np.array([[0.75, 0.5], [1.0, 0.25]]))
    assert list(fig.data[0].x) == ["512", "1024"] and list(fig.data[0].y) == ["0.0", "0.5"]


def test_save_html(tmp_path):
    path = viz.save_html(viz.layer_pos_heatmap(patch_frame()), tmp_path / "sub" / "fig.html")
    text = path.read_text()
    assert path.exists() and "plotly" in text.lower() and "1:  Mary" in text
    small = viz.save_html(viz.head_grid(patch_frame(heads=2).drop(columns="pos").drop_duplicates(["layer", "head"])),
                          tmp_path / "cdn.html", include_plotlyjs="cdn")
    assert "cdn.plot.ly" in small.read_text() and small.stat().st_size < path.stat().st_size


def test_bad_input_names_missing_and_present_columns():
    df = patch_frame().drop(columns="pos")
    with pytest.raises(ValueError, match=r"needs column\(s\) \['pos'\].*has columns \['layer', 'metric'\]"):
        viz.layer_pos_heatmap(df)
    with pytest.raises(ValueError, match=r"\['score'\]"):
        viz.head_grid(patch_frame(heads=2), value="score")
    with pytest.raises(ValueError, match="another axis among \\['head'\\]"):
        viz.layer_pos_heatmap(patch_frame(heads=2))
    with pytest.raises(ValueError, match=r"positions \[3\] have no token: 3 tokens"):
        viz.layer_pos_heatmap(patch_frame(), tokens=["a", "b", "c"])
    with pytest.raises(ValueError, match="empty frame"):
        viz.curve(pd.DataFrame({"k": [], "y": []}), "k", "y")
    with pytest.raises(TypeError, match="DataFrame"):
        viz.head_grid({"layer": [0]})
