"""Training checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``.

A run folder holds ``checkpoints/step_XXXXXXXX.pt``; the highest step is the latest. A checkpoint
is a plain dict of tensors and numbers (no pickled objects), so loading runs no code from the file.
It also holds the config values that shaped its model (``shaping_config``): a resume under another
value of one of them is refused (``check_resume``), naming the keys, so a run is never continued
by a config that did not train it.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from lib.atomic import load_torch, save_torch
from lib.config import RESUMABLE, SCHEMA
from lib.errors import ProjectError, check_finite

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(ProjectError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


def shaping_config(cfg, stage: str) -> dict[str, Any]:
    """'section.key' -> value of every key that shapes the model of ``stage`` ("regressor", "mapping"):
    the keys of the sections the stage and its upstream stages read, less ``lib.config.RESUMABLE``."""
    from lib.stages import read_sections

    values = cfg.to_dict()
    return {f"{s}.{k}": v for s in read_sections(stage) for k, v in values[s].items()
            if f"{s}.{k}" not in RESUMABLE}


def check_resume(state: dict, cfg, stage: str, path: str | Path) -> None:
    """Refuse to resume from checkpoint ``path`` when a key that shapes the model has another value now.
    A key the checkpoint does not record (added to the schema after it was written) may keep its default:
    a new key's default is the behaviour before it (e.g. ``train.views_per_step`` 1)."""
    recorded = state.get("shaping")
    if not isinstance(recorded, dict):
        return  # a checkpoint from before shaping records: nothing to compare
    current, recorded = shaping_config(cfg, stage), dict(recorded)
    for name in set(current) - set(recorded):
        section, key = name.split(".", 1)
        if current[name] == SCHEMA[section][key].default:
            recorded[name] = current[name]
    missing = object()
    differ = [k for k in sorted(set(recorded) | set(current)) if recorded.get(k, missing) != current.get(k, missing)]
    if differ:
        shown = "; ".join(f"{k}: {recorded.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}" for k in differ[:8])
        more = f" and {len(differ) - 8} more" if len(differ) > 8 else ""
        raise CheckpointError(
            f"{path} was trained with another config: {shown}{more}. These keys shape the model, so the run "
            "cannot continue with them changed. Either give the new config its own run (run.name=NAME), or start "
            "this run over with train.resume=false (the old checkpoints are moved aside, not deleted)")


def set_aside(folder: str | Path) -> Path | None:
    """Move a checkpoint folder out of the way (``checkpoints.before-YYYYmmdd-HHMMSS``) so that a run starts
    over without deleting anything. -> the new name, or None when there was nothing to move"""
    folder = Path(folder)
    if not list_checkpoints(folder):
        return None
    target = folder.with_name(f"{folder.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
    while target.exists():
        target = target.with_name(target.name + "x")
    folder.rename(target)
    return target


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoints of a folder, by ascending step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def save_checkpoint(state: dict, folder: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``state`` as step ``step`` (temp file + rename), then drop all but the ``keep`` newest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, step)
    save_torch(path, state)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint; a truncated, corrupt or foreign file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; train first (python train.py CONFIG)")
    state = load_torch(path, CheckpointError, "delete it to resume from the previous checkpoint, or retrain",
                       map_location)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint {path} does not hold a training state (no 'model'/'step'); "
                              "delete it or point at a checkpoint written by train.py")
    step, elapsed = state["step"], state.get("elapsed", 0.0)
    if not isinstance(state["model"], dict) or isinstance(step, bool) or not isinstance(step, int) or step < 0 \
            or not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed) or elapsed < 0:
        raise CheckpointError(f"checkpoint {path} holds a malformed training state (model {type(state['model']).__name__}, "
                              f"step {step!r}, elapsed {elapsed!r}); delete it to resume from the previous one")
    for name, value in state["model"].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            check_finite(value, name, f"checkpoint {path}", CheckpointError)
    return state


def load_into(module: torch.nn.Module, state: dict, path: str | Path, what: str = "model") -> None:
    """``module.load_state_dict(state)``; a checkpoint of another shape raises CheckpointError naming
    ``path`` (what: "model", "optimizer", ...) instead of torch's size-mismatch traceback."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds no {what} state; delete it to resume from the previous one")
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # missing keys, shapes, parameter groups
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        detail = detail if len(detail) <= 240 else detail[:240] + " ..."
        raise CheckpointError(
            f"checkpoint {path} does not fit the {what} of this config ({detail}): it was written with other "
            "network settings or code. Use the config it was trained with, or train anew in another run "
            "folder (move the old one aside)") from None
