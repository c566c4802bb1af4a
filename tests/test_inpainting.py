"RePaint inpainting (§2.5): the jump schedule's counts and shape, the known region, determinism across batches, resume."

import itertools
import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from diffusegen.core import load_config, torch_generator
from diffusegen.data import dilate_mask
from diffusegen.sets import MANIFEST_COLUMNS, read_set, set_dir
from diffusegen.inpainting import (
    inpaint_diffusion,
    inpaint_inputs,
    jump_schedule,
    refine_mask,
    repaint,
    run_inpainting,
    schedule_counts,
    to_uint8,
    variant_start,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this file

# --- the schedule (paper-code-facts c) ---


@pytest.mark.parametrize(
    "T,j,r,start,nfe,undo",
    [
        (200, 10, 5, None, 960, 760),  # the paper's code: skip ignored
        (200, 10, 5, 119, 560, 440),  # Appendix B.3's skip of 80 honoured
        (250, 10, 10, None, 2410, 2160),  # RePaint's face example
        (200, 10, 1, None, 200, 0),
    ],
)  # no resampling
def test_schedule_counts(T, j, r, start, nfe, undo):
    c = schedule_counts(T, j, r, start)
    assert (c["nfe"], c["undo"]) == (nfe, undo)


def test_variants_start_where_the_paper_says():
    cfg = load_config("paper")
    assert variant_start(cfg) is None
    assert variant_start(cfg.replace(inpaint_variant="paper-text")) == 200 - 80 - 1
    assert schedule_counts(200, 10, 5, variant_start(cfg.replace(inpaint_variant="paper-text")))["nfe"] == 560


@pytest.mark.parametrize(
    "T,j,r,start",
    [
        (T, j, r, s)
        for T, j, r in itertools.product((1, 2, 7, 20, 33, 200), (1, 3, 10), (1, 2, 5))
        for s in (None, T // 2)
    ],
)
def test_schedule_properties(T, j, r, start):
    seq = jump_schedule(T, j, r, start)
    s0 = T - 1 if start is None else start
    assert seq[0] == s0 and seq[-1] == -1 and min(seq) == -1 and max(seq) == s0
    steps = np.diff(seq)
    assert set(steps.tolist()) <= {-1, 1}  # every transition is ±1
    points = list(range(0, s0 + 1 - j, j))
    down, up = int((steps == -1).sum()), int((steps == 1).sum())
    assert down == s0 + 1 + len(points) * (r - 1) * j and up == len(points) * (r - 1) * j  # NFE closed form
    # the up-runs: each starts at a jump point, climbs exactly j, and each point has r−1 of them
    runs, k = [], 0
    while k < len(steps):
        if steps[k] == 1:
            m = k
            while m < len(steps) and steps[m] == 1:
                m += 1
            runs.append((seq[k], m - k))
            k = m
        else:
            k += 1
    assert all(n == j for _, n in runs)
    assert sorted(p for p, _ in runs) == sorted(p for p in points for _ in range(r - 1))
    assert all(p + j <= s0 for p, _ in runs)  # never above the start
    # every index 0..s0 is evaluated at least once, and the last evaluation is at 0
    evaluated = [a for a, b in zip(seq[:-1], seq[1:]) if b < a]
    assert set(evaluated) == set(range(s0 + 1)) and evaluated[-1] == 0


def test_schedule_rejects_bad_arguments():
    for args in ((0, 10, 5), (10, 0, 5), (10, 2, 0), (10, 2, 2, 10), (10, 2, 2, -1)):
        with pytest.raises(ValueError):
            jump_schedule(*args)


# --- masks ---


def test_dilation_and_refinement_on_a_real_mask(kvasir_root):
    from diffusegen.data import read_mask, resize_pair, read_image

    p = sorted((kvasir_root / "masks").glob("*.jpg"))[0]
    img, m = resize_pair(read_image(kvasir_root / "images" / p.name), read_mask(p), 64)
    d = dilate_mask(m, 5)
    assert (d >= (m > 0)).all() and d.sum() > (m > 0).sum()
    # a 5-px ellipse grows a straight edge by 2 px: every dilated pixel is within 2 px (Chebyshev) of the polyp
    import cv2

    dist = cv2.distanceTransform((1 - (m > 0)).astype(np.uint8), cv2.DIST_C, 3)
    assert dist[d > 0].max() <= 2
    g = np.where(d > 0, 255, 0).astype(np.uint8)
    g[0, 0] = g[63, 63] = 200  # specks outside the region
    r = refine_mask(g, 4)
    assert set(np.unique(r)) <= {0, 255} and (r[d == 0] == 0).all()


# --- the loop on real images with a real (tiny) UNet ---


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, kvasir_root):
    "The smoke profile's data and (very short) training stages on real Kvasir-SEG images; a short RePaint schedule."
    from diffusegen.data import run_data
    from diffusegen.clustering import clusters_path
    from diffusegen.training import run_training, training_images

    out = tmp_path_factory.mktemp("inpaint")
    cfg = load_config(
        "smoke",
        {
            "out": str(out),
            "train_steps": 2,
            "full_train_steps": 2,
            "save_interval": 2,
            "monitor_samples": 1,
            "monitor_sample_steps": 2,
            "timestep_respacing": 10,
            "jump_length": 3,
            "resample": 2,
        },
    )  # 19 evaluations
    run_data(cfg, kvasir_root, progress=False)
    # two clusters by position instead of the clustering stage (its Inception features are tested in test_clustering)
    ids = training_images(cfg)[1]
    clusters_path(cfg).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "cluster": [i % 2 for i in range(len(ids))]}).to_csv(clusters_path(cfg), index=False)
    run_training(cfg, progress=False)
    return cfg


