"""Training checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``.

A run folder holds ``checkpoints/step_XXXXXXXX.pt``; the highest step is the latest. A checkpoint
is a plain dict of tensors and numbers (no pickled objects), so loading runs no code from the file.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from lib.atomic import load_torch, save_torch
from lib.errors import ProjectError, check_finite

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(ProjectError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


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
