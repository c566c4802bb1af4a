"`diffusegen data download` of the external test sets (§2.7): a local HTTP server, fabricated archives in the real layouts."

import dataclasses
import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from diffusegen import datasets as D
from diffusegen.cli import main
from diffusegen.core import DataError, load_config
from diffusegen.data import check_dataset, check_test_sets, find_pairs

from test_datasets import _Server, _closed_port_url


def _tif(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "TIFF")
    return b.getvalue()


def cvc_zip(n=4, top="CVC-ClinicDB") -> bytes:
    "CVC-ClinicDB's real layout: Original/<k>.tif (RGB, 384×288 scaled down) and Ground Truth/<k>.tif (grey, not 0/255)."
    rng, buf = np.random.default_rng(0), io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for k in range(1, n + 1):
            m = np.zeros((18, 24), np.uint8)
            m[4:12, 5 : 5 + 2 * k] = 250
            m[4, 5] = 100  # a grey pixel below the threshold: background
            zf.writestr(f"{top}/Original/{k}.tif", _tif(rng.integers(0, 255, (18, 24, 3), dtype=np.uint8)))
            zf.writestr(f"{top}/Ground Truth/{k}.tif", _tif(m))
    return buf.getvalue()


@pytest.fixture
def served(monkeypatch):
    "Point cvc-clinicdb at a URL (the registry's dataclass is frozen: a replaced entry)."

    def point(url):
        monkeypatch.setitem(
            D.EXTERNAL_SETS, "cvc-clinicdb", dataclasses.replace(D.EXTERNAL_SETS["cvc-clinicdb"], url=url)
        )

    return point


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_cvc_clinicdb_download_resumes_and_converts_to_a_test_set(tmp_path, served, capsys):
    payload = cvc_zip(4)
    cut = len(payload) // 2
    to = tmp_path / "external" / "cvc"
    with _Server(payload, cut_after=cut) as srv:
        served(srv.url)
        # the connection drops half-way: one line, the bytes kept for resuming
        assert main(["data", "download", "cvc-clinicdb", "--to", str(to), "--expected", "4", "--timeout", "10"]) == 2
        err = _err_line(capsys)
        assert "run again to resume from" in err and "CVC-ClinicDB.rar.part" in err and not to.exists()
        # the same command resumes with a Range request, checks the archive (here a zip), converts it
        assert main(["data", "download", "cvc-clinicdb", "--to", str(to), "--expected", "4", "--timeout", "10"]) == 0
        assert srv.requests == [("/kvasir-seg.zip", None), ("/kvasir-seg.zip", f"bytes={cut}-")]
    out = capsys.readouterr().out
    assert out.startswith("Terms: CVC-ClinicDB (Bernal et al.") and f"4 CVC-ClinicDB pairs in {to}" in out
    assert f"--set test_sets=cvc-clinicdb={to}" in out
    # provenance: the URL, the archive's sha256, the counts; the archive's own record beside it
    meta = json.loads((to / "dataset.json").read_text())
    assert meta["sha256"] == hashlib.sha256(payload).hexdigest() and meta["url"] == srv.url
    assert meta["pairs"] == meta["expected"] == 4 and meta["downloaded"] is True and meta["date"]
    assert (
        json.loads((tmp_path / "external" / "CVC-ClinicDB.rar.provenance.json").read_text())["sha256"] == meta["sha256"]
    )
    # ids stay strings, names match, masks are 0/255 PNG
    pairs, problems = find_pairs(to)
    assert not problems and [p.id for p in pairs] == ["1", "2", "3", "4"]
    assert all(p.image.stem == p.mask.stem for p in pairs)
    m = np.asarray(Image.open(to / "masks" / "2.png"))
    assert (
        m.dtype == np.uint8 and set(np.unique(m)) == {0, 255} and (m == 255).sum() == 8 * 4 - 1
    )  # the grey pixel is background
    # `data check` counts it against its known count, and the segmentation stage accepts it as a test set
    assert len(check_dataset(to, progress=False).valid) == 4
    assert main(["data", "check", str(to)]) == 0
    assert "CVC-ClinicDB: 4 of its 4 pairs" in capsys.readouterr().out
    cfg = load_config("smoke", {"out": str(tmp_path / "o"), "test_sets": f"cvc={to}"})
    assert check_test_sets(cfg) == [{"name": "cvc", "folder": str(to), "pairs": 4}]
    # a rerun finds the set and fetches nothing
    with _Server(b"") as srv2:
        served(srv2.url)
        assert main(["data", "download", "cvc-clinicdb", "--to", str(to), "--expected", "4"]) == 0
        assert srv2.requests == []
    # a file of the set removed: `data check` says it falls short (exit 1)
    (to / "images" / "4.png").unlink()
    (to / "masks" / "4.png").unlink()
    assert main(["data", "check", str(to)]) == 1 and "3 valid pairs, but CVC-ClinicDB has 4" in capsys.readouterr().out


