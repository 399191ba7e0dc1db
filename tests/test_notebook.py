"""notebooks/explore_data.ipynb runs top to bottom on the tiny fixture mirror, through nbconvert's
``ExecutePreprocessor`` (what ``jupyter nbconvert --execute``, the documented command, runs)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

DOMAINS = ("code", "math", "prose")  # the default domain set (conf/data/domains)


nbformat = pytest.importorskip("nbformat")
nbconvert = pytest.importorskip("nbconvert")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOK_DIR / "explore_data.ipynb"


@pytest.fixture
def fixture_mirror(tiny_mirror, tiny_tokenizer_dir, tmp_path) -> Path:
    """The tiny datasets with the tiny tokenizer standing in for ``<mirror>/gpt2``."""
    mirror = tmp_path / "mirror"
    shutil.copytree(tiny_mirror, mirror)
    shutil.copytree(tiny_tokenizer_dir, mirror / "gpt2")
    return mirror


@pytest.fixture
def this_interpreter_kernel(tmp_path, monkeypatch) -> str:
    """A python3 kernel spec that runs ``sys.executable``, found before any user-level one."""
    jupyter_path = tmp_path / "jupyter"
    kernelspec.write_kernel_spec(jupyter_path / "kernels" / kernelspec.KERNEL_NAME)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    return kernelspec.KERNEL_NAME


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebook_runs_on_fixture_mirror(fixture_mirror, this_interpreter_kernel, monkeypatch):
    # The kernel inherits this environment (offline switches, per-test MOE_CACHE_DIR).
    monkeypatch.setenv("MOE_HUB_MIRROR", str(fixture_mirror))
    monkeypatch.setenv("MOE_NOTEBOOK_OVERRIDES", "data.block_size=32")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))

    executor = nbconvert.preprocessors.ExecutePreprocessor(
        timeout=120, kernel_name=this_interpreter_kernel
    )
    executor.preprocess(nb, {"metadata": {"path": str(NOTEBOOK_DIR)}})  # raises on a failing cell

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert _text(code_cells[-1]).strip() == sys.executable

    samples = next(c for c in code_cells if "tokenizer.decode" in c.source)
    printed = _text(samples)
    for domain in DOMAINS:
        assert f"--- {domain} ---" in printed
    assert len(printed) > 200  # the decoded blocks themselves, not only the headers

    images = [o for c in code_cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the bar chart produced no PNG output"
