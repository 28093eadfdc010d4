"""Writing result tables: the one writer behind `interp lens --out`, `interp heads` and `interp merge`.

A table goes to `.csv` or `.parquet` by the path's suffix, atomically (`interp.atomic`: temporary
sibling, fsync, rename, removed on failure), so a reader sees the old table or the new one,
never half of one. The parent folder is created; temporary files a killed earlier write left
beside the target are removed first.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

from .atomic import atomic_write, remove_stale_temps

if TYPE_CHECKING:  # only methods of the frame are called: no pandas import for the CLI's checks
    import pandas as pd

TABLE_SUFFIXES = (".csv", ".parquet")


def _writer(table: "pd.DataFrame", suffix: str) -> Callable[[Path], None]:
    if suffix == ".parquet":
        return lambda tmp: table.to_parquet(tmp, index=False)
    return lambda tmp: table.to_csv(tmp, index=False)


def write_table(table: "pd.DataFrame", path: Union[str, Path]) -> None:
    """Write `table` (without its index) to `path`, CSV or Parquet by suffix, atomically.

    Raises ValueError for any other suffix, before anything is written.
    """
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise ValueError(f"--out must end in .parquet or .csv, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, legacy=(path.name + ".tmp",))  # a killed earlier write's (older versions: <name>.tmp)
    atomic_write(path, _writer(table, path.suffix))
