"""docs/tour.ipynb runs from top to bottom against the code as it is (it cannot rot)."""

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="the dev extra installs nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent


def test_the_tour_notebook_executes_and_its_numbers_are_real(tmp_path):
    notebook = nbformat.read(ROOT / "docs" / "tour.ipynb", as_version=4)
    nbclient.NotebookClient(
        notebook, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    outputs = [
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    ]
    text = "\n".join(outputs)
    assert "validation loss" in text and "records;" in text
    assert not any(
        out.get("output_type") == "error" for c in notebook.cells for out in c.get("outputs", [])
    )
    images = [
        out for c in notebook.cells if c.cell_type == "code" for out in c.outputs
        if "image/png" in out.get("data", {})
    ]  # fmt: skip
    assert len(images) == 4  # one figure per section, drawn by the code as it is
    committed = nbformat.read(ROOT / "docs" / "tour.ipynb", as_version=4)
    assert (
        sum("image/png" in o.get("data", {}) for c in committed.cells for o in c.get("outputs", []))
        == 4
    )  # fmt: skip  (committed executed)
