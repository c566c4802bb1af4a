"""The GAN baseline's data (§2.6): a tiny SinGAN-Seg set in its published layout, built here from real Kvasir images,
is mapped to its real source images by checkpoint id (a 1-based index into the sorted ids), not by file order."""
import numpy as np
import pytest
from PIL import Image
from diffusegen.core import load_config, DataError
from diffusegen.gan import load_gan, dataset_ids

def test_load_gan_maps_by_chk_id(kvasir_root, tmp_path):
    cfg = load_config("smoke", {"data_root": str(kvasir_root), "gan_root": str(tmp_path/"gan"), "out": str(tmp_path)})
    ids = dataset_ids(cfg)
    assert len(ids) == 1000 and ids == sorted(ids)
    (tmp_path/"gan"/"sub").mkdir(parents=True)
    chks = [7, 2, 350]                                       # not in sorted order, one beyond 348
    for c in chks:
        src = ids[c - 1]
        img = Image.open(kvasir_root/"images"/f"{src}.jpg").convert("RGB").resize((32, 32))
        mask = Image.open(kvasir_root/"masks"/f"{src}.jpg").convert("L").resize((32, 32))
        for i in range(2):
            img.save(tmp_path/"gan"/"sub"/f"chk_id_{c}_gen_scale_0_{i}_img.png")
            mask.save(tmp_path/"gan"/"sub"/f"chk_id_{c}_gen_scale_0_{i}_mask.png")
    (tmp_path/"gan"/"notes.png").write_bytes(b"")            # other files are ignored
    g = load_gan(cfg)
    assert list(g.columns[:4]) == ["source_id", "image_path", "mask_path", "sample"] and len(g) == 6
    for r in g.itertuples():
        assert r.source_id == ids[r.chk_id - 1]
        want = np.asarray(Image.open(kvasir_root/"images"/f"{r.source_id}.jpg").convert("RGB").resize((32, 32)))
        assert (np.asarray(Image.open(r.image_path)) == want).all()      # the file really is that source's image
    assert load_gan(cfg.replace(gan_root="none")) is None
    (tmp_path/"gan"/"sub"/"chk_id_2_gen_scale_0_0_mask.png").unlink()
    with pytest.raises(DataError, match="has no mask"): load_gan(cfg)
