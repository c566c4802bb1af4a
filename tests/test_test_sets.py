"External test sets (§2.7) and the paper code's segmentation choices, on procedural data (no real data needed)."

import csv
import shutil

import nbformat
import numpy as np
import torch
import pandas as pd
import pytest
from PIL import Image

from diffusegen import segmentation as S
from diffusegen import statistics as ST
from diffusegen import audit as A
from diffusegen.core import load_config, ConfigError
from diffusegen.data import run_data, IN_DOMAIN
from diffusegen.datasets import make_demo_dataset

from test_segmentation import _fake_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = {
    "table2_types": "real styled-diff",
    "table2_n": "1",
    "table3_n": "4",
    "table3_r": "1 2",
    "table3_types": "styled-diff",
    "seg_epochs": 1,
    "seg_repeats": 1,
}


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    "A smoke run on the procedural set with fake synthetic sets, and three 'external' sets in other styles and sizes."
    root = tmp_path_factory.mktemp("ext")
    data = make_demo_dataset(root / "data", n=30, size=64, seed=0)
    sets = {
        k: make_demo_dataset(root / k, n=n, size=s, seed=sd)
        for k, n, s, sd in (("a", 5, 80, 7), ("b", 4, 48, 8), ("c", 3, 96, 9))
    }
    cfg = load_config("smoke", {"out": str(root / "out"), **GRID})
    run_data(cfg, data, progress=False)
    _fake_synthetic(cfg, kinds=("styled-diff",), n_src=10, m=2)
    return cfg, sets


def _specs(sets, names):
    return " ".join(f"{k}={sets[k]}" for k in names)


