"The data-set contract: evaluation reads every type through `diffusegen.sets` and imports no generator; a new type is one registration."

import ast
from pathlib import Path
import numpy as np
import pytest
from diffusegen.core import load_config, save_png
from diffusegen.sets import DataType, TYPES, MANIFEST_COLUMNS, register_type, set_dir, write_manifest_csv, read_set

ROOT = Path(__file__).resolve().parents[1]
EVALUATION = ("intrinsic", "segmentation", "memorization", "stats", "audit", "statistics", "survey")
GENERATORS = ("training", "inpainting", "styling", "gan", "copypaste")


def _imported_modules(path: Path) -> set:
    "Every diffusegen module a module imports, at the top or inside a function."
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:
                out.add(mod.split(".")[0] if mod else "")
            elif mod.startswith("diffusegen."):
                out.add(mod.split(".")[1])
            if mod in ("diffusegen", "") and node.level in (0, 1):
                out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("diffusegen.")}
    return out


@pytest.mark.parametrize("module", EVALUATION)
def test_evaluation_imports_no_generator(module):
    bad = _imported_modules(ROOT / "diffusegen" / f"{module}.py") & set(GENERATORS)
    assert not bad, (
        f"diffusegen/{module}.py imports generator module(s) {sorted(bad)}: read sets through diffusegen.sets"
    )


def test_the_import_check_sees_imports():
    "The check above can fail: styling imports training at the top, scale imports inpainting inside a function (`from diffusegen import inpainting as ip`)."
    assert {"training", "sets", "diffusion"} <= _imported_modules(ROOT / "diffusegen" / "styling.py")
    assert {"inpainting", "training"} <= _imported_modules(ROOT / "diffusegen" / "scale.py")


@pytest.fixture
def test_type():
    "A new synthetic type, registered as its generator would (and removed after the test)."
    t = register_type(DataType("test-paste", "Test-Paste", "test"))
    yield t
    del TYPES[t.key]


def _write_set(cfg, key, ids):
    d, rows = set_dir(cfg, key), []
    rng = np.random.default_rng(0)
    for k, sid in enumerate(ids):
        img = (rng.random((cfg.image_size, cfg.image_size, 3)) * 255).astype(np.uint8)
        m = np.zeros((cfg.image_size, cfg.image_size), np.uint8)
        m[8:20, 8:20] = 255
        save_png(img, d / "images" / f"{sid}_0.png")
        save_png(m, d / "masks" / f"{sid}_0.png")
        rows.append(
            dict(
                file=f"images/{sid}_0.png",
                mask_file=f"masks/{sid}_0.png",
                source_id=sid,
                cluster=-1,
                model="none",
                sample=0,
                seed=str(k),
                checkpoint_sha256="",
                variant="test",
                nfe=0,
                params="{}",
                weights="{}",
            )
        )
    write_manifest_csv(rows, d / "manifest.csv", MANIFEST_COLUMNS)


def test_a_new_type_reaches_every_evaluation(tmp_path, test_type):
    from diffusegen import intrinsic, segmentation, statistics

    cfg = load_config("smoke", {"out": str(tmp_path), "table2_types": "real test-paste"})
    _write_set(cfg, "test-paste", ["001", "7"])
    df = read_set(cfg, "test-paste")
    assert list(df.source_id) == ["001", "7"] and Path(df.image_path[0]).exists()
    assert "Test-Paste" in intrinsic.table1_rows()  # Table 1 has its row
    sets = intrinsic.synthetic_sets(cfg)
    assert list(sets["Test-Paste"].source_id) == ["001", "7"] and sets["Diff"] is None  # read through the contract
    assert {c["type"] for c in segmentation.grid(cfg) if c["table"] == 2} == {
        "real",
        "test-paste",
    }  # Table 2 accepts it
    assert statistics.type_label("test-paste") == "Test-Paste"


