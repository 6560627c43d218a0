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
    from lib.config import SCHEMA, describe

    readme = (REPO_ROOT / "README.md").read_text()
    missing = [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys if f"`{s}.{k}`" not in readme]
    assert not missing, f"README.md's config table lacks {missing}"
    assert describe() in readme, "README.md's config table is not lib.config.describe()'s: paste it again"


# ---- values checked at the door: null, ranges, lists, empty files, keys written twice

def test_an_empty_file_is_an_error_not_all_defaults(tmp_path):
    (tmp_path / "empty.yml").write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match=r"empty\.yml is empty"):
        load_config(tmp_path / "empty.yml")


@pytest.mark.parametrize("text, twice", [
    ("train:\n  lr: 1.0e-3\nactor:\n  name: a\ntrain:\n  iterations: 5\n", "'train' is written twice \\(lines 1 and 5\\)"),
    ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "'lr' is written twice \\(lines 2 and 3\\)"),
])
def test_a_section_or_key_written_twice_is_refused(tmp_path, text, twice):
    (tmp_path / "twice.yml").write_text(text)
    with pytest.raises(ConfigError, match=r"twice\.yml: " + twice):
        load_config(tmp_path / "twice.yml")


def test_null_values_are_refused_in_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.iterations in the command line has no value"):
        load_config(None, ["train.iterations="])
    path = write(tmp_path / "c.yml", {"mapping": {"lr": None}})
    with pytest.raises(ConfigError, match=r"mapping\.lr in .*c\.yml has no value"):
        load_config(path)


@pytest.mark.parametrize("override, bound", [
    ("train.checkpoint_every=0", ">= 1"), ("data.ds_rate=0", ">= 1"), ("train.curve_views=0", ">= 1"),
    ("train.iterations=-5", ">= 1"), ("train.lr=0", "> 0"), ("train.lr_gamma=1.5", "<= 1"),
    ("mapping.dropout=1.0", "< 1"), ("viewer.port=70000", "<= 65535"), ("train.lr=.nan", "a finite number"),
    ("data.background=[1.0, 2.0, 0.0]", "<= 1"), ("train.lr_milestones=[0.3, -0.1]", ">= 0"),
])
def test_numbers_out_of_range_name_the_key_and_the_bound(override, bound):
    key = override.split("=")[0].replace(".", r"\.")
    with pytest.raises(ConfigError, match=rf"{key} = .* must be {bound}"):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("data.background=[1.0, 1.0]", "needs exactly 3 item"), ("test.splits=[]", "needs at least 1 item"),
    ("test.splits=[val, tset]", "'tset' is not one of"), ("regressor.widths=[8, eight]", "is not a int"),
    ("actor.name=''", "is empty"), ("actor.name=a/b", "not a path"),
    ("regressor.widths=[8, 8, 8]", "uv_size 256 needs one per level"), ("run.name=masks", "folder of the actor.s masks"),
])
def test_lists_names_and_related_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_mapping_run_that_would_not_train_is_refused():
    with pytest.raises(ConfigError, match="would not train"):
        load_config(None, ["train.stage=mapping", "mapping.warmup_iterations=0", "mapping.iterations=0"])
    assert load_config(None, ["train.stage=mapping", "mapping.iterations=0"]).mapping.warmup_iterations > 0


def test_every_shipped_config_passes_the_checks():
    for path in sorted((REPO_ROOT / "configs").glob("*.yml")):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("base: 5\n", "base = 5 must be the path of another config file"),
    ("1: {a: 1}\n", "unknown config key '1'"),
    ("? [a]\n: b\n", "a key must be a name, got \\['a'\\] at line 1"),
    ("train: {lr: !!python/object/apply:os.system [echo]}\n", "could not determine a constructor .* at line 1"),
    ("train:\n  lr: [\n", "is not valid YAML: .* at line 3, column 1$"),
])
def test_malformed_files_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "bad.yml").write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(tmp_path / "bad.yml")
    assert "\n" not in str(err.value)
