import pytest
import yaml

from lib.config import ConfigError, load_config, save_config
from lib.paths import REPO_ROOT, resolve


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_load_without_a_file():
    cfg = load_config()
    assert cfg.actor.identity_camera == 8
    assert cfg.data.ds_rate == 1


def test_file_overrides_base_and_command_line_overrides_file(tmp_path):
    write(tmp_path / "base.yml", {"actor": {"name": "base_actor", "n_expr": 50}})
    child = write(tmp_path / "child.yml", {"base": "base.yml", "actor": {"name": "child_actor"}})
    cfg = load_config(child, ["actor.n_shape=20"])
    assert cfg.actor.name == "child_actor"   # the file wins over its base
    assert cfg.actor.n_expr == 50            # inherited from the base
    assert cfg.actor.n_shape == 20           # the command line wins over both


def test_misspelt_key_names_the_closest_known_key(tmp_path):
    path = write(tmp_path / "c.yml", {"actor": {"identity_camra": 3}})
    with pytest.raises(ConfigError, match=r"actor\.identity_camra.*did you mean 'actor\.identity_camera'"):
        load_config(path)


def test_misspelt_override_names_the_closest_known_key():
    with pytest.raises(ConfigError, match=r"did you mean 'data\.ds_rate'"):
        load_config(None, ["data.ds_rat=2"])


def test_unknown_section_is_refused(tmp_path):
    path = write(tmp_path / "c.yml", {"actr": {"name": "x"}})
    with pytest.raises(ConfigError, match="did you mean 'actor'"):
        load_config(path)


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path / "c.yml", {"data": {"ds_rate": "two"}})
    with pytest.raises(ConfigError, match=r"data\.ds_rate.*c\.yml"):
        load_config(path)


def test_float_keys_accept_yaml_exponent_strings():
    cfg = load_config(None, ["synthetic.tracking_noise=5e-3"])
    assert cfg.synthetic.tracking_noise == pytest.approx(5e-3)


def test_absolute_paths_are_refused(tmp_path):
    path = write(tmp_path / "c.yml", {"actor": {"data_dir": "/home/someone/data"}})
    with pytest.raises(ConfigError, match="relative to the repository root"):
        load_config(path)


def test_inheritance_loop_is_reported(tmp_path):
    write(tmp_path / "a.yml", {"base": "b.yml"})
    write(tmp_path / "b.yml", {"base": "a.yml"})
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["actor.name=roundtrip", "data.background=[0.0, 0.5, 1.0]"])
    saved = save_config(cfg, tmp_path / "run" / "config.yml")
    again = load_config(saved)
    assert again.to_dict() == cfg.to_dict()


def test_shipped_configs_are_valid():
    for path in sorted((REPO_ROOT / "configs").glob("*.yml")):
        load_config(path)


def test_config_paths_resolve_against_the_repository():
    assert resolve("data/x") == REPO_ROOT / "data" / "x"


def test_readme_documents_every_config_key():
    from lib.config import SCHEMA

    readme = (REPO_ROOT / "README.md").read_text()
    missing = [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys if f"`{s}.{k}`" not in readme]
    assert not missing, f"README.md's config table lacks {missing}"
