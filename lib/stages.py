"""Which pipeline stages are finished: stamps that let run.sh skip a stage already done.

A stage counts as done when all hold:
  * no stage upstream of it (``UPSTREAM``) ran in this invocation of run.sh (``GEM_STAGES_RAN``);
  * its stamp ``experiments/<actor>/<run>/stages/<stage>.json`` holds the hash of the config sections the
    stage depends on (``SECTIONS``: its own and its upstream stages'; and the source actor's, for
    cross-identity reenactment), so an edit of one of those, in the file, a base file or an override,
    makes the stage run again, and an edit of another section does not;
  * the outputs that prove the stage finished (``OUTPUTS``, paths from ``ActorPaths``) exist, and
    are the ones the stamp recorded (a newer checkpoint written by a manual run is a change).
run.sh calls ``done`` before a stage and ``mark`` after it succeeded; a stage that failed leaves
no stamp. The hash covers the resolved config rather than the literal command line, so
``configs/x.yml`` and ``./configs/x.yml`` are the same run while an edit inside a base file makes
another; the stage's name stands for its script (run.sh's table). Code changes are not hashed:
delete ``experiments/<actor>/<run>/stages/`` to run every stage again.

What a rerun does is the stage's own business: train.py resumes from the newest checkpoint, so
a run whose training config changed needs its run folder removed to train from scratch.

    GEM_STAGES_RAN="data masks" \
    python -m lib.stages done NAME CONFIG [SOURCE_CONFIG] [section.key=value ...]  # exit 0: done, else
                                                                                   # 1 and the reason
    python -m lib.stages mark NAME CONFIG [SOURCE_CONFIG] [section.key=value ...]  # after success
    python -m lib.stages results CONFIG [SOURCE_CONFIG] [section.key=value ...]    # where results are

Arguments are the stage script's own: those with '=' are overrides of CONFIG, the others config
files (the second one is the source actor of cross-identity reenactment). Only ``masks``,
``regressor`` and ``mapping`` import torch (to list frames and checkpoints), so a check takes
well under a second for most stages.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from lib.atomic import write_json
from lib.config import Config, load_config
from lib.errors import ProjectError
from lib.paths import REPO_ROOT, ActorPaths, resolve


def _actor_data(cfg: Config, source: Config | None) -> list[Path]:
    """The export's split files and the FLAME-format files (made by the synthetic stage, or given)."""
    data = resolve(cfg.actor.data_dir)
    return ([data / f"transforms_{split}.json" for split in ("train", "val", "test")]
            + [resolve(cfg.actor.flame_model), resolve(cfg.actor.flame_uv), resolve(cfg.actor.flame_masks)])


def _masks(cfg: Config, source: Config | None) -> list[Path]:
    """Both masks of every frame of the three splits, where the readers find them (``mask_paths``)."""
    from lib.dataset.masks import mask_paths
    from lib.dataset.vhap import SPLITS, VhapExport

    root, masks_dir = resolve(cfg.actor.data_dir), ActorPaths(cfg).masks
    export = VhapExport(root)
    images = dict.fromkeys(frame.image_path for split in SPLITS for frame in export.split(split))
    found = [mask_paths(image, root, masks_dir) for image in images]
    return [p for paths in found for p in (paths.keep, paths.mouth)]


def _latest_checkpoint(folder: Path) -> list[Path]:
    """The newest checkpoint, or the folder itself when it holds none (so that it counts as missing)."""
    from lib.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(folder)
    return [latest if latest is not None else folder]


def _reenactment(cfg: Config, source: Config | None) -> list[Path]:
    if source is None:
        raise StageError("cross-identity reenactment needs a source actor's config (a second config file)")
    return [ActorPaths(cfg).reenactment(source.actor.name) / "reenactment.json"]  # written last


# Stage -> the outputs that prove it finished. A folder must exist and hold a file.
OUTPUTS: dict[str, Callable[[Config, Config | None], list[Path]]] = {
    "data": _actor_data,
    "source_data": _actor_data,
    "masks": _masks,
    "mesh_pca": lambda cfg, _: [ActorPaths(cfg).mesh_pca, ActorPaths(cfg).canonical_mesh],
    "regressor": lambda cfg, _: _latest_checkpoint(ActorPaths(cfg).regressor_checkpoints),
    "regressor_test": lambda cfg, _: [ActorPaths(cfg).regressor_eval / "metrics.json"],  # written last
    "gem": lambda cfg, _: [ActorPaths(cfg).gem, ActorPaths(cfg).gem_report],
    "sweeps": lambda cfg, _: [ActorPaths(cfg).gem_sweeps],
    "mapping": lambda cfg, _: _latest_checkpoint(ActorPaths(cfg).mapping_checkpoints),
    "self_reenactment": lambda cfg, _: [ActorPaths(cfg).mapping_eval / "metrics.json"],  # written last
    "cross_reenactment": _reenactment,
}


