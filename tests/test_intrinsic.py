"""Intrinsic evaluation (§2.6, Table 1): clean-FID with the real FID Inception on real Kvasir images (a set against
itself ≈ 0; FID rises with added noise, monotone over three levels), the exact trace formula against clean-fid's
sqrtm, the device and worker settings handed to clean-fid, MS-SSIM against direct pytorch_msssim.ms_ssim calls; the
real-image cache follows the data settings, the GAN set is resized as the real images, an unreadable file is one line."""

from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from diffusegen.core import load_config
from diffusegen import intrinsic as I

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this file


def _kvasir(root: Path, n: int, size: int, offset: int = 0) -> np.ndarray:
    files = sorted((root / "images").glob("*.jpg"))[offset : offset + n]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in files])


def _save(imgs: np.ndarray, d: Path, tag: str) -> list:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for k, a in enumerate(imgs):
        p = d / f"{tag}_{k}.png"
        Image.fromarray(a).save(p)
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def fid_sets(kvasir_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("fid")
    base = _kvasir(kvasir_root, 8, 128)
    rng = np.random.default_rng(0)
    sets = {0: _save(base, d, "clean")}
    for sigma in (8, 24, 64):
        noisy = np.clip(base.astype(float) + rng.normal(0, sigma, base.shape), 0, 255).astype(np.uint8)
        sets[sigma] = _save(noisy, d, f"noise{sigma}")
    cfg = load_config("smoke", {"out": str(d), "device": "cpu", "fid_batch": 8})
    return cfg, sets


def test_fid_self_is_zero_and_rises_with_noise(fid_sets):
    cfg, sets = fid_sets
    self_fid = I.fid_between(cfg, sets[0], sets[0])
    assert abs(self_fid) < 1e-3, self_fid
    fids = [I.fid_between(cfg, sets[0], sets[s]) for s in (8, 24, 64)]
    assert fids[0] > 1.0 and fids[0] < fids[1] < fids[2], fids


def test_trace_formula_equals_clean_fid_sqrtm(fid_sets):
    cfg, sets = fid_sets
    a, b = (
        I.file_features(cfg, sets[0])[:, :96],
        I.file_features(cfg, sets[64])[:, :96],
    )  # small dims: sqrtm is quick and accurate
    assert abs(I.fid_from_features(a, b) - I.fid_from_features(a, b, sqrtm=True)) < 1e-4 * max(
        1.0, I.fid_from_features(a, b)
    )


def test_clean_fid_gets_device_workers_and_mode(fid_sets, monkeypatch, tmp_path):
    import cleanfid.fid as cf

    cfg, sets = fid_sets
    seen = {}
    real = cf.get_files_features

    def spy(files, model=None, **kw):
        seen.update(kw)
        return real(files, model, **kw)

    monkeypatch.setattr(cf, "get_files_features", spy)
    fresh = _save(np.asarray([np.asarray(Image.open(sets[0][0]))] * 2), tmp_path, "fresh")  # not in the feature cache
    I.file_features(cfg, fresh)
    assert (
        seen["device"] == torch.device("cpu")
        and seen["num_workers"] == cfg.num_workers == 0
        and seen["mode"] == "clean"
    )


def test_fid_images_cap_draws_seeded_subsets(fid_sets):
    cfg, sets = fid_sets
    capped = cfg.replace(fid_images=4)
    a = I.fid_between(capped, sets[0], sets[8], seed=1)
    assert a == I.fid_between(capped, sets[0], sets[8], seed=1)
    assert a != I.fid_between(capped, sets[0], sets[8], seed=2)


@pytest.mark.parametrize("size,win", [(256, 11), (64, 3)])
def test_ms_ssim_pairs_match_pytorch_msssim(kvasir_root, size, win):
    import pytorch_msssim

    imgs = _kvasir(kvasir_root, 5, size, offset=20)
    setup = I.msssim_setup(size, 11)
    assert (setup["win"], setup["levels"]) == (win, 5)
    i, j = I.pair_indices(len(imgs), 12, seed=3)
    assert (i != j).all()
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    direct = pytorch_msssim.ms_ssim(t[i], t[j], data_range=255, win_size=win, size_average=False).mean().item()
    assert abs(I.ms_ssim_pairs(imgs, 12, seed=3, win=11) - direct) < 1e-5
    # the same image pair twice scores 1; different Kvasir images score far lower
    assert abs(pytorch_msssim.ms_ssim(t[:1], t[:1], data_range=255, win_size=win).item() - 1) < 1e-5 and direct < 0.6


def _data_stage(cfg, root: Path, ids: list, train: list):
    "The data stage's two outputs that the intrinsic stage reads (resized pairs, splits.csv), made with its own functions."
    from diffusegen.data import Pair, load_pair, preprocess_pairs, save_pairs, pairs_path
    import pandas as pd

    pairs = [Pair(i, root / "images" / f"{i}.jpg", root / "masks" / f"{i}.jpg") for i in ids]
    save_pairs(preprocess_pairs(pairs, cfg, progress=False), ids, pairs_path(cfg))
    (cfg.run_dir / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "split": ["train" if i in train else "test" for i in ids]}).to_csv(
        cfg.run_dir / "data" / "splits.csv", index=False
    )
    return {i: load_pair(p, cfg.image_size, cfg.resize_mode, cfg.mask_threshold) for i, p in zip(ids, pairs)}


