"Every bad setting or file gets one clear line: decompression bombs, permissions, odd names, bad options, settings files, writes."

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from diffusegen.core import ConfigError, DataError, load_config
from diffusegen.data import check_dataset, read_image, run_data

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT):
    "Run the installed `diffusegen` command in a subprocess (to see exactly what a user sees)."
    exe = Path(sys.executable).parent / "diffusegen"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def good_pair(d: Path, name: str, seed: int = 0, iext=".jpg", mext=".png"):
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(d / "images" / f"{name}{iext}")
    m = np.zeros((24, 32), np.uint8)
    m[5:15, 8:20] = 255
    Image.fromarray(m).save(d / "masks" / f"{name}{mext}")


def bomb_png(path: Path, w: int = 20000, h: int = 20000) -> Path:
    "A tiny PNG whose IHDR claims w×h pixels (CRC fixed): PIL sees a huge image in a few bytes."
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4)).save(path)
    b = bytearray(path.read_bytes())
    assert b[12:16] == b"IHDR"
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(b))
    return path


# ---- 1. decompression bombs ----


def test_bomb_is_one_problem_of_its_pair(tmp_path):
    d = tmp_path / "ds"
    good_pair(d, "good")
    good_pair(d, "bomb")
    bomb_png(d / "images" / "bomb.png")
    (d / "images" / "bomb.jpg").unlink()
    rep = check_dataset(d)
    assert [p.id for p in rep.valid] == ["good"]
    assert len(rep.problems) == 1 and rep.problems[0].path == d / "images" / "bomb.png"
    assert "image too large (400 megapixels; max_image_pixels = 100000000)" in rep.problems[0].message
    with pytest.raises(DataError, match="too large"):
        read_image(d / "images" / "bomb.png")
    bomb_png(d / "images" / "bomb.png", 12000, 10000)  # under PIL's own refusal, over ours: refused by size, undecoded
    assert "image too large (12000×10000 pixels, 120 megapixels" in check_dataset(d).problems[0].message
    assert len(check_dataset(d, max_pixels=32 * 24).valid) == 1  # the setting is the limit: 32×24 still fits…
    assert len(check_dataset(d, max_pixels=32 * 24 - 1).valid) == 0  # …one pixel less and the good pair is too large


def test_bomb_cli_check_and_prepare_skip(tmp_path):
    d = tmp_path / "ds"
    for i in range(6):
        good_pair(d, f"ok{i}", seed=i)
    bomb_png(d / "masks" / "ok5_mask.png")
    (d / "masks" / "ok5.png").unlink()  # the bomb is a mask
    r = cli("data", "check", d)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stderr
    bad = [l for l in r.stdout.splitlines() if "too large" in l]
    assert len(bad) == 1 and bad[0].startswith(str(d / "masks" / "ok5_mask.png") + ": ")
    cfg = load_config("smoke", {"out": str(tmp_path / "out"), "train_ids": "none", "on_bad_pairs": "skip"})
    s = run_data(cfg, d, progress=False)
    assert s["pairs"] == "5" and s["skipped"] == 1
    assert "too large" in pd.read_csv(cfg.run_dir / "data" / "bad_pairs.csv").problem[0]
    with pytest.raises(DataError) as e:
        run_data(cfg.replace(on_bad_pairs="error"), d, progress=False)
    assert "ok5_mask.png" in str(e.value) and "too large" in str(e.value) and "\n" not in str(e.value)


# ---- 2. permissions ----


def _deny(monkeypatch, *denied):
    "Make reading `denied` files and listing `denied` folders fail as they do for a user without permission (tests run as root)."
    import pathlib
    from PIL import Image as PILImage

    denied = {Path(p) for p in denied}
    real_iterdir, real_open = pathlib.Path.iterdir, PILImage.open

    def iterdir(self):
        if self in denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    def open_(fp, *a, **kw):
        if isinstance(fp, (str, os.PathLike)) and Path(fp) in denied:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    monkeypatch.setattr(PILImage, "open", open_)