# Stage -> the stages whose outputs it reads (run.sh's order respects this graph).
UPSTREAM: dict[str, tuple[str, ...]] = {
    "data": (), "source_data": (), "masks": ("data",), "mesh_pca": ("data",), "regressor": ("masks", "mesh_pca"),
    "regressor_test": ("regressor",), "gem": ("regressor",), "sweeps": ("gem",), "mapping": ("gem",),
    "self_reenactment": ("mapping",), "cross_reenactment": ("mapping", "source_data"),
}
# Stage -> the config sections its script reads itself. A stage's hash covers these and those of every
# stage upstream of it, so an edit reruns the stages that read the edited section and everything
# downstream of them, and nothing else (a viewer setting reruns the sweeps, not GEM).
SECTIONS: dict[str, tuple[str, ...]] = {
    # masks: data.masks_dir is not hashed; moving the masks folder changes the stage's outputs, which reruns it
    "data": ("actor", "synthetic"), "source_data": ("actor", "synthetic"), "masks": ("actor",),
    "mesh_pca": ("actor", "mesh_pca"), "regressor": ("data", "regressor", "train", "loss"),
    "regressor_test": ("test",), "gem": ("gem", "test"), "sweeps": ("viewer",), "mapping": ("mapping", "train", "loss"),
    "self_reenactment": ("test",), "cross_reenactment": ("test",),
}
SOURCE_SECTIONS = ("actor", "synthetic", "test")  # what cross-identity reenactment reads of the source actor
RAN_ENV = "GEM_STAGES_RAN"  # run.sh: the stages that ran in this invocation, separated by spaces


def ancestors(name: str) -> list[str]:
    """Every stage upstream of ``name``, nearest first, each once."""
    found: list[str] = []
    for up in UPSTREAM[name]:
        for stage in [up, *ancestors(up)]:
            if stage not in found:
                found.append(stage)
    return found


def read_sections(name: str) -> list[str]:
    """The config sections stage ``name`` depends on: its own and its upstream stages', sorted."""
    return sorted({s for stage in [name, *ancestors(name)] for s in SECTIONS[stage]})


class StageError(ProjectError, ValueError):
    """A stage name or stage arguments that cannot be used as given."""


def _check_name(name: str) -> None:
    if name not in OUTPUTS:
        raise StageError(f"unknown stage '{name}'; one of {', '.join(OUTPUTS)}")


def stamp_path(name: str, cfg: Config, source: Config | None = None) -> Path:
    """``experiments/<actor>/<run>/stages/<name>.json``; per source actor for a stage that has one."""
    return ActorPaths(cfg).root / "stages" / (f"{name}.{source.actor.name}.json" if source else f"{name}.json")


