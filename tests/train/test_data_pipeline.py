"""The training images' pipeline: a DataLoader over steps, workers, the shared byte-budget cache, errors."""
import json
from dataclasses import replace
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib.config import load_config
from lib.dataset.image_cache import ImageCache
from lib.dataset.masks import mask_paths
from lib.dataset.vhap import DatasetError, VhapExport
from lib.paths import REPO_ROOT, ActorPaths, resolve
from lib.train import data as data_module
from lib.train.data import LoaderError, TrainingImages, read_pixels

CPU = torch.device("cpu")


def _images(cfg, workers=0, rank=0, world=1, start=0, stop=40, views=1, **data):
    cfg.data.workers = workers
    for key, value in data.items():
        setattr(cfg.data, key, value)
    export = VhapExport.from_config(cfg)
    return TrainingImages(export, export.split("train"), cfg, rank, world, start, stop, CPU, local_world_size=1,
                          views=views)


def _draws(images, steps):
    out = []
    for step in steps:
        sample, bg, gt = images.at(step)
        out.append((sample.frame.image_path, bg.tolist(), gt))
    return out


# ---------------------------------------------------------------- the cache

def test_cache_keeps_the_first_frames_put_until_its_budget_is_spent():
    cache = ImageCache([100, 100, 100], budget=250)
    frames = [np.full(100, i + 1, dtype=np.uint8) for i in range(3)]
    for i in (2, 0, 1):
        assert cache.get(i) is None
        cache.put(i, frames[i])
    np.testing.assert_array_equal(cache.get(2), frames[2])
    np.testing.assert_array_equal(cache.get(0), frames[0])
    assert cache.get(1) is None  # no room left: decoded at every use
    assert cache.used == 200
    cache.put(0, np.zeros(100, dtype=np.uint8))  # a frame is kept once
    np.testing.assert_array_equal(cache.get(0), frames[0])
    assert ImageCache([100], budget=0).get(0) is None


def _fill_in_child(cache):
    cache.put(0, np.full(64, 7, dtype=np.uint8))


