"""Styling (§2.5, Appendix A.1.2): the losses, the guidance gradient, batch independence, resume, the unchanged mask,
substitute labels and MKL colour matching. Runs on real Kvasir images at 32 px with a tiny (untrained) UNet and a
small inpainted-style set made here (real images and their masks in the inpainting layout), so it does not depend on
the inpainting stage."""

import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from diffusegen.core import load_config, torch_generator, write_json
from diffusegen.data import run_data
from diffusegen.sets import manifest_columns, read_set, set_dir
from diffusegen.training import build_unet, unet_kwargs
from diffusegen import styling as S

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this file

FAST = {
    "style_respacing": 10,
    "style_start": 2,
    "diff_iter": 1,
    "zecon_patches": 16,
    "style_images": 0,
    "style_batch": 2,
}


def _fake_model(cfg, name: str, seed: int):
    "A tiny untrained UNet saved as the training stage saves a finished model."
    final = cfg.run_dir / "training" / name / "final"
    unet = build_unet(cfg, seed=seed)
    unet.save_pretrained(str(final / "unet"), safe_serialization=True)
    write_json(final / "model.json", {"name": name, "sample_weights": "raw", "unet": unet_kwargs(cfg)})


def _fake_inpainted(cfg, n: int = 3):
    "diff and full-diff sets in the inpainting layout: real training images (as the 'inpainted' image) and their masks."
    real, masks = S.real_images(cfg)
    ids = sorted(real)[:n]
    for kind, model in (("diff", "cluster_0"), ("full-diff", "full")):
        d, rows = set_dir(cfg, kind), []
        for k, sid in enumerate(ids):
            name = f"{sid}_0"
            (d / "images").mkdir(parents=True, exist_ok=True)
            (d / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(real[sid]).save(d / "images" / f"{name}.png")
            Image.fromarray(masks[sid] * 255).save(d / "masks" / f"{name}.png")
            rows.append(
                dict(
                    file=f"images/{name}.png",
                    mask_file=f"masks/{name}.png",
                    source_id=sid,
                    cluster=0 if model != "full" else -1,
                    model=model,
                    sample=0,
                    seed=100 + k,
                    checkpoint_sha256="test",
                    variant="test",
                    nfe=35,
                    params="{}",
                    weights="{}",
                )
            )
        pd.DataFrame(rows).to_csv(d / "manifest.csv", index=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory, kvasir_root):
    out = tmp_path_factory.mktemp("style")
    cfg = load_config("smoke", {"out": str(out), **FAST})
    run_data(cfg, kvasir_root, progress=False)
    _fake_model(cfg, "cluster_0", 0)
    _fake_model(cfg, "full", 1)
    _fake_inpainted(cfg)
    return cfg


def _copy_inputs(cfg, dest: Path, **over):
    "A fresh output folder with the same data, models and inpainted sets (nothing styled yet)."
    import shutil

    for sub in ("data", "training", "synthetic/diff", "synthetic/full-diff"):
        shutil.copytree(cfg.run_dir / sub, dest / "runs" / cfg.profile / sub)
    return cfg.replace(out=str(dest), **over)


@pytest.fixture(scope="module")
def nets(base):
    cls_net, vgg_net, prov, _ = S.style_networks(base, "cpu")
    unet = build_unet(base, seed=0)
    return S.StyleNets(unet, base, cls_net, vgg_net)


def _inputs(cfg, n=3):
    real, _ = S.real_images(cfg)
    ids = sorted(real)[:n]
    src = torch.stack([S._to_pm1(real[i]) for i in ids])
    init = torch.cat(
        [src.flip(-1), torch.rand(n, 1, 32, 32, generator=torch_generator(3)) * 2 - 1], 1
    )  # a different "inpainted" image
    return init, src


# --- the losses on small inputs ---


def test_range_loss_zero_inside_positive_outside():
    x = torch.rand(2, 4, 8, 8) * 2 - 1
    assert torch.equal(S.range_loss(x), torch.zeros(2))
    y = x.clone()
    y[0, 3, 0, 0] = 1.5
    y[1, 0, 1, 1] = -3.0
    r = S.range_loss(y)
    assert torch.allclose(r, torch.tensor([0.25, 4.0]) / (4 * 64))


def test_zecon_same_features_lower_than_unrelated_and_tau(nets, base):
    x = torch.rand(2, 4, 32, 32, generator=torch_generator(0)) * 2 - 1
    y = torch.rand(2, 4, 32, 32, generator=torch_generator(1)) * 2 - 1
    fx = S.unet_encoder_features(nets.unet, x)
    fy = S.unet_encoder_features(nets.unet, y)
    assert len(fx) == 1 + min(4, len(nets.unet.down_blocks))  # conv_in + the last resnet of each level
    gens = lambda: [torch_generator(5), torch_generator(6)]
    same = S.zecon_loss(fx, fx, gens(), 16, 0.07)
    other = S.zecon_loss(fx, fy, gens(), 16, 0.07)
    assert same.shape == (2,) and (same < other).all()
    # τ: huge τ flattens every logit to 0, so each layer's loss is log(1 + P)
    flat = S.zecon_loss(fx, fy, gens(), 16, 1e5)
    assert torch.allclose(flat, torch.full((2,), len(fx) * np.log(17.0)), atol=1e-2)
    # more patches than locations: capped (the 4×4 level has 16)
    ids = S.patch_ids(gens(), 16, 256)
    assert ids.shape == (2, 16) and all(sorted(r.tolist()) == list(range(16)) for r in ids)


def test_l2_mse_vgg_zero_for_identical_inputs_and_semantic_sign(nets):
    x = torch.rand(2, 3, 32, 32, generator=torch_generator(2)) * 2 - 1
    assert torch.equal(S.mse_per_sample(x, x), torch.zeros(2))
    f = nets.vgg_net(x)
    assert torch.equal(S.vgg_loss(f, f), torch.zeros(2))
    assert (S.vgg_loss(f, nets.vgg_net(x.flip(-1))) > 0).all()
    c = nets.cls_net(x)
    assert torch.equal(S.style_loss(c, c), torch.zeros(2))
    c2 = nets.cls_net(x.flip(-2))
    assert (S.semantic_divergence(c, c2) < 0).all()  # minimising it pushes the two apart
    assert torch.allclose(S.semantic_divergence(c, c2), -S.style_loss(c, c2))


def test_every_loss_gradient_reaches_x_t(nets, base):
    init, src = _inputs(base, 1)
    x_t = nets.diffusion.q_sample(init, 2, torch.randn(init.shape, generator=torch_generator(9)))
    cls_src, cls_prev = nets.cls_net(src), nets.cls_net(src.flip(-1) * 0.5)
    full = dict(nets.lambdas)
    try:
        for k in S.LOSS_KEYS:
            nets.lambdas = {j: (1.0 if j == k else 0.0) for j in full}
            if k == "rng":  # only out-of-range x̂₀ has a range loss
                grad, _, x0, _, terms = S.guidance(nets, x_t * 4, 2, init, src, cls_src, cls_prev, [torch_generator(1)])
                assert terms["rng"].item() > 0
            else:
                grad, _, _, _, terms = S.guidance(nets, x_t, 2, init, src, cls_src, cls_prev, [torch_generator(1)])
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, k
            assert grad.shape == x_t.shape
    finally:
        nets.lambdas = full


def test_result_does_not_depend_on_the_batch(nets, base):
    init, src = _inputs(base, 3)
    init[1] = init[2]
    src[1] = src[2]  # samples 1 and 2: same input, other seed
    three, _ = S.style_samples(nets, init, src, [torch_generator(s) for s in (11, 12, 13)])
    one, _ = S.style_samples(nets, init[2:3], src[2:3], [torch_generator(13)])
    assert torch.isfinite(three).all()
    # equal up to float rounding (batched convolutions sum in another order): well under one uint8 level (2/255)
    assert (one[0] - three[2]).abs().max() < 4e-3, (one[0] - three[2]).abs().max()
    assert (three[1] - three[2]).abs().max() > 0.1  # the seed matters


# --- the stage: outputs, mask, labels, resume ---


def test_stage_outputs_mask_unchanged_and_substitute_labels(base, tmp_path):
    cfg = _copy_inputs(base, tmp_path, style_images=2)
    res = S.run_styling(cfg, progress=False)
    assert res["status"] == "done" and [r["type"] for r in res["types"]] == ["styled-diff", "full-styled-diff"]
    for kind, up in S.STYLED_TYPES.items():
        df = read_set(cfg, kind)
        upm = read_set(cfg, up).set_index("file")
        assert (
            list(df.columns[: len(manifest_columns(kind))]) == manifest_columns(kind)
            and len(df) == 2
            and df.inpainted_file.is_unique
        )
        assert set(df.model) == ({"full"} if kind == "full-styled-diff" else {"cluster_0"})
        for r in df.itertuples():
            d = set_dir(cfg, kind)
            up_file = r.inpainted_file.split("/", 1)[1]
            assert (d / r.mask_file).read_bytes() == (set_dir(cfg, up) / upm.loc[up_file, "mask_file"]).read_bytes()
            styled = np.asarray(Image.open(d / r.file))
            inp = np.asarray(Image.open(set_dir(cfg, up) / up_file))
            assert styled.shape == inp.shape == (32, 32, 3) and not np.array_equal(styled, inp)
            # the known region against the inpainted sample, outside the source's dilated mask: styling changes it
            from diffusegen.copypaste import known_mad
            from diffusegen.data import dilate_mask

            region = dilate_mask(S.real_images(cfg)[1][r.source_id] > 0, cfg.dilation)
            assert float(r.known_mad) == pytest.approx(known_mad(styled, inp, region)) and float(r.known_mad) > 0
            w = json.loads(r.weights)
            assert {x["name"] for x in w} == {"dino_vitb8", "vgg19"}
            assert all(x["substitute"] and x["label"].startswith("SUBSTITUTE") for x in w)  # DINO/VGG are absent here
            p = json.loads(r.params)
            assert p["steps"] == 3 and p["upstream"] == {
                "seed": str(upm.loc[up_file, "seed"]),
                "checkpoint_sha256": "test",
            }
    m = json.loads((cfg.fig_dir / "styling" / "manifest.json").read_text())
    assert {w["name"] for w in m["weights"]} == {"dino_vitb8", "vgg19"} and all(w["substitute"] for w in m["weights"])
    assert any("SUBSTITUTE" in n for n in m["notes"])
    assert (cfg.fig_dir / "styling" / "known_region.png").exists()
    assert (cfg.fig_dir / "styling" / "fig6_styled-diff.png").exists() and (
        cfg.fig_dir / "styling" / "styling.md"
    ).exists()


def test_resume_neither_duplicates_nor_loses(base, tmp_path):
    cfg = _copy_inputs(base, tmp_path, style_batch=1, style_images=2)
    stopped = S.run_styling(cfg, progress=False, stop_after=1)  # "killed" after one sample
    assert stopped["status"] == "stopped"
    first = read_set(cfg, "styled-diff")
    assert len(first) == 1
    f0 = set_dir(cfg, "styled-diff") / first.file[0]
    before = f0.read_bytes()
    (set_dir(cfg, "styled-diff") / "images" / "orphan.png").write_bytes(before)  # a write the manifest never recorded
    res = S.run_styling(cfg, progress=False)
    for kind in S.STYLED_TYPES:
        df = read_set(cfg, kind)
        assert len(df) == 2 and df.inpainted_file.is_unique  # the seeded subset, each sample once
    df = read_set(cfg, "styled-diff")
    assert df.file[0] == first.file[0] and f0.read_bytes() == before  # the finished sample was kept, not redone
    assert [r["new"] for r in res["types"]] == [1, 2]
    again = S.run_styling(cfg, progress=False)  # nothing left to do
    assert [r["new"] for r in again["types"]] == [0, 0]
    # the subset is the same seeded one whatever the batch size
    assert sorted(df.inpainted_file) == sorted("diff/" + S.select_samples(cfg, read_set(cfg, "diff")).file)


def _bytes(folder: Path) -> dict:
    return {str(q.relative_to(folder)): q.read_bytes() for q in sorted(folder.rglob("*.png"))}


def test_shrunk_rerun_keeps_every_file_and_prune_removes_only_what_it_lists(base, tmp_path, capsys):
    "A smaller style_images keeps the styled samples byte for byte (in manifest_unplanned.csv); only `prune` removes them."
    cfg = _copy_inputs(base, tmp_path, style_images=0, style_batch=3)
    S.run_styling(cfg, progress=False)
    dirs = {k: set_dir(cfg, k) for k in S.STYLED_TYPES}
    before = {k: _bytes(d) for k, d in dirs.items()}
    full = {k: read_set(cfg, k) for k in dirs}
    assert all(len(full[k]) == 3 and len(before[k]) == 9 for k in dirs)  # images, masks, raw
    small = cfg.replace(style_images=1)
    res = S.run_styling(small, progress=False)
    assert [(r["new"], r["unplanned"], r["pruned"]) for r in res["types"]] == [(0, 2, [])] * 2
    assert any("manifest_unplanned.csv" in n for n in res["notes"])
    for k, d in dirs.items():
        assert _bytes(d) == before[k]  # nothing deleted, nothing rewritten
        cur, aside = read_set(small, k), pd.read_csv(d / S.UNPLANNED, dtype=str)
        assert len(cur) == 1 and len(aside) == 2 and sorted([*cur.file, *aside.file]) == sorted(full[k].file)
    # the plan grows back: nothing is styled again
    res = S.run_styling(cfg, progress=False)
    assert [(r["new"], r["unplanned"]) for r in res["types"]] == [(0, 0)] * 2
    assert all(_bytes(d) == before[k] and len(read_set(cfg, k)) == 3 for k, d in dirs.items())
    # prune removes the kept-aside files (image, mask, raw), prints each, and nothing else
    S.run_styling(small, progress=False)
    capsys.readouterr()
    res = S.run_styling(small, progress=False, prune=True)
    printed = [l for l in capsys.readouterr().out.splitlines() if l.startswith("pruned ")]
    assert len(printed) == sum(len(r["pruned"]) for r in res["types"]) == 2 * 6
    for r in res["types"]:
        d, k = dirs[r["type"]], r["type"]
        gone = {str(Path(q).relative_to(d)) for q in r["pruned"]}
        cur = read_set(small, k)
        keep = {*cur.file, *cur.mask_file, "raw/" + Path(cur.file[0]).name}
        assert gone == set(before[k]) - keep and _bytes(d) == {f: b for f, b in before[k].items() if f in keep}
        assert len(pd.read_csv(d / S.UNPLANNED)) == 0


def test_styled_mask_regenerated_is_the_styled_channel_opened_and_named(base, tmp_path):
    "styled_mask = regenerated (the paper's code): a 0/255 mask of the styled sample, named in its row and the notes."
    cfg = _copy_inputs(base, tmp_path, style_images=1).replace(styled_mask="regenerated")
    S.run_styling(cfg, progress=False)
    df = read_set(cfg, "styled-diff")
    m = np.asarray(Image.open(set_dir(cfg, "styled-diff") / df.mask_file.iloc[0]))
    assert set(np.unique(m)) <= {0, 255} and json.loads(df.params.iloc[0])["styled_mask"] == "regenerated"
    notes = json.loads((cfg.fig_dir / "styling" / "manifest.json").read_text())["notes"]
    assert any("styled_mask = regenerated" in n for n in notes)
    assert (
        load_config("paper-revision").styled_mask == "regenerated" and load_config("paper").styled_mask == "inpainted"
    )


def test_a_setting_added_later_at_its_default_is_no_settings_change():
    "A style.json written before a setting existed still matches while the new setting keeps its default."
    cfg = load_config("smoke")
    rec = S._settings_record(cfg, "styled-diff", {})
    old = json.loads(json.dumps(rec))
    del old["settings"]["styled_mask"], old["settings"]["cls_substitute_size"]
    assert S._same_settings(old, rec)
    assert not S._same_settings(old, S._settings_record(cfg.replace(styled_mask="regenerated"), "styled-diff", {}))


def test_other_settings_are_an_error(base, tmp_path):
    cfg = _copy_inputs(base, tmp_path, style_images=1)
    S.run_styling(cfg, progress=False, stop_after=1)
    with pytest.raises(S.DiffusegenError, match="other settings"):
        S.run_styling(cfg.replace(lambda_l2=1.0), progress=False)


# --- colour matching ---


def test_mkl_maps_mean_and_covariance_onto_the_reference(kvasir_root):
    real = (
        np.asarray(
            Image.open(sorted((kvasir_root / "images").glob("*.jpg"))[0]).convert("RGB").resize((64, 64)),
            dtype=np.float64,
        )
        / 255
    )
    rng = np.random.default_rng(0)
    src = real[::-1] @ np.array([[0.6, 0.2, 0.1], [0.1, 0.5, 0.3], [0.0, 0.2, 0.9]]) + rng.normal(0, 0.02, real.shape)
    out = S.mkl_transfer(src, real)
    o, r = out.reshape(-1, 3), real.reshape(-1, 3)
    assert np.allclose(o.mean(0), r.mean(0), atol=1e-10)
    assert np.allclose(np.cov(o, rowvar=False), np.cov(r, rowvar=False), atol=1e-10)
    # the uint8 wrapper keeps the shape and moves the colour statistics towards the real image's
    su8, ru8 = (np.clip(src, 0, 1) * 255).astype(np.uint8), (real * 255).astype(np.uint8)
    cm = S.colour_match(su8, ru8)
    assert cm.shape == su8.shape and cm.dtype == np.uint8
    d = lambda a: np.abs(a.reshape(-1, 3).mean(0) - ru8.reshape(-1, 3).mean(0)).sum()
    assert d(S.colour_match(su8, ru8, paper_minmax=False)) < d(su8)


def test_loop_returns_x0_hat_of_the_last_step_with_an_oracle_denoiser(base, nets):
    "With a denoiser that knows x_0 (ε_θ = the true noise of the inpainted sample) and no guidance, styling returns x_0."
    init, src = _inputs(base, 2)
    diff = nets.diffusion

    class Oracle(torch.nn.Module):
        def forward(self, x, t_orig):
            i = torch.searchsorted(torch.as_tensor(diff.timestep_map), t_orig)
            a = torch.as_tensor(diff.sqrt_alphas_cumprod, dtype=x.dtype)[i].view(-1, 1, 1, 1)
            s = torch.as_tensor(diff.sqrt_one_minus_alphas_cumprod, dtype=x.dtype)[i].view(-1, 1, 1, 1)
            return type("Out", (), {"sample": torch.cat([(x - a * init) / s, -torch.ones_like(x)], 1)})()

    oracle = S.StyleNets(
        Oracle(),
        base.replace(
            **{
                k: 0.0
                for k in (
                    "lambda_sty",
                    "lambda_l2",
                    "lambda_sem",
                    "lambda_rng",
                    "lambda_zecon",
                    "lambda_vgg",
                    "lambda_mse",
                )
            }
        ),
        nets.cls_net,
        nets.vgg_net,
    )
    out, log = S.style_samples(oracle, init, src, [torch_generator(1), torch_generator(2)])
    assert [r["t"] for r in log] == list(range(base.style_start, -1, -1))
    assert torch.allclose(out, init, atol=1e-4)