def config_hash(name: str, cfg: Config, source: Config | None = None) -> str:
    """sha256 of the stage name and the resolved config sections it depends on (``read_sections``; of the
    source actor: ``SOURCE_SECTIONS``), independent of key order."""
    values, source_values = cfg.to_dict(), source.to_dict() if source else None
    payload = {"stage": name, "config": {s: values[s] for s in read_sections(name)},
               "source": {s: source_values[s] for s in SOURCE_SECTIONS} if source_values else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _shown(path: Path) -> str:
    """Relative to the repository root where it lies inside it: stamps survive moving the checkout."""
    relative = os.path.relpath(path, REPO_ROOT)
    return str(path) if relative.startswith("..") else relative


def _present(path: Path) -> bool:
    """A file, or a folder holding a file or folder that is not hidden (a lock file proves nothing)."""
    return any(not p.name.startswith(".") for p in path.iterdir()) if path.is_dir() else path.is_file()


def why_not_done(name: str, cfg: Config, source: Config | None = None, ran: tuple[str, ...] = ()) -> str | None:
    """None when stage ``name`` is done for this config; else the reason it has to run. ran: the stages
    that ran in this invocation of run.sh (a stage downstream of one of them runs again)."""
    _check_name(name)
    for up in ancestors(name):
        if up in ran:
            return f"upstream stage '{up}' ran"
    stamp = stamp_path(name, cfg, source)
    if not stamp.is_file():
        return "no record of a finished run"
    try:
        record = json.loads(stamp.read_text())
        recorded_hash, recorded_outputs = record["hash"], record["outputs"]
    except (OSError, ValueError, TypeError, KeyError):
        return f"its record {_shown(stamp)} is unreadable"
    if recorded_hash != config_hash(name, cfg, source):
        return "its config changed since it last ran"
    try:
        outputs = OUTPUTS[name](cfg, source)
    except (ValueError, OSError) as e:  # an unreadable dataset among them
        return f"its outputs cannot be listed ({e})"
    missing = [p for p in outputs if not _present(p)]
    if missing:
        return f"output missing: {_shown(missing[0])}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if recorded_outputs != [_shown(p) for p in outputs]:
        return "its outputs changed since it last ran"
    return None


def mark(name: str, cfg: Config, source: Config | None = None) -> Path:
    """Record that stage ``name`` finished for this config; refused when its outputs are missing."""
    _check_name(name)
    outputs = OUTPUTS[name](cfg, source)
    missing = [p for p in outputs if not _present(p)]
    if missing:
        raise StageError(f"stage '{name}' exited without error but did not write {_shown(missing[0])}"
                         + (f" (and {len(missing) - 1} more outputs)" if len(missing) > 1 else "")
                         + "; run its script alone to see why")
    path = stamp_path(name, cfg, source)
    write_json(path, {"stage": name, "hash": config_hash(name, cfg, source),
                      "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                      "configs": [c.source for c in (cfg, source) if c is not None],
                      "outputs": [_shown(p) for p in outputs]})
    return path


def results(cfg: Config, source: Config | None = None) -> list[tuple[str, Path]]:
    """(what, path) of every metrics / report file and video folder of the actor that exists."""
    paths = ActorPaths(cfg)
    found = [("regressor test metrics", paths.regressor_eval / "metrics.json"),
             ("regressor test videos", paths.regressor_eval),
             ("GEM report", paths.gem_report),
             ("GEM sweep videos", paths.gem_sweeps),
             ("self-reenactment metrics", paths.mapping_eval / "metrics.json"),
             ("self-reenactment video", paths.mapping_eval)]
    if source is not None:
        found.append((f"cross-identity reenactment by {source.actor.name}", paths.reenactment(source.actor.name)))
    return [(what, p) for what, p in found if p.is_file() or (p.is_dir() and any(p.glob("*.mp4")))]


def parse_args(args: list[str]) -> tuple[Config, Config | None]:
    """A stage script's arguments: CONFIG [SOURCE_CONFIG] and section.key=value overrides of CONFIG."""
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    if not 1 <= len(files) <= 2:
        raise StageError(f"expected CONFIG [SOURCE_CONFIG] and overrides, got {len(files)} config files: {files}")
    cfg = load_config(files[0], overrides)
    return cfg, load_config(files[1]) if len(files) == 2 else None


def main(argv: list[str]) -> int:
    """Exit 0 when done / marked / listed; 1 when not done or on an error (its message on stderr)."""
    usage = "usage: python -m lib.stages {done,mark} NAME CONFIG [SOURCE_CONFIG] [section.key=value ...] | results CONFIG ..."
    if not argv or argv[0] not in ("done", "mark", "results") or len(argv) < (2 if argv[0] == "results" else 3):
        print(usage, file=sys.stderr)
        return 1
    action = argv[0]
    name, args = (None, argv[1:]) if action == "results" else (argv[1], argv[2:])
    try:
        cfg, source = parse_args(args)
        if action == "results":
            found = results(cfg, source)
            width = max((len(what) for what, _ in found), default=0) + 1
            for what, path in found:
                print(f"  {what + ':':<{width}} {_shown(path)}{'/' if path.is_dir() else ''}")
            return 0
        if action == "mark":
            mark(name, cfg, source)
            return 0
        reason = why_not_done(name, cfg, source, tuple(os.environ.get(RAN_ENV, "").split()))
    except (ProjectError, OSError) as e:
        print(f"stages: {e}", file=sys.stderr)
        return 1
    if reason is not None:
        print(reason)
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
