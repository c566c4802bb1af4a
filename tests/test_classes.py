"Issue 19: several classes and grey images. The paper's binary polyp case is pinned to what it was before."

import hashlib
import json
import subprocess
import sys
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from diffusegen.core import load_config
from diffusegen.data import (
    Layout,
    check_classes,
    check_dataset,
    dataset_fingerprint,
    data_layout,
    load_pairs,
    pairs_path,
    preprocess_labels,
    preprocess_pairs,
    run_data,
)
from diffusegen.datasets import demo_pair, make_demo_dataset, make_multiclass_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args, cwd=ROOT):
    exe = Path(sys.executable).parent / "diffusegen"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def sha(t) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


# ---- the paper's case: same arrays, same fingerprints, no layout in the cache ----


def test_binary_png_masks_same_arrays_as_before(tmp_path):
    "The procedural demo set (RGB JPEG images, 0/255 PNG masks): the arrays the code before issue 19 made (pinned)."
    d = make_demo_dataset(tmp_path / "d", n=6, size=48, seed=3)
    rep = check_classes(d)
    assert rep.ok and rep.layout == Layout() and rep.layout.is_default
    t = preprocess_labels(rep.valid, load_config("smoke"), rep.layout, progress=False)
    assert {k: (tuple(v.shape), sha(v)) for k, v in t.items()} == {
        "images": ((6, 3, 32, 32), "a8daa8bf4fceb4ba"),
        "masks": ((6, 32, 32), "f4476ecdec21f35d"),
    }


def test_binary_jpeg_masks_thresholded_as_before(tmp_path):
    "RGB JPEG masks with ringing (Kvasir-SEG's kind), thresholded at 128: the same layout, arrays and report as before."
    d = tmp_path / "jpg"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    for i in range(5):
        im, m = demo_pair(7, i, 40)
        im.save(d / "images" / f"p{i}.jpg", quality=90)
        m.convert("RGB").save(d / "masks" / f"p{i}.jpg", quality=75)
    rep, old = check_classes(d), check_dataset(d)
    assert rep.layout == Layout() and rep.valid == old.valid and rep.stats == old.stats and rep.ok
    assert rep.summary_lines()[:3] == old.summary_lines()  # the lines of before come first, unchanged
    assert rep.summary_lines()[3:] == [
        "images: RGB, 3 channels; masks: binary, 1 class",
        f"class 1 polyp: {np.mean([s.polyp_share for s in old.stats]):.2%} of pixels, in 5 of 5 images",
    ]
    cfg = load_config("smoke")
    new, before = preprocess_labels(rep.valid, cfg, rep.layout, False), preprocess_pairs(old.valid, cfg, False)
    assert all(np.array_equal(new[k].numpy(), before[k].numpy()) for k in ("images", "masks"))
    assert {k: sha(v) for k, v in new.items()} == {"images": "649840eafccdd962", "masks": "fd162ca27d0446cf"}


def test_data_stage_binary_cache_has_no_layout(tmp_path):
    "The data stage on the paper's kind of data writes the resized pairs as before: no layout key, the default layout."
    d = make_demo_dataset(tmp_path / "d", n=12, size=48, seed=0)
    cfg = load_config("smoke", {"out": str(tmp_path / "out"), "n_test": 4})
    s = run_data(cfg, d, progress=False)
    _, _, meta = load_pairs(pairs_path(cfg))
    assert "layout" not in meta and data_layout(cfg) == Layout() and s["layout"] == Layout().to_meta()
    assert s["classes"][0] == "images: RGB, 3 channels; masks: binary, 1 class"


# ---- several classes, grey images ----


@pytest.mark.parametrize("fmt", ["labels", "palette", "folders"])
@pytest.mark.parametrize("channels", [1, 3])
def test_multiclass_set_read_in_every_format(tmp_path, fmt, channels):
    d = make_multiclass_dataset(tmp_path / "mc", n=8, size=32, seed=0, channels=channels, mask_format=fmt)
    rep = check_classes(d)
    assert rep.ok, rep.problems
    names = ("elongated", "round") if fmt == "folders" else ("class1", "class2")  # folders: their names, sorted
    assert rep.layout == Layout(channels, names, fmt)
    meta = json.loads((d / "dataset.json").read_text())
    per_class = dict(zip(rep.layout.classes, np.array(rep.class_shares).astype(bool).sum(0)))
    want = meta["images_per_class"]
    assert per_class == (want if fmt == "folders" else {"class1": want["round"], "class2": want["elongated"]})
    declared = check_classes(d, classes="round elongated")
    assert declared.ok and declared.layout.classes == ("round", "elongated")
    t = preprocess_labels(declared.valid, load_config("smoke").replace(image_size=16), declared.layout, False)
    assert t["images"].shape == (8, channels, 16, 16) and set(t["masks"].unique().tolist()) == {0, 1, 2}
    # the same labels whatever the format, once the classes are named
    if fmt != "labels":
        lab = make_multiclass_dataset(tmp_path / "lab", n=8, size=32, seed=0, channels=channels)
        ref = check_classes(lab, classes="round elongated")
        t2 = preprocess_labels(ref.valid, load_config("smoke").replace(image_size=16), ref.layout, False)
        assert np.array_equal(t["masks"].numpy(), t2["masks"].numpy())


def test_data_check_cli_reports_classes_and_refuses_in_one_line(tmp_path):
    d = make_multiclass_dataset(tmp_path / "mc", n=6, size=32, seed=2, mask_format="palette")
    r = cli("data", "check", d, "--classes", "round elongated")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "6 valid pairs" and "images: grey, 1 channel; masks: palette, 2 classes" in out
    assert any(l.startswith("class 1 round: ") and "% of pixels, in " in l for l in out), out
    p = Image.open(d / "masks" / "mc_0003.png")
    p.putpalette([0, 0, 0, 1, 2, 3, 4, 5, 6])
    p.save(d / "masks" / "mc_0003.png")
    r = cli("data", "check", d)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    bad = [l for l in r.stdout.splitlines() if str(d) in l]
    assert len(bad) == 1 and "mc_0003.png" in bad[0] and "palette differs" in bad[0]
    lab = make_multiclass_dataset(tmp_path / "lab", n=6, size=32, seed=2)
    r = cli("data", "check", lab, "--classes", "round")
    bad = [l for l in r.stdout.splitlines() if "outside the declared classes" in l]
    assert r.returncode == 1 and bad and all(str(lab / "masks") in l for l in bad)


def test_data_stage_multiclass_grey(tmp_path):
    "The data stage on a grey two-class set: N×1×S×S images, label maps 0…2, the layout in the cache and the manifest."
    d = make_multiclass_dataset(tmp_path / "mc", n=12, size=32, seed=0, mask_format="folders")
    cfg = load_config("smoke", {"out": str(tmp_path / "out"), "n_test": 4, "classes": "round elongated"})
    s = run_data(cfg, d, progress=False)
    t, ids, meta = load_pairs(pairs_path(cfg))
    assert t["images"].shape == (12, 1, 32, 32) and int(t["masks"].max()) == 2
    assert data_layout(cfg) == Layout(1, ("round", "elongated"), "folders") == Layout.from_meta(s["layout"])
    assert dataset_fingerprint(d) != dataset_fingerprint(
        make_multiclass_dataset(tmp_path / "mc2", n=12, size=32, seed=1, mask_format="folders")
    )
