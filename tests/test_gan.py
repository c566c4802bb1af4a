"""The GAN baseline's data (§2.6): a tiny SinGAN-Seg set in its published layout, built here from real Kvasir images,
is mapped to its real source images by checkpoint id (a 1-based index into the sorted ids), not by file order; a set
numbered one off is refused by the mask check, and a malformed chk_id_map.csv is one line naming it."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from diffusegen.core import load_config, DataError
from diffusegen.gan import load_gan, dataset_ids


def test_load_gan_maps_by_chk_id(kvasir_root, tmp_path):
    cfg = load_config("smoke", {"data_root": str(kvasir_root), "gan_root": str(tmp_path / "gan"), "out": str(tmp_path)})
    ids = dataset_ids(cfg)
    assert len(ids) == 1000 and ids == sorted(ids)
    (tmp_path / "gan" / "sub").mkdir(parents=True)
    chks = [7, 2, 350]  # not in sorted order, one beyond 348
    for c in chks:
        src = ids[c - 1]
        img = Image.open(kvasir_root / "images" / f"{src}.jpg").convert("RGB").resize((32, 32))
        mask = Image.open(kvasir_root / "masks" / f"{src}.jpg").convert("L").resize((32, 32))
        for i in range(2):
            img.save(tmp_path / "gan" / "sub" / f"chk_id_{c}_gen_scale_0_{i}_img.png")
            mask.save(tmp_path / "gan" / "sub" / f"chk_id_{c}_gen_scale_0_{i}_mask.png")
    (tmp_path / "gan" / "notes.png").write_bytes(b"")  # other files are ignored
    g = load_gan(cfg)
    assert list(g.columns[:4]) == ["source_id", "image_path", "mask_path", "sample"] and len(g) == 6
    for r in g.itertuples():
        assert r.source_id == ids[r.chk_id - 1]
        want = np.asarray(Image.open(kvasir_root / "images" / f"{r.source_id}.jpg").convert("RGB").resize((32, 32)))
        assert (np.asarray(Image.open(r.image_path)) == want).all()  # the file really is that source's image
    assert load_gan(cfg.replace(gan_root="none")) is None
    (tmp_path / "gan" / "sub" / "chk_id_2_gen_scale_0_0_mask.png").unlink()
    with pytest.raises(DataError, match="has no mask"):
        load_gan(cfg)


def _write_set(root, kvasir_root, ids, chks, source_of):
    root.mkdir(parents=True, exist_ok=True)
    for c in chks:
        src = ids[source_of(c)]
        Image.open(kvasir_root / "images" / f"{src}.jpg").convert("RGB").resize((32, 32)).save(
            root / f"chk_id_{c}_gen_scale_0_0_img.png"
        )
        Image.open(kvasir_root / "masks" / f"{src}.jpg").convert("L").resize((32, 32)).save(
            root / f"chk_id_{c}_gen_scale_0_0_mask.png"
        )


def test_shifted_numbering_is_caught(kvasir_root, tmp_path):
    "A partial download of a 0-based set (no chk_id 0 among the files) read as 1-based: every id one off, refused."
    cfg = load_config("smoke", {"data_root": str(kvasir_root), "gan_root": str(tmp_path / "gan"), "out": str(tmp_path)})
    ids = dataset_ids(cfg)
    chks = [3, 10, 41, 200, 347]
    _write_set(tmp_path / "gan", kvasir_root, ids, chks, lambda c: c)  # chk c is ids[c]: 0-based
    with pytest.raises(DataError, match="mapping looks shifted: .* the id after each assumed source"):
        load_gan(cfg)
    g = load_gan(cfg, base=0)  # the right base: accepted
    assert [ids.index(s) for s in g.source_id] == chks and g.attrs["mapping_check"]["mean_iou"] > 0.6
    pd.DataFrame({"chk_id": chks, "source_id": [ids[c] for c in chks]}).to_csv(
        tmp_path / "gan" / "chk_id_map.csv", index=False
    )
    assert list(load_gan(cfg).source_id) == [ids[c] for c in chks]  # or an explicit map
    _write_set(tmp_path / "gan0", kvasir_root, ids, [0, 5], lambda c: c)  # a chk_id 0 is never read as 1-based
    with pytest.raises(DataError, match="gan0: SinGAN-Seg chk_id 0 is outside .* chk_id_map.csv"):
        load_gan(cfg.replace(gan_root=str(tmp_path / "gan0")))


@pytest.mark.parametrize(
    "text,msg",
    [
        ("chk_id,source_id\n1,cju0qkwl35piu0993l0dewei2\nx2,abc\n", "chk_id 'x2' is not"),
        ("chk,source\n1,a\n", "needs columns chk_id, source_id"),
        ("chk_id,source_id\n1,\n", "chk_id 1 has no source_id"),
    ],
)
def test_malformed_chk_id_map(tmp_path, text, msg):
    d = tmp_path / "gan"
    d.mkdir()
    for part in ("img", "mask"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / f"chk_id_1_gen_scale_0_0_{part}.png")
    (d / "chk_id_map.csv").write_text(text)
    cfg = load_config("smoke", {"gan_root": str(d), "out": str(tmp_path)})
    with pytest.raises(DataError, match=f"chk_id_map.csv: {msg}"):
        load_gan(cfg, ids_sorted=["a"], check=False)
