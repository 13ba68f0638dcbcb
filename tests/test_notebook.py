"""``notebooks/quickstart.ipynb`` executes from top to bottom (slow; ``make test-app``), and is
committed without outputs, so that what a reader sees comes from running it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 600


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "clear the outputs"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's working folder lands under pytest's
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.monotonic()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    elapsed = time.monotonic() - start
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any(output.get("data", {}).get("image/png") for output in outputs), "the montage was not drawn"
    text = "".join(output.get("text", "") for output in outputs)
    assert "RetrievalModel" in text and "VisionLanguageModel" in text and "answer:" in text
    nbformat.write(notebook, tmp_path / "quickstart.executed.ipynb")
    print(f"notebook executed in {elapsed:.0f} s; output: {tmp_path / 'quickstart.executed.ipynb'}")
