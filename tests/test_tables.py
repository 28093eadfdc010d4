"""interp/tables.py: the one table writer (CSV or Parquet by suffix, atomic, parent created)."""

from __future__ import annotations

import pandas as pd
import pytest

import interp.atomic as atomic_mod
from interp.tables import write_table

TABLE = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "token": [" Paris", "\n", "é"], "p": [0.5, 1e-9, 0.25]})


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_round_trip_and_parent_folder(tmp_path, suffix):
    path = tmp_path / "new" / "folder" / f"t{suffix}"
    assert write_table(TABLE, path) is None
    back = pd.read_csv(path, keep_default_na=False) if suffix == ".csv" else pd.read_parquet(path)
    pd.testing.assert_frame_equal(back, TABLE)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_other_suffixes_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"must end in .parquet or .csv, got 't.xlsx'"):
        write_table(TABLE, tmp_path / "sub" / "t.xlsx")
    assert not (tmp_path / "sub").exists()


def test_a_failed_write_keeps_the_old_table(tmp_path, monkeypatch):
    path = tmp_path / "t.csv"
    write_table(TABLE, path)
    before = path.read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_mod.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_table(TABLE.head(1), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_the_cli_and_the_head_table_share_the_writer():
    import interp.cli as cli
    from interp.heads import table

    assert cli.write_table is write_table and table.write_table is write_table
    assert not hasattr(cli, "_write_table")
