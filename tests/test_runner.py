"`diffusegen reproduce`: papermill execution, the stage cache, the report, and failures."
import json, shutil, subprocess, sys
from pathlib import Path
import nbformat
import pytest
from diffusegen.core import STAGES, load_config
from diffusegen.datasets import make_demo_dataset
from diffusegen.runner import StageFailed, reproduce

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    "A small procedural dataset (the runner's own fallback data), so these tests do not depend on Kvasir."
    return make_demo_dataset(tmp_path_factory.mktemp("demo")/"ds", n=20, size=64, seed=3)

def status(runs): return {r.stage.name: r.status for r in runs}

def test_reproduce_runs_then_caches_then_reruns_on_change(tmp_path, tiny_data):
    runs = reproduce("smoke", data=tiny_data, out=tmp_path, progress=False)
    st = status(runs)
    assert st["data"] == "ran"
    assert all(st[s.name] in ("missing", "blocked") for s in STAGES[1:])      # not stubbed: reported as missing
    cfg = load_config("smoke", {"out": str(tmp_path)})
    report = (cfg.fig_dir/"report.md").read_text()
    assert "## Not yet implemented" in report and "02_clustering.ipynb does not exist yet" in report
    assert "Dataset summary" in report and "| training images" in report and "348" in report   # ours next to the paper's
    executed = cfg.fig_dir/"executed"/"01_data.ipynb"
    assert executed.exists() and (cfg.fig_dir/"data"/"fig1_samples.png").exists()
    nb = nbformat.read(executed, as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    stamp = executed.stat().st_mtime_ns

    assert status(reproduce("smoke", data=tiny_data, out=tmp_path, progress=False))["data"] == "cached"
    assert executed.stat().st_mtime_ns == stamp                                # not re-executed

    runs = reproduce("smoke", data=tiny_data, out=tmp_path, overrides={"image_size": 24}, progress=False)
    assert status(runs)["data"] == "ran" and (cfg.run_dir/"data"/"pairs_24.safetensors").exists()
    assert status(reproduce("smoke", data=tiny_data, out=tmp_path, overrides={"device": "cpu", "image_size": 24},
                            progress=False))["data"] == "cached"              # run-only settings keep the cache

    shutil.copy(tiny_data/"images"/"demo_0000.jpg", tiny_data/"images"/"extra.jpg")
    shutil.copy(tiny_data/"masks"/"demo_0000.png", tiny_data/"masks"/"extra.png")
    try:
        assert status(reproduce("smoke", data=tiny_data, out=tmp_path, overrides={"image_size": 24},
                                progress=False))["data"] == "ran"             # new data files: redone
    finally:
        (tiny_data/"images"/"extra.jpg").unlink(); (tiny_data/"masks"/"extra.png").unlink()

def test_only_selects_stages(tmp_path, tiny_data):
    runs = reproduce("smoke", data=tiny_data, out=tmp_path, only=["clustering"], progress=False)
    assert status(runs)["data"] == "skipped"
    assert status(reproduce("smoke", data=tiny_data, out=tmp_path, only=["data"], progress=False))["data"] == "ran"

def _failing_notebook(path):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell('profile = "smoke"\ndata = None\nout = None\noverrides = "{}"'); p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('clusters went wrong')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, path)

def test_failing_notebook_stops_naming_notebook_and_cell(tmp_path, tiny_data):
    nbs = tmp_path/"nbs"; nbs.mkdir()
    shutil.copy(ROOT/"nbs"/"01_data.ipynb", nbs)
    _failing_notebook(nbs/"02_clustering.ipynb")
    out = tmp_path/"out"
    with pytest.raises(StageFailed) as e:
        reproduce("smoke", data=tiny_data, out=out, nbs_dir=nbs, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "02_clustering.ipynb" in msg and "cell 3" in msg and "ValueError: clusters went wrong" in msg
    cfg = load_config("smoke", {"out": str(out)})
    state = json.loads((cfg.run_dir/"stages.json").read_text())
    assert state["data"]["status"] == "done" and state["clustering"]["status"] == "failed"
    assert (cfg.run_dir/"data"/"splits.csv").exists()                          # earlier results intact
    assert (cfg.fig_dir/"executed"/"02_clustering.failed.ipynb").exists()
    assert "| failed |" in (cfg.fig_dir/"report.md").read_text()
    # the data stage is not redone when the run is repeated
    with pytest.raises(StageFailed):
        runs = reproduce("smoke", data=tiny_data, out=out, nbs_dir=nbs, progress=False)
    assert json.loads((cfg.run_dir/"stages.json").read_text())["data"]["status"] == "done"

def test_cli_reproduce_bad_data_is_one_line(tmp_path):
    exe = Path(sys.executable).parent/"diffusegen"
    r = subprocess.run([str(exe), "reproduce", "--profile", "smoke", "--data", str(tmp_path/"nowhere"), "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.startswith("diffusegen: error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr and "01_data.ipynb" in err[0] and "nowhere" in err[0]
