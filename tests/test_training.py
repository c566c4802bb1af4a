"Training the 4-channel DDPM (§2.4): a real smoke run on Kvasir images, exact resume, checkpoints, regimes."

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
import pandas as pd
import pytest
import torch
from diffusegen.core import DiffusegenError, load_config
from diffusegen.data import run_data
from diffusegen.training import (
    ModelSpec,
    build_unet,
    draw_batch,
    load_unet,
    make_diffusion,
    model_specs,
    train_model,
    train_step,
    training_images,
    run_training,
    unet_kwargs,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, kvasir_root):
    "The smoke profile's data and clustering stages on real Kvasir-SEG images (16 training images, 32 px, k = 2)."
    from diffusegen.clustering import run_clustering

    out = tmp_path_factory.mktemp("train")
    cfg = load_config("smoke", {"out": str(out)})
    run_data(cfg, kvasir_root, progress=False)
    run_clustering(cfg, progress=False)
    return cfg


def _spec(cfg, ids, steps, batch=4, micro=0):
    return ModelSpec("m", ids, False, steps, cfg.lr, batch, micro)


def test_smoke_run_loss_falls_and_weights_load(prepared):
    from diffusers import UNet2DModel

    cfg = prepared.replace(full_train_steps=24, save_interval=12)
    s = run_training(cfg, clusters=[], full=True, progress=False)
    (rec,) = s["models"]
    assert rec["name"] == "full" and rec["status"] == "trained" and rec["n_images"] == 16
    assert rec["final_loss"] < 0.7 * rec["first_loss"], rec  # the hybrid loss falls
    final = cfg.run_dir / "training" / "full" / "final"
    u = UNet2DModel.from_pretrained(str(final / "unet"), use_safetensors=True)  # loads with diffusers itself
    assert (u.config.in_channels, u.config.out_channels) == (4, 8)
    ema = UNet2DModel.from_pretrained(str(final / "unet_ema"), use_safetensors=True)
    x = torch.zeros(1, 4, 32, 32)
    assert u(x, torch.tensor([10])).sample.shape == (1, 8, 32, 32)
    assert not torch.equal(u(x, torch.tensor([10])).sample, ema(x, torch.tensor([10])).sample)
    for f in ("loss_curve.png", "samples.png", "loss.csv", "model.json"):
        assert (final / f).exists()
    assert len(pd.read_csv(final / "loss.csv")) == 24
    assert (cfg.fig_dir / "training" / "models.md").exists() and (cfg.fig_dir / "training" / "manifest.json").exists()
    # the same settings again: the finished model is reused, not retrained
    assert run_training(cfg, clusters=[], full=True, progress=False)["models"][0]["status"] == "cached"


def test_resume_is_exact(prepared, tmp_path):
    cfg = prepared.replace(save_interval=3)
    images, ids = training_images(cfg)
    spec = _spec(cfg, ids, steps=7)
    train_model(spec, images, cfg, tmp_path / "straight", progress=False)
    b0 = train_model(spec, images, cfg, tmp_path / "resumed", progress=False, stop_after=5)  # "crash" after step 5
    assert b0["status"] == "stopped" and json.loads((tmp_path / "resumed" / "latest.json").read_text())["step"] == 3
    b = train_model(spec, images, cfg, tmp_path / "resumed", progress=False)
    assert b["resumed_from"] == 3 and b["steps"] == 7
    ua, ub = load_unet(tmp_path / "straight" / "final" / "unet"), load_unet(tmp_path / "resumed" / "final" / "unet")
    for (k, pa), pb in zip(ua.state_dict().items(), ub.state_dict().values()):
        assert torch.equal(pa, pb), k  # bit-identical to the uninterrupted run
    la, lb = (
        pd.read_csv(tmp_path / "straight" / "final" / "loss.csv"),
        pd.read_csv(tmp_path / "resumed" / "final" / "loss.csv"),
    )
    assert la.equals(lb)