@pytest.fixture(scope="module")
def model_and_batch(prepared):
    from diffusegen.training import load_unet, training_images

    x4, ids = training_images(prepared)
    unet = load_unet(prepared.run_dir / "training" / "full", "cpu").eval()
    return (lambda x, t: unet(x, t).sample), x4[:4], ids[:4]


@pytest.mark.parametrize("start", [None, 6])
def test_known_region_equals_input(prepared, model_and_batch, start):
    fn, x4, _ = model_and_batch
    cfg = prepared
    x4 = x4[:2]
    init4, known, dil = inpaint_inputs(x4, cfg.dilation)
    assert (dil >= (x4[:, 3] > 0).numpy()).all()
    calls = []

    def counted(x, t):
        calls.append(len(x))
        return fn(x, t)

    out = repaint(
        counted,
        inpaint_diffusion(cfg),
        init4,
        known,
        [torch_generator(s) for s in range(2)],
        cfg.jump_length,
        cfg.resample,
        start,
    )
    assert len(calls) == schedule_counts(cfg.timestep_respacing, cfg.jump_length, cfg.resample, start)["nfe"]
    u_out, u_in = to_uint8(out), to_uint8(x4)
    outside = dil == 0
    assert np.array_equal(u_out[..., :3][outside], u_in[..., :3][outside])  # the known RGB is the input, exactly
    masks = np.stack([refine_mask(a[..., 3], cfg.mask_open) for a in u_out])
    assert (masks[outside] == 0).all()  # the generated mask: background there
    assert not np.array_equal(u_out[..., :3][~outside], u_in[..., :3][~outside])  # inside, new pixels


def test_same_seed_same_pixels_at_batch_1_and_4(prepared, model_and_batch):
    fn, x4, _ = model_and_batch
    init4, known, _ = inpaint_inputs(x4, prepared.dilation)
    diff, seeds = inpaint_diffusion(prepared), [11, 12, 13, 14]
    run = lambda sl, ss: repaint(
        fn, diff, init4[sl], known[sl], [torch_generator(s) for s in ss], prepared.jump_length, prepared.resample
    )
    four = to_uint8(run(slice(0, 4), seeds))
    one = to_uint8(run(slice(2, 3), seeds[2:3]))
    assert np.abs(one[0].astype(int) - four[2].astype(int)).max() <= 1  # batch-independent (up to float rounding)
    other = to_uint8(run(slice(2, 3), [99]))
    assert np.abs(other[0].astype(int) - four[2].astype(int)).max() > 10  # a different seed: different pixels


def _pixels(cfg, ty):
    df = read_set(cfg, ty, required=True)
    return {r.file: (np.array(Image.open(r.image_path)), np.array(Image.open(r.mask_path))) for r in df.itertuples()}


