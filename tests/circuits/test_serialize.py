"""Saved circuits (circuits/serialize.py): the JSON format interp.circuit/1, files written before the
typed edges still load, atomic writes, and the dot text."""

from __future__ import annotations

import json
import os

import pytest

from interp.circuits import Circuit, Edge, Node
from interp.circuits.serialize import FORMAT, DrawnEdge, to_dot

# A circuit as Circuit.save wrote it at 45e1437, when edges were strings (verbatim bytes).
OLD_JSON = """{
 "format": "interp.circuit/1",
 "model": "tiny",
 "n_layers": 2,
 "n_heads": 2,
 "n_kv_heads": 1,
 "edges": [
  "input->a0.kv0<k>",
  "a0.h1->logits",
  "a0.h0->logits"
 ],
 "scores": {
  "input->a0.kv0<k>": -2.0,
  "a0.h1->logits": 1.5,
  "a0.h0->logits": 1.0
 },
 "meta": {
  "method": "eap",
  "extraction": "top_n(3)",
  "faithfulness": 0.5
 }
}"""


def _circuit() -> Circuit:
    names = {"input->a0.kv0<k>": -2.0, "a0.h1->logits": 1.5, "a0.h0->logits": 1.0}
    edges = [Edge.parse(n) for n in names]
    return Circuit(edges, 2, 2, 1, dict(zip(edges, names.values())), "tiny",
                   {"method": "eap", "extraction": "top_n(3)", "faithfulness": 0.5})


def test_a_file_saved_before_typed_edges_loads(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(OLD_JSON)
    c = Circuit.load(path)
    assert c == _circuit()
    assert c.edges[0] == Edge(Node.input(), Node.kv(0, 0), "k")
    assert c.scores[Edge(Node.head(0, 1), Node.logits())] == 1.5


def test_save_writes_the_same_bytes_as_before_and_round_trips(tmp_path):
    c = _circuit()
    path = c.save(tmp_path / "c.json")
    assert path == tmp_path / "c.json"
    assert path.read_text() == OLD_JSON
    assert json.loads(path.read_text())["format"] == FORMAT == "interp.circuit/1"
    assert Circuit.load(path) == c
    assert Circuit.from_dict(c.to_dict()) == c
    assert sorted(os.listdir(tmp_path)) == ["c.json"]  # no temporary left beside it


def test_save_is_atomic(tmp_path, monkeypatch):
    """A write that fails half way leaves the old file whole and no temporary."""
    path = _circuit().save(tmp_path / "c.json")
    bigger = _circuit()
    bigger.meta["note"] = "x" * 1000

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(path)
    assert path.read_text() == OLD_JSON
    assert sorted(os.listdir(tmp_path)) == ["c.json"]


@pytest.mark.parametrize("change, match", [
    ({"format": "interp.circuit/0"}, "not a saved circuit"),
    ({"edges": ["m1->a0.h0<q>"]}, "backwards"),
    ({"edges": ["a0.h7->logits"]}, "unknown edge"),
    ({"edges": ["a0.h1->a1.h0"]}, "unknown edge"),
])
def test_from_dict_refuses_bad_files(change, match):
    with pytest.raises(ValueError, match=match):
        Circuit.from_dict(json.loads(OLD_JSON) | change)


def test_dot_text():
    want = "\n".join([
        "digraph circuit {",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
        '  "input" [fillcolor="#dddddd"];',
        '  "a0.h0" [fillcolor="#cfe3ff"];',
        '  "a0.h1" [fillcolor="#cfe3ff"];',
        '  "logits" [fillcolor="#dddddd"];',
        '  "input" -> "a0.h0" [color="#1f5fbf", label="k"];',
        '  "input" -> "a0.h1" [color="#1f5fbf", label="k"];',
        '  "a0.h1" -> "logits" [color="#c0392b"];',
        '  "a0.h0" -> "logits" [color="#c0392b"];',
        "}",
    ])
    assert _circuit().to_dot() == want
    assert to_dot([Node.mlp(3)], [DrawnEdge(Node.mlp(3), Node.logits(), "", 0.0)]).splitlines()[3:5] == [
        '  "m3" [fillcolor="#ffe2c6"];', '  "m3" -> "logits" [color="#1f5fbf"];']
