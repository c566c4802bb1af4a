"""The fast sampler's schedule and determinism, the speed settings (no-ops on the CPU), the device tables,
and tiny bench and fast-sampler runs that write their tables. No timing assertions: speeds go to the bench output."""

import json
import numpy as np
import pytest
import torch
from diffusegen.core import load_config, torch_generator, write_json
from diffusegen.diffusion import auto_batch, sampling_fn
from diffusegen.inpainting import inpaint_diffusion, inpaint_params, repaint, schedule_counts, to_uint8
from diffusegen.training import build_unet, unet_kwargs
from diffusegen import bench

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this file


@pytest.fixture(scope="module")
def tiny():
    "The smoke UNet (untrained) and a batch of 4 disc-masked random images at 32 px, with a 12-step schedule."
    cfg = load_config("smoke", {"timestep_respacing": 12, "jump_length": 3, "resample": 2})
    unet = build_unet(cfg, seed=0).eval()
    init4, known = bench._bench_inputs(4, cfg.image_size, cfg.dilation)
    return cfg, unet, init4, known


# --- the fast sampler in the RePaint loop ---


@pytest.mark.parametrize("T,j,r", [(12, 3, 2), (12, 3, 1), (6, 2, 3)])
def test_fast_sampler_nfe_is_the_schedules(tiny, T, j, r):
    cfg, unet, init4, known = tiny
    calls = []

    def fn(x, t):
        calls.append(len(x))
        return unet(x, t).sample

    diff = inpaint_diffusion(cfg.replace(timestep_respacing=T))
    repaint(fn, diff, init4[:1], known[:1], [torch_generator(0)], j, r, sampler="ddim", eta=0.3)
    assert len(calls) == schedule_counts(T, j, r)["nfe"] == T + len(range(0, T - j, j)) * (r - 1) * j


def test_paper_scale_fast_settings_counts():
    assert schedule_counts(200, 10, 5)["nfe"] == 960  # the paper's code
    assert schedule_counts(50, 10, 5)["nfe"] == 210  # demo's stand-in (the curve's reference)
    assert schedule_counts(50, 10, 1)["nfe"] == 50 <= 210 / 4  # a fast setting at ≤ ¼ of the evaluations
    assert schedule_counts(25, 5, 2)["nfe"] == 45


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_same_seed_same_pixels_batch_1_and_4(tiny, sampler, eta):
    cfg, unet, init4, known = tiny
    fn = lambda x, t: unet(x, t).sample
    diff = inpaint_diffusion(cfg)
    run = lambda sl, seeds: to_uint8(
        repaint(
            fn,
            diff,
            init4[sl],
            known[sl],
            [torch_generator(s) for s in seeds],
            cfg.jump_length,
            cfg.resample,
            sampler=sampler,
            eta=eta,
        )
    )
    four, one = run(slice(0, 4), [5, 6, 7, 8]), run(slice(2, 3), [7])
    assert np.abs(four[2].astype(int) - one[0].astype(int)).max() <= 1
    assert np.array_equal(one, run(slice(2, 3), [7]))  # deterministic per seed
    assert np.abs(run(slice(2, 3), [99])[0].astype(int) - one[0].astype(int)).max() > 10


def test_ddim_differs_from_ddpm_and_settings_recorded(tiny):
    cfg, unet, init4, known = tiny
    fn = lambda x, t: unet(x, t).sample
    diff = inpaint_diffusion(cfg)
    a = repaint(fn, diff, init4[:1], known[:1], [torch_generator(3)], 3, 2, sampler="ddpm")
    b = repaint(fn, diff, init4[:1], known[:1], [torch_generator(3)], 3, 2, sampler="ddim")
    assert not torch.equal(a, b)
    with pytest.raises(ValueError):
        repaint(fn, diff, init4[:1], known[:1], [torch_generator(3)], 3, 2, sampler="euler")
    p_ddpm, p_ddim = (
        inpaint_params(cfg, "cpu"),
        inpaint_params(cfg.replace(inpaint_sampler="ddim", ddim_eta=0.5), "cpu"),
    )
    assert "sampler" not in p_ddpm and "precision" not in p_ddpm  # the defaults keep the old records
    assert p_ddim["sampler"] == "ddim" and p_ddim["ddim_eta"] == 0.5
    assert "inpaint_sampler" in cfg.keys_for("inpainting") and "ddim_eta" in cfg.keys_for("inpainting")
    assert "compile" not in cfg.keys_for("inpainting")


# --- speed settings: no-ops on the CPU ---


def test_speed_flags_are_noops_on_cpu(tiny):
    cfg, unet, init4, known = tiny
    x, t = init4[:2], torch.tensor([999, 10])
    plain = unet(x, t).sample
    fast = sampling_fn(unet, cfg.replace(mixed_precision="bf16", channels_last=True, compile=False), "cpu")(x, t)
    assert torch.equal(plain, fast)
    assert next(unet.parameters()).is_contiguous()  # the CPU model is left as it was
    assert auto_batch(lambda b: None, "cpu", default=7) == 7
    assert load_config("paper").inpaint_batch == 0 and load_config("paper").style_batch == 0  # auto by default


# --- tiny bench runs ---

REQUIRED = {
    "images_per_second",
    "peak_memory_MB",
    "GFLOP_per_forward_image",
    "fraction_of_peak",
    "device",
    "precision",
    "baseline",
    "baseline_images_per_second",
    "speed_ratio",
}