def test_every_cell_is_tested_on_every_set_and_a_new_set_trains_nothing(ext, monkeypatch):
    cfg, sets = ext
    c2 = cfg.replace(test_sets=_specs(sets, "ab"))
    s = S.run_segmentation(c2, progress=False)
    res = pd.read_csv(S.results_paths(c2)[1], keep_default_na=False)
    assert list(res.columns) == S.RESULT_COLUMNS and s["trained"] == s["ok"] > 0
    dom = res[res.test_set == IN_DOMAIN]
    assert list(res.test_set.unique()) == [IN_DOMAIN, "a", "b"]
    for name, n_img in (("a", 5), ("b", 4)):
        sub = res[(res.test_set == name) & (res.status == "ok")]
        assert len(sub) == (dom.status == "ok").sum() and (sub.n_test == n_img).all()
        assert sub[["dice_loss", "dice", "iou"]].astype(float).apply(lambda c: c.between(0, 1)).all().all()
        # the external rows carry the in-domain cell's training record (same model: seed, best epoch, n_train)
        m = sub.merge(dom, on=S.KEY_COLUMNS, suffixes=("", "_d"))
        assert (
            (m.seed == m.seed_d).all() and (m.best_epoch == m.best_epoch_d).all() and (m.n_train == m.n_train_d).all()
        )
    fig_d = S.stage_dirs(c2, "segmentation")[1]
    assert (fig_d / "table2-a.md").exists() and (fig_d / "table3-b.md").exists() and (fig_d / "table2.md").exists()

    # a third set added later: nothing trains, a and b are reused, c is evaluated from the kept checkpoints
    monkeypatch.setattr(S, "train_cell", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
    calls = []
    real_eval = S.evaluate
    monkeypatch.setattr(S, "evaluate", lambda *a, **k: calls.append(len(a[1])) or real_eval(*a, **k))
    c3 = cfg.replace(test_sets=_specs(sets, "abc"))
    s3 = S.run_segmentation(c3, progress=False)
    assert s3["trained"] == 0 and calls and set(calls) == {3}  # only set c's 3 images were tested
    res3 = pd.read_csv(S.results_paths(c3)[1], keep_default_na=False)
    assert list(res3.test_set.unique()) == [IN_DOMAIN, "a", "b", "c"]
    pd.testing.assert_frame_equal(
        res3[res3.test_set.isin([IN_DOMAIN, "a", "b"])].reset_index(drop=True), res.reset_index(drop=True)
    )

    # the statistics: one block per test set, the t-tests of each set named, no paper values for an external set
    monkeypatch.setattr(ST, "read_table1_values", lambda cfg: None)
    out = ST.run_statistics(c3, progress=False)
    assert {"table2", "table2-a", "table3-c"} <= set(out["tables"])
    tests = pd.read_csv(ST.stage_dirs(c3, "statistics")[1] / "tests.csv", keep_default_na=False)
    assert {"a", "b", "c", IN_DOMAIN} <= set(tests.test_set)
    assert pd.DataFrame(out["tables"]["table2-a"])["paper IoU"].str.startswith("n/a").all()
    assert not pd.DataFrame(out["tables"]["table2"])["paper IoU"].str.startswith("n/a").any()


def test_a_changed_test_set_reruns_segmentation_which_tests_only_that_set_again(ext, monkeypatch):
    "The stage's inputs are the sets' files: one changed mask of set b, and the rerun trains nothing and rewrites b's rows only."
    from diffusegen.core import get_stage, inputs_fingerprint, stage_finished

    cfg, sets = ext
    c3 = cfg.replace(test_sets=_specs(sets, "abc"))
    S.run_segmentation(c3, progress=False)  # (reuses what the test above trained)
    seg = get_stage("segmentation")
    fp = inputs_fingerprint(c3, seg)
    assert fp and stage_finished(c3, seg)
    ext_p = S.stage_dirs(c3, "segmentation")[0] / "external.csv"
    before = ext_p.read_text().splitlines()
    res0 = pd.read_csv(S.results_paths(c3)[1], keep_default_na=False)

    mk = sorted((sets["b"] / "masks").iterdir())[0]
    m = np.asarray(Image.open(mk)).copy()
    m[:] = 0
    m[4:20, 4:20] = 255
    Image.fromarray(m).save(mk)
    assert inputs_fingerprint(c3, seg) != fp and not stage_finished(c3, seg)  # the runner's cache sees it

    monkeypatch.setattr(S, "train_cell", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
    calls, real_eval = [], S.evaluate
    monkeypatch.setattr(S, "evaluate", lambda *a, **k: calls.append(len(a[1])) or real_eval(*a, **k))
    s = S.run_segmentation(c3, progress=False)
    assert s["trained"] == 0 and calls and set(calls) == {4}  # only set b's 4 images, from the kept checkpoints
    assert stage_finished(c3, seg) and s["fingerprint"] == inputs_fingerprint(c3, seg)

    after = ext_p.read_text().splitlines()
    rows = list(csv.DictReader(after))
    b_lines = [i + 1 for i, r in enumerate(rows) if r["test_set"] == "b"]
    assert len(after) == len(before) and b_lines and after[0] == before[0]
    assert [i for i, (x, y) in enumerate(zip(before, after)) if x != y] == b_lines  # every other row byte for byte
    res = pd.read_csv(S.results_paths(c3)[1], keep_default_na=False)
    keep = lambda df: df[df.test_set != "b"].reset_index(drop=True)
    pd.testing.assert_frame_equal(keep(res), keep(res0), check_exact=True)


def _stage_notebook(path, name):
    "A stand-in section notebook: writes its stage's manifest with the fingerprint of the outside files it reads."
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell('profile = "smoke"\ndata = None\nout = None\noverrides = "{}"')
    p.metadata["tags"] = ["parameters"]
    body = (
        "import json\nfrom diffusegen.core import get_stage, inputs_fingerprint, load_config, write_manifest\n"
        "cfg = load_config(profile, {**json.loads(overrides), 'out': out})\n"
        f"write_manifest(cfg, {name!r}, [], summary={{'fingerprint': inputs_fingerprint(cfg, get_stage({name!r}), data)}})\n"
    )
    nb.cells = [p, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, path)


def test_the_runner_reruns_segmentation_when_a_test_set_changes(tmp_path):
    "`diffusegen reproduce` without --force: a test set's new file reruns segmentation (and statistics), nothing before."
    from diffusegen.core import STAGES
    from diffusegen.runner import reproduce

    data = make_demo_dataset(tmp_path / "data", n=6, size=32, seed=1)
    ts = make_demo_dataset(tmp_path / "ts", n=3, size=40, seed=2)
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for s in STAGES:
        _stage_notebook(nbs / s.notebook, s.name)
    kw = dict(data=data, out=tmp_path / "out", overrides={"test_sets": f"x={ts}"}, nbs_dir=nbs, progress=False)
    status = lambda runs: {r.stage.name: r.status for r in runs}
    assert set(status(reproduce("smoke", **kw)).values()) == {"ran"}
    assert set(status(reproduce("smoke", **kw)).values()) == {"cached"}
    shutil.copy(ts / "images" / "demo_0000.jpg", ts / "images" / "extra.jpg")
    shutil.copy(ts / "masks" / "demo_0000.png", ts / "masks" / "extra.png")
    st = status(reproduce("smoke", **kw))
    assert st["segmentation"] == "ran" and st["statistics"] == "ran", st
    assert all(st[s.name] == "cached" for s in STAGES[:6]), st
    assert set(status(reproduce("smoke", **kw)).values()) == {"cached"}


def test_results_without_a_test_set_column_read_as_in_domain():
    df = pd.DataFrame({"table": [2], "type": ["Real"], "n": [1], "dice_loss": [0.3], "iou": [0.6]})
    assert A.normalize_seg(df).test_set.tolist() == [IN_DOMAIN]


def test_a_bad_test_set_is_one_line_before_anything_runs(tmp_path):
    from diffusegen.runner import reproduce

    with pytest.raises(Exception, match="needs images/ and masks/") as e:
        reproduce("smoke", out=tmp_path, overrides={"test_sets": f"x={tmp_path / 'nothing'}"}, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="not name=folder"):
        reproduce("smoke", out=tmp_path, overrides={"test_sets": "oops"}, progress=False)


def test_table3_coins_are_shared_across_r_and_types_as_the_paper_code(ext):
    "table3_coins = shared: the same real images get siblings at r = 1 and r = 2 (per-r: fresh coins for each r)."
    cfg, _ = ext
    sets = S.Sets(cfg)

    df = sets.synthetic("styled-diff")
    owner = dict(zip(df.key, df.source_id))

    def picked(c, r):
        cell = dict(table=3, type="styled-diff", n=8, r=r, mode="add", repeat=0)
        items = S.cell_data(c, sets, cell)["keys"][0]
        return sorted({owner[k] for k in items if k in owner})  # the real images that got siblings

    assert load_config("paper").table3_coins == "shared"
    assert picked(cfg, 1) == picked(cfg, 2) and picked(cfg, 1)
    per_r = cfg.replace(table3_coins="per-r")
    assert any(picked(per_r.replace(seed=s), 1) != picked(per_r.replace(seed=s), 2) for s in range(5))


def test_cluster_masks_are_read_as_rgb_as_the_paper_code(tmp_path):
    "cluster_mask_read = raw (the default): a coloured mask keeps its colours; grey gives its L levels in 3 channels."
    from PIL import Image
    from diffusegen.clustering import feature_inputs

    assert load_config("paper").cluster_mask_read == "raw"
    Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(tmp_path / "i.png")
    m = np.zeros((20, 20, 3), np.uint8)
    m[5:15, 5:15] = (255, 0, 0)
    Image.fromarray(m).save(tmp_path / "m.png")
    raw = feature_inputs(tmp_path / "i.png", tmp_path / "m.png", 16)[1]
    grey = feature_inputs(tmp_path / "i.png", tmp_path / "m.png", 16, "grey")[1]
    assert raw[8, 8].tolist() == [255, 0, 0] and grey[8, 8, 0] == grey[8, 8, 1] == grey[8, 8, 2] == 76


def test_paper_trains_unetpp_from_imagenet_weights_and_says_so(tmp_path):
    "paper: the encoder's ImageNet weights (the paper's code); offline and absent they are one clear line; a dry run says random."
    from diffusegen.core import dry_run_overrides, WeightsNotFound

    cfg = load_config("paper", {"out": str(tmp_path)})
    assert cfg.seg_encoder_weights == "imagenet" and load_config("demo").seg_encoder_weights == "none"
    assert load_config("paper", dry_run_overrides()).seg_encoder_weights == "none"
    try:
        p = S.encoder_weights_file(cfg, download=False)
    except WeightsNotFound as e:
        assert "\n" not in str(e) and "se_resnext50_32x4d" in str(e)
    else:
        assert p.is_file()


def test_paper_revision_crops_in_diffusion_training_only(tmp_path):
    "train_crop = center: the diffusion models see center crops of wide images; the data stage's pairs stay stretched."
    from PIL import Image
    from diffusegen.data import Pair, load_pair, load_split
    from diffusegen.training import training_images

    rev = load_config("paper-revision")
    assert (rev.train_crop, rev.resize_mode, load_config("paper").train_crop) == ("center", "stretch", "none")
    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (tmp_path / "wide" / d).mkdir(parents=True)
    for k in range(12):
        im = (rng.random((40, 80, 3)) * 255).astype(np.uint8)
        m = np.zeros((40, 80), np.uint8)
        m[10:30, 5 + 4 * k : 25 + 4 * k] = 255
        Image.fromarray(im).save(tmp_path / "wide" / "images" / f"w{k}.png")
        Image.fromarray(m).save(tmp_path / "wide" / "masks" / f"w{k}.png")
    cfg = load_config("smoke", {"out": str(tmp_path / "out"), "n_test": 4})
    run_data(cfg, tmp_path / "wide", progress=False)
    plain, ids = training_images(cfg)
    assert training_images(cfg, crop=True)[0].equal(plain)  # train_crop = none: the same tensors
    c = cfg.replace(train_crop="center")
    crop, ids2 = training_images(c, crop=True)
    assert ids2 == ids and not crop.equal(plain) and training_images(c)[0].equal(plain)
    sp = load_split(cfg).set_index("id")
    im, mk = load_pair(Pair(ids[0], sp.loc[ids[0], "image"], sp.loc[ids[0], "mask"]), cfg.image_size, "center_crop")
    assert np.array_equal(((crop[0, :3] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(), im)
    assert np.array_equal((crop[0, 3] > 0).numpy(), mk)


def test_a_retrain_under_other_settings_keeps_both_checkpoints(ext, tmp_path):
    """A cell trained, then trained again under a setting that changes its hash: both checkpoints stay (one file per
    cell and settings hash), and each loads by its hash as the model of its own training (its in-domain test scores)."""
    import shutil

    cfg, _ = ext
    c1 = cfg.replace(out=str(tmp_path / "o"))
    for sub in ("data", "synthetic"):
        shutil.copytree(cfg.run_dir / sub, c1.run_dir / sub)
    cell, only = dict(table=2, type="real", n=1, r=0, mode="", repeat=0), [{"table": 2, "type": "real"}]
    c2 = c1.replace(seg_lr=5e-4)
    scores = {}
    for c in (c1, c2):
        res = pd.DataFrame(S.run_segmentation(c, progress=False, only=only)["results"])
        scores[c.seg_lr] = res[(res.table == 2) & (res.type == "real") & (res.test_set == IN_DOMAIN)].iloc[0]
    sets = S.Sets(c1)
    h1, h2 = S.cell_hash(c1, sets, cell), S.cell_hash(c2, sets, cell)
    assert h1 != h2 and S.checkpoint_path(c1, cell, h1).exists() and S.checkpoint_path(c2, cell, h2).exists()
    models = {}
    for c, h in ((c1, h1), (c2, h2)):
        models[h] = S.load_cell_model(c, cell, h)
        e = S.evaluate(models[h], *sets.test, threshold=c.seg_threshold)
        assert (
            abs(e["iou"] - float(scores[c.seg_lr].iou)) < 1e-6 and abs(e["dice"] - float(scores[c.seg_lr].dice)) < 1e-6
        )
    w1, w2 = (models[h].state_dict() for h in (h1, h2))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # two trainings, two sets of weights
    assert S.load_cell_model(c1, cell, "not-a-hash") is None