def test_unreadable_file_and_folder_say_permission_denied(tmp_path, monkeypatch):
    d = tmp_path / "ds"
    good_pair(d, "a")
    good_pair(d, "b", seed=1)
    _deny(monkeypatch, d / "images" / "b.jpg")
    rep = check_dataset(d)
    assert [p.id for p in rep.valid] == ["a"]
    assert [str(p) for p in rep.problems] == [f"{d / 'images' / 'b.jpg'}: permission denied (cannot read this file)"]
    _deny(monkeypatch, d / "masks")
    rep = check_dataset(d)  # a traceback before
    assert not rep.valid and [str(p) for p in rep.problems] == [
        f"{d / 'masks'}: permission denied (cannot list this folder)"
    ]


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads files whatever their mode (the monkeypatched test above runs)"
)
def test_unreadable_file_and_folder_cli(tmp_path):
    d = tmp_path / "ds"
    good_pair(d, "a")
    good_pair(d, "b", seed=1)
    (d / "images" / "b.jpg").chmod(0)
    r = cli("data", "check", d)
    assert r.returncode == 1 and f"{d / 'images' / 'b.jpg'}: permission denied" in r.stdout
    (d / "masks").chmod(0)
    try:
        r = cli("data", "check", d)
        assert r.returncode == 1 and "Traceback" not in r.stderr and f"{d / 'masks'}: permission denied" in r.stdout
    finally:
        (d / "masks").chmod(0o755)
        (d / "images" / "b.jpg").chmod(0o644)


# ---- 4. data check options ----


def test_check_a_file_says_not_a_folder(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    r = cli("data", "check", f)
    assert (
        r.returncode == 1
        and r.stdout.splitlines()[0]
        == f"{f}: not a folder (a dataset is a folder with images/ and masks/ paired by file stem)"
    )
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "images").write_text("x")
    (tmp_path / "ds" / "masks").mkdir()
    assert [p.message.split(" (")[0] for p in check_dataset(tmp_path / "ds").problems] == ["not a folder"]


# ---- 3. one problem, one line ----


def test_path_with_colon_space_is_not_repeated(tmp_path):
    d = tmp_path / "study: polyps"
    good_pair(d, "a")
    good_pair(d, "b", seed=1)
    (d / "images" / "b.jpg").write_bytes(b"not a jpeg at all")
    (p,) = check_dataset(d).problems
    assert p.message == "not a readable image (unknown or corrupt format)"
    assert (
        str(p) == f"{d / 'images' / 'b.jpg'}: not a readable image (unknown or corrupt format)"
        and str(p).count("polyps") == 1
    )


def test_control_characters_and_undecodable_bytes_in_names_stay_on_one_line(tmp_path):
    d = tmp_path / "ds"
    good_pair(d, "a")
    good_pair(d, "new\nline", seed=1)
    good_pair(d, "esc\x1b[31m", seed=2)
    (d / "masks" / "new\nline.png").unlink()  # an image without a mask
    (d / "images" / "esc\x1b[31m.jpg").write_bytes(b"")  # an empty file
    with open(os.path.join(os.fsencode(d / "images"), b"bad\xff.jpg"), "wb") as f:
        f.write(b"x")  # not UTF-8: no mask
    r = cli("data", "check", d)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 + 3 + 2, lines  # three problems, three summary lines, then the classes
    assert f"{d / 'images'}/new\\nline.jpg: image without a mask (no masks/new\\nline.* file)" in lines
    assert f"{d / 'images'}/esc\\x1b[31m.jpg: empty file (0 bytes)" in lines
    assert any(l.startswith(f"{d / 'images'}/bad\\udcff.jpg: image without a mask") for l in lines)
    assert lines[3] == "1 valid pair, 3 problems"


