"""Memorization audit (§2.6): on real Kvasir images at 64 px with the real FID Inception, a synthetic image that hands
back its source's polyp is flagged as such, an exact copy of another training image is flagged with the right
neighbour, a new region is not flagged, and flagged samples drop out of the filtered manifest."""

from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from diffusegen.core import load_config
from diffusegen import memorization as M
from diffusegen.intrinsic import file_features

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this file

S = 64


@pytest.fixture(scope="module")
def setup(kvasir_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("memo")
    ids = sorted(p.stem for p in (kvasir_root / "images").glob("*.jpg"))[40:46]
    rows = []
    for i in ids:
        img = Image.open(kvasir_root / "images" / f"{i}.jpg").convert("RGB").resize((S, S), Image.BICUBIC)
        m = np.asarray(Image.open(kvasir_root / "masks" / f"{i}.jpg").convert("L").resize((S, S), Image.NEAREST)) >= 128
        img.save(d / f"{i}.png")
        Image.fromarray(m.astype(np.uint8) * 255).save(d / f"{i}_mask.png")
        rows.append({"id": i, "image_path": str(d / f"{i}.png"), "mask_path": str(d / f"{i}_mask.png")})
    real = pd.DataFrame(rows)
    src, other = real.iloc[0], real.iloc[3]
    # a synthetic set in the inpainting layout (manifest.csv with paths relative to its folder), source = ids[0]
    sd = d / "diff"
    (sd / "images").mkdir(parents=True)
    (sd / "masks").mkdir()
    base = np.asarray(Image.open(src.image_path))
    mask = np.asarray(Image.open(src.mask_path)) > 0
    region = M.read_mask01(src.mask_path).astype(bool)
    new = base.copy()
    rng = np.random.default_rng(0)
    new[region] = np.clip(rng.normal(150, 30, (region.sum(), 3)), 0, 255).astype(np.uint8)  # a new (textured) region
    for name, a in (("handed_back", base), ("copy_other", np.asarray(Image.open(other.image_path))), ("new", new)):
        Image.fromarray(a).save(sd / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(sd / "masks" / f"{name}.png")
    man = pd.DataFrame(
        {
            "file": [f"images/{n}.png" for n in ("handed_back", "copy_other", "new")],
            "mask_file": [f"masks/{n}.png" for n in ("handed_back", "copy_other", "new")],
            "source_id": src.id,
        }
    )
    man.to_csv(sd / "manifest.csv", index=False)
    synth = pd.DataFrame(
        {
            "type": "Diff",
            "image_path": [str(sd / f) for f in man.file],
            "mask_path": [str(sd / f) for f in man.mask_file],
            "source_id": src.id,
        }
    )
    cfg = load_config("smoke", {"out": str(d), "image_size": S, "dilation": 5, "device": "cpu"})
    return cfg, real, synth, sd, other.id


def test_audit_flags_the_right_samples(setup):
    cfg, real, synth, _, other_id = setup
    a = M.audit(cfg, synth, real, lambda f: file_features(cfg, f)).set_index(
        synth.image_path.map(lambda p: Path(p).stem)
    )
    hb, co, new = a.loc["handed_back"], a.loc["copy_other"], a.loc["new"]
    assert hb.copy_of_source and abs(hb.ssim_source - 1) < 1e-4 and abs(hb.cos_source - 1) < 1e-4
    assert co.copy_of_other and co.cos_nn_id == other_id and co.ssim_nn_id == other_id and co.cos_nn > 0.999
    assert (
        not new.flagged
        and new.ssim_source < cfg.memo_ssim
        and new.ssim_nn < cfg.memo_ssim
        and new.cos_nn < cfg.memo_cosine
    )
    assert new.cos_source > new.cos_nn  # the kept background makes the source the closest image: reported, not flagged
    counts = M.audit_counts(a.reset_index(drop=True)).set_index("type")
    assert counts.loc["Diff", "flagged"] == 2 and counts.loc["Diff", "copy of source polyp"] == 1


def test_real_control_and_filtered_manifest(setup, tmp_path):
    cfg, real, synth, sd, _ = setup
    feats = lambda f: file_features(cfg, f)
    ctrl = M.real_control(cfg, real, feats, n=4, seed=0)
    assert len(ctrl) == 4 and not ctrl.copy_of_source.any() and ctrl.cos_source.isna().all()
    assert (ctrl.cos_nn < 1 - 1e-6).all()  # its own image is excluded from the search
    a = M.audit(cfg, synth, real, feats)
    (p,) = M.write_filtered_manifests(cfg, a, {"Diff": sd}, dest=tmp_path)
    kept = pd.read_csv(p)
    assert [Path(f).stem for f in kept.file] == ["new"] and all(Path(f).is_file() for f in kept.file)


def test_unreadable_image_is_one_line(setup, tmp_path):
    from diffusegen.core import DataError

    cfg, real, synth, _, _ = setup
    bad = tmp_path / "cut.png"
    bad.write_bytes(Path(synth.image_path[0]).read_bytes()[:200])  # a truncated PNG
    broken = synth.head(1).assign(image_path=str(bad))
    zeros = lambda files: np.zeros((len(files), 8))  # the image reader alone, not the Inception
    with pytest.raises(DataError, match="cut.png: (truncated|corrupt|not a readable)"):
        M.audit(cfg, broken, real, zeros)
