"""notebooks/explore.ipynb runs top to bottom (nbclient, a fresh kernel, one CPU device, a few training
steps) without an error, draws its plots, and is stored without outputs."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "explore.ipynb")
PLOTS = 7  # layer pattern, parameter counts, loss, expert load, Mamba decay, attention maps, NVFP4 error


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.xdist_group("notebook")
def test_notebook_runs_top_to_bottom(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = dict(os.environ, NEMOJAX_NOTEBOOK_STEPS="4", NEMOJAX_NOTEBOOK_WORKDIR=str(tmp_path / "tiny"))
    env.pop("MPLBACKEND", None)
    # One CPU device, as on a laptop (the test session's conftest asks for 8 simulated ones).
    env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                                if not flag.startswith("--xla_force_host_platform_device_count"))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError naming the cell on any error (the notebook asserts too)

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == PLOTS, f"{len(images)} plots drawn, expected {PLOTS}"
    text = "".join(out.get("text", "") for out in outputs)
    assert "speculative == plain greedy: [True, True, True]" in text
    assert "acceptance rate" in text and "verdict: FITS" in text