def test_real_image_cache_follows_the_data_settings(kvasir_root, tmp_path):
    ids = sorted(p.stem for p in (kvasir_root / "images").glob("*.jpg"))[:4]
    cfg = load_config("smoke", {"out": str(tmp_path), "image_size": 32})
    want = _data_stage(cfg, kvasir_root, ids, ids[:3])
    r32 = I.real_training_files(cfg)
    assert list(r32.id) == ids[:3] and Image.open(r32.image_path[0]).size == (32, 32)
    assert (np.asarray(Image.open(r32.image_path[0])) == want[ids[0]][0]).all()
    assert I.real_training_files(cfg).image_path.tolist() == r32.image_path.tolist()  # same settings: the same files
    cfg48 = cfg.replace(image_size=48)  # a new size: the data stage writes pairs_48, the cache follows
    want48 = _data_stage(cfg48, kvasir_root, ids, ids[:3])
    r48 = I.real_training_files(cfg48)
    assert (
        Image.open(r48.image_path[0]).size == (48, 48)
        and (np.asarray(Image.open(r48.image_path[0])) == want48[ids[0]][0]).all()
    )
    assert not Path(r32.image_path[0]).exists()  # the stale 32-px set is gone
    # another split (same pairs file): the cache is rebuilt with the new training ids
    _data_stage(cfg48, kvasir_root, ids, ids[1:])
    r48b = I.real_training_files(cfg48)
    assert list(r48b.id) == ids[1:] and Path(r48b.image_path[0]).parent.parent != Path(r48.image_path[0]).parent.parent
    # another resize mode at the same size: a new cache folder, even before the pairs file changes
    assert I.real_training_files(cfg48.replace(resize_mode="center_crop")).image_path[0] != r48b.image_path[0]


def test_gan_set_is_resized_like_real(kvasir_root, tmp_path):
    from diffusegen.data import Pair, load_pair
    from diffusegen.gan import dataset_ids

    cfg = load_config(
        "smoke",
        {
            "out": str(tmp_path),
            "data_root": str(kvasir_root),
            "gan_root": str(tmp_path / "gan"),
            "image_size": 32,
            "resize_mode": "center_crop",
        },
    )
    ids = dataset_ids(cfg)
    (tmp_path / "gan").mkdir()
    for c in (3, 9):  # SinGAN-Seg's layout at another (non-square) size
        src = ids[c - 1]
        Image.open(kvasir_root / "images" / f"{src}.jpg").convert("RGB").resize((70, 50)).save(
            tmp_path / "gan" / f"chk_id_{c}_gen_scale_0_0_img.png"
        )
        Image.open(kvasir_root / "masks" / f"{src}.jpg").convert("L").resize((70, 50)).save(
            tmp_path / "gan" / f"chk_id_{c}_gen_scale_0_0_mask.png"
        )
    g = I.synthetic_sets(cfg, [ids[2], ids[8]])["GAN"]
    assert len(g) == 2 and g.attrs["mapping_check"]["mean_iou"] > 0.6  # the chk_id mapping check ran
    for r in g.itertuples():
        orig = tmp_path / "gan" / Path(r.image_path).name
        img, mask = load_pair(
            Pair(r.source_id, orig, tmp_path / "gan" / Path(r.mask_path).name), 32, "center_crop", cfg.mask_threshold
        )
        assert Image.open(r.image_path).size == (32, 32)
        assert (np.asarray(Image.open(r.image_path)) == img).all() and (
            (np.asarray(Image.open(r.mask_path)) > 0) == mask
        ).all()
    assert I.fid_between(cfg, list(g.image_path), list(g.image_path)) < 1e-3  # clean-fid reads the 32-px files


def test_unreadable_image_is_one_line(fid_sets, tmp_path):
    from diffusegen.core import DataError

    cfg, sets = fid_sets
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png: "):
        I.file_features(cfg, [sets[0][0], str(bad)])
