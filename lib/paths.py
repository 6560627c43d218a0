"""Where things live: the repository root, config paths, and each stage's artifacts.

This is the one place that turns a config's relative paths into files on disk, so every
stage reads exactly what the previous stage wrote.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO_ROOT / "experiments"


def resolve(path: str | Path) -> Path:
    """A path from a config (relative to the repository root) as an absolute path."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


class ActorPaths:
    """The artifacts of one actor under ``experiments/<actor.name>/``."""

    def __init__(self, cfg):
        self.root = EXPERIMENTS / cfg.actor.name

    def stage_dir(self, stage: str) -> Path:
        """Folder of one stage's run (checkpoints, logs, resolved config)."""
        return self.root / stage
