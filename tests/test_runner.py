"`diffusegen reproduce`: papermill execution, the stage cache, the report, and failures."

import json
import shutil
import subprocess
import sys
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
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", n=20, size=64, seed=3)


def status(runs):
    return {r.stage.name: r.status for r in runs}


FAST = {"train_steps": 3, "full_train_steps": 3, "save_interval": 3, "monitor_samples": 2, "monitor_sample_steps": 2}


def test_reproduce_runs_then_caches_then_reruns_downstream(tmp_path, tiny_data):
    runs = reproduce("smoke", data=tiny_data, out=tmp_path, overrides=FAST, progress=False)
    st = status(runs)
    existing = [s.name for s in STAGES if (ROOT / "nbs" / s.notebook).exists()]
    assert existing == [s.name for s in STAGES]  # every section notebook exists
    assert all(st[n] == "ran" for n in existing)
    cfg = load_config("smoke", {"out": str(tmp_path)})
    report = (cfg.fig_dir / "report.md").read_text()
    assert "Every stage is implemented." in report
    for ref in ("Table 1", "Table 2", "Table 3", "Fig. 5", "Fig. 6"):
        assert ref in report, ref  # every section reports
    assert "Dataset summary" in report and "| training images" in report and "348" in report  # ours next to the paper's
    assert f"**Data:** `{tiny_data}`" in report and "procedurally drawn stand-ins" in report  # which data, up front
    assert "FID Inception-v3" in report  # weights provenance (clustering)
    executed = cfg.fig_dir / "executed" / "01_data.ipynb"
    assert executed.exists() and (cfg.fig_dir / "data" / "fig1_samples.png").exists()
    nb = nbformat.read(executed, as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    stamp = executed.stat().st_mtime_ns

    st = status(reproduce("smoke", data=tiny_data, out=tmp_path, overrides=FAST, progress=False))
    assert all(st[n] == "cached" for n in existing) and executed.stat().st_mtime_ns == stamp  # nothing re-executed

    st = status(reproduce("smoke", data=tiny_data, out=tmp_path, overrides={**FAST, "device": "cpu"}, progress=False))
    assert all(st[n] == "cached" for n in existing)  # run-only settings keep the cache

    with pytest.raises(
        StageFailed, match="finished model trained with other settings"
    ):  # finished models are protected…
        reproduce("smoke", data=tiny_data, out=tmp_path, overrides={**FAST, "n_clusters": 3}, progress=False)
    st = status(
        reproduce(
            "smoke",
            data=tiny_data,
            out=tmp_path,
            progress=False,
            only=["data", "clustering", "training"],
            overrides={**FAST, "n_clusters": 3, "overwrite_models": True},
        )
    )
    assert (
        st["data"] == "cached" and st["clustering"] == "cached" and st["training"] == "ran"
    )  # …unless asked to retrain

    shutil.copy(tiny_data / "images" / "demo_0000.jpg", tiny_data / "images" / "extra.jpg")
    shutil.copy(tiny_data / "masks" / "demo_0000.png", tiny_data / "masks" / "extra.png")
    try:
        st = status(
            reproduce(
                "smoke",
                data=tiny_data,
                out=tmp_path,
                overrides={**FAST, "n_clusters": 3},
                only=["data"],
                progress=False,
            )
        )
        assert st["data"] == "ran" and st["clustering"] == "skipped"  # new data files: redone
    finally:
        (tiny_data / "images" / "extra.jpg").unlink()
        (tiny_data / "masks" / "extra.png").unlink()


def test_only_selects_stages(tmp_path, tiny_data):
    st = status(reproduce("smoke", data=tiny_data, out=tmp_path, only=["clustering"], progress=False))
    assert st["data"] == "skipped" and st["clustering"] == "blocked"
    assert status(reproduce("smoke", data=tiny_data, out=tmp_path, only=["data"], progress=False))["data"] == "ran"


def test_missing_notebook_is_reported_and_blocks_its_downstream(tmp_path, tiny_data):
    "A stage without a notebook is `missing` (never stubbed), the stages that need it `blocked`; the report lists both."
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    shutil.copy(ROOT / "nbs" / "02_clustering.ipynb", nbs)  # clustering exists, the data stage does not
    st = status(reproduce("smoke", data=tiny_data, out=tmp_path / "out", nbs_dir=nbs, progress=False))
    assert st["data"] == "missing" and st["clustering"] == "blocked" and st["training"] == "missing"
    assert all(st[s.name] in ("missing", "blocked") for s in STAGES)  # nothing ran: no kernel started
    report = (load_config("smoke", {"out": str(tmp_path / "out")}).fig_dir / "report.md").read_text()
    assert "- Data: pairs, checks, splits (§2.1, §2.3): nbs/01_data.ipynb does not exist yet" in report
    assert "- Clustering (§2.3): needs data" in report and "Every stage is implemented." not in report


def _failing_notebook(path):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell('profile = "smoke"\ndata = None\nout = None\noverrides = "{}"')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [
        p,
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise ValueError('clusters went wrong')"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, path)


def test_failing_notebook_stops_naming_notebook_and_cell(tmp_path, tiny_data):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    shutil.copy(ROOT / "nbs" / "01_data.ipynb", nbs)
    _failing_notebook(nbs / "02_clustering.ipynb")
    out = tmp_path / "out"
    with pytest.raises(StageFailed) as e:
        reproduce("smoke", data=tiny_data, out=out, nbs_dir=nbs, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "02_clustering.ipynb" in msg and "ValueError: clusters went wrong" in msg
    assert "cell 3 (\"raise ValueError('clusters went wrong')\")" in msg, msg
    assert msg.endswith("rerun the same command to resume from this stage")  # what the user can do
    cfg = load_config("smoke", {"out": str(out)})
    state = json.loads((cfg.run_dir / "stages.json").read_text())
    assert state["data"]["status"] == "done" and state["clustering"]["status"] == "failed"
    assert (cfg.run_dir / "data" / "splits.csv").exists()  # earlier results intact
    assert (cfg.fig_dir / "executed" / "02_clustering.failed.ipynb").exists()
    assert "| failed |" in (cfg.fig_dir / "report.md").read_text()
    # the data stage is not redone when the run is repeated
    with pytest.raises(StageFailed):
        reproduce("smoke", data=tiny_data, out=out, nbs_dir=nbs, progress=False)
    assert json.loads((cfg.run_dir / "stages.json").read_text())["data"]["status"] == "done"


def test_dead_kernel_is_one_line_naming_memory(tmp_path, tiny_data):
    "A kernel killed (as the kernel OOM killer does) stops the run with one line naming the notebook and memory."
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _failing_notebook(nbs / "01_data.ipynb")
    nb = nbformat.read(nbs / "01_data.ipynb", as_version=4)
    nb.cells[2] = nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    nbformat.write(nb, nbs / "01_data.ipynb")
    with pytest.raises(StageFailed) as e:
        reproduce("smoke", data=tiny_data, out=tmp_path / "out", nbs_dir=nbs, progress=False)
    msg = str(e.value)
    assert (
        "\n" not in msg and "01_data.ipynb" in msg and "kernel died" in msg and "out of memory" in msg and "GiB" in msg
    )


def test_cli_reproduce_bad_data_is_one_line(tmp_path):
    exe = Path(sys.executable).parent / "diffusegen"
    r = subprocess.run(
        [str(exe), "reproduce", "--profile", "smoke", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.startswith("diffusegen: error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr and "01_data.ipynb" in err[0] and "nowhere" in err[0]


def test_projection_of_a_fake_dry_run(tmp_path):
    "The dry run's report projects the full run from the unit times in its manifests (fake manifests, the paper profile)."
    from diffusegen.core import write_manifest
    from diffusegen.runner import StageRun, project_full_run, write_report

    cfg = load_config("paper", {"out": str(tmp_path), "dry_run": True, "allow_substitute_weights": True})
    models = [
        {"name": f"cluster_{k}", "full": False, "batch": 1, "seconds_per_step": 1.5, "device": "cpu"} for k in (0, 1)
    ]
    models.append(
        {"name": "full", "full": True, "batch": 1, "steps_per_second": 0.25, "device": "cpu"}
    )  # older manifest
    write_manifest(cfg, "training", [], summary={"models": models})
    write_manifest(
        cfg,
        "inpainting",
        [],
        summary={"types": [{"type": t, "seconds_per_evaluation": 0.2} for t in ("diff", "full-diff")]},
    )
    write_manifest(cfg, "styling", [], summary={"types": [{"type": "styled-diff", "seconds_per_step": 1.0}]})
    write_manifest(cfg, "segmentation", [], summary={"seconds_per_image_epoch": 0.1})
    p = project_full_run(cfg, {"data": 36.0})
    rows = {r["stage"]: r for r in p["rows"]}
    assert rows["training: cluster models"]["hours"] == pytest.approx(20 * 110_000 * 1.5 / 3600)
    assert rows["training: full-data model"]["hours"] == pytest.approx(200_000 * 4.0 / 3600)  # 1 / steps_per_second
    assert rows["inpainting"]["hours"] == pytest.approx(2 * 348 * 3 * 960 * 0.2 / 3600)
    assert rows["styling"]["units"] == 1 * 348 * 3 * 120  # the styled types the dry run made
    assert rows["data"]["hours"] == pytest.approx(0.01)
    assert p["total_h"] == pytest.approx(sum(r["hours"] for r in p["rows"]))
    # the SLURM fan-out: every model its own job, the longest (the full model) sets the wall time
    assert f"{200_000 * 4.0 / 3600:,.1f} h of wall time at this device's speed instead of" in p["slurm"]
    stages = {s.name: s for s in STAGES}
    txt = write_report(cfg, [StageRun(stages["data"], "ran", 36.0)]).read_text()
    assert "## Projected full run" in txt and f"**About {p['total_h']:,.0f} hours" in txt and "CPU" in txt
    assert "| inpainting | network evaluation (per sample) | 200.0 ms | 2,004,480" in txt
