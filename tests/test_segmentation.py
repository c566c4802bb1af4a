"""Segmentation (§2.7, Appendix B.2): IoU, Dice and the soft Dice loss on hand-made masks (checked against smp's own
metrics), the grouped train/validation split, Table 3's augmentation sampler (α, r, add and replace) on counts, and
the stage end to end on real Kvasir images at 32 px with small synthetic sets made here (flipped real images in the
synthetic layout, a SinGAN-Seg-layout GAN folder), including resume after a crash and retraining on changed settings."""

import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from diffusegen.core import load_config
from diffusegen.data import run_data
from diffusegen import segmentation as S

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this file

# --- metrics on hand-made masks ---


def _masks():
    "Two 4×4 images: (prediction probabilities, ground truth) with counted TP/FP/FN."
    g = torch.zeros(2, 4, 4)
    p = torch.zeros(2, 4, 4)
    g[0, :2, :2] = 1
    p[0, :2, :2] = 0.9
    p[0, 0, 0] = 0.3
    p[0, 3, 3] = 0.8  # TP 3, FN 1, FP 1
    g[1, 1:3, :] = 1
    p[1, 1, :] = 0.7
    p[1, 0, :2] = 0.51
    p[1, 3, 0] = 0.5  # TP 4, FN 4, FP 2 (0.5 is not > 0.5)
    return p, g


def test_iou_dice_hand_made():
    p, g = _masks()
    tp, fp, fn = S.confusion(p, g, 0.5)
    assert tp.tolist() == [3, 4] and fp.tolist() == [1, 2] and fn.tolist() == [1, 4]
    assert torch.allclose(S.iou_score(p, g), torch.tensor([3 / 5, 4 / 10]))
    assert torch.allclose(S.dice_score(p, g), torch.tensor([6 / 8, 8 / 14]))
    # threshold is a setting: at 0.25 the 0.3 pixel counts too
    assert torch.allclose(S.iou_score(p, g, threshold=0.25)[0], torch.tensor(4 / 5))
    # empty mask and empty prediction: 1 (the code's eps); a prediction on an empty mask: 0
    z = torch.zeros(1, 4, 4)
    assert S.iou_score(z, z).item() == pytest.approx(1.0) and S.dice_score(z, z).item() == pytest.approx(1.0)
    assert S.iou_score(torch.ones(1, 4, 4), z).item() == pytest.approx(0.0, abs=1e-6)


def test_iou_dice_agree_with_smp_metrics():
    import segmentation_models_pytorch as smp

    p, g = _masks()
    # smp thresholds with >=, ours with > (the paper code); move the 0.5 pixel off the threshold to compare
    p2 = p.clone()
    p2[p2 == 0.5] = 0.49
    tp, fp, fn, tn = smp.metrics.get_stats(p2[:, None], g[:, None].long(), mode="binary", threshold=0.5)
    ref_iou = smp.metrics.iou_score(tp, fp, fn, tn, reduction="none").flatten()
    ref_f1 = smp.metrics.f1_score(tp, fp, fn, tn, reduction="none").flatten()
    assert torch.allclose(S.iou_score(p2, g), ref_iou.float(), atol=1e-6)
    assert torch.allclose(S.dice_score(p2, g), ref_f1.float(), atol=1e-6)


def test_soft_dice_loss_and_polyp_channel():
    p, g = _masks()
    per = S.soft_dice_loss(p, g)
    exp = [1 - (2 * (p[i] * g[i]).sum() + 1) / (p[i].sum() + g[i].sum() + 1) for i in range(2)]
    assert torch.allclose(per, torch.stack(exp))
    pooled = S.soft_dice_loss(p, g, per_image=False)
    assert torch.allclose(pooled, 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1))
    # the loss is on probabilities: a softer correct prediction costs more, the thresholded Dice does not change
    assert (S.soft_dice_loss(g * 0.6, g) > S.soft_dice_loss(g * 0.9, g)).all()
    assert torch.equal(S.dice_score(g * 0.6, g), S.dice_score(g * 0.9, g))
    two = torch.stack([1 - p, p], 1)  # the softmax2d layout: channel 0 background (ignored), 1 polyp
    assert torch.equal(S.polyp_channel(two), p)


# --- grouped split and Table 3's sampler ---


def test_grouped_split_keeps_siblings_together():
    rng = np.random.default_rng(0)
    groups = [f"src{g}" for g in rng.integers(0, 60, 400)]  # 400 synthetic images of ≤ 60 sources, uneven
    val = S.grouped_split(groups, 0.2, seed=7)
    vg = {g for g, v in zip(groups, val) if v}
    tg = {g for g, v in zip(groups, val) if not v}
    assert vg and tg and not (vg & tg)
    assert len(vg) == round(0.2 * len(set(groups)))
    assert np.array_equal(val, S.grouped_split(groups, 0.2, seed=7))  # seeded
    assert not np.array_equal(val, S.grouped_split(groups, 0.2, seed=8))
    # a source's side does not depend on the order of the items
    perm = rng.permutation(len(groups))
    val_p = S.grouped_split([groups[i] for i in perm], 0.2, seed=7)
    assert {groups[i] for i, v in zip(perm, val_p) if v} == vg
    # two sources: one each side; one source: an error
    assert S.grouped_split(["a", "a", "b"], 0.2, seed=0).tolist() in ([True, True, False], [False, False, True])
    with pytest.raises(S.DiffusegenError, match="at least 2 source"):
        S.grouped_split(["a", "a"], 0.2, seed=0)