def test_unknown_type_in_settings_is_one_line(tmp_path):
    from diffusegen import segmentation
    from diffusegen.core import ConfigError

    with pytest.raises(ConfigError, match="table type 'cut-mix': must be one of real, gan, diff"):
        segmentation.grid(load_config("smoke", {"out": str(tmp_path), "table2_types": "real cut-mix"}))


def test_real_set_is_the_training_split_with_string_ids(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import numeric_dataset
    from diffusegen.data import run_data

    cfg = load_config("smoke", {"out": str(tmp_path)})
    run_data(cfg, numeric_dataset(tmp_path / "data", n=12), progress=False)
    real = read_set(cfg, "real")
    stems = {p.stem for p in (tmp_path / "data" / "images").iterdir()}
    assert len(real) and set(real.source_id) <= stems  # "003" stays "003", never 3
    assert all(Path(p).stem == s for p, s in zip(real.image_path, real.source_id))


def test_manifest_of_an_earlier_version_resumes(tmp_path):
    """A set manifest as earlier versions wrote it (literal text; the format is unchanged): its samples under the current
    key count as done (ids and seeds as text, so '003' and '0042' match the plan), the others are neither lost nor done."""
    from diffusegen.sets import read_manifest_csv, split_ledger

    d = tmp_path / "diff"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    rows = [
        ("003_0", "003", "0042", '"{""respacing"": 200}"'),
        ("7_0", "7", "9", '"{""respacing"": 200}"'),
        ("8_0", "8", "1", '"{""respacing"": 100}"'),
    ]
    text = (
        ",".join(MANIFEST_COLUMNS)
        + "\n"
        + "".join(
            f"images/{n}.png,masks/{n}.png,{sid},2,cluster_2,0,{seed},00ff,paper-code,35,{params},{{}}\n"
            for n, sid, seed, params in rows
        )
    )
    (d / "manifest.csv").write_text(text)
    for n, *_ in rows:
        (d / "images" / f"{n}.png").write_bytes(b"x")
        (d / "masks" / f"{n}.png").write_bytes(b"x")
    old = read_manifest_csv(d / "manifest.csv").to_dict("records")
    assert (
        [r["source_id"] for r in old] == ["003", "7", "8"]
        and old[0]["seed"] == "0042"
        and old[0]["params"] == '{"respacing": 200}'
    )
    planned = {("images/003_0.png", "0042", '{"respacing": 200}'), ("images/7_0.png", "9", '{"respacing": 200}')}
    key = lambda r: (r["file"], r["seed"], r["params"])
    done, aside = split_ledger(
        old,
        lambda r: key(r) in planned,
        {f for f, *_ in planned},
        lambda r: (d / r["file"]).exists() and (d / r["mask_file"]).exists(),
    )
    assert [r["file"] for r in done] == ["images/003_0.png", "images/7_0.png"]  # resumed: not made again
    assert [r["file"] for r in aside] == ["images/8_0.png"]  # outside the plan: kept


def test_copy_paste_and_filtered_types_reach_the_evaluations(tmp_path):
    "Copy-Paste is in the registry (Table 1, Tables 2 and 3); a filtered subset is a Table 2 row but not a Table 1 row."
    from diffusegen import intrinsic, segmentation, statistics
    from diffusegen.sets import synthetic_types

    assert "copy-paste" in synthetic_types() and "Copy-Paste" in intrinsic.table1_rows()
    assert "Styled-Diff (filtered)" not in intrinsic.table1_rows()
    assert "styled-diff-filtered" not in statistics.table1_types() and "copy-paste" in statistics.table1_types()
    cfg = load_config("smoke", {"out": str(tmp_path), "filtered_types": "styled-diff"})
    t2 = {c["type"] for c in segmentation.grid(cfg) if c["table"] == 2}
    assert {"copy-paste", "styled-diff-filtered"} <= t2
    assert statistics.type_label("styled-diff-filtered") == "Styled-Diff (filtered)"