def test_killed_cli_run_resumes_to_the_configured_step(prepared):
    "A real `diffusegen train` process killed mid-way resumes from its last checkpoint and ends at train_steps."
    cfg = prepared
    k = int(pd.read_csv(cfg.run_dir / "clustering" / "clusters.csv").cluster.value_counts().idxmax())
    mdir = cfg.run_dir / "training" / f"cluster_{k}"
    args = [
        str(Path(sys.executable).parent / "diffusegen"),
        "train",
        "--profile",
        "smoke",
        "--out",
        str(cfg.root),
        "--cluster",
        str(k),
        "--set",
        "train_steps=40",
        "--set",
        "save_interval=5",
    ]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (mdir / "latest.json").exists():
            time.sleep(0.2)
        assert (mdir / "latest.json").exists(), "no checkpoint written"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    killed_at = json.loads((mdir / "latest.json").read_text())["step"]
    assert 5 <= killed_at < 40 and not (mdir / "final").exists()
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((mdir / "final" / "model.json").read_text())
    assert rec["steps"] == 40 and rec["resumed_from"] >= killed_at
    assert len(pd.read_csv(mdir / "final" / "loss.csv")) == 40 and not (mdir / "checkpoints").exists()


def test_finished_model_is_never_overwritten_by_other_settings(prepared, tmp_path):
    cfg = prepared
    images, ids = training_images(cfg)
    spec = _spec(cfg, ids[:4], steps=2)
    train_model(spec, images[:4], cfg, tmp_path / "m", progress=False)
    before = (tmp_path / "m" / "final" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(DiffusegenError) as e:
        train_model(spec, images[:4], cfg.replace(lr=1e-5), tmp_path / "m", progress=False)
    assert "other settings" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "m" / "final" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert (
        train_model(spec, images[:4], cfg.replace(lr=1e-5, overwrite_models=True), tmp_path / "m", progress=False)[
            "status"
        ]
        == "trained"
    )


def test_gradient_accumulation_is_exact(prepared):
    cfg = prepared
    images, ids = training_images(cfg)
    diff = make_diffusion(cfg)
    x0, t, noise = draw_batch(images, _spec(cfg, ids, 1, batch=8), 0, 0, diff.num_timesteps, True)
    weights = []
    for micro in (0, 4, 3):  # whole batch; two micro-batches of 4; uneven 3 + 3 + 2
        u = build_unet(cfg, seed=0)
        opt = torch.optim.SGD(u.parameters(), lr=0.1)
        train_step(u, opt, diff, x0, t, noise, micro, torch.device("cpu"))
        weights.append(torch.cat([p.detach().flatten() for p in u.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6) and torch.allclose(weights[0], weights[2], atol=1e-6)


def test_paper_regimes():
    cl = pd.DataFrame({"id": [f"i{j}" for j in range(50)], "cluster": [j % 3 for j in range(50)]})
    paper, rev = model_specs(load_config("paper"), cl), model_specs(load_config("paper-revision"), cl)
    assert [(s.lr, s.batch, s.microbatch, s.steps) for s in paper[:1]] == [(1e-4, 1, 0, 110000)]
    assert [(s.lr, s.batch, s.microbatch, s.steps) for s in rev[:1]] == [(5e-5, 17, 4, 3600)]  # the whole cluster
    assert paper[-1].name == "full" and paper[-1].steps == 200000
    k = unet_kwargs(load_config("paper"), full=True)
    assert k["down_block_types"].count("AttnDownBlock2D") == 3  # 32, 16 and 8 (image_train.py)
    assert unet_kwargs(load_config("paper-revision"))["down_block_types"].count("AttnDownBlock2D") == 1


def test_shipped_weights_stand_in_for_the_full_model_only_on_their_data(numeric_data, tmp_path):
    """`ship_weights` → `init_from = shipped`: on the card's training ids the shipped weights become the full model
    (a full model trained there before is moved aside) and the cluster models start from them; on other ids the full
    model is trained, and the report says why; a damaged weights file stops the stage with one line."""
    import shutil
    from diffusegen.clustering import run_clustering
    from diffusegen.core import read_manifest
    from diffusegen.training import card_settings, ship_weights
    from diffusegen.core import sha256_file as file_sha256

    torch.set_num_threads(1)
    base = {
        "out": str(tmp_path / "a"),
        "subset": 0,
        "full_train_steps": 4,
        "train_steps": 2,
        "save_interval": 2,
        "train_clusters": "largest:1",
        "check_draws": 8,
    }
    cfg = load_config("smoke", {**base, "init_from": "none"})
    run_data(cfg, numeric_data, progress=False)
    run_clustering(cfg, progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "c")  # the same data and clusters for the mismatch run
    run_training(cfg, clusters=[], full=True, progress=False)
    card = ship_weights(cfg, cfg.run_dir / "training" / "full", tmp_path / "w" / "m", command="test command")
    w = tmp_path / "w" / "m.safetensors"
    assert card["sha256"] == file_sha256(w) and card["fits"] == card_settings(cfg) and card["steps"] == 4
    _, ids = training_images(cfg)
    assert card["ids"] == ids and "003" in ids  # ids stay strings (zero-padded names survive)
    # fp16 storage: the fixed-draw loss moves by rounding only (weights' relative error ≤ 2^-11; 2 % is far above that)
    assert abs(card["fixed_loss_fp16"] - card["fixed_loss_fp32"]) < 0.02 * card["fixed_loss_fp32"], card
    assert "test command" in (tmp_path / "w" / "m.md").read_text()

    cfg_b = load_config("smoke", {**base, "init_from": "shipped", "shipped_weights": str(tmp_path / "w" / "m")})
    s = run_training(cfg_b, progress=False)
    full, cl = [r for r in s["models"] if r["name"] == "full"][0], [r for r in s["models"] if r["name"] != "full"][0]
    assert full["status"] == "shipped" and full["shipped"]["sha256"] == card["sha256"]
    assert list((cfg.run_dir / "training" / "full").glob("final.was-*")), "the full model trained here was not kept"
    f = cfg.run_dir / "training" / "full" / "final" / "unet" / "diffusion_pytorch_model.safetensors"
    assert cl["status"] == "trained" and cl["init"]["sha256"] == file_sha256(f)
    m = read_manifest(cfg_b, "training")
    assert any("init_from = shipped: the full-data model is the one shipped" in n for n in m["notes"])
    assert run_training(cfg_b, progress=False)["models"][-1]["status"] == "cached"

    # other training ids: the card does not fit, the full model is trained here
    shutil.copy(w, tmp_path / "w" / "m2.safetensors")
    (tmp_path / "w" / "m2.json").write_text(json.dumps({**card, "ids": card["ids"][1:]}))
    cfg_c = load_config(
        "smoke",
        {**base, "out": str(tmp_path / "c"), "init_from": "shipped", "shipped_weights": str(tmp_path / "w" / "m2")},
    )
    s = run_training(cfg_c, progress=False)
    assert [r["status"] for r in s["models"] if r["name"] == "full"] == ["trained"]
    assert any(
        "no shipped full model fits this run" in n and "share" in n for n in read_manifest(cfg_c, "training")["notes"]
    )

    # a damaged file: one line naming it
    b = bytearray(w.read_bytes())
    b[-1] ^= 1
    w.write_bytes(bytes(b))
    with pytest.raises(DiffusegenError, match=r"m\.safetensors: damaged or replaced"):
        run_training(cfg_b, progress=False)


@pytest.mark.parametrize("name", ["weights/demo-full-64", "weights/demo-full-64-procedural"])
def test_shipped_demo_weights_match_their_card(name, tmp_path):
    """Each shipped model matches its card: the file's sha256, the demo profile's network and data settings, the
    training ids (the paper's 348 for Kvasir-SEG; the procedural set's training split, made here), and the settings of
    the profile that made it as settings.ini has it today. The demo looks for both."""
    from diffusegen.training import card_settings, read_shipped, shipped_names, shipped_paths
    from diffusegen.core import sha256_file as file_sha256
    from safetensors import safe_open

    cfg = load_config("demo")
    assert name in shipped_names(cfg)
    card, why = read_shipped(cfg, name)
    if card is None:
        pytest.skip(why)
    w, _ = shipped_paths(cfg, name)
    assert file_sha256(w) == card["sha256"] and w.stat().st_size < 16e6
    assert card["fits"] == card_settings(cfg)
    made = load_config(card["profile"], {"out": str(tmp_path)})
    if card.get("real_data", True):
        paper = pd.read_csv(ROOT / "data" / "paper" / "paper_clusters_k20.csv", dtype=str)
        assert sorted(card["ids"]) == sorted(paper.iloc[:, 0]) and len(card["ids"]) == 348
    else:  # the procedural set as a fresh clone makes it (whatever DIFFUSEGEN_DATA_SEARCH says): the same training ids
        run_data(made.replace(data_search="none"), progress=False)
        assert card["ids"] == training_images(made)[1] and card["dataset"] == "the procedural demo set"
    made_by = json.loads(json.dumps(made.keys_for("training")))
    assert {k: made_by.get(k) for k in card["settings"]} == card["settings"], (
        "settings.ini no longer makes these weights"
    )
    ref = build_unet(cfg, True).state_dict()
    with safe_open(str(w), "pt") as f:
        assert sorted(f.keys()) == sorted(ref) and all(
            tuple(f.get_slice(k).get_shape()) == tuple(ref[k].shape) for k in ref
        )