def _sib(n, m=3):
    ids = [f"r{k:04d}" for k in range(n)]
    return ids, {i: [f"{i}_s{j}" for j in range(m)] for i in ids}


@pytest.mark.parametrize("mode", ["add", "replace"])
@pytest.mark.parametrize("r", [1, 2, 3])
def test_sampler_counts(mode, r):
    ids, sib = _sib(2000)
    items, c = S.augment_small_set(ids, sib, r, 0.5, mode, coin_seed=1, pick_seed=2)
    k = c["picked"]
    assert 900 < k < 1100  # Binomial(2000, 0.5)
    assert c["synthetic"] == k * r
    assert c["real"] == (2000 if mode == "add" else 2000 - k)
    assert len(items) == c["real"] + c["synthetic"]
    # every synthetic image is a sibling of a picked real image, r distinct ones each
    owners = pd.Series([q.split("_s")[0] for s, q in items if s == "syn"]).value_counts()
    assert set(owners) == {r} and len(owners) == k
    assert all(q in sib[q.split("_s")[0]] for s, q in items if s == "syn")
    if mode == "replace":  # a picked image is gone, an unpicked one stays
        reals = {q for s, q in items if s == "real"}
        assert not (reals & set(owners.index)) and len(reals) == 2000 - k


def test_sampler_alpha_extremes_shared_coins_and_short_sets():
    ids, sib = _sib(50)
    assert S.augment_small_set(ids, sib, 2, 0.0, "add", 1, 2)[1] == {
        "real": 50,
        "synthetic": 0,
        "picked": 0,
        "short_of_r": 0,
    }
    assert S.augment_small_set(ids, sib, 2, 1.0, "add", 1, 2)[1]["synthetic"] == 100
    assert S.augment_small_set(ids, sib, 2, 1.0, "replace", 1, 2)[1] == {
        "real": 0,
        "synthetic": 100,
        "picked": 50,
        "short_of_r": 0,
    }
    a = S.augment_small_set(ids, sib, 1, 0.3, "add", 5, 6)[0]
    b = S.augment_small_set(ids, sib, 1, 0.3, "add", 5, 99)[0]  # other type (pick seed), same coins
    owners = lambda it: [q.split("_s")[0] for s, q in it if s == "syn"]
    assert owners(a) == owners(b) and a == S.augment_small_set(ids, sib, 1, 0.3, "add", 5, 6)[0]
    # fewer siblings than r: all of them; no siblings at all: the real image stays, even in replace mode
    short = {i: sib[i][:2] for i in ids[:25]}
    items, c = S.augment_small_set(ids, short, 3, 1.0, "replace", 1, 2)
    assert c == {"real": 25, "synthetic": 50, "picked": 50, "short_of_r": 50}
    with pytest.raises(S.ConfigError):
        S.augment_small_set(ids, sib, 1, 0.5, "swap", 1, 2)


def test_grid_and_seeds():
    cfg = load_config("paper")
    g = S.grid(cfg)
    t2 = [c for c in g if c["table"] == 2]
    t3 = [c for c in g if c["table"] == 3]
    # Table 2: Real + 5 paper types and Copy-Paste × N = 1, 2, 3; Table 3: 4 N × (Real + 3 types × r = 1, 2, 3)
    assert len(t2) == 19 and len(t3) == 40 and {c["mode"] for c in t3 if c["type"] != "real"} == {"add"}
    assert {c["mode"] for c in t3 if c["type"] == "real"} == {""}  # Real baselines: no mode
    assert len(S.grid(cfg.replace(seg_repeats=3))) == 3 * len(g)
    seeds = [S.cell_seed(cfg, c) for c in g]
    assert len(set(seeds)) == len(seeds)
    assert S.cell_seed(cfg, g[3]) == S.cell_seed(load_config("paper"), g[3])  # stable across runs
    assert S.cell_seed(cfg.replace(seed=1), g[3]) != seeds[3]
    g_rep = S.grid(cfg.replace(table3_mode="replace"))
    assert {c["mode"] for c in g_rep if c["table"] == 3 and c["type"] != "real"} == {"replace"}
    # add and replace share the Real cells: same keys and seeds
    real3 = lambda g: [(c, S.cell_seed(cfg, c)) for c in g if c["table"] == 3 and c["type"] == "real"]
    assert real3(g_rep) == real3(g)


