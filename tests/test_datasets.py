"The procedural demo set and the dataset download (against a local HTTP server with Range support)."

import io
import json
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusegen.core import DataError
from diffusegen.datasets import (
    DATASETS,
    DEMO_AREA_RANGE,
    DEMO_VERSION,
    check_layout,
    demo_pair,
    download_dataset,
    make_demo_dataset,
    safe_extract,
)


# ---------------------------------------------------------------- demo set
@pytest.fixture(scope="module")
def demo8(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("d8") / "demo", n=8, size=96, seed=0)


def _bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix in (".jpg", ".png")}


def test_demo_deterministic_and_prefix_stable(demo8, tmp_path):
    again = make_demo_dataset(tmp_path / "again", n=8, size=96, seed=0)
    assert _bytes(again) == _bytes(demo8)  # same seed: byte-identical files
    five = make_demo_dataset(tmp_path / "five", n=5, size=96, seed=0)
    b5, b8 = _bytes(five), _bytes(demo8)
    assert len(b5) == 10 and all(b8[k] == v for k, v in b5.items())  # image i does not depend on n


def test_demo_other_seed_differs(demo8, tmp_path):
    other = make_demo_dataset(tmp_path / "s1", n=3, size=96, seed=1)
    for i in range(3):
        a = np.asarray(Image.open(demo8 / "images" / f"demo_{i:04d}.jpg"), dtype=float)
        b = np.asarray(Image.open(other / "images" / f"demo_{i:04d}.jpg"), dtype=float)
        assert np.abs(a - b).mean() > 5


def test_demo_images_and_masks(demo8):
    meta = json.loads((demo8 / "dataset.json").read_text())
    assert (meta["n"], meta["size"], meta["seed"], meta["generator_version"], meta["procedural"]) == (
        8,
        96,
        0,
        DEMO_VERSION,
        True,
    )
    assert "not real data" in (demo8 / "SOURCE.md").read_text()
    assert check_layout(demo8, 8) == 8
    shares = []
    for i in range(8):
        im = Image.open(demo8 / "images" / f"demo_{i:04d}.jpg")
        m = Image.open(demo8 / "masks" / f"demo_{i:04d}.png")
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (96, 96)
        assert m.format == "PNG" and m.size == (96, 96)
        a = np.asarray(m)
        assert set(np.unique(a).tolist()) == {0, 255}  # two-level and non-empty
        share = (a > 0).mean()
        shares.append(share)
        assert DEMO_AREA_RANGE[0] <= share <= DEMO_AREA_RANGE[1]
        assert meta["polyp_share"][i] == pytest.approx(share, abs=1e-6)
    assert len(set(shares)) > 1  # polyp sizes vary


def test_demo_area_range_many_draws():
    "The share stays in range over many draws, at a small size (discretisation) and the default one."
    for size in (48, 256):
        shares = [(np.asarray(demo_pair(7, i, size)[1]) > 0).mean() for i in range(40 if size == 48 else 8)]
        assert min(shares) >= DEMO_AREA_RANGE[0] and max(shares) <= DEMO_AREA_RANGE[1]
        if size == 48:
            assert max(shares) / min(shares) > 3  # small and large polyps both occur


def test_demo_polyp_differs_from_background():
    "The masked pixels are the drawn polyp: their colour statistics differ from a ring just outside the mask."
    from scipy.ndimage import binary_dilation

    diffs = []
    for i in range(6):
        im, m = demo_pair(0, i, 128)
        a, mk = np.asarray(im, dtype=float), np.asarray(m) > 0
        ring = binary_dilation(mk, iterations=4) & ~mk
        diffs.append(np.abs(a[mk].mean(0) - a[ring].mean(0)).max())
    assert np.median(diffs) > 8


