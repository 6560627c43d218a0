"""Where things live: the repository root, config paths, and each stage's artifacts.

This is the one place that turns a config's relative paths into files on disk, so every
stage reads exactly what the previous stage wrote.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO_ROOT / "experiments"


def resolve(path: str | Path) -> Path:
    """A path from a config (relative to the repository root) as an absolute path."""
    path = Path(path)
    # normpath: '../x' from a config names the file as the user knows it (errors quote these paths)
    return path if path.is_absolute() else Path(os.path.normpath(REPO_ROOT / path))


class ActorPaths:
    """The artifacts of one run of an actor under ``experiments/<actor.name>/<run.name>/``: runs of one
    actor with other settings (ablations) live side by side. The actor's masks are shared by its runs."""

    def __init__(self, cfg):
        self.actor = Path(os.path.normpath(resolve(cfg.actor.experiments_dir) / cfg.actor.name))
        self.root = self.actor / cfg.run.name
        self._masks_dir = cfg.data.masks_dir

    @property
    def masks(self) -> Path:
        """render_masks.py's alpha and mouth masks of the actor's export (``data.masks_dir``; by default
        ``experiments/<actor>/masks/``, shared by the actor's runs: masks depend on the data and FLAME only)."""
        return resolve(self._masks_dir) if self._masks_dir else self.actor / "masks"

    def stage_dir(self, stage: str) -> Path:
        """Folder of one stage's run (checkpoints, logs, resolved config)."""
        return self.root / stage

    # ---- stage 1: mesh PCA ----
    @property
    def mesh_pca(self) -> Path:
        """Mean, components, variances and whitening of the tracked meshes (.npz)."""
        return self.stage_dir("mesh_pca") / "mesh_pca.npz"

    @property
    def canonical_mesh(self) -> Path:
        """The actor's canonical head-space mesh (.npz with 'verts' [V, 3])."""
        return self.stage_dir("mesh_pca") / "canonical_mesh.npz"

    # ---- stage 2: regressor ----
    @property
    def regressor(self) -> Path:
        return self.stage_dir("regressor")

    @property
    def regressor_checkpoints(self) -> Path:
        return self.regressor / "checkpoints"

    @property
    def regressor_tensorboard(self) -> Path:
        return self.regressor / "tensorboard"

    @property
    def regressor_curve(self) -> Path:
        """Val PSNR versus training minutes (.csv; a .png plot beside it)."""
        return self.regressor / "psnr_curve.csv"

    @property
    def regressor_eval(self) -> Path:
        """test.py's renders, videos and metrics.json."""
        return self.regressor / "eval"

    # ---- stage 3: GEM ----
    @property
    def gem_dir(self) -> Path:
        return self.stage_dir("gem")

    @property
    def gem(self) -> Path:
        """The eigenbasis: means, bases, variances, colours, per-frame coefficients (.pt)."""
        return self.gem_dir / "gem.pt"

    @property
    def gem_report(self) -> Path:
        """pca_gauss.py's figures: reconstruction errors, sizes, renders against the regressor (.json)."""
        return self.gem_dir / "report.json"

    @property
    def gem_sweeps(self) -> Path:
        """pca_viewer.py's PNG strips and MP4 videos of component sweeps."""
        return self.gem_dir / "sweeps"

    @property
    def gem_exports(self) -> Path:
        """PLY files exported from the web viewer."""
        return self.gem_dir / "exports"

    # ---- stage 4: mapping network ----
    @property
    def mapping(self) -> Path:
        return self.stage_dir("mapping")

    @property
    def mapping_checkpoints(self) -> Path:
        return self.mapping / "checkpoints"

    @property
    def mapping_tensorboard(self) -> Path:
        return self.mapping / "tensorboard"

    @property
    def encoder_pca(self) -> Path:
        """The encoder signal's per-actor PCA of relative image features (.npz)."""
        return self.mapping / "encoder_pca.npz"

    @property
    def mapping_eval(self) -> Path:
        """test.py's self-reenactment renders and metrics.json (predicted vs ground-truth coefficients)."""
        return self.mapping / "eval"

    def reenactment(self, source: str) -> Path:
        """test.py TARGET SOURCE: cross-identity reenactment of this actor by actor ``source`` (PNGs, MP4s)."""
        return self.mapping / "reenact" / source