def test_encoder_weights_from_local_torch_hub(tmp_path, monkeypatch):
    cfg = load_config("smoke", {"seg_encoder": "resnet18", "seg_encoder_weights": "imagenet"})
    import huggingface_hub

    def no_hf(*a, **k):
        raise FileNotFoundError("not in the Hugging Face cache (offline)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hf)  # an empty Hugging Face cache
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.get_dir() follows $TORCH_HOME …
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # … here tmp_path/hub (restored afterwards)
    with pytest.raises(S.WeightsNotFound, match="checkpoints"):
        S.encoder_weights_file(cfg, download=False)
    src = S.build_model(cfg.replace(seg_encoder_weights="none"))
    sd = {**src.encoder.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(sd, tmp_path / "hub" / "checkpoints" / "resnet18-5c106cde.pth")
    assert S.encoder_weights_file(cfg, download=False).name == "resnet18-5c106cde.pth"
    torch.manual_seed(123)
    m = S.build_model(cfg)
    assert torch.equal(m.encoder.conv1.weight, src.encoder.conv1.weight)


# --- the stage end to end ---


def _fake_synthetic(cfg, kinds=("diff", "styled-diff"), n_src=10, m=2):
    "Synthetic sets in the styling layout: m horizontally flipped copies (sample 0..m-1) of n_src real training images."
    from diffusegen.data import load_split
    from diffusegen.styling import real_images
    from diffusegen.sets import set_dir

    real, masks = real_images(cfg)
    ids = sorted(load_split(cfg).query("split == 'train'").id)[:n_src]
    for kind in kinds:
        d, rows = set_dir(cfg, kind), []
        (d / "images").mkdir(parents=True, exist_ok=True)
        (d / "masks").mkdir(parents=True, exist_ok=True)
        for sid in ids:
            for j in range(m):
                name = f"{sid}_{j}"
                im = np.ascontiguousarray(np.roll(real[sid][:, ::-1], j, axis=0))
                Image.fromarray(im).save(d / "images" / f"{name}.png")
                Image.fromarray(np.ascontiguousarray(np.roll(masks[sid][:, ::-1], j, axis=0)) * 255).save(
                    d / "masks" / f"{name}.png"
                )
                rows.append(
                    dict(file=f"images/{name}.png", mask_file=f"masks/{name}.png", source_id=sid, sample=j, seed=j)
                )
        pd.DataFrame(rows).to_csv(d / "manifest.csv", index=False)
    return ids


def _fake_gan(cfg, root: Path, ids_sorted, use):
    "A SinGAN-Seg-layout folder (chk_id_<k>_gen_scale_0_<i>_img/mask.png) at another size, for 3 training and 1 test image."
    from diffusegen.styling import real_images

    real, masks = real_images(cfg)
    root.mkdir()
    for sid in use:
        c = ids_sorted.index(sid) + 1
        for i in range(2):
            Image.fromarray(real[sid]).resize((48, 40)).save(root / f"chk_id_{c}_gen_scale_0_{i}_img.png")
            Image.fromarray(masks[sid] * 255).resize((48, 40)).save(root / f"chk_id_{c}_gen_scale_0_{i}_mask.png")


GRID = {
    "table2_types": "real gan diff styled-diff",
    "table2_n": "1 2 3",
    "table3_n": "4 32",
    "table3_r": "1 2",
    "table3_types": "styled-diff gan",
    "seg_epochs": 2,
}


@pytest.fixture(scope="module")
def stage(tmp_path_factory, kvasir_root):
    out = tmp_path_factory.mktemp("seg")
    cfg = load_config("smoke", {"out": str(out), **GRID})
    run_data(cfg, kvasir_root, progress=False)
    _fake_synthetic(cfg)
    return cfg


def test_stage_end_to_end_resume_and_settings(stage, monkeypatch, kvasir_root):
    cfg = stage
    from diffusegen.data import load_split

    # a crash in the 4th trained cell: the three finished cells are in results.csv
    real_train, calls = S.train_cell, []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("crash")
        return real_train(*a, **k)

    monkeypatch.setattr(S, "train_cell", crashing)
    with pytest.raises(RuntimeError):
        S.run_segmentation(cfg, progress=False)
    ledger, res_p, fig_p = S.results_paths(cfg)
    part = pd.read_csv(res_p, keep_default_na=False)
    assert (part.status == "ok").sum() == 3
    monkeypatch.setattr(S, "train_cell", real_train)
    s = S.run_segmentation(cfg, progress=False)
    assert s["reused"] == 3 and s["trained"] == s["ok"] - 3
    res = pd.read_csv(res_p, keep_default_na=False)
    assert list(res.columns) == S.RESULT_COLUMNS and fig_p.read_text() == res_p.read_text()
    assert len(res) == len(S.grid(cfg))
    st = dict(zip(zip(res.table, res.type, res.n, res.r), res.status))
    assert st[(2, "gan", 1, 0)] == "not provided" and st[(3, "gan", 4, 1)] == "not provided"
    assert st[(2, "diff", 3, 0)].startswith("skipped: no diff sample has index 2")
    assert st[(3, "real", 32, 0)].startswith("skipped: N = 32")
    ok = res[res.status == "ok"]
    assert set(zip(ok.table, ok.type, ok.n)) >= {
        (2, "real", 1),
        (2, "diff", 1),
        (2, "diff", 2),
        (2, "styled-diff", 2),
        (3, "real", 4),
    }
    for c in ("dice_loss", "dice", "iou", "val_iou"):
        assert ok[c].astype(float).between(0, 1).all()
    assert (ok.iou.astype(float) <= ok.dice.astype(float) + 1e-9).all()
    assert (ok.best_epoch.between(1, 2)).all() and (ok.epochs == 2).all() and (ok.n_test == 8).all()
    assert (ok.encoder == cfg.seg_encoder).all()
    assert list(res.columns[-5:]) == ["n_syn", "short_of_r", "class_iou", "class_dice", "test_set"]
    assert (res.class_iou.fillna("") == "").all() and (res.class_dice.fillna("") == "").all()  # one class: none
    assert (ok[ok.type == "real"].n_syn == 0).all()
    # Table 2: N samples per source, 80/20 by source (10 sources: 8 train, 2 validation)
    row = lambda t, ty, n, r=0: ok[(ok.table == t) & (ok.type == ty) & (ok.n == n) & (ok.r == r)].iloc[0]
    assert (row(2, "diff", 1).n_train, row(2, "diff", 1).n_val) == (8, 2)
    assert (row(2, "diff", 2).n_train, row(2, "diff", 2).n_val) == (16, 4)
    assert row(2, "diff", 2).n_syn == 16 and row(2, "diff", 2).short_of_r == 0
    n_real = (load_split(cfg).split == "train").sum()
    assert row(2, "real", 1).n_train + row(2, "real", 1).n_val == n_real
    # Table 3 (add): N real images plus r siblings for the picked ones; validation = held-out real images
    t3 = row(3, "styled-diff", 4, 2)
    assert t3.n_train >= 4 and (t3.n_train - 4) % 2 == 0 and t3.n_val == row(3, "real", 4).n_val
    assert t3.n_syn == t3.n_train - 4 and t3.short_of_r == 0 and t3["mode"] == "add" and row(3, "real", 4)["mode"] == ""
    assert row(3, "real", 4).n_train == 4
    # Markdown tables and the manifest
    md = (cfg.fig_dir / "segmentation" / "table2.md").read_text()
    assert "Styled-Diff-1" in md and "0.2556" in md and "not provided" in md
    assert "| add " in (cfg.fig_dir / "segmentation" / "table3.md").read_text()
    m = json.loads((cfg.fig_dir / "segmentation" / "manifest.json").read_text())
    assert {a["paper_ref"] for a in m["artifacts"]} >= {"Table 2", "Table 3"}
    # a rerun reuses everything; a changed setting retrains (only the selected cell here)
    assert S.run_segmentation(cfg, progress=False)["trained"] == 0
    before = pd.read_csv(res_p, keep_default_na=False)
    cfg2 = cfg.replace(seg_lr=5e-4)
    s2 = S.run_segmentation(cfg2, progress=False, only=[{"table": 2, "type": "diff", "n": 1}])
    assert s2["trained"] == 1
    after = pd.read_csv(res_p, keep_default_na=False)
    k = (after.table == 2) & (after.type == "diff") & (after.n == 1)
    assert after[k].iou.iloc[0] != before[k].iou.iloc[0] or after[k].dice_loss.iloc[0] != before[k].dice_loss.iloc[0]
    # every other trained cell ran under the old seg_lr: stale, without scores; untrainable cells keep their status
    old_ok = (before.status == "ok") & ~k
    assert old_ok.sum() >= 5 and after[k].status.iloc[0] == "ok"
    assert (after[old_ok].status == S.STALE).all() and (
        after[old_ok][["dice_loss", "dice", "iou", "val_iou"]] == ""
    ).all().all()
    assert after[~old_ok & ~k].status.tolist() == before[~old_ok & ~k].status.tolist()
    # … and the statistics stage uses none of them
    from diffusegen import audit as A, statistics as ST

    seg = ST.read_results(cfg2)
    assert A.values({"seg": seg}, 2, "iou", "diff").index.tolist() == [(1, 0)]
    assert (
        len(A.values({"seg": seg}, 2, "iou", "styled-diff")) == 0 and len(A.values({"seg": seg}, 3, "iou", "real")) == 0
    )
    t2, _ = ST.table2_stats(cfg2, seg, A.load_paper_tables())
    assert (
        S.STALE in t2.set_index("type").loc["Styled-Diff", "status"]
        and t2.set_index("type").loc["Styled-Diff", "DL"] == ""
    )


def test_gan_rows_and_replace_mode(stage, tmp_path, kvasir_root):
    "A GAN set in the SinGAN-Seg layout: its test-image samples are dropped, its images resized; Table 3 in replace mode."
    from diffusegen.data import load_split

    sp = load_split(stage)
    ids_sorted = sorted(sp.id)
    train = sorted(sp[sp.split == "train"].id)
    test_id = sorted(sp[sp.split == "test"].id)[0]
    _fake_gan(stage, tmp_path / "gan", ids_sorted, train[:3] + [test_id])
    pd.DataFrame({"chk_id": [ids_sorted.index(i) + 1 for i in ids_sorted], "source_id": ids_sorted}).to_csv(
        tmp_path / "gan" / "chk_id_map.csv", index=False
    )
    cfg = stage.replace(gan_root=str(tmp_path / "gan"), table3_mode="replace", out=str(tmp_path / "o"))
    import shutil

    shutil.copytree(stage.run_dir / "data", cfg.run_dir / "data")
    shutil.copytree(stage.run_dir / "synthetic", cfg.run_dir / "synthetic")
    sets = S.Sets(cfg)
    g = sets.synthetic("gan")
    assert sorted(set(g.source_id)) == train[:3] and len(g) == 6 and g["image"].iloc[0].shape == (32, 32, 3)
    assert "dropped" in sets.notes["gan"]
    s = S.run_segmentation(
        cfg, progress=False, only=[{"table": 2, "type": "gan", "n": 1}, {"table": 3, "type": "gan", "n": 4, "r": 2}]
    )
    res = pd.DataFrame(s["results"])
    gan2 = res[(res.table == 2) & (res.type == "gan") & (res.n == 1)].iloc[0]
    assert gan2.status == "ok" and (gan2.n_train, gan2.n_val) == (2, 1)
    t3 = res[(res.table == 3) & (res.type == "gan")]
    assert set(t3["mode"]) == {"replace"}


def test_gan_numbered_from_1_gives_n_per_source_and_first_m_siblings(stage, tmp_path):
    "A SinGAN-Seg set numbers its 10 samples per source 1..10: Table 2 takes N per source, Table 3 the first M."
    from diffusegen.data import load_split
    from diffusegen.styling import real_images

    sp = load_split(stage)
    train = sorted(sp[sp.split == "train"].id)
    real, masks = real_images(stage)
    root = tmp_path / "gan"
    root.mkdir()
    for c, sid in enumerate(train, 1):
        for i in range(1, 11):
            Image.fromarray(np.ascontiguousarray(np.roll(real[sid], i, axis=1))).save(
                root / f"chk_id_{c}_gen_scale_0_{i}_img.png"
            )
            Image.fromarray(masks[sid] * 255).save(root / f"chk_id_{c}_gen_scale_0_{i}_mask.png")
    pd.DataFrame({"chk_id": range(1, len(train) + 1), "source_id": train}).to_csv(root / "chk_id_map.csv", index=False)
    cfg = stage.replace(gan_root=str(root), samples_per_image=3, table3_alpha=1.0)
    sets = S.Sets(cfg)
    g = sets.synthetic("gan")
    assert len(g) == 10 * len(train) and (g["sample"] == g["file_sample"] - 1).all()
    assert all(sorted(v) == list(range(10)) for v in g.groupby("source_id")["sample"].apply(list))
    fnum = lambda key: int(key.split("_gen_scale_0_")[1].split("_")[0])  # the file's own sample number
    for n in (1, 2, 3):  # Table 2: N samples per source
        tk, vk = S.cell_data(cfg, sets, dict(table=2, type="gan", n=n, r=0, mode="", repeat=0))["keys"]
        assert len(tk) + len(vk) == n * len(train) and {fnum(q) for q in tk + vk} == set(range(1, n + 1))
    cell = dict(table=3, type="gan", n=4, r=3, mode="add", repeat=0)  # Table 3: r of the first M = 3
    d = S.cell_data(cfg, sets, cell)
    syn = [q for q in d["keys"][0] if q.startswith("gan/")]
    assert d["counts"]["picked"] == 4 and len(syn) == 12 and {fnum(q) for q in syn} == {1, 2, 3}
    assert d["counts"]["short_of_r"] == 0 and d["counts"]["synthetic"] == 12
    d = S.cell_data(cfg.replace(samples_per_image=2), sets, cell)  # M = 2 < r = 3: each picked image is short
    syn = [q for q in d["keys"][0] if q.startswith("gan/")]
    assert len(syn) == 8 and {fnum(q) for q in syn} == {1, 2} and d["counts"]["short_of_r"] == 4


# --- small units that need no data ---


def test_scale_augmentation_is_isotropic():
    "ShiftScaleRotate's one scale for both axes: a square stays a square (albumentations 2 Affine with keep_ratio)."
    sq = np.zeros((64, 64), np.uint8)
    sq[24:40, 24:40] = 1
    sides = set()
    for seed in range(20):
        m = S.train_augmentation(seed)(image=np.zeros((64, 64, 3), np.uint8), mask=sq)["mask"]
        ys, xs = np.nonzero(m)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert abs(int(h) - int(w)) <= 1, (seed, h, w)
        sides.add(int(h))
    assert min(sides) <= 12 and max(sides) >= 20  # it does scale, within 0.5 … 1.5


def test_read_pair_follows_resize_mode_threshold_and_names_bad_files(tmp_path):
    im = np.zeros((32, 64, 3), np.uint8)
    im[:, :16] = [255, 0, 0]
    im[:, 16:] = [0, 0, 255]
    mk = np.zeros((32, 64), np.uint8)
    mk[:, :16] = 200
    Image.fromarray(im).save(tmp_path / "a.png")
    Image.fromarray(mk).save(tmp_path / "m.png")
    i1, m1 = S._read_pair(tmp_path / "a.png", tmp_path / "m.png", 32, "stretch", 128)
    i2, m2 = S._read_pair(tmp_path / "a.png", tmp_path / "m.png", 32, "center_crop", 128)
    assert m1.dtype == np.uint8 and m1[:, :8].all() and not m1[:, 8:].any() and i1[:, :6, 0].min() > 200
    assert not m2.any() and i2[..., 0].max() < 50  # the centre crop has no red column
    assert not S._read_pair(tmp_path / "a.png", tmp_path / "m.png", 32, "stretch", 201)[1].any()  # mask_threshold
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 8)
    with pytest.raises(S.DataError, match=r"bad\.png: .*(corrupt|not a readable)") as e:
        S._read_pair(tmp_path / "bad.png", tmp_path / "m.png", 32)
    assert "\n" not in str(e.value)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(S.DataError, match=r"empty\.png: empty file"):
        S._read_pair(tmp_path / "a.png", tmp_path / "empty.png", 32)


def _ledger_rows(cells, hashes):
    return pd.DataFrame(
        [
            dict(
                **c,
                seed=1,
                dice_loss=0.3,
                dice=0.7,
                iou=0.6,
                val_iou=0.6,
                best_epoch=1,
                epochs=1,
                n_train=8,
                n_val=2,
                n_test=8,
                encoder="x",
                status="ok",
                n_syn=0,
                short_of_r=0,
                class_iou="",
                class_dice="",
                settings_hash=h,
                seconds=1.0,
            )
            for c, h in zip(cells, hashes)
        ]
    )[S.LEDGER_COLUMNS]


def test_write_results_marks_rows_of_other_settings_stale(tmp_path):
    cfg = load_config("smoke", {"out": str(tmp_path)})
    for d in S.stage_dirs(cfg, "segmentation"):
        d.mkdir(parents=True, exist_ok=True)
    cells = S.grid(cfg)[:3]
    current = {S._key(c): h for c, h in zip(cells, ["h0", "new", "h2"])}  # cell 1's settings changed since its row
    res = S.write_results(cfg, _ledger_rows(cells, ["h0", "h1", "h2"]), cells, current)
    assert res.status.tolist() == ["ok", S.STALE, "ok"] and np.isnan(res.iou.iloc[1]) and res.iou.iloc[0] == 0.6
    disk = pd.read_csv(S.results_paths(cfg)[1], keep_default_na=False)
    assert (
        list(disk.columns) == S.RESULT_COLUMNS
        and disk.status.tolist() == ["ok", S.STALE, "ok"]
        and disk.iou.iloc[1] == ""
    )
    assert S.read_ledger(cfg).iou.tolist() == [0.6, 0.6, 0.6]  # the ledger keeps the row until the cell retrains


def test_read_ledger_schema(tmp_path):
    cfg = load_config("smoke", {"out": str(tmp_path)})
    p = S.results_paths(cfg)[0]
    p.parent.mkdir(parents=True)
    assert S.read_ledger(cfg).columns.tolist() == S.LEDGER_COLUMNS  # no ledger yet: empty
    p.write_text("table,type,n\n2,real,1\n")
    with pytest.raises(S.DataError, match=r"cells\.csv: missing column\(s\) r, mode, repeat"):
        S.read_ledger(cfg)
    p.write_text("")
    with pytest.raises(S.DataError, match=r"cells\.csv: not a readable cells ledger"):
        S.read_ledger(cfg)
    old = [c for c in S.LEDGER_COLUMNS if c not in ("n_syn", "short_of_r")]  # written before the two columns existed
    led = _ledger_rows(S.grid(cfg)[:1], ["h"])
    led[old].to_csv(p, index=False)
    got = S.read_ledger(cfg)
    assert got.columns.tolist() == S.LEDGER_COLUMNS and got.n_syn.iloc[0] == "" and got.iou.iloc[0] == 0.6
    led.assign(n="x").to_csv(p, index=False)
    with pytest.raises(S.DataError, match=r"cells\.csv: non-numeric n"):
        S.read_ledger(cfg)


def test_ledger_of_an_earlier_version_resumes_without_training(tmp_path, monkeypatch):
    """A cells.csv as the versions before n_syn / short_of_r wrote it (literal text): every cell whose settings hash is
    the current one is reused, nothing is trained again; the ledger is then rewritten in the current schema."""
    cfg = load_config(
        "smoke",
        {"out": str(tmp_path), "table2_types": "real diff", "table2_n": "1 2", "table3_n": "16", "table3_types": ""},
    )
    cells = S.grid(cfg)
    p = S.results_paths(cfg)[0]
    p.parent.mkdir(parents=True)
    lines = [
        "table,type,n,r,mode,repeat,seed,dice_loss,dice,iou,val_iou,best_epoch,epochs,n_train,n_val,n_test,encoder,status,settings_hash,seconds"
    ]
    lines += [
        f"{c['table']},{c['type']},{c['n']},{c['r']},{c['mode']},{c['repeat']},{S.cell_seed(cfg, c)},0.3,0.7,0.6,0.65,1,1,8,2,8,"
        f"{cfg.seg_encoder},ok,0123abcd,1.5"
        for c in cells
    ]
    p.write_text("\n".join(lines) + "\n")
    z = (np.zeros((3, 8, 8, 3), np.uint8), np.zeros((3, 8, 8), np.uint8))

    class FakeSets:
        test, notes = z, {}

        def __init__(self, cfg):
            pass

    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(S, "Sets", FakeSets)
    monkeypatch.setattr(
        S, "cell_data", lambda cfg, sets, cell: {"train": z, "val": z, "counts": {"synthetic": 3, "short_of_r": 0}}
    )
    monkeypatch.setattr(S, "cell_hash", lambda cfg, sets, cell: "0123abcd")  # read as text: the leading 0 stays
    monkeypatch.setattr(S, "train_cell", no_training)
    s = S.run_segmentation(cfg, progress=False)
    assert (s["trained"], s["reused"], s["ok"]) == (0, len(cells), len(cells))
    res = pd.read_csv(S.results_paths(cfg)[1], keep_default_na=False)
    assert res.status.tolist() == ["ok"] * len(cells) and res.iou.tolist() == [0.6] * len(cells)
    led = S.read_ledger(cfg)
    assert led.columns.tolist() == S.LEDGER_COLUMNS and led.n_syn.astype(int).tolist() == [3] * len(cells)
    assert led.settings_hash.tolist() == ["0123abcd"] * len(cells) and led.seconds.tolist() == [1.5] * len(cells)
    # the same ledger under another hash for one cell: that cell (only) trains
    trained = []
    monkeypatch.setattr(S, "cell_hash", lambda cfg, sets, cell: "new" if cell["n"] == 2 else "0123abcd")
    monkeypatch.setattr(
        S,
        "train_cell",
        lambda *a, **k: (
            trained.append(1)
            or {"dice_loss": 0.2, "dice": 0.8, "iou": 0.7, "val_iou": 0.7, "best_epoch": 1, "epochs": 1, "state": {}}
        ),
    )
    s = S.run_segmentation(cfg, progress=False)
    assert (s["trained"], s["reused"]) == (1, len(cells) - 1) and len(trained) == 1


# --- label agreement and the label filter ---


def test_label_agreement_drops_for_shifted_masks_and_the_filter_removes_them(tmp_path):
    """Procedural polyps: a Diff set whose sample 0 is the real pair (a right label) and sample 1 the same image with its
    mask moved by half the image (a wrong label). The Real cell's segmenter (real training images only) agrees with the
    right labels and not with the moved ones; the filter keeps the right ones, leaves the full set as it was, and the
    filtered subset trains its own Table 2 row."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import numeric_dataset
    from diffusegen.data import load_split
    from diffusegen.sets import read_set, set_dir
    from diffusegen.styling import real_images

    cfg = load_config(
        "smoke",
        {
            "out": str(tmp_path),
            "table2_types": "real diff",
            "table2_n": "1",
            "table3_n": "4",
            "table3_types": "",
            "seg_epochs": 15,  # enough for a real-only segmenter that finds the procedural polyps
            "seg_lr": 3e-3,
            "filtered_types": "diff",
            "label_min_iou": 0.2,
        },
    )
    run_data(cfg, numeric_dataset(tmp_path / "data", n=24), progress=False)
    real, masks = real_images(cfg)
    ids = sorted(load_split(cfg).query("split == 'train'").id)[:10]
    d, rows, S_ = set_dir(cfg, "diff"), [], cfg.image_size
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    for sid in ids:
        for j, m in enumerate((masks[sid], np.roll(masks[sid], (S_ // 2, S_ // 2), axis=(0, 1)))):
            Image.fromarray(real[sid]).save(d / "images" / f"{sid}_{j}.png")
            Image.fromarray(m.astype(np.uint8) * 255).save(d / "masks" / f"{sid}_{j}.png")
            rows.append(dict(file=f"images/{sid}_{j}.png", mask_file=f"masks/{sid}_{j}.png", source_id=sid, sample=j))
    pd.DataFrame(rows).to_csv(d / "manifest.csv", index=False)
    s = S.run_segmentation(cfg, progress=False)
    per = pd.read_csv(S.agreement_paths(cfg)[2], dtype={"source_id": str})
    diff = per[per.type == "diff"]
    right, moved = diff[diff["sample"] == 0].iou, diff[diff["sample"] == 1].iou
    assert len(right) == len(moved) == 10
    real_iou = per[per.type == "real"].iou.median()
    assert right.median() > moved.median() + 0.3, (right.tolist(), moved.tolist(), real_iou)  # the agreement drops
    assert (moved < cfg.label_min_iou).mean() >= 0.9  # nearly every moved mask falls below the bar …
    kept = read_set(cfg, "diff-filtered")
    n_kept = lambda j: int((kept["sample"].astype(int) == j).sum())
    assert n_kept(1) <= 1 and n_kept(0) >= 5, (n_kept(0), n_kept(1))  # … and is filtered out; most right ones stay
    assert (kept.label_iou >= cfg.label_min_iou).all() and len(read_set(cfg, "diff")) == 20  # the full set stays
    f = {r["from"]: r for r in s["label_agreement"]["filter"]}["diff"]
    assert f["dropped"] == 20 - len(kept) and f["samples"] == 20
    res = pd.read_csv(S.results_paths(cfg)[1], keep_default_na=False)
    row = res[(res.type == "diff-filtered") & (res.table == 2)].iloc[0]
    assert row.status == "ok" and row.n_train + row.n_val == (kept["sample"].astype(int) == 0).sum()
    assert (cfg.fig_dir / "segmentation" / "label_agreement.png").exists()
    t = pd.read_csv(cfg.fig_dir / "segmentation" / "label_agreement.csv").set_index("type")
    assert t.loc["Diff", "IoU q25"] < t.loc["Real", "label IoU median"]  # half the Diff labels are wrong
    # a rerun trains nothing and measures the same
    assert S.run_segmentation(cfg, progress=False)["trained"] == 0
    assert pd.read_csv(S.agreement_paths(cfg)[2], dtype={"source_id": str}).iou.tolist() == per.iou.tolist()
    # one home for the real-only segmenter: the Real cell's kept checkpoint; segmenter.json points to it, no second copy
    legacy, rpath, _ = S.agreement_paths(cfg)
    rec = json.loads(rpath.read_text())
    h = rec["settings_hash"]
    ck = S.checkpoint_path(cfg, S.AGREEMENT_CELL, h)
    assert ck.exists() and not legacy.exists() and ck == rpath.parents[1] / rec["checkpoint"]
    # a run of an earlier version kept the weights only as agreement/segmenter.safetensors: read without training, the
    # copy becomes the cell's checkpoint, and the agreement is the same
    ck.rename(legacy)
    import diffusegen.segmentation as SM

    real_train = SM.train_cell
    SM.train_cell = lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again"))
    try:
        s3 = S.run_segmentation(cfg, progress=False)
    finally:
        SM.train_cell = real_train
    assert s3["trained"] == 0 and s3["label_agreement"] is not None
    assert ck.exists() and not legacy.exists()
    assert pd.read_csv(S.agreement_paths(cfg)[2], dtype={"source_id": str}).iou.tolist() == per.iou.tolist()


def test_memorized_samples_are_flagged_and_dropped_with_their_reason(tmp_path):
    """A Diff set of procedural polyps whose samples have their polyp region repainted (noise), except one sample that
    is an exact copy of another training image. The memorization audit (§2.6) flags that one only; its flags, written
    through the data-set contract, make the filter drop it from diff-filtered with the reason `memorized` (the label
    filter is off: label_min_iou = 0); with filter_memorized = false it stays."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import numeric_dataset
    from diffusegen.data import dilate_mask
    from diffusegen.intrinsic import real_training_files
    from diffusegen.memorization import audit, read_rgb
    from diffusegen.sets import DROPPED, read_set, set_dir, write_memorization_flags

    cfg = load_config(
        "smoke",
        {
            "out": str(tmp_path),
            "table2_types": "real",
            "table2_n": "1",
            "table3_n": "4",
            "table3_types": "",
            "seg_epochs": 1,
            "filtered_types": "diff",
            "label_min_iou": 0.0,
        },
    )
    run_data(cfg, numeric_dataset(tmp_path / "data", n=24), progress=False)
    real = real_training_files(cfg)
    ims = {i: read_rgb(p) for i, p in zip(real.id, real.image_path)}
    mks = {i: (np.array(Image.open(p)) > 127).astype(np.uint8) for i, p in zip(real.id, real.mask_path)}
    ids = sorted(real.id)[:8]
    d, rows, rng = set_dir(cfg, "diff"), [], np.random.default_rng(0)
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    for sid in ids:
        im = ims[sid].copy()
        reg = dilate_mask(mks[sid], cfg.dilation) > 0
        im[reg] = rng.integers(0, 256, (int(reg.sum()), 3))  # the polyp region repainted: no copy of anything
        im, mk = (ims[ids[1]], mks[ids[1]]) if sid == ids[0] else (im, mks[sid])  # the copy: ids[1]'s own image
        Image.fromarray(im).save(d / "images" / f"{sid}_0.png")
        Image.fromarray(mk * 255).save(d / "masks" / f"{sid}_0.png")
        rows.append(dict(file=f"images/{sid}_0.png", mask_file=f"masks/{sid}_0.png", source_id=sid, sample=0))
    pd.DataFrame(rows).to_csv(d / "manifest.csv", index=False)
    import shutil

    shutil.copytree(
        d, set_dir(cfg, "copy-paste")
    )  # the same files as a Copy-Paste set, which copies real pixels by design
    # the audit with a cheap feature (centred grey pixels, so cosine is a correlation) in place of FID Inception
    feats = lambda files: np.stack([(g := read_rgb(f, 32).mean(-1).ravel()) - g.mean() for f in files])
    syn = read_set(cfg, "diff").assign(type="Diff")
    a = audit(cfg, syn, real, feats)
    assert a.flagged.tolist() == [f.endswith(f"{ids[0]}_0.png") for f in a.image_path], a[["ssim_nn", "cos_nn"]]
    cp = read_set(cfg, "copy-paste").assign(type="Copy-Paste")[["type", "image_path", "source_id"]]
    cp = cp.assign(flagged=True, copy_of_source=True, copy_of_other=False)  # as the audit flags its kept polyp
    write_memorization_flags(cfg, pd.concat([a, cp], ignore_index=True))
    s = S.run_segmentation(cfg, progress=False)
    copy = f"images/{ids[0]}_0.png"
    kept = read_set(cfg, "diff-filtered")
    assert copy not in set(kept.file) and len(kept) == 7
    dropped = pd.read_csv(set_dir(cfg, "diff-filtered") / DROPPED, dtype=str, keep_default_na=False)
    assert dict(zip(dropped.file, dropped.dropped_by)) == {copy: "memorized"}
    f = {r["from"]: r for r in s["label_agreement"]["filter"]}["diff"]
    assert (f["dropped_by_memorized"], f["dropped_by_label"], f["memo_measured"]) == (1, 0, 8)
    fc = {r["from"]: r for r in s["label_agreement"]["filter"]}["copy-paste"]
    assert (fc["filter_memorized"], fc["kept"]) == (False, 8)  # the memorization flags do not apply to copy-paste
    fj = json.loads((set_dir(cfg, "diff-filtered") / "filter.json").read_text())
    assert fj["provenance"]["memorization"]["used"] and fj["provenance"]["memorization"]["sha256"]
    t = pd.read_csv(cfg.fig_dir / "segmentation" / "label_filter.csv")
    assert t.set_index("from").loc["diff", "dropped_by_memorized"] == 1
    # the switch off: the label filter alone, the copy stays (and the notes say why)
    s2 = S.run_segmentation(cfg.replace(filter_memorized=False), progress=False)
    assert copy in set(read_set(cfg, "diff-filtered").file)
    assert {r["from"]: r for r in s2["label_agreement"]["filter"]}["diff"]["dropped"] == 0
