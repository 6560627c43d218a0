"""lib/stages: a stage is done only for the same resolved config with its outputs in place."""
import json
import os

import pytest
import yaml

from lib import stages
from lib.config import load_config
from lib.paths import REPO_ROOT, ActorPaths


def _rel(path) -> str:
    return os.path.relpath(path, REPO_ROOT)


@pytest.fixture
def config_file(tmp_path):
    """A config of its own experiments folder under tmp_path."""
    path = tmp_path / "actor.yml"
    path.write_text(yaml.safe_dump({"actor": {"name": "unit", "experiments_dir": _rel(tmp_path / "experiments")},
                                    "mesh_pca": {"n_components": 5}}))
    return path


def _write_mesh_pca(cfg):
    paths = ActorPaths(cfg)
    for p in (paths.mesh_pca, paths.canonical_mesh):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"npz")


def test_a_stage_is_done_only_after_it_is_marked_with_its_outputs_present(config_file):
    cfg = load_config(config_file)
    _write_mesh_pca(cfg)
    assert stages.why_not_done("mesh_pca", cfg) == "no record of a finished run"
    path = stages.mark("mesh_pca", cfg)
    assert path == ActorPaths(cfg).root / "stages" / "mesh_pca.json"
    assert stages.why_not_done("mesh_pca", cfg) is None
    record = json.loads(path.read_text())
    assert [o.split("/experiments/")[-1] for o in record["outputs"]] == ["unit/default/mesh_pca/mesh_pca.npz",
                                                                         "unit/default/mesh_pca/canonical_mesh.npz"]
    assert record["hash"] == stages.config_hash("mesh_pca", cfg) and record["time"]


def test_a_changed_config_file_or_override_makes_the_stage_run_again(config_file):
    cfg = load_config(config_file)
    _write_mesh_pca(cfg)
    stages.mark("mesh_pca", cfg)
    changed = load_config(config_file, ["mesh_pca.n_components=6"])
    assert stages.why_not_done("mesh_pca", changed) == "its config changed since it last ran"

    data = yaml.safe_load(config_file.read_text())
    data["mesh_pca"]["n_components"] = 7
    config_file.write_text(yaml.safe_dump(data))
    assert stages.why_not_done("mesh_pca", load_config(config_file)) == "its config changed since it last ran"
    # The same values spelled differently (an override equal to the file's value) are the same run.
    assert stages.why_not_done("mesh_pca", load_config(config_file, ["mesh_pca.n_components=7"])) is not None
    stages.mark("mesh_pca", load_config(config_file))
    assert stages.why_not_done("mesh_pca", load_config(config_file, ["mesh_pca.n_components=7"])) is None


def test_an_edit_in_a_base_file_changes_the_hash(tmp_path, config_file):
    child = tmp_path / "child.yml"
    child.write_text(yaml.safe_dump({"base": config_file.name, "gem": {"positions": 3}}))
    before = stages.config_hash("gem", load_config(child))
    config_file.write_text(config_file.read_text().replace("n_components: 5", "n_components: 4"))
    assert stages.config_hash("gem", load_config(child)) != before


def test_a_deleted_output_makes_the_stage_run_again(config_file):
    cfg = load_config(config_file)
    _write_mesh_pca(cfg)
    stages.mark("mesh_pca", cfg)
    ActorPaths(cfg).canonical_mesh.unlink()
    reason = stages.why_not_done("mesh_pca", cfg)
    assert reason.startswith("output missing: ") and reason.endswith("/unit/default/mesh_pca/canonical_mesh.npz")


def test_an_emptied_output_folder_counts_as_missing(config_file):
    cfg = load_config(config_file)
    sweeps = ActorPaths(cfg).gem_sweeps
    sweeps.mkdir(parents=True)
    (sweeps / "positions_00.mp4").write_bytes(b"mp4")
    stages.mark("sweeps", cfg)
    assert stages.why_not_done("sweeps", cfg) is None
    (sweeps / "positions_00.mp4").unlink()
    assert stages.why_not_done("sweeps", cfg).startswith("output missing")


def test_a_newer_checkpoint_than_the_recorded_one_makes_the_stage_run_again(config_file):
    cfg = load_config(config_file)
    folder = ActorPaths(cfg).regressor_checkpoints
    folder.mkdir(parents=True)
    (folder / "step_00000010.pt").write_bytes(b"pt")
    stages.mark("regressor", cfg)
    assert stages.why_not_done("regressor", cfg) is None
    (folder / "step_00000020.pt").write_bytes(b"pt")  # trained further by hand
    assert stages.why_not_done("regressor", cfg) == "its outputs changed since it last ran"


def test_a_stage_without_its_outputs_cannot_be_marked(config_file):
    cfg = load_config(config_file)
    with pytest.raises(stages.StageError, match="did not write .*mesh_pca.npz"):
        stages.mark("mesh_pca", cfg)
    assert not stages.stamp_path("mesh_pca", cfg).exists()
    with pytest.raises(stages.StageError, match="did not write .*checkpoints"):
        stages.mark("regressor", cfg)  # no checkpoint at all


def test_a_corrupt_stamp_counts_as_not_done(config_file, capsys):
    cfg = load_config(config_file)
    _write_mesh_pca(cfg)
    stamp = stages.stamp_path("mesh_pca", cfg)
    for text in ("{\"hash\": \"ab", "[1, 2]", "{\"time\": 1}", ""):
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(text)
        assert "unreadable" in stages.why_not_done("mesh_pca", cfg)
        assert stages.main(["done", "mesh_pca", str(config_file)]) == 1
        assert "its record" in capsys.readouterr().out


