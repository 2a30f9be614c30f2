"""Every notebook runs top to bottom on the embedded model, so none of them can rot.

The tests run them smaller: a cell after each notebook's ``parameters`` cell (papermill's convention) sets
fewer facts, the same code paths at a fraction of the time (notebook 3 edits 20 facts, not 100), which keeps
the suite within CI's time.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
SMALLER = {"02_locating_layers": {"n_facts": 4}, "03_memit_100_edits": {"n_edits": 20}, "04_wise_stream": {"n_edits": 4}}


def with_smaller_parameters(notebook, values: dict[str, int]):
    """The notebook with a cell setting ``values`` after its parameters cell, which must define each name."""
    if not values:
        return notebook
    index = next((i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])), None)
    assert index is not None, "the notebook has no cell tagged 'parameters'"
    assigned = {line.split("=")[0].strip() for line in notebook.cells[index].source.splitlines() if "=" in line}
    assert set(values) <= assigned, f"the parameters cell sets {sorted(assigned)}, not {sorted(values)}"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    return notebook


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    notebook = with_smaller_parameters(nbformat.read(path, as_version=4), SMALLER.get(path.stem, {}))
    NotebookClient(notebook, timeout=2400, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images or "wise" in path.stem  # the tracing and MEMIT notebooks draw figures


def test_there_are_four_notebooks():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]