def test_bench_smoke_writes_json_and_markdown(tmp_path):
    over = {"jump_length": "1", "resample": "2"}  # overrides reach the workers' subprocesses
    bench.run_bench(
        ["train", "generate", "style"],
        ["smoke"],
        steps=1,
        device="cpu",
        respacing=3,
        batch=2,
        out=tmp_path,
        progress=False,
        style_networks="tiny",
        settings=over,
    )
    for part in ("train", "generate", "style"):
        js = json.loads((tmp_path / f"{part}.json").read_text())
        assert js["rows"] and "torch" in js["versions"] and "diffusegen" in js["versions"], part
        assert not any("error" in r for r in js["rows"]), js["rows"]
        assert REQUIRED <= set(js["rows"][0]), (part, REQUIRED - set(js["rows"][0]))
        md = (tmp_path / f"{part}.md").read_text()
        assert "speed_ratio" in md and "images_per_second" in md
    gen = json.loads((tmp_path / "generate.json").read_text())["rows"]
    assert [r["batch"] for r in gen] == [1, 2] and all(r["nfe_per_image"] == r["baseline_nfe_per_image"] for r in gen)
    assert all(
        r["nfe_per_image"] == schedule_counts(3, 1, 2)["nfe"] == 5 != schedule_counts(3, 5, 5)["nfe"] for r in gen
    )
    assert all(
        json.loads((tmp_path / f"{p}.json").read_text())["settings"] == over for p in ("train", "generate", "style")
    )
    sty = json.loads((tmp_path / "style.json").read_text())["rows"]
    assert all(
        r["unet_forwards_per_image"] == r["backwards_per_image"] == load_config("smoke").style_start + 1 for r in sty
    )
    summ = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [r["sampler"] for r in summ] == ["profile's (ddpm)", f"fast: {bench.FAST_SETTING}"]
    assert summ[1]["inpaint_nfe"] == bench.fast_sampler_nfe("smoke", settings=over) < summ[0]["inpaint_nfe"]
    per_eval = [r["inpaint_seconds_per_image"] / r["inpaint_nfe"] for r in summ]  # one measured cost per evaluation
    assert per_eval[1] == pytest.approx(per_eval[0], rel=0.05) and all(r["seconds_per_styled_pair"] > 0 for r in summ)
    # batching on the CPU: the share of the measured peak at the best batch (target ≥ 50 %), not a batch speed-up
    assert all(0 < r["inpaint_share_of_peak"] and 0 < r["style_share_of_peak"] for r in summ)
    assert all(
        r["cpu_peak_share_ok"] == (min(r["inpaint_share_of_peak"], r["style_share_of_peak"]) >= 0.5) for r in summ
    )
    assert "≥ 50 % of the measured CPU peak" in json.loads((tmp_path / "summary.json").read_text())["batching"]


def test_segment_part_failing_encoder_is_an_error_row_not_a_crash(monkeypatch):
    "One encoder failing (e.g. absent weights) is an `error: …` row; the other encoders are still timed."

    def fake(enc, arch, size, batch, steps, device):
        if enc == "broken":
            raise RuntimeError("no weights for broken\nsecond line")
        return {"images_per_second": 1.5}

    monkeypatch.setattr(bench, "segment_throughput", fake)
    rows = bench.segment_worker("smoke", 1, "cpu", encoders=["broken", "resnet18"])
    assert [r["encoder"] for r in rows] == ["broken", "resnet18"]
    assert rows[0]["status"] == "error: no weights for broken"
    assert (
        rows[1]["status"] == "ok"
        and rows[1]["images_per_second"] == 1.5
        and rows[1]["arch"] == load_config("smoke").seg_arch
    )


# --- the FID-against-evaluations curve on tiny models ---


def test_fast_sampler_curve_writes_table_figure_manifest(tmp_path, kvasir_root):
    from diffusegen.data import run_data

    cfg = load_config("smoke", {"out": str(tmp_path), "device": "cpu", "subset": 8})
    run_data(cfg, kvasir_root, progress=False)
    final = cfg.run_dir / "training" / "full" / "final"
    build_unet(cfg, seed=1).save_pretrained(str(final / "unet"), safe_serialization=True)
    write_json(final / "model.json", {"name": "full", "sample_weights": "raw", "unet": unet_kwargs(cfg)})
    settings = [
        {"label": "ref", "reference": True, "timestep_respacing": 6, "jump_length": 2},
        {"label": "fast ddim", "timestep_respacing": 3, "resample": 1, "inpaint_sampler": "ddim"},
    ]
    df = bench.fast_sampler_curve(cfg, settings, n_images=3, progress=False)
    assert list(df.nfe_per_image) == [schedule_counts(6, 2, 2)["nfe"], 3]
    assert df.nfe_fraction.iloc[0] == 1.0 and df.fid_ratio.iloc[0] == 1.0 and (df.fid > 0).all()
    d = cfg.fig_dir / "fast_sampler"
    assert (d / "fast_sampler.csv").exists() and (d / "fast_sampler.png").exists()
    m = json.loads((d / "manifest.json").read_text())
    assert m["stage"] == "fast_sampler" and {a["kind"] for a in m["artifacts"]} == {"table", "figure"} and m["weights"]
    # the same seeds: a setting's images are identical when run again
    df2 = bench.fast_sampler_curve(cfg, settings[1:], n_images=3, progress=False, write=False)
    assert df2.fid.iloc[0] == df.fid.iloc[1]