def test_an_interrupted_mark_leaves_the_old_stamp_whole(config_file, monkeypatch):
    cfg = load_config(config_file)
    _write_mesh_pca(cfg)
    stamp = stages.mark("mesh_pca", cfg)
    old = stamp.read_text()

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        stages.mark("mesh_pca", load_config(config_file, ["mesh_pca.n_components=6"]))
    assert stamp.read_text() == old
    assert sorted(p.name for p in stamp.parent.iterdir()) == ["mesh_pca.json"]  # no temp file left


def test_cross_identity_reenactment_is_stamped_per_source_actor(tmp_path, config_file):
    cfg = load_config(config_file)
    sources = {}
    for name in ("b", "c"):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump({"actor": {"name": name}}))
        sources[name] = load_config(path)
        out = ActorPaths(cfg).reenactment(name) / "reenactment.json"
        out.parent.mkdir(parents=True)
        out.write_text("{}")
    stages.mark("cross_reenactment", cfg, sources["b"])
    assert stages.stamp_path("cross_reenactment", cfg, sources["b"]).name == "cross_reenactment.b.json"
    assert stages.why_not_done("cross_reenactment", cfg, sources["b"]) is None
    assert stages.why_not_done("cross_reenactment", cfg, sources["c"]) == "no record of a finished run"


def test_the_command_line_reads_a_stage_scripts_arguments(tmp_path, config_file, capsys):
    _write_mesh_pca(load_config(config_file))
    args = [str(config_file), "mesh_pca.n_components=6"]
    assert stages.main(["done", "mesh_pca", *args]) == 1
    assert capsys.readouterr().out == "no record of a finished run\n"
    assert stages.main(["mark", "mesh_pca", *args]) == 0
    assert stages.main(["done", "mesh_pca", *args]) == 0
    assert stages.main(["done", "mesh_pca", str(config_file)]) == 1  # without the override: another config

    source = tmp_path / "b.yml"
    source.write_text(yaml.safe_dump({"actor": {"name": "b"}}))
    cfg, parsed_source = stages.parse_args([str(config_file), "train.stage=mapping", str(source)])
    assert cfg.train.stage == "mapping" and parsed_source.actor.name == "b" and parsed_source.train.stage == "regressor"

    assert stages.main(["done", "no_such_stage", str(config_file)]) == 1
    assert "unknown stage 'no_such_stage'" in capsys.readouterr().err
    assert stages.main(["done", "mesh_pca", str(tmp_path / "missing.yml")]) == 1
    assert "config file not found" in capsys.readouterr().err


def test_results_lists_the_metrics_and_video_folders_that_exist(config_file):
    cfg = load_config(config_file)
    paths = ActorPaths(cfg)
    assert stages.results(cfg) == []
    paths.regressor_eval.mkdir(parents=True)
    (paths.regressor_eval / "metrics.json").write_text("{}")
    assert [what for what, _ in stages.results(cfg)] == ["regressor test metrics"]
    (paths.regressor_eval / "test.mp4").write_bytes(b"mp4")
    assert stages.results(cfg)[1] == ("regressor test videos", paths.regressor_eval)


def test_an_edit_reruns_the_stages_that_read_its_section_and_those_downstream_only():
    base = load_config()
    hashes = lambda cfg: {name: stages.config_hash(name, cfg) for name in stages.OUTPUTS}  # noqa: E731
    before = hashes(base)
    changed = lambda override: {n for n, h in hashes(load_config(None, [override])).items() if h != before[n]}  # noqa: E731
    assert changed("viewer.fps=30") == {"sweeps"}
    assert changed("gem.positions=20") == {"gem", "sweeps", "mapping", "self_reenactment", "cross_reenactment"}
    assert changed("test.max_frames=3") == {"regressor_test", "gem", "sweeps", "mapping", "self_reenactment",
                                            "cross_reenactment"}
    assert changed("mapping.width=64") == {"mapping", "self_reenactment", "cross_reenactment"}
    assert changed("synthetic.seed=5") == set(stages.OUTPUTS)  # the data itself: everything


def test_a_stage_downstream_of_one_that_ran_just_now_runs_again(config_file):
    cfg = load_config(config_file)
    _write_mesh_pca(cfg)
    stages.mark("mesh_pca", cfg)
    assert stages.why_not_done("mesh_pca", cfg, ran=("masks",)) is None  # masks is not upstream of it
    assert stages.why_not_done("mesh_pca", cfg, ran=("data",)) == "upstream stage 'data' ran"
    assert stages.ancestors("sweeps") == ["gem", "regressor", "masks", "data", "mesh_pca"]


def test_the_masks_stage_is_proven_by_the_masks_in_the_masks_folder(tiny_actor_config, tmp_path):
    cfg = load_config(tiny_actor_config, [f"actor.experiments_dir={_rel(tmp_path / 'experiments')}"])
    outputs = stages.OUTPUTS["masks"](cfg, None)
    assert outputs and all(p.is_file() and ActorPaths(cfg).masks in p.parents for p in outputs)
    stages.mark("masks", cfg)
    assert stages.why_not_done("masks", cfg) is None
    moved = load_config(tiny_actor_config, [f"actor.experiments_dir={_rel(tmp_path / 'experiments')}",
                                            f"data.masks_dir={_rel(tmp_path / 'elsewhere')}"])
    assert stages.why_not_done("masks", moved).startswith("output missing: ")
