"""The five notebooks run top to bottom in fresh kernels, with the quick switch on.

Each notebook is executed by nbclient in a new IPython kernel started from the
interpreter running the tests (a kernel spec written to a temporary
``JUPYTER_PATH``, so a user's own ``python3`` kernel cannot substitute another
environment), with ``PYRO_VAE_QUICK=1`` and the notebooks folder as the working
directory. The notebooks assert their key claims in cells, so a broken formula
in the package fails the notebook, and the failing cell's traceback is the test
failure. Outputs are not written back.

The first four take about two and a half minutes of one CPU core together, the
fifth about one more; the timeouts below are guards against a hang, not
performance targets.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
KERNEL_NAME = "pyro-vae-tests"
# notebook -> seconds allowed for the whole notebook (quick switch on; ~4x what one idle core needs)
NOTEBOOKS = {
    "01_elbo.ipynb": 120,
    "02_train_vae.ipynb": 180,
    "03_priors_and_guides.ipynb": 240,
    "04_estimators.ipynb": 240,
    "05_discrete.ipynb": 240,
}


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    """A kernel spec that starts ipykernel with this very interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pyro_vae tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.timeout(budget + 60)) for name, budget in sorted(NOTEBOOKS.items())]
)
def test_notebook_runs_top_to_bottom(name, kernel_path, monkeypatch):
    budget = NOTEBOOKS[name]
    monkeypatch.setenv("PYRO_VAE_QUICK", "1")
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    notebook = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name=KERNEL_NAME, timeout=budget, resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}
    )  # cwd = notebooks/
    start = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - start
    print(f"{name}: {elapsed:.0f} s")
    assert elapsed < budget, f"{name} took {elapsed:.0f} s, more than its {budget} s budget"
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
