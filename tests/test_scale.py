"Scale: 2-process DDP training (CPU, gloo), submitit job arrays, generation shards, init_from = full."

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from diffusegen.core import load_config, read_manifest, step_seed
from diffusegen.training import build_unet, load_unet, model_specs, run_training, spec_hash

ROOT = Path(__file__).resolve().parents[1]
TINY = {"train_steps": 2, "full_train_steps": 2, "save_interval": 2, "monitor_samples": 2, "monitor_sample_steps": 2}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DIFFUSEGEN_OUT": ""}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, kvasir_root):
    "The smoke profile's data and clustering stages on real Kvasir-SEG images (16 training images, 32 px, k = 2)."
    from diffusegen.clustering import run_clustering
    from diffusegen.data import run_data

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("scale")
    cfg = load_config("smoke", {"out": str(out)})
    run_data(cfg, kvasir_root, progress=False)
    run_clustering(cfg, progress=False)
    return cfg


def _copy(cfg, dest: Path, stages=("data", "clustering"), **over):
    "A fresh output folder holding `stages` of `cfg`'s run (manifests included)."
    for st in stages:
        for side in ("runs", "figures"):
            src = cfg.root / side / cfg.profile / st
            if src.exists():
                shutil.copytree(src, dest / side / cfg.profile / st)
    return load_config("smoke", {"out": str(dest), **over})


def _flat(u):
    return torch.cat([p.detach().flatten() for p in u.state_dict().values()])


SCRIPT = textwrap.dedent('''
    import json, sys
    from diffusegen.core import load_config
    from diffusegen.clustering import load_clusters
    from diffusegen.training import get_accelerator, model_specs, run_training, train_model, training_images
    cfg = load_config("smoke", json.loads(sys.argv[1]))
    acc = get_accelerator(cfg)
    assert acc is not None and acc.num_processes == 2 and acc.distributed_type.value == "MULTI_CPU", acc
    images, ids = training_images(cfg); pos = {i: k for k, i in enumerate(ids)}
    spec = model_specs(cfg, load_clusters(cfg), [], True)[0]
    r = train_model(spec, images[[pos[i] for i in spec.ids]], cfg, cfg.run_dir/"training"/spec.name,
                    progress=False, stop_after=2, accelerator=acc)          # "crash" after step 2 ...
    assert r["status"] == "stopped", r
    s = run_training(cfg, clusters=[], full=True, progress=False)           # ... resume (finds WORLD_SIZE=2 itself)
    print("rank", acc.process_index, s["models"][0]["status"], s["models"][0]["resumed_from"])
''')


def test_two_process_ddp_training_matches_one_process(prepared, tmp_path):
    "torchrun, 2 CPU processes over gloo: batch 4 split 2 + 2, stopped and resumed; vs 1 process with batch 4."
    over = {**TINY, "full_train_steps": 4}
    two = _copy(prepared, tmp_path / "two", **over)
    (tmp_path / "ddp.py").write_text(SCRIPT)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(tmp_path / "ddp.py"),
            json.dumps({"out": str(two.root), **over}),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(l for l in r.stdout.splitlines() if l.startswith("rank")) == ["rank 0 trained 2", "rank 1 trained 2"]
    one = _copy(prepared, tmp_path / "one", **over)
    run_training(one, clusters=[], full=True, progress=False)  # 1 process, the same settings
    fa, fb = one.run_dir / "training" / "full", two.run_dir / "training" / "full"
    # the same checkpoint layout (only rank 0 wrote; checkpoints removed at the end), loadable by load_unet
    tree = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    assert tree(fa) == tree(fb)
    mb = json.loads((fb / "final" / "model.json").read_text())
    assert mb["world_size"] == 2 and mb["resumed_from"] == 2 and mb["steps"] == 4
    assert mb["spec_hash"] == json.loads((fa / "final" / "model.json").read_text())["spec_hash"]
    # the same losses (all-reduced over the 2 processes) and close weights: only the gradient sum's order differs
    la, lb = pd.read_csv(fa / "final" / "loss.csv"), pd.read_csv(fb / "final" / "loss.csv")
    assert np.allclose(la.values, lb.values, rtol=1e-5, atol=1e-6), (la, lb)
    ua, ub = load_unet(fa), load_unet(fb)
    w0 = _flat(build_unet(one, True, seed=step_seed(one.seed, "full", -(10**6))))
    a, b = _flat(ua), _flat(ub)
    assert (a - b).norm() < 1e-2 * (a - w0).norm(), ((a - b).norm(), (a - w0).norm())
    assert ((a - b).abs() > 1e-5).float().mean() < 1e-2
    x = torch.zeros(1, 4, 32, 32)
    assert ub(x, torch.tensor([10])).sample.shape == (1, 8, 32, 32) and (fb / "final" / "samples.png").exists()


