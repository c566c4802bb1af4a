"The data layer on real Kvasir-SEG images, on other dataset conventions, and on every kind of bad input."

import os
import pickle
import subprocess
import sys
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from diffusegen.core import DataError, load_config
from diffusegen.data import (
    PairedDataset,
    check_dataset,
    find_pairs,
    load_pair,
    load_pairs,
    make_splits,
    pairs_path,
    read_id_list,
    read_mask,
    read_mask_grey,
    resize_pair,
    run_data,
    to_tensor4,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER_IDS = ROOT / "data" / "paper" / "paper_clusters_k20.csv"


def cli(*args, cwd=ROOT):
    "Run the installed `diffusegen` command in a subprocess (to see exactly what a user sees)."
    exe = Path(sys.executable).parent / "diffusegen"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def write_pair(d, name, img, mask, iext=".jpg", mext=".png"):
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "masks").mkdir(parents=True, exist_ok=True)
    if img is not None:
        Image.fromarray(img).save(d / "images" / f"{name}{iext}")
    if mask is not None:
        Image.fromarray(mask).save(d / "masks" / f"{name}{mext}")


@pytest.fixture
def bad_folder(tmp_path):
    "One good pair and one file of every kind of bad input the data check must name (missing partner, size, empty, grey, zero-byte, truncated, …)."
    d = tmp_path / "bad"
    rng = np.random.default_rng(0)
    img = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    m = np.zeros((48, 64), np.uint8)
    m[10:30, 20:40] = 255
    write_pair(d, "good", img, m)
    write_pair(d, "no_mask", img, None)  # image without a mask
    write_pair(d, "no_image", None, m)  # mask without an image
    write_pair(d, "size", img, m[:40])  # sizes differ
    write_pair(d, "empty", img, np.zeros_like(m))  # empty mask
    write_pair(d, "grey", img, (rng.random(m.shape) * 255).astype(np.uint8))  # not two-level
    write_pair(d, "zero", img, m)
    (d / "images" / "zero.jpg").write_bytes(b"")  # zero-byte
    write_pair(d, "trunc", img, m)
    b = (d / "images" / "trunc.jpg").read_bytes()
    (d / "images" / "trunc.jpg").write_bytes(b[: len(b) // 2])  # truncated
    write_pair(d, "corrupt", img, m)
    (d / "masks" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # corrupt
    write_pair(d, "unreadable", img, m)
    (d / "images" / "unreadable.jpg").write_bytes(b"this is text, not a JPEG")
    (d / "masks" / "readme.txt").write_text("notes")  # a non-image file
    (d / "images" / ".DS_Store").write_bytes(b"\0\0")  # hidden files are ignored
    return d


EXPECTED_BAD = {
    "no_mask": "image without a mask",
    "no_image": "mask without an image",
    "size": "differs from its image",
    "empty": "empty mask",
    "grey": "not a two-level mask",
    "zero": "empty file (0 bytes)",
    "trunc": "truncated",
    "corrupt": "corrupt",
    "unreadable": "not a readable image",
    "readme": "not an image file",
}


def test_check_reports_every_bad_file_once(bad_folder):
    rep = check_dataset(bad_folder)
    assert [p.id for p in rep.valid] == ["good"]
    assert len(rep.problems) == len(EXPECTED_BAD)
    for stem, phrase in EXPECTED_BAD.items():
        hits = [p for p in rep.problems if Path(p.path).stem == stem]
        assert len(hits) == 1, (stem, [str(p) for p in rep.problems])
        assert phrase in hits[0].message, (stem, hits[0].message)


def test_check_cli_bad_input_one_line_per_problem_no_traceback(bad_folder):
    r = cli("data", "check", bad_folder)
    assert r.returncode == 1
    out = r.stdout.strip().splitlines()
    assert "Traceback" not in r.stdout + r.stderr
    problem_lines = [l for l in out if str(bad_folder) in l]
    assert len(problem_lines) == len(EXPECTED_BAD)
    for l in problem_lines:
        assert l.split(": ", 1)[0].startswith(str(bad_folder))  # each line names its file
    assert out[len(EXPECTED_BAD)].startswith("1 valid pair, 10 problems")  # after the problems (then the classes)


@pytest.mark.parametrize("layout", ["missing", "no_masks_dir", "empty"])
def test_check_cli_missing_or_empty_folder(tmp_path, layout):
    d = tmp_path / "ds"
    if layout != "missing":
        (d / "images").mkdir(parents=True)
    if layout == "empty":
        (d / "masks").mkdir()
    r = cli("data", "check", d)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stdout.strip().splitlines()
    assert any(("no such folder" in l or "missing folder" in l or "no image files" in l) and str(d) in l for l in lines)


def test_kvasir_check_cli(kvasir_root):
    r = cli("data", "check", kvasir_root)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "1000 valid pairs"
    assert lines[1].startswith("sizes: width 332–1920 px, height 352–1072 px")
    assert lines[2] == "polyp area share: min 0.47%, median 11.4%, max 81.2%"  # as documented in SOURCE.md


def test_kvasir_masks_are_two_level_after_threshold(kvasir_root):
    pairs, problems = find_pairs(kvasir_root)
    assert not problems and len(pairs) == 1000
    grey = read_mask_grey(pairs[0].mask)
    assert len(np.unique(grey)) > 2  # JPEG ringing…
    img, mask = load_pair(pairs[0], 64)
    x = to_tensor4(img, mask)
    assert tuple(x.shape) == (4, 64, 64)
    assert set(x[3].unique().tolist()) == {-1.0, 1.0}  # …gone after thresholding and resizing
    assert -1 <= x[:3].min() and x[:3].max() <= 1


def test_mask_resize_invents_no_grey_and_keeps_area():
    m = np.zeros((300, 400), bool)
    m[50:250, 100:300] = True
    img = np.zeros((300, 400, 3), np.uint8)
    for mode in ("stretch", "center_crop"):
        _, r = resize_pair(img, m, 64, mode)
        assert r.dtype == bool
    _, r = resize_pair(img, m, 64, "stretch")
    assert abs(r.mean() - m.mean()) < 0.02


def test_other_convention_png_numeric_tiff_grey(tmp_path, kvasir_root):
    "CVC-ClinicDB-like: PNG, numeric names, 384×288; plus greyscale TIFF and 16-bit PNG; no code change."
    pairs, _ = find_pairs(kvasir_root)
    d = tmp_path / "cvc"
    for i, p in enumerate(pairs[:4], start=1):
        img = Image.open(p.image).convert("RGB").resize((384, 288))
        m = Image.fromarray((read_mask(p.mask) * 255).astype(np.uint8)).resize((384, 288), Image.NEAREST)
        if i == 3:
            img = img.convert("L")  # greyscale image
        if i == 4:
            img = Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257))  # 16-bit
        (d / "images").mkdir(parents=True, exist_ok=True)
        (d / "masks").mkdir(exist_ok=True)
        img.save(d / "images" / f"{i}.png")
        m.save(d / "masks" / (f"{i}.tif" if i == 2 else f"{i}.png"))
    rep = check_dataset(d)
    assert rep.ok and len(rep.valid) == 4, [str(p) for p in rep.problems]
    assert {(s.width, s.height) for s in rep.stats} == {(384, 288)}
    ds = PairedDataset(d, size=32)
    assert ds.ids == ["1", "2", "3", "4"]
    xs = [ds[i] for i in range(4)]
    assert all(tuple(x.shape) == (4, 32, 32) for x in xs)
    assert (xs[2][0] == xs[2][1]).all()  # greyscale replicated to RGB


def test_mask_suffix_and_01_masks(tmp_path):
    img = np.full((20, 20, 3), 100, np.uint8)
    m = np.zeros((20, 20), np.uint8)
    m[5:15, 5:15] = 1
    write_pair(tmp_path, "a", img, m, mext="_mask.png")  # masks/a_mask.png pairs with images/a.jpg
    rep = check_dataset(tmp_path)
    assert rep.ok and rep.stats[0].polyp_share == pytest.approx(0.25)


def test_paired_dataset_stops_or_skips(bad_folder):
    with pytest.raises(DataError) as e:
        PairedDataset(bad_folder, size=16)
    assert "\n" not in str(e.value) and "on_bad_pairs=skip" in str(e.value)
    ds = PairedDataset(bad_folder, size=16, on_bad="skip")
    assert ds.ids == ["good"] and len(ds.skipped) == len(EXPECTED_BAD)


def test_id_list_csv_and_paper_pickle_agree(tmp_path):
    csv = read_id_list(PAPER_IDS)
    assert len(csv) == 348 and csv.paper_cluster.nunique() == 20
    # the paper repository's clusters_20.pkl: {cluster: np.ndarray of relative paths}
    pk = {
        int(c): np.array([f"./guided_diffusion/segmented-images/masked-images/{i}.jpg" for i in g.id])
        for c, g in csv.groupby("paper_cluster")
    }
    with open(tmp_path / "clusters_20.pkl", "wb") as f:
        pickle.dump(pk, f)
    got = read_id_list(tmp_path / "clusters_20.pkl")
    assert got.sort_values("id").reset_index(drop=True).equals(csv.sort_values("id").reset_index(drop=True))


class _Hostile:
    def __reduce__(self):
        return (os.system, ("touch /tmp/diffusegen-pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    p = tmp_path / "evil.pkl"
    with open(p, "wb") as f:
        pickle.dump({0: [_Hostile()]}, f)
    with pytest.raises(DataError, match="refused to unpickle"):
        read_id_list(p)
    assert not Path("/tmp/diffusegen-pwned").exists()


def test_paper_split_on_kvasir(kvasir_root):
    ids = [p.id for p in find_pairs(kvasir_root)[0]]
    cfg = load_config("paper")
    split, notes = make_splits(ids, cfg)
    train, test = set(split[split.split == "train"].id), set(split[split.split == "test"].id)
    assert train == set(read_id_list(PAPER_IDS).id) and len(test) == 200 and not train & test
    assert split.equals(make_splits(ids, cfg)[0])  # seeded: the same split again
    other = make_splits(ids, cfg.replace(split_seed=1))[0]
    assert set(other[other.split == "test"].id) != test  # another seed, another test draw
    assert not notes


def test_seeded_split_without_paper_list():
    ids = [f"{i}" for i in range(100)]
    split, notes = make_splits(ids, load_config("demo", {"train_ids": "none", "n_test": 20}))
    assert (split.split == "test").sum() == 20 and (split.split == "train").sum() == 80 and not notes
    partial = sorted(read_id_list(PAPER_IDS).id)[:10] + ids
    with pytest.raises(DataError, match="not in the dataset"):
        make_splits(partial, load_config("demo"))


def test_data_stage_writes_splits_pairs_and_keeps_outputs_on_bad_input(tmp_path, kvasir_root, bad_folder):
    cfg = load_config("smoke", {"out": str(tmp_path)})
    s = run_data(cfg, kvasir_root, progress=False)
    assert (s["pairs"], s["train"], s["test"]) == ("1000", "16", "8")
    t, ids, meta = load_pairs(pairs_path(cfg))
    assert tuple(t["images"].shape) == (24, 3, 32, 32) and t["images"].dtype.is_floating_point is False
    assert set(t["masks"].unique().tolist()) <= {0, 1} and meta["split"].count("train") == 16
    split = pd.read_csv(cfg.run_dir / "data" / "splits.csv", dtype={"id": str})
    assert set(split[split.split == "train"].id) <= set(read_id_list(PAPER_IDS).id)
    before = {p: p.read_bytes() for p in (cfg.run_dir / "data").glob("*.csv")}
    with pytest.raises(DataError) as e:
        run_data(cfg, bad_folder, progress=False)
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in (cfg.run_dir / "data").glob("*.csv")} == before  # nothing lost or half-written
    assert not list((cfg.run_dir / "data").glob(".*tmp*"))


def test_data_stage_skip_lists_bad_pairs(tmp_path, bad_folder):
    for i in range(9):  # enough good pairs for a seeded split
        rng = np.random.default_rng(i)
        m = np.zeros((48, 64), np.uint8)
        m[5:25, 10:40] = 255
        write_pair(bad_folder, f"ok{i}", (rng.random((48, 64, 3)) * 255).astype(np.uint8), m)
    cfg = load_config("smoke", {"out": str(tmp_path), "on_bad_pairs": "skip"})
    s = run_data(cfg, bad_folder, progress=False)
    assert s["pairs"] == "10" and s["skipped"] == len(EXPECTED_BAD)
    bad = pd.read_csv(cfg.run_dir / "data" / "bad_pairs.csv")
    assert len(bad) == len(EXPECTED_BAD)


def test_offline_the_download_is_one_line_then_the_procedural_set(tmp_path, monkeypatch, capsys):
    "data_download = kvasir-seg with no network: a line saying so within seconds, then the embedded procedural set."
    import socket
    import time
    import urllib.request
    from diffusegen.data import resolve_data_root

    def no_network(*a, **k):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.delenv("DIFFUSEGEN_DATA_DOWNLOAD", raising=False)
    cfg = load_config(
        "smoke",
        {"out": str(tmp_path), "data_search": str(tmp_path / "data" / "kvasir-seg"), "data_download": "kvasir-seg"},
    )
    t0 = time.time()
    root, origin = resolve_data_root(cfg)
    assert time.time() - t0 < 30 and root.name == "demo-dataset"
    line = "Kvasir-SEG not downloaded: no network ([Errno -2] Name or service not known)"
    assert line in origin and "procedural" in origin
    assert capsys.readouterr().out.strip().splitlines() == [line]
    assert not (tmp_path / "data").exists()  # nothing half-made


def test_data_download_none_never_touches_the_network(tmp_path, monkeypatch):
    import urllib.request
    from diffusegen.data import resolve_data_root

    def boom(*a, **k):
        raise AssertionError("the network was used")

    monkeypatch.setattr(urllib.request, "urlopen", boom)
    monkeypatch.setenv("DIFFUSEGEN_DATA_DOWNLOAD", "none")
    cfg = load_config("demo", {"out": str(tmp_path), "data_search": str(tmp_path / "nothing")})
    root, origin = resolve_data_root(cfg)
    assert root.name == "demo-dataset" and "data_download = none" in origin