def test_demo_reuse_and_replace(tmp_path):
    d = make_demo_dataset(tmp_path / "demo", n=3, size=64, seed=2)
    stamp = {p.name: p.stat().st_mtime_ns for p in (d / "images").iterdir()}
    assert make_demo_dataset(tmp_path / "demo", n=3, size=64, seed=2) == d
    assert {p.name: p.stat().st_mtime_ns for p in (d / "images").iterdir()} == stamp  # reused, not rewritten
    make_demo_dataset(tmp_path / "demo", n=2, size=64, seed=2)  # other parameters: rebuilt
    assert json.loads((d / "dataset.json").read_text())["n"] == 2 and len(list((d / "images").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp folders left


def test_demo_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="not a diffusegen demo set"):
        make_demo_dataset(tmp_path / "mine", n=2, size=32)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ---------------------------------------------------------------- download
def _kvasir_like_zip(n=4, top="Kvasir-SEG", extra=None) -> bytes:
    "A tiny zip with the Kvasir-SEG layout: <top>/images/<id>.jpg, <top>/masks/<id>.jpg, a bbox json."
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            for sub in ("images", "masks"):
                b = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(b, "JPEG")
                zf.writestr(f"{top}/{sub}/id{i:03d}.jpg", b.getvalue())
        zf.writestr(f"{top}/kavsir_bboxes.json", "{}")
        for k, v in (extra or {}).items():
            zf.writestr(k, v)
    return buf.getvalue()


class _Server:
    "A local HTTP server with one file, answering `Range: bytes=a-` with 206 (or ignoring it, honour_range=False)."

    def __init__(self, payload: bytes, honour_range=True, cut_after=None):
        self.payload, self.honour_range, self.cut_after, self.requests = payload, honour_range, cut_after, []
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                srv.requests.append((self.path, rng))
                if self.path != "/kvasir-seg.zip":
                    self.send_error(404, "Not Found")
                    return
                data, start = srv.payload, 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and srv.honour_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if srv.cut_after is not None:  # drop the connection mid-file, once
                    body, srv.cut_after = body[: srv.cut_after], None
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/kvasir-seg.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/kvasir-seg.zip"


def test_registry_has_real_urls():
    assert DATASETS["kvasir-seg"].url == "https://datasets.simula.no/downloads/kvasir-seg.zip"
    assert (
        DATASETS["hyperkvasir"].url
        == "https://datasets.simula.no/downloads/hyper-kvasir/hyper-kvasir-segmented-images.zip"
    )
    assert all(d.n_pairs == 1000 for d in DATASETS.values())


def test_download_extract_layout(tmp_path):
    payload = _kvasir_like_zip(4)
    with _Server(payload) as srv:
        out = download_dataset("kvasir-seg", tmp_path, url=srv.url, expected=4, progress=False)
    assert out == tmp_path / "kvasir-seg"
    assert srv.requests == [("/kvasir-seg.zip", None)]  # one plain GET
    assert (tmp_path / "kvasir-seg.zip").read_bytes() == payload
    assert not (tmp_path / "kvasir-seg.zip.part").exists()
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"id{i:03d}.jpg" for i in range(4)]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"id{i:03d}.jpg" for i in range(4)]
    assert (out / "kavsir_bboxes.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kvasir-seg", "kvasir-seg.zip"]  # no temp folders


def test_download_hyperkvasir_layout(tmp_path):
    "HyperKvasir's zip nests segmented-images/{images,masks}; the pair folder is found, not hard-coded."
    payload = _kvasir_like_zip(3, top="segmented-images", extra={"__MACOSX/segmented-images/images/._x": b""})
    with _Server(payload) as srv:
        out = download_dataset("hyperkvasir", tmp_path, url=srv.url, expected=3, progress=False)
    assert out == tmp_path / "hyperkvasir" and check_layout(out, 3) == 3
    assert (tmp_path / DATASETS["hyperkvasir"].zip_name).read_bytes() == payload


def test_download_resumes_part_file(tmp_path):
    payload = _kvasir_like_zip(6)
    half = len(payload) // 2
    (tmp_path / "kvasir-seg.zip.part").write_bytes(payload[:half])
    with _Server(payload) as srv:
        out = download_dataset("kvasir-seg", tmp_path, url=srv.url, expected=6, progress=False)
    assert srv.requests == [("/kvasir-seg.zip", f"bytes={half}-")]
    assert (tmp_path / "kvasir-seg.zip").read_bytes() == payload
    assert check_layout(out, 6) == 6


def test_interrupted_download_resumes(tmp_path):
    "A connection dropped mid-file is a one-line error that keeps the bytes; the next call resumes from them."
    payload = _kvasir_like_zip(6)
    cut = len(payload) // 3
    with _Server(payload, cut_after=cut) as srv:
        with pytest.raises(DataError) as ei:
            download_dataset("kvasir-seg", tmp_path, url=srv.url, expected=6, progress=False)
        assert "\n" not in str(ei.value) and "resume" in str(ei.value)
        assert (tmp_path / "kvasir-seg.zip.part").read_bytes() == payload[:cut]
        out = download_dataset("kvasir-seg", tmp_path, url=srv.url, expected=6, progress=False)
    assert srv.requests == [("/kvasir-seg.zip", None), ("/kvasir-seg.zip", f"bytes={cut}-")]
    assert (tmp_path / "kvasir-seg.zip").read_bytes() == payload and check_layout(out, 6) == 6