def test_stage_outputs_batching_and_resume(prepared, tmp_path):
    import shutil

    cfg = prepared.replace(inpaint_images=1, samples_per_image=2, inpaint_batch=4)
    s = run_inpainting(cfg, progress=False)
    assert [r["type"] for r in s["types"]] == ["diff", "full-diff", "copy-paste"]
    for rec in s["types"][:2]:
        ty = rec["type"]
        df = read_set(cfg, ty, required=True)
        # the known region after the final paste: exactly 0, no tolerance. `repaint` returns known·init4 + (1−known)·x
        # with known exactly 1 outside the dilated mask, i.e. the source's own float values there, and `to_uint8`
        # rounds equal floats to equal bytes; a broken paste (NaN, wrong mask, resizing) gives a mean error ≥ 1/N px.
        assert (df.known_mad.astype(float) == 0.0).all(), df.known_mad.tolist()
        assert list(df.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
        assert len(df) == rec["planned"] == 2 and df.file.is_unique and df.seed.is_unique
        assert (df.nfe == schedule_counts(cfg.timestep_respacing, cfg.jump_length, cfg.resample)["nfe"]).all()
        assert (
            json.loads(df.params[0])["dilation"] == cfg.dilation
            and json.loads(df.weights[0])["source"] == "trained by diffusegen"
        )
        from diffusegen.training import weights_file
        from diffusegen.core import sha256_file

        for m, sha in df.groupby("model").checkpoint_sha256.first().items():
            assert sha == sha256_file(weights_file(cfg.run_dir / "training" / m))
        if ty == "full-diff":
            assert (df.model == "full").all()
        else:
            assert (df.model == "cluster_" + df.cluster.astype(str)).all()
    assert (cfg.fig_dir / "inpainting" / "fig5_full-diff.png").exists() and (
        cfg.fig_dir / "inpainting" / "manifest.json"
    ).exists()
    cp = read_set(cfg, "copy-paste", required=True)  # the copy-paste baseline comes with the stage, Diff's plan sizes
    assert len(cp) == 2 and set(cp.source_id) == set(read_set(cfg, "diff").source_id)
    assert (cp.known_mad.astype(float) == 0.0).all() and (cp.polyp_source_id != cp.source_id).all()
    assert (cfg.fig_dir / "inpainting" / "known_region.png").exists()
    ref = {ty: _pixels(cfg, ty) for ty in ("diff", "full-diff")}
    # the same seeds at batch 1 give the same pixels (another output folder)
    c1 = cfg.replace(inpaint_batch=1, out=str(tmp_path / "b1"))
    shutil.copytree(cfg.run_dir, c1.run_dir, ignore=shutil.ignore_patterns("synthetic"))
    run_inpainting(c1, types=("full-diff",), progress=False)
    for f, (img, msk) in _pixels(c1, "full-diff").items():
        assert np.abs(img.astype(int) - ref["full-diff"][f][0].astype(int)).max() <= 1
    # a killed run: stop after one batch (1 of 2 samples at batch 1), leave a stray half-written file, resume
    c2 = cfg.replace(inpaint_batch=1, out=str(tmp_path / "killed"))
    shutil.copytree(cfg.run_dir, c2.run_dir, ignore=shutil.ignore_patterns("synthetic"))
    run_inpainting(c2, types=("full-diff",), progress=False, stop_after=1)
    part = pd.read_csv(set_dir(c2, "full-diff") / "manifest.csv")
    assert len(part) == 1
    missing = [f for f in ref["full-diff"] if f not in set(part.file)]
    stray = set_dir(c2, "full-diff") / missing[0]
    stray.write_bytes(b"not a png")  # a killed batch's leftover
    before = {f: (set_dir(c2, "full-diff") / f).stat().st_mtime_ns for f in part.file}
    r = run_inpainting(c2, types=("full-diff",), progress=False)["types"][0]
    assert (r["cached"], r["made"], r["total"]) == (1, 1, 2)
    df = read_set(c2, "full-diff", required=True)
    assert len(df) == 2 and df.file.is_unique
    assert all((set_dir(c2, "full-diff") / f).stat().st_mtime_ns == t for f, t in before.items())  # not redone
    for f, (img, msk) in _pixels(c2, "full-diff").items():
        assert np.abs(img.astype(int) - ref["full-diff"][f][0].astype(int)).max() <= 1
    # once more: nothing to do
    assert run_inpainting(c2, types=("full-diff",), progress=False)["types"][0]["made"] == 0


def test_missing_models_are_skipped_with_notes(prepared, tmp_path):
    import shutil

    cfg = prepared.replace(out=str(tmp_path / "one"), inpaint_images=0, samples_per_image=1, inpaint_batch=8)
    shutil.copytree(prepared.run_dir, cfg.run_dir, ignore=shutil.ignore_patterns("synthetic", "cluster_1", "full"))
    s = run_inpainting(cfg, progress=False)
    diff, full, cp = s["types"]
    assert cp["type"] == "copy-paste" and cp["planned"] > 0  # needs no model
    assert diff["planned"] == diff["images"] > 0 and len(diff["skipped_images"]) > 0
    assert full["planned"] == 0 and any("full-diff: no trained model" in n for n in s["notes"])
    assert any("skipped, their cluster has no trained model" in n for n in s["notes"])
    assert set(read_set(cfg, "diff", required=True).model) == {"cluster_0"}


def _bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_shrunk_rerun_keeps_every_file_and_prune_removes_only_what_it_lists(prepared, tmp_path, capsys):
    "A smaller plan keeps earlier samples byte for byte (aside, in manifest_unplanned.csv); only `prune` removes them."
    import shutil
    from diffusegen.sets import UNPLANNED

    cfg = prepared.replace(out=str(tmp_path / "shrink"), inpaint_images=2, samples_per_image=2, inpaint_batch=4)
    shutil.copytree(prepared.run_dir, cfg.run_dir, ignore=shutil.ignore_patterns("synthetic"))
    ty, sdir = "full-diff", set_dir(cfg, "full-diff")
    run_inpainting(cfg, types=(ty,), progress=False)
    before, full = _bytes(sdir), read_set(cfg, ty, required=True)
    assert len(before) == 8 and len(full) == 4
    small = cfg.replace(inpaint_images=1, samples_per_image=1)
    r = run_inpainting(small, types=(ty,), progress=False)["types"][0]
    assert (r["planned"], r["made"], r["unplanned"], r["pruned"]) == (1, 0, 3, [])
    assert _bytes(sdir) == before  # nothing deleted, nothing rewritten
    cur, aside = read_set(small, ty, required=True), pd.read_csv(sdir / UNPLANNED, dtype={"source_id": str})
    assert len(cur) == 1 and len(aside) == 3  # readers see only the plan
    assert sorted([*cur.file, *aside.file]) == sorted(full.file)
    # the plan grows back: the kept samples count as done, nothing is made again
    r = run_inpainting(cfg, types=(ty,), progress=False)["types"][0]
    assert (r["cached"], r["made"], r["unplanned"]) == (4, 0, 0) and _bytes(sdir) == before
    assert list(read_set(cfg, ty, required=True).file) == list(full.file)
    assert len(pd.read_csv(sdir / UNPLANNED)) == 0
    # prune: removes the kept-aside files, prints each, and nothing else
    run_inpainting(small, types=(ty,), progress=False)
    capsys.readouterr()
    r = run_inpainting(small, types=(ty,), progress=False, prune=True)["types"][0]
    printed = [l for l in capsys.readouterr().out.splitlines() if l.startswith("pruned ")]
    gone = {str(Path(p).relative_to(sdir)) for p in r["pruned"]}
    assert len(gone) == 6 and len(printed) == 6 and all(any(g in l for l in printed) for g in gone)
    assert gone == {f for f in before if f not in {*cur.file, *cur.mask_file}}
    assert _bytes(sdir) == {f: b for f, b in before.items() if f not in gone}  # the plan's files untouched
    assert len(read_set(small, ty, required=True)) == 1 and len(pd.read_csv(sdir / UNPLANNED)) == 0


def test_cli_inpaint_prints_a_line_per_type_and_prunes(prepared, tmp_path, capsys):
    "`diffusegen inpaint` prints one line of counts per type (not `{}`); `--prune` lists each file it removes."
    import shutil
    from diffusegen.cli import main

    out = tmp_path / "cli"
    shutil.copytree(prepared.run_dir, out / "runs" / prepared.profile, ignore=shutil.ignore_patterns("synthetic"))
    sets = ["timestep_respacing=10", "jump_length=3", "resample=2", "inpaint_batch=4", "inpaint_images=1"]
    args = ["inpaint", "--profile", "smoke", "--out", str(out), "--types", "full-diff"]
    cli = lambda *extra: main([*args, *[a for s in [*sets, *extra] for a in ("--set", s)]])
    assert cli("samples_per_image=2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "{}" not in lines and any(l.startswith("full-diff") and "planned 2" in l and "made 2" in l for l in lines), (
        lines
    )
    assert cli("samples_per_image=1") == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(l.startswith("full-diff") and "kept outside the plan 1" in l for l in lines), lines
    assert any("manifest_unplanned.csv" in l and "--prune" in l for l in lines), lines
    assert main([*args, "--prune", *[a for s in [*sets, "samples_per_image=1"] for a in ("--set", s)]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([l for l in lines if l.startswith("pruned ")]) == 2 and any("pruned 2" in l for l in lines), lines


def test_changed_settings_keep_the_earlier_samples(prepared, tmp_path):
    "A rerun under other settings makes the plan again and keeps every earlier sample (renamed, listed aside)."
    import shutil
    from diffusegen.sets import UNPLANNED

    cfg = prepared.replace(out=str(tmp_path / "changed"), inpaint_images=1, samples_per_image=2, inpaint_batch=4)
    shutil.copytree(prepared.run_dir, cfg.run_dir, ignore=shutil.ignore_patterns("synthetic"))
    ty, sdir = "full-diff", set_dir(cfg, "full-diff")
    run_inpainting(cfg, types=(ty,), progress=False)
    before = _bytes(sdir)
    other = cfg.replace(resample=cfg.resample + 1)
    r = run_inpainting(other, types=(ty,), progress=False)["types"][0]
    assert (r["made"], r["unplanned"]) == (2, 2)
    after = _bytes(sdir)
    assert sorted(before.values()) == sorted(
        b for f, b in after.items() if ".was-" in f
    )  # every earlier file, byte for byte
    aside = pd.read_csv(sdir / UNPLANNED, dtype=str)
    assert len(aside) == 2 and all(".was-" in f and (sdir / f).exists() for f in [*aside.file, *aside.mask_file])
    assert len(read_set(other, ty, required=True)) == 2  # readers see the new plan only


def test_copy_paste_never_covers_the_background_polyp(tmp_path):
    """Procedural pairs (the demo set's polyps, 64 px): every pasted polyp is placed where it does not overlap the
    background's own polyp, so the background's polyp keeps its pixels exactly and the label holds both polyps whole."""
    import torch
    from diffusegen.copypaste import make_copy_paste
    from diffusegen.datasets import demo_pair

    S, n = 64, 6
    pairs = [demo_pair(0, i, S) for i in range(n)]
    imgs = np.stack([np.asarray(im.convert("RGB")) for im, _ in pairs])
    masks = np.stack([(np.asarray(m) > 0) for _, m in pairs])
    assert masks.reshape(n, -1).any(1).all() and masks.mean() < 0.25  # every image has a polyp, with room beside it
    x4 = torch.cat(
        [
            torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1,
            torch.from_numpy(masks)[:, None].float() * 2 - 1,
        ],
        1,
    )
    ids = [f"p{i}" for i in range(n)]
    cfg = load_config("smoke", {"out": str(tmp_path), "samples_per_image": 3, "inpaint_images": 0})
    make_copy_paste(cfg, x4, ids)
    df = read_set(cfg, "copy-paste", required=True)
    assert len(df) == 3 * n and (df.overlap_share.astype(float) == 0).all()
    bg_img = {i: ((x4[k, :3].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for k, i in enumerate(ids)}
    for r in df.itertuples():
        k = ids.index(r.source_id)
        out, lab = np.array(Image.open(r.image_path)), np.array(Image.open(r.mask_path)) > 0
        assert (out[masks[k]] == bg_img[r.source_id][masks[k]]).all()  # the background's polyp is not painted over
        assert (lab >= masks[k]).all() and lab.sum() > masks[k].sum()  # the label: both polyps
        changed = (out != bg_img[r.source_id]).any(-1)
        assert changed.any() and not (changed & masks[k]).any()