@pytest.mark.parametrize(
    "opt,value,words",
    [
        ("--threshold", "999", "a grey level 0..255"),
        ("--threshold", "-1", "a grey level 0..255"),
        ("--tolerance", "-1", "a share of pixels 0..1"),
        ("--tolerance", "1.5", "a share of pixels 0..1"),
        ("--max-pixels", "0", "at least 1"),
    ],
)
def test_check_options_out_of_range_are_one_line_errors(tmp_path, opt, value, words):
    good_pair(tmp_path, "a")
    r = cli("data", "check", tmp_path, opt, value)
    assert (
        r.returncode == 2
        and r.stdout == ""
        and r.stderr == f"diffusegen: error: data check {opt} {value}: must be {words}\n"
    )


def test_out_of_range_settings_and_arguments(tmp_path):
    with pytest.raises(ConfigError, match=r"mask_threshold=999: must be an integer in \[0, 255\]"):
        load_config("smoke", {"mask_threshold": 999})
    with pytest.raises(ConfigError, match=r"mask_grey_tolerance=-1.0: must be a number in \[0, 1\]"):
        load_config("smoke", {"mask_grey_tolerance": -1})
    with pytest.raises(ConfigError, match="tolerance=2: must be a share 0..1"):
        check_dataset(tmp_path, tolerance=2)


# ---- 6. exit codes: 1 = problems found, 2 = an error ----