def test_download_restarts_when_server_ignores_range(tmp_path):
    "A 200 answer to a Range request is the whole file: the part file is rewritten, not appended to."
    payload = _kvasir_like_zip(3)
    (tmp_path / "kvasir-seg.zip.part").write_bytes(payload[:100])
    with _Server(payload, honour_range=False) as srv:
        download_dataset("kvasir-seg", tmp_path, url=srv.url, expected=3, progress=False)
    assert srv.requests == [("/kvasir-seg.zip", "bytes=100-")]
    assert (tmp_path / "kvasir-seg.zip").read_bytes() == payload


def test_download_complete_part_file(tmp_path):
    "A part file that already holds every byte gets 416 and is finished without downloading again."
    payload = _kvasir_like_zip(2)
    (tmp_path / "kvasir-seg.zip.part").write_bytes(payload)
    with _Server(payload) as srv:
        download_dataset("kvasir-seg", tmp_path, url=srv.url, expected=2, progress=False)
    assert srv.requests == [("/kvasir-seg.zip", f"bytes={len(payload)}-")]
    assert (tmp_path / "kvasir-seg.zip").read_bytes() == payload


def test_local_zip_used_without_network(tmp_path):
    (tmp_path / "kvasir-seg.zip").write_bytes(_kvasir_like_zip(5))
    out = download_dataset("kvasir-seg", tmp_path, url=_closed_port_url(), expected=5, progress=False)
    assert check_layout(out, 5) == 5
    # and once extracted, the folder itself is enough (zip removed, still no network)
    (tmp_path / "kvasir-seg.zip").unlink()
    assert download_dataset("kvasir-seg", tmp_path, url=_closed_port_url(), expected=5) == out


def test_offline_error_is_one_line(tmp_path):
    url = _closed_port_url()
    with pytest.raises(DataError) as ei:
        download_dataset("kvasir-seg", tmp_path / "data", url=url, timeout=5, progress=False)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(tmp_path / "data" / "kvasir-seg.zip") in msg and url in msg
    assert not (tmp_path / "data" / "kvasir-seg").exists()


def test_http_error_is_one_line(tmp_path):
    with _Server(b"") as srv:
        url = srv.url.replace("kvasir-seg.zip", "missing.zip")
        with pytest.raises(DataError) as ei:
            download_dataset("kvasir-seg", tmp_path, url=url, progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and "HTTP 404" in msg and url in msg and str(tmp_path / "kvasir-seg.zip") in msg


def test_non_zip_answer_rejected(tmp_path):
    "A server answering with something else than a zip (a login page, say) leaves neither .zip nor .part behind."
    with _Server(b"<html>please log in</html>") as srv:
        with pytest.raises(DataError) as ei:
            download_dataset("kvasir-seg", tmp_path, url=srv.url, progress=False)
    assert "\n" not in str(ei.value) and "not a zip" in str(ei.value)
    assert not (tmp_path / "kvasir-seg.zip").exists() and not (tmp_path / "kvasir-seg.zip.part").exists()


def test_path_traversal_zip_rejected(tmp_path):
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "kvasir-seg.zip").write_bytes(_kvasir_like_zip(2, extra={"Kvasir-SEG/../../escaped.txt": b"x"}))
    with pytest.raises(DataError, match="unsafe member"):
        download_dataset("kvasir-seg", tmp_path / "dl", url=_closed_port_url(), expected=2, progress=False)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "dl" / "kvasir-seg").exists()
    absz = tmp_path / "abs.zip"
    with zipfile.ZipFile(absz, "w") as zf:
        zi = zipfile.ZipInfo("/tmp/abs-evil.txt")
        zf.writestr(zi, "x")  # ZipInfo keeps the leading slash as given
    with pytest.raises(DataError, match="unsafe member"):
        safe_extract(absz, tmp_path / "out")


def test_count_check(tmp_path):
    (tmp_path / "kvasir-seg.zip").write_bytes(_kvasir_like_zip(3))
    with pytest.raises(DataError, match=r"3 files, expected 1000"):
        download_dataset("kvasir-seg", tmp_path, url=_closed_port_url(), progress=False)  # real count: 1000
    assert not (tmp_path / "kvasir-seg").exists()
    assert check_layout(download_dataset("kvasir-seg", tmp_path, url=_closed_port_url(), expected=None), None) == 3


def test_unpaired_zip_rejected(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("Kvasir-SEG/images/a.jpg", b"")
        zf.writestr("Kvasir-SEG/images/b.jpg", b"")
        zf.writestr("Kvasir-SEG/masks/a.jpg", b"")
        zf.writestr("Kvasir-SEG/masks/c.jpg", b"")
    (tmp_path / "kvasir-seg.zip").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"1 images have no mask of the same stem \(e.g. b.jpg\)"):
        download_dataset("kvasir-seg", tmp_path, url=_closed_port_url(), expected=None, progress=False)
