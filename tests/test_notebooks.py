"The notebooks themselves: their checks run (through nbdev), and they are clean, exported and papermill-ready."

import shutil
import subprocess
import sys
from pathlib import Path
import nbformat
import pytest
from nbdev.test import test_nb as run_notebook  # aliased: pytest would collect `test_nb` itself
from diffusegen.core import STAGES

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("*.ipynb"))
SECTION_NBS = [ROOT / "nbs" / s.notebook for s in STAGES if (ROOT / "nbs" / s.notebook).exists()]


@pytest.fixture(scope="session")
def section_out(tmp_path_factory):
    "One output folder for the section notebooks: run in order, each finds its upstream stages' outputs there."
    return tmp_path_factory.mktemp("sections")


@pytest.mark.parametrize("nb", NBS, ids=[p.name for p in NBS])
def test_notebook_checks_pass(nb, tmp_path, monkeypatch, section_out, numeric_data):
    """Every cell of every notebook runs (nbdev's test runner: exported code plus the checks after it). The section
    notebooks run the smoke pipeline end to end on a dataset whose files are named by number (`1.png`, `003.png`):
    ids are strings wherever they are read back, and no check may trip over them."""
    out = section_out if nb in SECTION_NBS else tmp_path  # a notebook run alone still runs its upstream stages
    monkeypatch.setenv("DIFFUSEGEN_OUT", str(out))  # the stage cells write here, not into the checkout
    monkeypatch.setenv("DIFFUSEGEN_DATA_SEARCH", str(numeric_data))  # data_root = auto finds it (and nothing else)
    monkeypatch.chdir(nb.parent)
    ok, secs = run_notebook(nb.name, skip_flags=["notest"], do_print=False, showerr=True)
    assert ok, f"{nb.name} failed (see the traceback above)"


def test_section_notebooks_have_exactly_one_parameters_cell():
    assert SECTION_NBS, "no section notebook found"
    for nb in SECTION_NBS:
        cells = nbformat.read(nb, as_version=4).cells
        tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{nb.name}: {len(tagged)} cells tagged `parameters`"
        src = tagged[0].source
        for name in ("profile", "data", "out", "overrides"):
            assert f"\n{name} = " in "\n" + src, (nb.name, name)


def test_nbdev_clean_and_export_leave_no_diff(tmp_path):
    "What CI checks with git, checked here without git: cleaning and exporting a copy changes nothing."
    for item in ("pyproject.toml", "nbs", "diffusegen"):
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, tmp_path / item)
    bindir = Path(sys.executable).parent
    for cmd in ("nbdev-clean", "nbdev-export"):
        r = subprocess.run([str(bindir / cmd)], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    changed = [
        str(p.relative_to(tmp_path))
        for p in sorted(tmp_path.rglob("*"))
        if p.is_file()
        and "__pycache__" not in p.parts
        and (
            not (ROOT / p.relative_to(tmp_path)).exists()
            or p.read_bytes() != (ROOT / p.relative_to(tmp_path)).read_bytes()
        )
    ]
    assert not changed, f"run `make clean-nbs export` and commit: {changed}"
