"""Suite-wide settings, applied before any test module imports torch, and the tiny synthetic actor
(80x55 images, 10 cameras, 2 x 3 timesteps) with its masks (in its own data.masks_dir) and mesh PCA, made once per test session
when a test asks for it, with tiny regressor configs that train in seconds."""
import lib  # noqa: F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import os
import shutil

import pytest
import torch
import yaml

from lib.config import load_config
from lib.dataset.masks import render_masks
from lib.dataset.synthetic_actor import ActorSpec, HeadFiles, generate_actor
from lib.dataset.vhap import VhapExport
from lib.flame.model import FlameModel
from lib.flame.safe_pickle import load_pickle
from lib.flame.synthetic import ensure_head_model
from lib.paths import REPO_ROOT, ActorPaths, resolve
from lib.train.fit_mesh_pca import fit_mesh_pca


def _rel(path) -> str:
    """Configs take paths relative to the repository root, also for pytest's temporary folders."""
    return os.path.relpath(path, REPO_ROOT)


TINY_REGRESSOR = {"uv_size": 16, "widths": [8, 8], "convs_per_level": 1, "feature_channels": 4,
                  "style_dim": 8, "colour_width": 8, "n_pca": 4}


def build_tiny_actor(root, **sections):
    """The tiny actor under ``root``: its config (tiny.yml, each of ``sections`` merged into the section of
    that name), dataset, masks and mesh PCA. -> the config's path"""
    head = root / "head"
    cfg_data = {
        "base": os.path.relpath(REPO_ROOT / "configs" / "synthetic_a.yml", root),  # relative to this file
        "actor": {"name": "tiny", "data_dir": _rel(root / "actor"), "flame_model": _rel(head / "flame2023.pkl"),
                  "flame_uv": _rel(head / "head_template.obj"), "flame_masks": _rel(head / "FLAME_masks.pkl"),
                  "experiments_dir": _rel(root / "experiments")},
        "synthetic": {"head_dir": _rel(head), "scale": 0.1, "n_cameras": 10, "sequences": ["A", "B"],
                      "frames_per_sequence": 3},
        "regressor": TINY_REGRESSOR,
        "train": {"iterations": 6, "checkpoint_every": 3, "log_every": 2, "image_every": 3,
                  "curve_every_minutes": 0.0, "lr": 2e-3, "lr_features": 1e-2, "lr_schedule": "exponential",
                  "device": "cpu", "threads": 1},
        "test": {"spin_views": 4, "max_frames": 2},
        # the actor's own masks folder, so runs in other experiments folders (run_config) find its masks
        "data": {"masks_dir": _rel(root / "masks")},
    }
    for section, values in sections.items():
        cfg_data.setdefault(section, {}).update(values)
    path = root / "tiny.yml"
    path.write_text(yaml.safe_dump(cfg_data))
    cfg = load_config(path)
    torch.set_num_threads(1)  # tiny tensors: extra threads only spin against other processes
    ensure_head_model(resolve(cfg.synthetic.head_dir), cfg.synthetic.head_seed, cfg.synthetic.head_mouth)
    generate_actor(resolve(cfg.actor.data_dir), HeadFiles.from_config(cfg), ActorSpec.from_config(cfg), log=lambda *a: None)
    render_masks(VhapExport(resolve(cfg.actor.data_dir), masks_dir=ActorPaths(cfg).masks),
                 FlameModel.from_file(resolve(cfg.actor.flame_model)), load_pickle(resolve(cfg.actor.flame_masks)),
                 log=lambda *a: None)
    fit_mesh_pca(cfg, log=lambda *a: None)
    return path


@pytest.fixture(scope="session")
def tiny_actor_config(tmp_path_factory):
    """Path of a config for the tiny actor (stage 1 done); runs write under the same folder."""
    return build_tiny_actor(tmp_path_factory.mktemp("tiny_actor"))


@pytest.fixture
def tiny_actor_factory(tmp_path):
    """``build_tiny_actor`` in this test's folder: another shape of the tiny actor, e.g.
    ``tiny_actor_factory(synthetic={"n_cameras": 1})``. -> the config's path"""
    return lambda **sections: build_tiny_actor(tmp_path, **sections)


@pytest.fixture
def run_config(tiny_actor_config, tmp_path):
    """A fresh run of the tiny actor: stage 1 copied from the session's, its own run folder."""
    overrides = [f"actor.experiments_dir={_rel(tmp_path / 'experiments')}"]
    shutil.copytree(ActorPaths(load_config(tiny_actor_config)).stage_dir("mesh_pca"),
                    ActorPaths(load_config(tiny_actor_config, overrides)).stage_dir("mesh_pca"))
    return tiny_actor_config, overrides


class RenderLog:
    """The order in which an evaluation renders and appends frames to its videos: proof that it streams
    (each frame goes to the video as it is rendered) instead of holding a split in memory."""

    def __init__(self, monkeypatch):
        from lib.eval.video import VideoWriter

        self.events: list[str] = []  # "render", or the name of the video a frame was appended to
        self._monkeypatch = monkeypatch
        append = VideoWriter.append

        def logged_append(writer, frame):
            self.events.append(writer.path.name)
            append(writer, frame)

        monkeypatch.setattr(VideoWriter, "append", logged_append)

    def watch(self, module, name: str) -> None:
        """Log each call of ``module.name`` (a render function as that module sees it) as a render."""
        real = getattr(module, name)

        def logged(*args, **kwargs):
            self.events.append("render")
            return real(*args, **kwargs)

        self._monkeypatch.setattr(module, name, logged)

    def renders_in_a_row(self) -> int:
        """The most renders with no frame appended to a video between them."""
        longest = run = 0
        for event in self.events:
            run = run + 1 if event == "render" else 0
            longest = max(longest, run)
        return longest

    def frames(self, video: str) -> int:
        return self.events.count(video)


@pytest.fixture
def render_log(monkeypatch) -> RenderLog:
    return RenderLog(monkeypatch)


@pytest.fixture
def fill_disk(monkeypatch):
    """A function that, once called, makes every temporary file lib.atomic creates a link to /dev/full,
    which fails every write with ENOSPC, as a full disk does."""
    import tempfile

    from lib import atomic

    real_mkstemp = tempfile.mkstemp

    def full_disk_mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        os.remove(name)
        os.symlink("/dev/full", name)
        return os.open(name, os.O_RDONLY), name

    return lambda: monkeypatch.setattr(atomic.tempfile, "mkstemp", full_disk_mkstemp)
