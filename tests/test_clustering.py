"The clustering stage (§2.3) on real Kvasir-SEG pairs with the real FID Inception: features, cache, KMeans, ARI, outputs."

import json
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors.numpy import load_file
from diffusegen.core import DataError, load_config, stage_dirs
from diffusegen.data import load_split, run_data
from diffusegen.core import sha256_file
from diffusegen.weights import resolve_weights
import diffusegen.clustering as clu
from diffusegen.clustering import (
    cached_pair_features,
    feature_cache_key,
    kmeans_labels,
    load_clusters,
    pair_features,
    paper_agreement,
    run_clustering,
)


@pytest.fixture(scope="module")
def inception():
    cfg = load_config("smoke")
    return resolve_weights("inception", cfg)


@pytest.fixture(scope="module")
def smoke_run(kvasir_root, tmp_path_factory):
    "The data stage, then the clustering stage, on the smoke profile (16 real training images, k = 2)."
    out = tmp_path_factory.mktemp("smoke")
    cfg = load_config("smoke", {"out": str(out)})
    run_data(cfg, kvasir_root, progress=False)
    return cfg, run_clustering(cfg, progress=False)


def _first_pairs(root, n):
    ids = sorted(p.stem for p in (root / "images").glob("*.jpg"))[:n]
    return [(root / "images" / f"{i}.jpg", root / "masks" / f"{i}.jpg") for i in ids]


def test_features_are_image_then_mask_halves(kvasir_root, inception, tmp_path):
    model, _ = inception
    ((img, mask),) = _first_pairs(kvasir_root, 1)
    flipped = tmp_path / "flipped.png"  # same image, another mask: its mirror image
    Image.open(mask).convert("L").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    f = pair_features([(img, mask), (img, flipped)], model, progress=False)
    assert f.shape == (2, 4096) and f.dtype == np.float32
    np.testing.assert_allclose(f[0, :2048], f[1, :2048], atol=1e-4)  # the image half depends on the image only
    assert np.abs(f[0, 2048:] - f[1, 2048:]).mean() > 100 * np.abs(f[0, :2048] - f[1, :2048]).mean() + 1e-3


def test_cache_returns_the_same_features_without_recomputing(kvasir_root, inception, tmp_path, monkeypatch):
    model, prov = inception
    pairs = _first_pairs(kvasir_root, 2)
    f1, path, hit = cached_pair_features(pairs, model, prov["sha256"], tmp_path, progress=False)
    assert not hit and path.exists() and path.parent == tmp_path
    mtime = path.stat().st_mtime_ns

    def no_forward(*a, **k):
        raise AssertionError("the Inception ran although the features were cached")

    monkeypatch.setattr(clu, "_forward", no_forward)
    f2, path2, hit2 = cached_pair_features(pairs, model, prov["sha256"], tmp_path, progress=False)
    assert hit2 and path2 == path and path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(f1, f2)
    # what the key depends on: other weights, another size, another mask mode, another file set
    key = feature_cache_key(pairs, prov["sha256"], 256)
    assert key == path.stem
    assert (
        len(
            {
                key,
                feature_cache_key(pairs, "0" * 64, 256),
                feature_cache_key(pairs, prov["sha256"], 128),
                feature_cache_key(pairs, prov["sha256"], 256, "grey"),
                feature_cache_key(pairs[:1], prov["sha256"], 256),
            }
        )
        == 5
    )


def test_stage_on_smoke_writes_clusters_tables_figures_manifest(smoke_run):
    cfg, summary = smoke_run
    split = load_split(cfg)
    train_ids = split[split.split == "train"].id.tolist()
    cl = load_clusters(cfg)
    assert list(cl.columns) == ["id", "cluster"]
    assert cl.id.tolist() == train_ids and len(train_ids) == 16
    assert sorted(cl.cluster.unique()) == list(range(cfg.n_clusters))
    assert summary["feature_dim"] == 4096 and summary["n_images"] == 16 and sum(summary["sizes"]) == 16
    run_d, fig_d = stage_dirs(cfg, "clustering")
    sizes = pd.read_csv(fig_d / "cluster_sizes.csv")
    assert sizes["size"].sum() == 16 and len(sizes) == cfg.n_clusters
    for name in ("fig3_clusters.png", "projection.png", "contingency.png"):
        with Image.open(fig_d / name) as im:
            assert im.size[0] > 200 and im.size[1] > 100, name
    m = json.loads((fig_d / "manifest.json").read_text())
    w = m["weights"][0]
    assert w["name"] == "inception" and not w["substitute"] and w["sha256"] == sha256_file(w["source"])
    # the smoke images are 16 of the paper's 348: the agreement is measured (k=2 against the paper's labels, and said so)
    assert m["summary"]["ari_paper"] == summary["ari_paper"] and -1 <= summary["ari_paper"] <= 1
    ari = [a for a in m["artifacts"] if "adjusted Rand" in a["title"]]
    assert ari and ari[0]["paper_value"] == "ARI 1.0 = identical clustering" and ari[0]["paper_ref"].startswith("§2.3")
    assert any("the paper used k=20" in n for n in m["notes"])
    assert "PCA" in summary["projection"]  # 16 points: too few for t-SNE


