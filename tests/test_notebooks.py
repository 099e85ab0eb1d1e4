"""The example notebooks are stored without outputs and run top to bottom.

Execution uses nbclient with the ``python3`` Jupyter kernel of this environment. The kernel
inherits the environment variables: ``UEC_RAG_DATA`` selects XQuAD and ``UEC_RAG_CACHE`` the
model cache, as for the other tests. Without ``UEC_RAG_DATA`` the notebooks use the sample
corpus.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))

CELL_TIMEOUT_S = 900
"""Per-cell limit. A cell encodes at most 40 passages with three models, which takes one to
two minutes on a busy 2-core CPU. The limit only catches a hung kernel."""


def test_notebooks_found() -> None:
    names = [path.name for path in NOTEBOOKS]
    assert names == [
        "01_uec_in_langchain.ipynb",
        "02_uec_in_llamaindex.ipynb",
        "03_how_uec_works.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_stored_without_outputs(path: Path) -> None:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    for number, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name} cell {number} has stored outputs"
        assert cell.get("execution_count") is None, (
            f"{path.name} cell {number} has an execution count"
        )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path: Path) -> None:
    for module in ("nbclient", "nbformat", "ipykernel"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed; pip install nbclient nbformat ipykernel")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    # A failing cell raises CellExecutionError with the cell source and the traceback.
    client.execute()

    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert errors == []
    unexecuted = [
        number
        for number, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and cell.execution_count is None
    ]
    assert unexecuted == []
