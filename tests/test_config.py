"Settings, profiles and the typed configuration."
import json, re
from pathlib import Path
import pytest
from diffusegen.core import ConfigError, load_config, profiles, read_settings, settings_path, write_manifest, Config

def test_profiles_exist_and_build():
    assert profiles() == ["smoke", "demo", "paper", "paper-revision"]
    for p in profiles():
        cfg = load_config(p)
        assert isinstance(cfg, Config) and cfg.profile == p

def test_every_setting_cites_its_source():
    "Each key = value line carries a `;` comment naming a paper section, table, figure or paper-code-facts."
    lines = [l for l in settings_path().read_text(encoding="utf-8").splitlines()
             if re.match(r"^[a-z_]+\s*=", l)]
    assert lines
    for l in lines:
        assert ";" in l, f"no comment: {l}"
        comment = l.split(";", 1)[1]
        assert re.search(r"§\d|Table|Fig\.|Appendix [AB]|paper-code-facts", comment), f"no source cited: {l}"

def test_every_config_field_is_in_default_section():
    keys = set(read_settings()["DEFAULT"]) | {"base"}
    fields = set(Config.__dataclass_fields__) - {"profile", "out"}
    assert fields <= keys, fields - keys

def test_paper_profiles_never_allow_substitutes():
    assert not load_config("paper").allow_substitute_weights
    assert not load_config("paper-revision").allow_substitute_weights
    assert load_config("demo").allow_substitute_weights

def test_overrides_and_types():
    cfg = load_config("smoke", {"image_size": "48", "allow_substitute_weights": "false", "mask_grey_tolerance": 0.1})
    assert (cfg.image_size, cfg.allow_substitute_weights, cfg.mask_grey_tolerance) == (48, False, 0.1)
    with pytest.raises(ConfigError, match="not a valid int"): load_config("smoke", {"image_size": "big"})
    with pytest.raises(ConfigError, match="must be one of"): load_config("smoke", {"resize_mode": "squash"})

def test_unknown_key_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting 'imag_size'.*did you mean 'image_size'"):
        load_config("demo", {"imag_size": 64})
    bad = tmp_path/"settings.ini"
    bad.write_text(settings_path().read_text(encoding="utf-8") + "\n[broken]\nlearning_rat = 1 ; §2.4\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e: load_config("broken", path=bad)
    assert str(bad) in str(e.value) and "[broken]" in str(e.value) and "\n" not in str(e.value)

def test_base_inheritance_and_cycles(tmp_path):
    p = tmp_path/"settings.ini"
    p.write_text("[DEFAULT]\nimage_size = 256 ; §2.3\n[a]\nbase = b ; x\n[b]\nbase = a ; x\n[c]\nbase = d ; x\n[d]\nimage_size = 8 ; x\n")
    with pytest.raises(ConfigError, match="inherits from itself"): load_config("a", path=p)
    assert load_config("c", path=p).image_size == 8

def test_hash_ignores_run_only_settings():
    a = load_config("demo")
    assert a.hash("data") == a.replace(device="cpu", num_workers=4, out="/elsewhere").hash("data")
    assert a.hash("data") != a.replace(n_test=10).hash("data")
    assert a.hash("data") != a.replace(seed=1).hash("data")            # seed changes every stage

def test_config_json_beside_artifacts(tmp_path):
    cfg = load_config("smoke", {"out": str(tmp_path)})
    write_manifest(cfg, "data", [])
    for d in (cfg.run_dir/"data", cfg.fig_dir/"data"):
        saved = json.loads((d/"config.json").read_text())
        assert saved == json.loads(json.dumps(cfg.to_dict()))
        assert json.loads((d/"manifest.json").read_text())["config_hash"] == cfg.hash("data")

def test_env_redirects_outputs(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSEGEN_OUT", str(tmp_path))
    assert load_config("demo").run_dir == tmp_path/"runs"/"demo"
