"""A real notebook, executed by nbclient on an ipykernel kernel running this interpreter.

tests/notebooks/where_it_runs.ipynb defines a class with a @parallelizable
method in a cell, maps on loky, redefines a helper and then the class in
later cells (the maps must give the new answers), draws a progress bar and
prints explain(). Needs nbclient, nbformat and ipykernel (the test extra);
the widget case also needs ipywidgets (the notebook extra).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (pip install nbclient ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (pip install nbclient ipykernel)")
pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel (pip install ipykernel)")

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notebooks", "where_it_runs.ipynb")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDGET = "application/vnd.jupyter.widget-view+json"


def _kernel_manager(tmp_path: object) -> Any:
    """A kernel that runs *this* interpreter (a fresh CI venv has no kernelspec installed)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = os.path.join(str(tmp_path), "kernels")
    spec_dir = os.path.join(kernels, "pm-test")
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "parallelmethods test",
                "language": "python",
                # the repo root first: the checkout under test, as for the other subprocess tests
                "env": {"PYTHONPATH": os.pathsep.join([ROOT, *sys.path]), "PYTHONWARNINGS": "default"},
            },
            f,
        )
    return KernelManager(kernel_name="pm-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]))


def _run(tmp_path: object, *, hide_ipywidgets: bool) -> Any:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    if hide_ipywidgets:  # as in a Jupyter without the widget package
        nb.cells.insert(0, nbformat.v4.new_code_cell('import sys\nsys.modules["ipywidgets"] = None'))
    # Be kind to a shared machine: end the kernel's loky workers with it.
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "from joblib.externals.loky import get_reusable_executor\nget_reusable_executor().shutdown(wait=True)"
        )
    )
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=180,
        startup_timeout=120,
        allow_errors=False,
        store_widget_state=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    return nb


def _text(cell: Any, name: str | None = None) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream" and (name is None or out.get("name") == name):
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data") and name is None:
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def _cell(nb: Any, tag: str) -> Any:
    for cell in nb.cells:
        if cell.cell_type == "code" and tag in cell.source:
            return cell
    raise AssertionError(f"no cell with {tag!r}")


def _check_common(nb: Any) -> None:
    assert "FIRST [1, 3, 5, 7, 9]" in _text(_cell(nb, '"FIRST"'), "stdout")
    # a helper redefined in a later cell: the same object maps with the new helper
    assert "HELPER [-1, 1, 3, 5, 7]" in _text(_cell(nb, '"HELPER"'), "stdout")
    # a class redefined in a later cell: its new code runs in the (warm) workers
    assert "CLASS [300, 301, 302, 303, 304]" in _text(_cell(nb, '"CLASS"'), "stdout")
    assert "PROGRESS 3435" in _text(_cell(nb, '"PROGRESS"'), "stdout")
    explained = _text(_cell(nb, "explain("), "stdout")
    assert "Model.score on backend='loky'" in explained and "cloudpickle" in explained, explained
    everything = "".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "TqdmWarning" not in everything and "IProgress not found" not in everything, everything


@pytest.mark.timeout(300)
def test_notebook_text_bar_without_ipywidgets(tmp_path: object) -> None:
    """No ipywidgets: the text bar on stderr, and no TqdmWarning noise."""
    nb = _run(tmp_path, hide_ipywidgets=True)
    _check_common(nb)
    progress = _cell(nb, '"PROGRESS"')
    assert "30/30" in _text(progress, "stderr") and "Model.score" in _text(progress, "stderr")
    assert not any(WIDGET in out.get("data", {}) for out in progress.outputs)


@pytest.mark.timeout(300)
def test_notebook_widget_bar(tmp_path: object) -> None:
    """With ipywidgets (the notebook extra): tqdm's widget, which reaches 30/30; nothing on stderr."""
    pytest.importorskip(
        "ipywidgets", reason="the widget bar needs ipywidgets (pip install 'parallelmethods[notebook]')"
    )
    nb = _run(tmp_path, hide_ipywidgets=False)
    _check_common(nb)
    progress = _cell(nb, '"PROGRESS"')
    assert any(WIDGET in out.get("data", {}) for out in progress.outputs), progress.outputs
    assert "30/30" not in _text(progress, "stderr")
    state = json.dumps(nb.metadata.get("widgets", {}))
    assert "30/30" in state and "Model.score" in state, state[:2000]