def test_a_frame_a_forked_worker_caches_is_seen_by_every_process():
    cache = ImageCache([64], budget=1 << 20)
    assert cache.budget == 64  # no more than the export needs
    child = multiprocessing.get_context("fork").Process(target=_fill_in_child, args=(cache,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    np.testing.assert_array_equal(cache.get(0), np.full(64, 7, dtype=np.uint8))


def test_a_pickled_cache_arrives_empty():
    import pickle

    cache = ImageCache([8], budget=64)
    cache.put(0, np.arange(8, dtype=np.uint8))
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.get(0) is None
    copy.put(0, np.arange(8, dtype=np.uint8))  # a no-op, not an error


# ---------------------------------------------------------------- draws

def test_draws_do_not_depend_on_workers_cache_or_resuming(tiny_actor_config):
    cfg = load_config(tiny_actor_config)
    steps = list(range(12))
    reference = _draws(_images(cfg, workers=0, cache_gb=0.0), steps)
    for workers, cache_gb, start in ((2, 1.0, 0), (1, 0.0, 0), (1, 1.0, 5)):
        got = _draws(_images(cfg, workers=workers, cache_gb=cache_gb, start=start), steps[start:])
        for (path, bg, gt), (ref_path, ref_bg, ref_gt) in zip(got, reference[start:]):
            assert path == ref_path and bg == ref_bg
            torch.testing.assert_close(gt, ref_gt, rtol=0, atol=0)
    # and the draws are random: several frames and backgrounds over 12 steps
    assert len({p for p, _, _ in reference}) > 3 and len({tuple(b) for _, b, _ in reference}) > 3


def test_a_step_of_several_views_sees_its_timestep_from_distinct_cameras(tiny_actor_config):
    cfg = load_config(tiny_actor_config)
    export = VhapExport.from_config(cfg)
    cameras = {}  # timestep -> the train split's images of it
    for f in export.split("train"):
        cameras.setdefault(f.timestep_index, set()).add(f.image_path)
    single, several, loaded = _images(cfg), _images(cfg, views=3), _images(cfg, workers=1, views=3)
    for step in range(12):
        one, _, _ = single.at(step)
        samples, bg, gt = several.views(step)
        t = samples[0].frame.timestep_index
        paths = [s.frame.image_path for s in samples]
        assert paths[0] == one.frame.image_path  # the first view is the one-view step's image
        assert len(set(paths)) == len(paths) == min(3, len(cameras[t])) and set(paths) <= cameras[t]
        assert bg.shape == (len(paths), 3) and gt.shape[0] == len(paths)
        for k, s in enumerate(samples):  # each view on its own background
            torch.testing.assert_close(gt[k:k + 1], s.ground_truth(bg[k]), rtol=0, atol=0)
        samples_w, bg_w, gt_w = loaded.views(step)  # and workers draw the same
        assert [s.frame.image_path for s in samples_w] == paths
        torch.testing.assert_close(gt_w, gt, rtol=0, atol=0)
    assert min(len(c) for c in cameras.values()) >= 3  # so every step above drew three views
    with pytest.raises(ValueError, match="drew 3 views"):
        _images(cfg, views=3).at(0)  # a one-view caller is told, not handed the first view


def test_the_sample_holds_the_exports_pixels(tiny_actor_config):
    cfg = load_config(tiny_actor_config)
    images = _images(cfg)
    sample, _, _ = images.at(0)
    export = VhapExport.from_config(cfg)
    image = export.load_image(sample.frame)
    paths = mask_paths(sample.frame.image_path, export.root, export.masks_dir)
    keep, mouth = (export.load_mask(replace(sample.frame, mask_path=p)) for p in (paths.keep, paths.mouth))
    fg = export.load_mask(sample.frame)  # the export's own foreground alpha
    torch.testing.assert_close(sample.image, image, rtol=0, atol=0)
    torch.testing.assert_close(sample.fg, fg, rtol=0, atol=0)
    torch.testing.assert_close(sample.keep, keep, rtol=0, atol=0)
    torch.testing.assert_close(sample.mouth, mouth, rtol=0, atol=0)
    torch.testing.assert_close(sample.alpha, fg * keep, rtol=0, atol=0)
    assert keep.max() > 0.5 and mouth.max() > 0.5  # the tiny actor's frames show a head and its mouth
    assert ((fg > 0) & (fg < 1)).any()  # soft edges to re-composite


def test_ranks_draw_from_disjoint_shares_of_the_frames(tiny_actor_config):
    cfg = load_config(tiny_actor_config)
    everything = set(f.image_path for f in VhapExport.from_config(cfg).split("train"))
    shares = [set(f.image_path for f in _images(cfg, rank=r, world=3).frames) for r in range(3)]
    assert not (shares[0] & shares[1]) and not (shares[1] & shares[2]) and not (shares[0] & shares[2])
    assert set.union(*shares) == everything


def test_a_step_asked_for_twice_is_a_programming_error(tiny_actor_config):
    images = _images(load_config(tiny_actor_config))
    images.at(3)
    with pytest.raises(ValueError, match="step 2"):
        images.at(2)


# ---------------------------------------------------------------- errors from workers

@pytest.fixture
def broken_copy(tiny_actor_config, tmp_path):
    """(config path, overrides, data folder) of a private copy of the tiny actor's export and stage 1."""
    cfg = load_config(tiny_actor_config)
    data = tmp_path / "actor"
    shutil.copytree(resolve(cfg.actor.data_dir), data)
    overrides = [f"actor.data_dir={os.path.relpath(data, REPO_ROOT)}",
                 f"actor.experiments_dir={os.path.relpath(tmp_path / 'experiments', REPO_ROOT)}"]
    shutil.copytree(ActorPaths(cfg).stage_dir("mesh_pca"),
                    ActorPaths(load_config(tiny_actor_config, overrides)).stage_dir("mesh_pca"))
    return tiny_actor_config, overrides, data


def _train_images(data):
    return [data / f["file_path"] for f in json.loads((data / "transforms_train.json").read_text())["frames"]]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_bad_image_found_by_a_worker_is_the_same_dataset_error(broken_copy, damage):
    config, overrides, data = broken_copy
    for image in _train_images(data):
        if damage == "truncated":
            image.write_bytes(image.read_bytes()[:100])
        else:
            image.unlink()
    messages = []
    for workers in (0, 2):
        with pytest.raises(DatasetError) as error:
            _images(load_config(config, overrides), workers=workers).at(0)
        messages.append(str(error.value))
    assert messages[0] == messages[1], messages
    assert "Traceback" not in messages[1] and "worker" not in messages[1]
    assert str(data / "images") in messages[1]
    assert ("cannot decode" if damage == "truncated" else "image not found") in messages[1]


def test_a_worker_that_dies_ends_the_run_with_a_loader_error(tiny_actor_config, monkeypatch):
    def die(*args):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return read_pixels(*args)

    monkeypatch.setattr(data_module, "read_pixels", die)  # the forked worker inherits the patch
    with pytest.raises(LoaderError, match="data-loading worker died.*data.workers"):
        _images(load_config(tiny_actor_config), workers=1, cache_gb=0.0).at(0)


def test_train_py_stops_with_the_files_name_when_a_worker_meets_a_truncated_image(broken_copy):
    config, overrides, data = broken_copy
    for image in _train_images(data):
        image.write_bytes(image.read_bytes()[:100])
    result = subprocess.run([sys.executable, "train.py", str(config), *overrides, "data.workers=2"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot decode ") and str(data / "images") in line, line


def test_meshes_posed_on_demand_equal_the_ones_posed_up_front(tiny_actor_config):
    from lib.flame.model import FlameModel
    from lib.train.data import ActorData

    cfg = load_config(tiny_actor_config)
    export, flame = VhapExport.from_config(cfg), FlameModel.from_config(cfg)
    kept, lazy = ActorData(export, flame, CPU), ActorData(export, flame, CPU, keep_meshes=False)
    steps = kept.timesteps[::-1]
    for t in steps:
        assert kept.driving(t).tracked is None and lazy.driving(t).tracked is None  # nothing corrected
        for a, b in zip(kept.driving(t)[:3], lazy.driving(t)[:3]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(kept.meshes(steps), lazy.meshes(steps), rtol=0, atol=1e-6)
    torch.testing.assert_close(kept.meshes(steps[:1])[0], kept.driving(steps[0])[0][0])
    for a, b in zip(kept.gem_pose(steps), lazy.gem_pose(steps)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