def test_submitit_local_trains_two_cluster_models_as_two_jobs(prepared, tmp_path):
    "`diffusegen train --executor local`: one submitit job (a local process) per cluster model, then the stage's report."
    cfg = _copy(prepared, tmp_path / "fan")
    args = [
        str(Path(sys.executable).parent / "diffusegen"),
        "train",
        "--profile",
        "smoke",
        "--out",
        str(cfg.root),
        "--executor",
        "local",
        *[a for k, v in {**TINY, "train_full": "false"}.items() for a in ("--set", f"{k}={v}")],
    ]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "submitted 2 training job(s) (local, 1 at a time, no GPU)" in r.stdout, r.stdout
    names = sorted(f"cluster_{k}" for k in pd.read_csv(cfg.run_dir / "clustering" / "clusters.csv").cluster.unique())
    jobs = cfg.run_dir / "jobs" / "training"
    assert len(list(jobs.glob("*_result.pkl"))) == 2  # two jobs ran and returned
    for n in names:
        rec = json.loads((cfg.run_dir / "training" / n / "final" / "model.json").read_text())
        assert rec["steps"] == 2 and rec["world_size"] == 1
        u = load_unet(cfg.run_dir / "training" / n)
        assert u(torch.zeros(1, 4, 32, 32), torch.tensor([5])).sample.shape == (1, 8, 32, 32)
    man = read_manifest(cfg, "training")
    assert sorted(m["name"] for m in man["summary"]["models"]) == names
    assert all(m["status"] == "cached" for m in man["summary"]["models"])  # trained by the jobs, reported here
    assert all(f"{n}: job " in r.stdout and f"{n} " in r.stdout for n in names)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    "init_from = full: the full model first, then both cluster models from its raw weights (2 steps each)."
    cfg = _copy(prepared, tmp_path_factory.mktemp("init"), init_from="full", **TINY)
    return cfg, run_training(cfg, progress=False)


def test_init_from_full(trained):
    cfg, s = trained
    names = [r["name"] for r in s["models"]]
    assert names[0] == "full" and sorted(names[1:]) == ["cluster_0", "cluster_1"]
    tdir = cfg.run_dir / "training"
    wfile = tdir / "full" / "final" / "unet" / "diffusion_pytorch_model.safetensors"
    sha = hashlib.sha256(wfile.read_bytes()).hexdigest()
    full = _flat(load_unet(tdir / "full" / "final" / "unet"))
    for n in names[1:]:
        rec = json.loads((tdir / n / "final" / "model.json").read_text())
        assert rec["init"] == {"file": str(wfile.relative_to(cfg.root)), "sha256": sha} and sha in rec["provenance"]
        w = _flat(load_unet(tdir / n / "final" / "unet"))
        scratch = _flat(build_unet(cfg, seed=step_seed(cfg.seed, n, -(10**6))))
        # 2 AdamW steps move each weight by about lr at most: the model is the full one, not a fresh initialisation
        assert (w - full).abs().max() < 3 * cfg.lr * cfg.train_steps < (w - scratch).abs().max()
    man = read_manifest(cfg, "training")
    assert [w["sha256"] for w in man["weights"]] == [sha] and any("init_from = full" in n for n in man["notes"])
    # the paper's setting trains them from scratch: other initial weights, another settings hash
    scratch_spec = model_specs(cfg, pd.read_csv(cfg.run_dir / "clustering" / "clusters.csv"), [0], False)[0]
    assert json.loads((tdir / "cluster_0" / "final" / "model.json").read_text())["spec_hash"] != spec_hash(
        cfg.replace(init_from="none"), scratch_spec
    )


