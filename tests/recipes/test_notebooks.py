"""The notebooks under recipes/notebooks run top to bottom (TINY mode, CPU) and are committed without outputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import qllava

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "recipes" / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_notebooks_are_found():
    assert NOTEBOOKS, f"no notebooks under {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nbformat.validate(nbformat.read(path, as_version=4))
    raw = json.loads(path.read_text())
    for i, cell in enumerate(raw["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: code cell {i} has outputs; strip them before committing"
            assert cell["execution_count"] is None, f"{path.name}: code cell {i} has an execution_count"
    assert "widgets" not in raw["metadata"], f"{path.name}: widget state is committed"


def _kernel_manager() -> AsyncKernelManager:
    """A python3 kernel on this very interpreter.

    With no kernel directories, the only spec is ipykernel's built-in one, whose argv starts with sys.executable;
    a python3 spec registered elsewhere (user or system Jupyter dirs) could point at another environment.
    """
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv
    return km


def _kernel_env() -> dict[str, str]:
    """This process's environment (QLLAVA_CACHE, PYTHONPATH, ...), with the qllava under test first on PYTHONPATH:
    pytest may import it from the checkout without it being installed, and the kernel must import the same one."""
    source_root = str(Path(qllava.__file__).resolve().parents[1])
    path = [source_root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


@pytest.mark.slow
@pytest.mark.recipe
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    first_code = next(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert "TINY = True" in first_code.splitlines(), "the committed notebook must default to TINY = True"
    client = NotebookClient(
        nb,
        km=_kernel_manager(),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    try:
        client.execute(env=_kernel_env())
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)
