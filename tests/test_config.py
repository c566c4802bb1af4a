"Settings, profiles and the typed configuration."

import json
import re
from pathlib import Path
import pytest
from diffusegen.core import ConfigError, load_config, profiles, read_settings, settings_path, write_manifest, Config


def test_profiles_exist_and_build():
    assert profiles() == [
        "smoke",
        "demo",
        "demo-weights",
        "demo-weights-procedural",
        "dry-run",
        "paper",
        "paper-revision",
    ]
    for p in profiles():
        cfg = load_config(p)
        assert isinstance(cfg, Config) and cfg.profile == p


def test_every_setting_cites_its_source():
    "Each key = value line carries a `;` comment naming a paper section, table, figure or paper-code-facts."
    lines = [l for l in settings_path().read_text(encoding="utf-8").splitlines() if re.match(r"^[a-z_]+\s*=", l)]
    assert lines
    for l in lines:
        assert ";" in l, f"no comment: {l}"
        comment = l.split(";", 1)[1]
        assert re.search(r"§\d|Table|Fig\.|Appendix [AB]|paper-code-facts", comment), f"no source cited: {l}"


def test_every_config_field_is_in_default_section():
    keys = set(read_settings()["DEFAULT"]) | {"base"}
    fields = set(Config.__dataclass_fields__) - {"profile", "out"}
    assert fields <= keys, fields - keys


def test_config_defaults_are_the_default_section():
    "One source of defaults: a Config built without settings.ini has [DEFAULT]'s values."
    from diffusegen.core import _parse

    d = read_settings()["DEFAULT"]
    differ = {
        f: (getattr(Config(), f), d[f])
        for f in Config.__dataclass_fields__
        if f in d and _parse(f, d[f], "[DEFAULT]") != getattr(Config(), f)
    }
    assert not differ, differ


def test_paper_profiles_never_allow_substitutes():
    assert not load_config("paper").allow_substitute_weights
    assert not load_config("paper-revision").allow_substitute_weights
    assert load_config("demo").allow_substitute_weights


def test_overrides_and_types():
    cfg = load_config("smoke", {"image_size": "48", "allow_substitute_weights": "false", "mask_grey_tolerance": 0.1})
    assert (cfg.image_size, cfg.allow_substitute_weights, cfg.mask_grey_tolerance) == (48, False, 0.1)
    with pytest.raises(ConfigError, match="not a valid int"):
        load_config("smoke", {"image_size": "big"})
    with pytest.raises(ConfigError, match="must be one of"):
        load_config("smoke", {"resize_mode": "squash"})


def test_unknown_key_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting 'imag_size'.*did you mean 'image_size'"):
        load_config("demo", {"imag_size": 64})
    bad = tmp_path / "settings.ini"
    bad.write_text(
        settings_path().read_text(encoding="utf-8") + "\n[broken]\nlearning_rat = 1 ; §2.4\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError) as e:
        load_config("broken", path=bad)
    assert str(bad) in str(e.value) and "[broken]" in str(e.value) and "\n" not in str(e.value)


def test_base_inheritance_and_cycles(tmp_path):
    p = tmp_path / "settings.ini"
    p.write_text(
        "[DEFAULT]\nimage_size = 256 ; §2.3\n[a]\nbase = b ; x\n[b]\nbase = a ; x\n[c]\nbase = d ; x\n[d]\nimage_size = 64 ; x\n"
    )
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config("a", path=p)
    assert load_config("c", path=p).image_size == 64


def test_hash_ignores_run_only_settings():
    a = load_config("demo")
    assert a.hash("data") == a.replace(device="cpu", num_workers=4, out="/elsewhere").hash("data")
    assert a.hash("data") != a.replace(n_test=10).hash("data")
    assert a.hash("data") != a.replace(seed=1).hash("data")  # seed changes every stage


def test_config_json_beside_artifacts(tmp_path):
    cfg = load_config("smoke", {"out": str(tmp_path)})
    write_manifest(cfg, "data", [])
    for d in (cfg.run_dir / "data", cfg.fig_dir / "data"):
        saved = json.loads((d / "config.json").read_text())
        assert saved == json.loads(json.dumps(cfg.to_dict()))
        assert json.loads((d / "manifest.json").read_text())["config_hash"] == cfg.hash("data")


def test_env_redirects_outputs(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSEGEN_OUT", str(tmp_path))
    assert load_config("demo").run_dir == tmp_path / "runs" / "demo"


# --- ranges and relations: a bad value is one line naming the key, its value and what is allowed ---


def _one_line_error(profile, over) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(profile, over)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("override (--set or papermill `overrides`): setting "), msg
    return msg


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("train_steps", "-5", "an integer ≥ 1"),
        ("full_train_steps", "0", "an integer ≥ 1"),
        ("samples_per_image", "0", "an integer ≥ 1"),
        ("samples_per_image", "-1", "an integer ≥ 1"),
        ("n_test", "-5", "an integer ≥ 1"),
        ("save_interval", "0", "an integer ≥ 1"),
        ("timestep_respacing", "0", "an integer ≥ 1"),
        ("jump_length", "0", "an integer ≥ 1"),
        ("image_size", "0", "an integer ≥ 8"),
        ("lr", "nan", "a number > 0 (finite)"),
        ("lr", "-0.5", "a number > 0"),
        ("full_lr", "inf", "a number > 0 (finite)"),
        ("mask_threshold", "256", "an integer in [0, 255]"),
        ("mask_threshold", "-1", "an integer in [0, 255]"),
        ("seg_val_fraction", "1", "a number > 0 and < 1"),
        ("ema_rate", "1.5", "a number in [0, 1]"),
        ("inpaint_images", "-1", "an integer ≥ 0"),
        ("lambda_sty", "-1", "a number ≥ 0"),
        ("seed", "-1", "an integer ≥ 0"),
        ("significance", "0", "a number > 0 and < 1"),
        ("batch_size", "0", "an integer ≥ 1 or `cluster`"),
        ("table3_n", "16 -2", "one or more positive integers"),
        ("block_out_channels", "", "one or more positive integers"),
        ("msssim_win", "4", "odd"),
    ],
)
def test_bad_value_is_one_line_with_the_key(key, value, allowed):
    for profile in ("smoke", "paper"):
        msg = _one_line_error(profile, {key: value})
        assert f"setting {key}=" in msg and value.strip("'") in msg and allowed in msg, msg