def test_data_check_crash_exits_2_not_1(tmp_path, monkeypatch, capsys):
    import diffusegen.data
    from diffusegen.cli import main

    good_pair(tmp_path, "a")
    assert main(["data", "check", str(tmp_path)]) == 0

    def boom(*a, **kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(diffusegen.data, "check_dataset", boom)
    assert main(["data", "check", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == "diffusegen: error: internal error (RuntimeError: a bug); please report it with the traceback above"
    )

    def full(*a, **kw):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(diffusegen.data, "check_dataset", full)
    assert main(["data", "check", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"diffusegen: error: {tmp_path / 'x'}: No space left on device\n"


# ---- 5. image stems that end in a mask suffix ----


def test_image_stem_with_mask_suffix_pairs(tmp_path):
    from diffusegen.data import find_pairs

    for img, mask in [("a_mask", "a_mask"), ("b_seg", "b_seg"), ("c_gt", "c_gt_mask"), ("d", "d_mask")]:
        good_pair(tmp_path, "tmp")
        (tmp_path / "images" / "tmp.jpg").rename(tmp_path / "images" / f"{img}.jpg")
        (tmp_path / "masks" / "tmp.png").rename(tmp_path / "masks" / f"{mask}.png")
    pairs, problems = find_pairs(tmp_path)
    assert not problems, [str(p) for p in problems]
    assert [(p.id, p.mask.name) for p in pairs] == [
        ("a_mask", "a_mask.png"),
        ("b_seg", "b_seg.png"),
        ("c_gt", "c_gt_mask.png"),
        ("d", "d_mask.png"),
    ]
    good_pair(tmp_path, "d")  # masks/d.png and masks/d_mask.png both claim images/d.jpg
    problems = find_pairs(tmp_path)[1]
    assert [str(p) for p in problems] == [
        f"{tmp_path / 'masks' / 'd_mask.png'}: two masks share the stem 'd' (also d.png)"
    ]


# ---- 7. the settings file ----


def test_settings_file_not_utf8_or_a_folder(tmp_path):
    from diffusegen.core import read_settings

    p = tmp_path / "settings.ini"
    p.write_bytes(
        (ROOT / "settings.ini").read_text(encoding="utf-8").encode("latin-1", "replace")
    )  # § and × become latin-1 bytes
    with pytest.raises(ConfigError) as e:
        load_config("smoke", path=p)
    assert str(e.value).startswith(f"{p}: not UTF-8 text (byte 0x") and "save it as UTF-8" in str(e.value)
    p.unlink()
    p.mkdir()
    with pytest.raises(ConfigError, match="is a folder, not a settings file"):
        read_settings(p)
    (tmp_path / "nbs").mkdir()
    r = subprocess.run(
        [str(Path(sys.executable).parent / "diffusegen"), "config", "--profile", "smoke"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "DIFFUSEGEN_ROOT": str(tmp_path)},
    )
    assert r.returncode == 2 and r.stderr == f"diffusegen: error: {p}: is a folder, not a settings file\n"


def test_settings_file_with_bom_reads():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "settings.ini"
        p.write_bytes(b"\xef\xbb\xbf" + (ROOT / "settings.ini").read_bytes())
        assert load_config("smoke", path=p) == load_config("smoke")


# ---- 8. writes: the umask's mode, on disk before the rename ----


def test_atomic_writes_respect_umask_and_fsync(tmp_path, monkeypatch):
    import pandas as pd
    from diffusegen.core import atomic_path, current_umask, write_json, write_table

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    old = os.umask(0o002)  # a shared project folder: group-writable
    try:
        assert current_umask() == 0o002
        write_json(tmp_path / "a.json", {"x": 1})
        write_table(pd.DataFrame({"x": [1]}), tmp_path / "t")
        with atomic_path(tmp_path / "b.bin") as p:
            p.write_bytes(b"b")
    finally:
        os.umask(old)
    for name in ("a.json", "t.csv", "t.md", "b.bin"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o664), name  # mkstemp's 0600 before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "t.csv", "t.md"]
    assert any(s.startswith(str(tmp_path / ".a.json.")) for s in synced)  # the file before its rename…
    assert synced.count(str(tmp_path)) >= 4  # …and the folder after each rename


# ---- 9. damaged run state in training ----


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    "A tiny model stopped after its checkpoint at step 2 (random images: no data stage needed)."
    import torch
    from diffusegen.training import ModelSpec, train_model

    out = tmp_path_factory.mktemp("train")
    cfg = load_config("smoke", {"out": str(out), "check_draws": 2, "save_interval": 2, "monitor_samples": 1})
    images = torch.rand(4, 4, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    spec = ModelSpec("m", ["a", "b", "c", "d"], False, 6, cfg.lr, 4, 0)
    assert train_model(spec, images, cfg, out / "m", progress=False, stop_after=2)["status"] == "stopped"
    return cfg, spec, images, out / "m"


def _cut(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage,named,words",
    [
        ("latest", "latest.json", "damaged ("),
        ("no_checkpoints", "checkpoints/step_000002", "the checkpoint latest.json points at is missing"),
        ("state", "checkpoints/step_000002/state.json", "damaged ("),
        ("optimizer", "checkpoints/step_000002/optimizer.safetensors", "damaged checkpoint ("),
        ("unet", "checkpoints/step_000002/unet", "damaged checkpoint ("),
    ],
)
def test_damaged_run_state_is_one_line_and_restart_recovers(stopped_run, tmp_path, damage, named, words):
    import shutil
    from diffusegen.core import DiffusegenError
    from diffusegen.training import train_model

    cfg, spec, images, pristine = stopped_run
    mdir = tmp_path / "m"
    shutil.copytree(pristine, mdir)
    ck = mdir / "checkpoints" / "step_000002"
    {
        "latest": lambda: _cut(mdir / "latest.json"),
        "no_checkpoints": lambda: shutil.rmtree(mdir / "checkpoints"),
        "state": lambda: _cut(ck / "state.json"),
        "optimizer": lambda: _cut(ck / "optimizer.safetensors"),
        "unet": lambda: _cut(ck / "unet" / "diffusion_pytorch_model.safetensors"),
    }[damage]()
    with pytest.raises(DiffusegenError) as e:
        train_model(spec, images, cfg, mdir, progress=False, stop_after=1)
    msg = str(e.value)
    assert msg.startswith(f"{mdir / named}: {words}") and "\n" not in msg, msg
    assert "rerun with --restart to train m from step 0" in msg
    r = train_model(spec, images, cfg, mdir, resume=False, progress=False, stop_after=1)  # --restart
    assert r == {"name": "m", "status": "stopped", "step": 1}