def test_kmeans_is_deterministic_and_ari_ignores_label_names(smoke_run):
    cfg, summary = smoke_run
    feats = load_file(summary["feature_cache"])["features"]
    a, _ = kmeans_labels(feats, 3, cfg.kmeans_seed, cfg.kmeans_n_init)
    b, _ = kmeans_labels(feats, 3, cfg.kmeans_seed, cfg.kmeans_n_init)
    np.testing.assert_array_equal(a, b)
    renamed = np.array([7, 3, 11])[a]  # the same partition under other names
    assert paper_agreement(renamed, a)["ari"] == 1.0 and paper_agreement(renamed, a)["matched_share"] == 1.0
    # and the stage's labels are those of kmeans_labels on the cached features
    np.testing.assert_array_equal(
        kmeans_labels(feats, cfg.n_clusters, cfg.kmeans_seed, cfg.kmeans_n_init)[0], load_clusters(cfg).cluster.values
    )


def test_second_run_reads_the_feature_cache(smoke_run, monkeypatch):
    cfg, summary = smoke_run
    monkeypatch.setattr(clu, "_forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = run_clustering(cfg, progress=False)
    assert again["features_cached"] and again["feature_cache"] == summary["feature_cache"]
    assert again["sizes"] == summary["sizes"] and again["ari_paper"] == summary["ari_paper"]


def test_too_many_clusters_and_missing_inputs_are_one_line_errors(smoke_run, tmp_path):
    cfg, _ = smoke_run
    with pytest.raises(DataError, match=r"16 training images, fewer than n_clusters=17") as e:
        run_clustering(cfg.replace(n_clusters=17), progress=False)
    assert "\n" not in str(e.value)
    fresh = load_config("smoke", {"out": str(tmp_path)})
    with pytest.raises(DataError, match="run the data stage first"):
        run_clustering(fresh, progress=False)
    with pytest.raises(DataError, match="run the clustering stage first"):
        load_clusters(fresh)


def test_shipped_features_are_the_paper_ids_as_the_demo_reads_them(inception):
    """The shipped features (weights/kvasir-seg-paper348.features.safetensors): the paper's 348 Kvasir-SEG training
    pairs, the FID Inception's sha256, and the demo's and the paper's feature settings, with the key the stage looks up."""
    from pathlib import Path
    from safetensors import safe_open

    files = clu.shipped_feature_files()
    assert [f.name for f in files] == ["kvasir-seg-paper348.features.safetensors"]
    with safe_open(str(files[0]), "np") as h:
        meta, a = h.metadata(), h.get_tensor("features")
    paper = pd.read_csv(Path(__file__).resolve().parents[1] / "data" / "paper" / "paper_clusters_k20.csv", dtype=str)
    assert sorted(json.loads(meta["images"])) == sorted(f"{i}.jpg" for i in paper.iloc[:, 0])
    assert a.shape == (348, 4096) and a.dtype == np.float32 and np.isfinite(a).all()
    for p in ("demo", "paper"):
        cfg = load_config(p)
        assert (meta["size"], meta["mask_mode"]) == (str(cfg.feature_size), cfg.cluster_mask_read)
    assert meta["weights_sha256"] == inception[1]["sha256"] and len(meta["key"]) == 24


def test_demo_on_kvasir_reads_the_shipped_features(kvasir_root, tmp_path, monkeypatch):
    "The demo's clustering stage on Kvasir-SEG: the key of these files is the shipped one, so no Inception pass runs."
    cfg = load_config("demo", {"out": str(tmp_path)})
    run_data(cfg, kvasir_root, progress=False)

    def no_forward(*a, **k):
        raise AssertionError("the Inception ran although the features were shipped")

    monkeypatch.setattr(clu, "_forward", no_forward)
    s = run_clustering(cfg, progress=False)
    assert s["features_cached"] and s["features_shipped"] and s["n_images"] == 348
    m = json.loads((stage_dirs(cfg, "clustering")[0] / "manifest.json").read_text())
    assert "the features shipped with diffusegen" in json.dumps(m["notes"])
    (w,) = [w for w in m["weights"] if w["name"] == "clustering features (shipped)"]  # their sha256 in the provenance
    assert w["sha256"] == sha256_file(clu.shipped_feature_files()[0])