def test_offline_is_one_line_naming_the_url_and_the_folder(tmp_path, served, capsys):
    url = _closed_port_url()
    served(url)
    assert main(["data", "download", "cvc-clinicdb", str(tmp_path / "ext"), "--timeout", "5"]) == 2
    err = _err_line(capsys)
    assert url in err and str(tmp_path / "ext" / "CVC-ClinicDB.rar") in err and "put it at" in err
    # then the archive put there by hand is used without the network (its sha256 recorded at this first sighting)
    (tmp_path / "ext").mkdir(exist_ok=True)
    (tmp_path / "ext" / "CVC-ClinicDB.rar").write_bytes(cvc_zip(3))
    assert (
        D.download_external("cvc-clinicdb", tmp_path / "ext", expected=3, progress=False)
        == tmp_path / "ext" / "cvc-clinicdb"
    )
    assert json.loads((tmp_path / "ext" / "cvc-clinicdb" / "dataset.json").read_text())["downloaded"] is False


def test_wrong_count_is_one_line_and_leaves_nothing(tmp_path, served, capsys):
    with _Server(cvc_zip(4)) as srv:
        served(srv.url)
        assert main(["data", "download", "cvc-clinicdb", "--to", str(tmp_path / "cvc")]) == 2
    err = _err_line(capsys)
    assert "4 CVC-ClinicDB image/mask pairs, expected 612" in err and "--expected 4" in err
    assert (
        not (tmp_path / "cvc").exists()
        and not list(tmp_path.glob(".cvc*"))
        and not list(tmp_path.glob(".cvc-clinicdb*"))
    )


def test_bad_archives_are_one_line(tmp_path, served, capsys):
    # a page instead of an archive (a share link's HTML): refused, the part file deleted, where to put it said
    with _Server(b"<html>sign in to download</html>") as srv:
        served(srv.url)
        assert main(["data", "download", "cvc-clinicdb", str(tmp_path / "a")]) == 2
    err = _err_line(capsys)
    assert "not an archive of a known format" in err and str(tmp_path / "a" / "CVC-ClinicDB.rar") in err
    assert not list((tmp_path / "a").iterdir())
    # a damaged RAR put there by hand: one line (no reader here, or the reader fails), saying how to go on
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "CVC-ClinicDB.rar").write_bytes(b"Rar!\x1a\x07\x01\x00" + bytes(64))
    assert main(["data", "download", "cvc-clinicdb", str(tmp_path / "b")]) == 2
    err = _err_line(capsys)
    assert "diffusegen data download cvc-clinicdb --from FOLDER" in err
    # an archive that is not CVC-ClinicDB
    (tmp_path / "c").mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("other/readme.txt", "x")
    (tmp_path / "c" / "CVC-ClinicDB.rar").write_bytes(buf.getvalue())
    assert main(["data", "download", "cvc-clinicdb", str(tmp_path / "c")]) == 2
    assert "holds no CVC-ClinicDB folders (Original/ beside Ground Truth/)" in _err_line(capsys)
    # the archive changed after its first sighting: its recorded sha256 no longer matches
    (tmp_path / "c" / "CVC-ClinicDB.rar").write_bytes(cvc_zip(2))
    assert main(["data", "download", "cvc-clinicdb", str(tmp_path / "c"), "--expected", "2"]) == 2
    assert "is not the sha256 recorded in CVC-ClinicDB.rar.provenance.json" in _err_line(capsys)


def test_polypgen_needs_a_login_then_converts_from_a_folder(tmp_path, capsys):
    assert main(["data", "download", "polypgen", str(tmp_path / "ext")]) == 2
    err = _err_line(capsys)
    assert "synapse.org" in err and "diffusegen data download polypgen --from FOLDER" in err
    src = tmp_path / "PolypGen2021_MultiCenterData_v3"
    for c in ("C1", "C2"):
        for k in ("100H0050", "200OLCV1_100H0011"):
            for sub, name, arr in (
                (f"images_{c}", f"{k}.jpg", np.full((16, 20, 3), 120, np.uint8)),
                (f"masks_{c}", f"{k}_mask.jpg", np.kron(np.eye(2, dtype=np.uint8), np.full((8, 10), 255, np.uint8))),
            ):
                (src / f"data_{c}" / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(src / f"data_{c}" / sub / name)
    seq = src / "sequenceData" / "positive" / "seq1" / "images_seq1"  # video sequences: not used
    seq.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(seq / "x.jpg")
    args = ["data", "download", "polypgen", str(tmp_path / "ext"), "--from", str(tmp_path)]
    assert main(args) == 2 and "4 PolypGen image/mask pairs, expected 1537" in _err_line(capsys)
    assert main([*args, "--expected", "4"]) == 0
    to = tmp_path / "ext" / "polypgen"
    assert [p.id for p in find_pairs(to)[0]] == [
        "C1_100H0050",
        "C1_200OLCV1_100H0011",
        "C2_100H0050",
        "C2_200OLCV1_100H0011",
    ]
    assert (to / "images" / "C1_100H0050.jpg").read_bytes() == (
        src / "data_C1" / "images_C1" / "100H0050.jpg"
    ).read_bytes()
    assert len(check_dataset(to, progress=False).valid) == 4


def test_registry_names_and_the_one_bundle(tmp_path):
    assert D.EXTERNAL_SETS["cvc-clinicdb"].n_pairs == 612 and D.EXTERNAL_SETS["cvc-colondb"].n_pairs == 380
    assert D.EXTERNAL_SETS["etis-laribpolypdb"].n_pairs == 196 and D.EXTERNAL_SETS["polypgen"].n_pairs == 1537
    assert D.external_dir("cvc-colondb").parts[-3:] == ("data", "external", "cvc-colondb")
    with pytest.raises(DataError, match="known: cvc-clinicdb"):
        D.download_external("cvc-300", tmp_path)
