"""docs/tutorial.ipynb runs top to bottom: every derivation step in it is an assert
against jax.grad (or finite differences), so a wrong formula or a broken API fails here."""

import os

import nbclient
import nbformat
import pytest

from conftest import ROOT


@pytest.mark.slow  # a Jupyter kernel: a process of its own
def test_the_tutorial_notebook_executes_without_an_error():
  path = os.path.join(ROOT, "docs", "tutorial.ipynb")
  notebook = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "test accuracy after 10 epochs" in text
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 2   # curves, filters
