"Training the 4-channel DDPM (§2.4): a real smoke run on Kvasir images, exact resume, checkpoints, regimes."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pandas as pd
import pytest
import torch
from diffusegen.core import DiffusegenError, load_config
from diffusegen.data import run_data
from diffusegen.training import (ModelSpec, build_unet, draw_batch, load_unet, make_diffusion, model_specs, train_model,
                                 train_step, training_images, run_training, unet_kwargs)

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def prepared(tmp_path_factory, kvasir_root):
    "The smoke profile's data and clustering stages on real Kvasir-SEG images (16 training images, 32 px, k = 2)."
    from diffusegen.clustering import run_clustering
    out = tmp_path_factory.mktemp("train")
    cfg = load_config("smoke", {"out": str(out)})
    run_data(cfg, kvasir_root, progress=False); run_clustering(cfg, progress=False)
    return cfg

def _spec(cfg, ids, steps, batch=4, micro=0): return ModelSpec("m", ids, False, steps, cfg.lr, batch, micro)

def test_smoke_run_loss_falls_and_weights_load(prepared):
    from diffusers import UNet2DModel
    cfg = prepared.replace(full_train_steps=24, save_interval=12)
    s = run_training(cfg, clusters=[], full=True, progress=False)
    (rec,) = s["models"]
    assert rec["name"] == "full" and rec["status"] == "trained" and rec["n_images"] == 16
    assert rec["final_loss"] < 0.7 * rec["first_loss"], rec                     # the hybrid loss falls
    final = cfg.run_dir/"training"/"full"/"final"
    u = UNet2DModel.from_pretrained(str(final/"unet"), use_safetensors=True)   # loads with diffusers itself
    assert (u.config.in_channels, u.config.out_channels) == (4, 8)
    ema = UNet2DModel.from_pretrained(str(final/"unet_ema"), use_safetensors=True)
    x = torch.zeros(1, 4, 32, 32)
    assert u(x, torch.tensor([10])).sample.shape == (1, 8, 32, 32)
    assert not torch.equal(u(x, torch.tensor([10])).sample, ema(x, torch.tensor([10])).sample)
    for f in ("loss_curve.png", "samples.png", "loss.csv", "model.json"): assert (final/f).exists()
    assert len(pd.read_csv(final/"loss.csv")) == 24
    assert (cfg.fig_dir/"training"/"models.md").exists() and (cfg.fig_dir/"training"/"manifest.json").exists()
    # the same settings again: the finished model is reused, not retrained
    assert run_training(cfg, clusters=[], full=True, progress=False)["models"][0]["status"] == "cached"

def test_resume_is_exact(prepared, tmp_path):
    cfg = prepared.replace(save_interval=3)
    images, ids = training_images(cfg)
    spec = _spec(cfg, ids, steps=7)
    a = train_model(spec, images, cfg, tmp_path/"straight", progress=False)
    b0 = train_model(spec, images, cfg, tmp_path/"resumed", progress=False, stop_after=5)   # "crash" after step 5
    assert b0["status"] == "stopped" and json.loads((tmp_path/"resumed"/"latest.json").read_text())["step"] == 3
    b = train_model(spec, images, cfg, tmp_path/"resumed", progress=False)
    assert b["resumed_from"] == 3 and b["steps"] == 7
    ua, ub = load_unet(tmp_path/"straight"/"final"/"unet"), load_unet(tmp_path/"resumed"/"final"/"unet")
    for (k, pa), pb in zip(ua.state_dict().items(), ub.state_dict().values()):
        assert torch.equal(pa, pb), k                                              # bit-identical to the uninterrupted run
    la, lb = pd.read_csv(tmp_path/"straight"/"final"/"loss.csv"), pd.read_csv(tmp_path/"resumed"/"final"/"loss.csv")
    assert la.equals(lb)

def test_killed_cli_run_resumes_to_the_configured_step(prepared):
    "A real `diffusegen train` process killed mid-way resumes from its last checkpoint and ends at train_steps."
    cfg = prepared
    k = int(pd.read_csv(cfg.run_dir/"clustering"/"clusters.csv").cluster.value_counts().idxmax())
    mdir = cfg.run_dir/"training"/f"cluster_{k}"
    args = [str(Path(sys.executable).parent/"diffusegen"), "train", "--profile", "smoke", "--out", str(cfg.root),
            "--cluster", str(k), "--set", "train_steps=40", "--set", "save_interval=5"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (mdir/"latest.json").exists(): time.sleep(0.2)
        assert (mdir/"latest.json").exists(), "no checkpoint written"
    finally:
        p.send_signal(signal.SIGKILL); p.wait()
    killed_at = json.loads((mdir/"latest.json").read_text())["step"]
    assert 5 <= killed_at < 40 and not (mdir/"final").exists()
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((mdir/"final"/"model.json").read_text())
    assert rec["steps"] == 40 and rec["resumed_from"] >= killed_at
    assert len(pd.read_csv(mdir/"final"/"loss.csv")) == 40 and not (mdir/"checkpoints").exists()

def test_finished_model_is_never_overwritten_by_other_settings(prepared, tmp_path):
    cfg = prepared
    images, ids = training_images(cfg)
    spec = _spec(cfg, ids[:4], steps=2)
    train_model(spec, images[:4], cfg, tmp_path/"m", progress=False)
    before = (tmp_path/"m"/"final"/"unet"/"diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(DiffusegenError) as e:
        train_model(spec, images[:4], cfg.replace(lr=1e-5), tmp_path/"m", progress=False)
    assert "other settings" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path/"m"/"final"/"unet"/"diffusion_pytorch_model.safetensors").read_bytes() == before
    assert train_model(spec, images[:4], cfg.replace(lr=1e-5, overwrite_models=True), tmp_path/"m", progress=False)["status"] == "trained"

def test_gradient_accumulation_is_exact(prepared):
    cfg = prepared
    images, ids = training_images(cfg)
    diff = make_diffusion(cfg)
    x0, t, noise = draw_batch(images, _spec(cfg, ids, 1, batch=8), 0, 0, diff.num_timesteps, True)
    weights = []
    for micro in (0, 4, 3):                    # whole batch; two micro-batches of 4; uneven 3 + 3 + 2
        u = build_unet(cfg, seed=0); opt = torch.optim.SGD(u.parameters(), lr=0.1)
        train_step(u, opt, diff, x0, t, noise, micro, torch.device("cpu"))
        weights.append(torch.cat([p.detach().flatten() for p in u.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6) and torch.allclose(weights[0], weights[2], atol=1e-6)

def test_paper_regimes():
    cl = pd.DataFrame({"id": [f"i{j}" for j in range(50)], "cluster": [j % 3 for j in range(50)]})
    paper, rev = model_specs(load_config("paper"), cl), model_specs(load_config("paper-revision"), cl)
    assert [(s.lr, s.batch, s.microbatch, s.steps) for s in paper[:1]] == [(1e-4, 1, 0, 110000)]
    assert [(s.lr, s.batch, s.microbatch, s.steps) for s in rev[:1]] == [(5e-5, 17, 4, 3600)]   # the whole cluster
    assert paper[-1].name == "full" and paper[-1].steps == 200000
    k = unet_kwargs(load_config("paper"), full=True)
    assert k["down_block_types"].count("AttnDownBlock2D") == 3                  # 32, 16 and 8 (image_train.py)
    assert unet_kwargs(load_config("paper-revision"))["down_block_types"].count("AttnDownBlock2D") == 1
