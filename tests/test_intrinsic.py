"""Intrinsic evaluation (§2.6, Table 1): clean-FID with the real FID Inception on real Kvasir images (a set against
itself ≈ 0; FID rises with added noise, monotone over three levels), the exact trace formula against clean-fid's
sqrtm, the device and worker settings handed to clean-fid, and MS-SSIM against direct pytorch_msssim.ms_ssim calls."""
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from diffusegen.core import load_config
from diffusegen import intrinsic as I

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one torch thread for this file

def _kvasir(root: Path, n: int, size: int, offset: int = 0) -> np.ndarray:
    files = sorted((root/"images").glob("*.jpg"))[offset:offset + n]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in files])

def _save(imgs: np.ndarray, d: Path, tag: str) -> list:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for k, a in enumerate(imgs):
        p = d/f"{tag}_{k}.png"; Image.fromarray(a).save(p); out.append(str(p))
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
    a, b = I.file_features(cfg, sets[0])[:, :96], I.file_features(cfg, sets[64])[:, :96]   # small dims: sqrtm is quick and accurate
    assert abs(I.fid_from_features(a, b) - I.fid_from_features(a, b, sqrtm=True)) < 1e-4 * max(1.0, I.fid_from_features(a, b))

def test_clean_fid_gets_device_workers_and_mode(fid_sets, monkeypatch, tmp_path):
    import cleanfid.fid as cf
    cfg, sets = fid_sets
    seen = {}
    real = cf.get_files_features
    def spy(files, model=None, **kw):
        seen.update(kw); return real(files, model, **kw)
    monkeypatch.setattr(cf, "get_files_features", spy)
    fresh = _save(np.asarray([np.asarray(Image.open(sets[0][0]))] * 2), tmp_path, "fresh")    # not in the feature cache
    I.file_features(cfg, fresh)
    assert seen["device"] == torch.device("cpu") and seen["num_workers"] == cfg.num_workers == 0 and seen["mode"] == "clean"

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