def test_inpainting_shards_give_the_one_process_pixels(trained, tmp_path):
    """Shards, merged, make the samples one process makes, pixel for pixel: `diffusegen inpaint` under torchrun
    (2 processes, RANK = shard) and 2 shards as a submitit (debug) job array. (Batch 1 everywhere: a sample's pixels
    then depend on its seed alone; across batch compositions they agree up to float rounding, ≤ 1 grey level, as
    tests/test_inpainting.py shows.)"""
    from diffusegen.inpainting import run_inpainting
    from diffusegen.sets import read_set
    from diffusegen.scale import sharded_inpainting

    cfg, _ = trained
    over = {"init_from": "full", "inpaint_batch": 1, **TINY}
    one, two, jobs, hand = (
        _copy(cfg, tmp_path / n, ("data", "clustering", "training"), **over) for n in ("one", "two", "jobs", "hand")
    )
    types = ("diff", "full-diff")
    run_inpainting(one, types, progress=False)
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(sys.executable).parent / "diffusegen"),
        "inpaint",
        "--profile",
        "smoke",
        "--out",
        str(two.root),
        *[a for k, v in over.items() for a in ("--set", f"{k}={v}")],
    ]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = sharded_inpainting(jobs, ("diff",), shards=2, executor="debug", progress=False)
    assert sorted(x["shard"] for x in s["shards"]) == ["0/2", "1/2"] and all(x["made"] == 2 for x in s["shards"])
    shard_types = [
        t for t in s["types"] if t["type"] != "copy-paste"
    ]  # copy-paste: made here in seconds, not in shards
    assert shard_types and all(t["made"] == 0 and t["cached"] == t["planned"] for t in shard_types)  # nothing to redo
    for i in (1, 0):
        assert sharded_inpainting(hand, ("diff",), shard=f"{i}/2")["shards"][0]["made"] == 2  # `inpaint --shard I/2`
    assert sharded_inpainting(hand, ("diff",)) is None  # a plain `inpaint`: merges, then ...
    assert run_inpainting(hand, ("diff",), progress=False)["types"][0]["cached"] == 4  # ... finds every sample done
    # samples made on a GPU (their rows say so) are done for a run on the CPU too: a merge on a login node redoes nothing
    man = hand.run_dir / "synthetic" / "diff" / "manifest.csv"
    df = pd.read_csv(man, dtype=str, keep_default_na=False)
    gpu = df.assign(
        params=[
            json.dumps({**json.loads(p), "noise_device": "cuda", "precision": "bf16 autocast"}, sort_keys=True)
            for p in df.params
        ]
    )
    gpu.to_csv(man, index=False)
    again = run_inpainting(hand, ("diff",), progress=False)["types"][0]
    assert again["made"] == 0 and again["cached"] == 4
    assert (
        pd.read_csv(man, dtype=str, keep_default_na=False).params.tolist() == gpu.params.tolist()
    )  # rows keep their device
    df.to_csv(man, index=False)
    cols = ["file", "mask_file", "source_id", "seed", "checkpoint_sha256", "params"]
    for out, tys in ((two, types), (jobs, ("diff",)), (hand, ("diff",))):
        assert read_manifest(out, "inpainting") is not None
        for ty in tys:
            a, b = read_set(one, ty, required=True), read_set(out, ty, required=True)
            assert len(a) == one.inpaint_images * one.samples_per_image and a[cols].equals(b[cols])
            assert not list((out.run_dir / "synthetic" / ty).glob("manifest.shard-*"))
            for pa, pb in zip([*a.image_path, *a.mask_path], [*b.image_path, *b.mask_path]):
                assert np.array_equal(np.array(Image.open(pa)), np.array(Image.open(pb))), pb


@pytest.mark.parametrize("gpu_ids,seen", [(["7"], ["7"]), (["2", "3"], ["2", "3", "2"]), ([], ["", "", ""])])
def test_local_executor_one_job_per_gpu(tmp_path, gpu_ids, seen):
    "`executor = local`: each job sees only its own GPU (one per GPU at a time); without GPUs none, one at a time."
    from diffusegen.scale import run_array

    cfg = load_config("smoke", {"out": str(tmp_path), "executor": "local"})
    n = len(seen)
    res, jobs = run_array(
        cfg,
        "check",
        "check",
        os.getenv,
        [("CUDA_VISIBLE_DEVICES", "unset")] * n,
        [f"j{i}" for i in range(n)],
        progress=False,
        gpu_ids=gpu_ids,
    )
    assert res == seen and len({j.job_id for j in jobs}) == n