@pytest.mark.parametrize(
    "over,key,rule",
    [
        ({"jump_length": 20}, "jump_length", "< timestep_respacing=20"),  # smoke: T = 20, r = 2
        ({"timestep_respacing": 4}, "jump_length", "< timestep_respacing=4"),  # the other side of the same rule
        ({"style_start": 10}, "style_start", "< style_respacing=10"),
        ({"diff_iter": 10}, "diff_iter", "< style_respacing=10"),
        ({"timestep_respacing": 1001}, "timestep_respacing", "≤ diffusion_steps=1000"),
        ({"style_respacing": 5, "style_start": 5}, "style_start", "< style_respacing=5"),
        ({"image_size": 34}, "image_size", "a multiple of 4"),  # smoke's UNet halves 32 px twice
        ({"inpaint_variant": "paper-text"}, "skip_timesteps", "< timestep_respacing=20"),
    ],
)  # smoke keeps the paper's skip 80
def test_relations_between_settings(over, key, rule):
    msg = _one_line_error("smoke", over)
    assert f"setting {key}=" in msg and rule in msg, msg


def test_relations_hold_where_they_should_not_bite():
    load_config("smoke", {"timestep_respacing": 5, "resample": 1})  # no jumps: jump_length ≥ T is harmless
    load_config("smoke", {"inpaint_variant": "paper-text", "skip_timesteps": 8})
    load_config("paper", {"style_respacing": 50, "style_start": 29, "diff_iter": 25})


def test_every_profile_in_settings_ini_loads_and_replace_checks_too():
    for p in profiles():
        assert load_config(p).profile == p  # every profile's values lie in the declared ranges
    with pytest.raises(ConfigError, match=r"^replace\(\): setting samples_per_image=0: must be an integer ≥ 1$"):
        load_config("smoke").replace(samples_per_image=0)


def test_a_bad_profile_value_names_the_file_and_profile(tmp_path):
    bad = tmp_path / "settings.ini"
    bad.write_text(
        settings_path().read_text(encoding="utf-8") + "\n[broken]\ntrain_steps = -5 ; §2.4\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError) as e:
        load_config("broken", path=bad)
    assert str(e.value) == f"{bad} [broken]: setting train_steps=-5: must be an integer ≥ 1"


def test_every_number_declares_a_range():
    from dataclasses import fields

    for f in fields(Config):
        if f.type in ("int", "float"):
            assert any(v is not None for v in f.metadata["range"].values()), f.name


def test_python_m_diffusegen_is_the_cli():
    "`python -m diffusegen` runs the same command line; a bad --set value is one line on stderr and exit status 2."
    import subprocess
    import sys

    ok = subprocess.run(
        [sys.executable, "-m", "diffusegen", "config", "--profile", "smoke", "--set", "image_size=48"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["image_size"] == 48, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "diffusegen", "config", "--profile", "smoke", "--set", "train_steps=-5"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "diffusegen: error: override (--set or papermill `overrides`): setting train_steps=-5: must be an integer ≥ 1"
    ]


def test_profile_is_not_a_setting_and_the_hint_says_so():
    with pytest.raises(ConfigError, match="not a setting; choose the profile with --profile"):
        load_config("smoke", {"profile": "demo"})
    with pytest.raises(ConfigError, match="did you mean 'image_size'"):
        load_config("smoke", {"image_sise": 32})


def test_content_key_keeps_the_persisted_keys():
    "content_key reproduces, byte for byte, the keys the hand-made hashes wrote before it (pinned: computed with the old code)."
    from diffusegen.core import content_key

    A = {"b": 1, "a": [1, 2.5, "x"], "c": {"z": None, "y": True}}
    assert content_key(A) == "0af44fd70228ce26"  # Config.hash, spec_hash, styling, intrinsic caches
    assert content_key(A, n=24, sort_keys=False) == "629525ab3e4d813cac0a3151"  # clustering's spec key
    assert content_key(A, sort_keys=False) == "629525ab3e4d813c"  # runner's cell key, segmentation's status hash
    assert content_key({"path": Path("runs/x"), "n": 3}, n=10) == "9ca47f7a34"  # the kept-samples ledger
    assert content_key([7, "images/1.png", "images/003.png"], n=12, sort_keys=False) == "9934ec388fa6"  # survey id


def test_sha256_file_streams(tmp_path):
    import hashlib
    from diffusegen.core import sha256_file

    p = tmp_path / "w.bin"
    p.write_bytes(b"\x00\x01" * (3 << 20))
    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
