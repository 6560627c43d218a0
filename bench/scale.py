"""Benchmark the pipeline at NeRSemble scale: peak resident memory and throughput of the training-image
loader, the GEM build (stage 3) and test.py, for T = 500, 1,000 and 2,000 timesteps x 16 cameras at
802 x 550.

The export is fabricated cheaply, in the real format: a small synthetic actor (16 cameras, a few
timesteps at a quarter of the size) is generated once, its images and masks are upscaled to 802 x 550
once, and every timestep of the big export hard-links one of them; its FLAME parameters are
interpolated between the small actor's. Splits as NeRSemble's: train = the first 90% of the timesteps
seen by the 15 side cameras, val = the same timesteps from the frontal camera 8, test = the last 10%
from all 16. The regressor is an untrained one at UV 256 (50,933 Gaussians on the synthetic head; the CPU default's
generator widths one level deeper): memory and speed do not depend on its weights, and a wider (GPU)
generator changes the time per timestep, not how memory grows with T.

Each measurement is its own process, so its peak resident set (``ru_maxrss``) is its own:
  loader      ``lib.train.data.TrainingImages`` with the config's defaults (workers, cache budget) over
              enough steps to fill the cache; peak of the trainer process and of its largest worker.
              Timed: the loader's items as the training process receives them (uint8, before its
              device turns them into float images, which a GPU does in well under a millisecond).
  throughput  the loader without a cache (every image decoded: the steady state at this scale) with 0,
              1 and 2 workers, at the largest T, so a GPU host can be sized from the figure per worker.
  gem         ``pca_gauss.py`` with gem.evaluate false (the build: regressor over every train + val
              timestep, the frame store, the bases, the reconstruction errors).
  test        ``test.py`` on the val split, ``--test-frames`` frames (renders, comparisons, video, metrics).
The fabricated data is deleted afterwards (``--keep`` keeps it).

    .venv/bin/python bench/scale.py [--timesteps 500 1000 2000] [--parts loader gem test throughput]
                                    [--test-frames 1000] [--workdir DIR] [--keep]
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HEIGHT, WIDTH = 550, 802
FRONTAL = 8
SOURCE_TIMESTEPS = 8  # distinct images per camera; the big export reuses them
GB = 1 << 30


# ---------------------------------------------------------------- fabrication

def _rel(path: Path) -> str:
    return os.path.relpath(path, REPO)


def small_actor(work: Path):
    """A small synthetic actor (16 cameras, SOURCE_TIMESTEPS timesteps, 1/4 size) with its masks.
    -> (its VhapExport, the config dict shared by the big actors)"""
    from lib.config import load_config
    from lib.dataset.masks import render_masks
    from lib.dataset.synthetic_actor import ActorSpec, HeadFiles, generate_actor
    from lib.dataset.vhap import VhapExport
    from lib.flame.model import FlameModel, load_regions
    from lib.flame.synthetic import ensure_head_model
    from lib.paths import resolve

    head = work / "head"
    base = {"base": os.path.relpath(REPO / "configs" / "default.yml", work),  # relative to the config file
            "actor": {"flame_model": _rel(head / "flame2023.pkl"), "flame_uv": _rel(head / "head_template.obj"),
                      "flame_masks": _rel(head / "FLAME_masks.pkl"), "experiments_dir": _rel(work / "experiments")},
            "synthetic": {"enabled": False, "head_dir": _rel(head)},
            # the CPU default's generator one level deeper: UV 256, about 59k Gaussians
            "regressor": {"uv_size": 256, "widths": [16, 32, 32, 64, 64, 64]},
            "train": {"device": "cpu"}}
    small = dict(base, actor={**base["actor"], "name": "small", "data_dir": _rel(work / "small")},
                 synthetic={"enabled": True, "head_dir": _rel(head), "scale": 0.25, "n_cameras": 16,
                            "sequences": ["A", "B"], "frames_per_sequence": SOURCE_TIMESTEPS // 2})
    path = work / "small.yml"
    path.write_text(yaml.safe_dump(small))
    cfg = load_config(path)
    ensure_head_model(resolve(cfg.synthetic.head_dir), cfg.synthetic.head_seed, cfg.synthetic.head_mouth)
    generate_actor(resolve(cfg.actor.data_dir), HeadFiles.from_config(cfg), ActorSpec.from_config(cfg), log=lambda *a: None)
    model = FlameModel.from_config(cfg)
    export = VhapExport.from_config(cfg)
    render_masks(export, model, load_regions(resolve(cfg.actor.flame_masks), model.v_template.shape[0]), log=lambda *a: None)
    return export, base


def _upscaled(src: Path, dst: Path, gray: bool) -> None:
    image = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst), cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system: a copy
        shutil.copyfile(src, dst)


def big_actor(work: Path, source, base: dict, T: int) -> Path:
    """The NeRSemble-scale export of T timesteps x 16 cameras, and stage 1 and a regressor checkpoint
    of its run. -> its config file"""
    from lib.config import load_config
    from lib.dataset.masks import mask_paths
    from lib.flame.model import FlameModel
    from lib.models.avatar import build_avatar
    from lib.paths import ActorPaths
    from lib.train.checkpoint import save_checkpoint, shaping_config
    from lib.train.fit_mesh_pca import fit_mesh_pca

    small = source.root
    frames = {(f.timestep_index, f.camera_index): f for s in ("train", "val", "test") for f in source.split(s)}
    full = work / "full"  # the upscaled source frames, made once for every T
    if not full.is_dir():
        for (t, c), f in frames.items():
            name = f"{t:05d}_{c:02d}.png"
            _upscaled(f.image_path, full / "images" / name, gray=False)
            _upscaled(f.mask_path, full / "fg_masks" / name, gray=True)
            masks = mask_paths(f.image_path, small, source.masks_dir)
            _upscaled(masks.keep, full / "keep" / name, gray=True)
            _upscaled(masks.mouth, full / "mouth" / name, gray=True)

    data = work / f"actor_{T}"
    cfg_dict = dict(base, actor={**base["actor"], "name": f"scale_{T}", "data_dir": _rel(data),
                                 "identity_timestep": 0})
    path = work / f"scale_{T}.yml"
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(path)
    masks_dir = ActorPaths(cfg).masks
    params = [np.load(small / "flame_param" / f"{t:05d}.npz") for t in range(SOURCE_TIMESTEPS)]
    cameras = {}  # camera index -> its fields in the small actor's json, intrinsics scaled to 802 x 550
    for split in ("train", "val", "test"):
        content = json.loads((small / f"transforms_{split}.json").read_text())
        for e in content["frames"]:
            fields = {k: e.get(k, content.get(k)) for k in ("transform_matrix", "fl_x", "fl_y", "cx", "cy", "w", "h")}
            sx, sy = WIDTH / fields["w"], HEIGHT / fields["h"]
            fields.update(fl_x=fields["fl_x"] * sx, fl_y=fields["fl_y"] * sy, cx=fields["cx"] * sx,
                          cy=fields["cy"] * sy, w=WIDTH, h=HEIGHT)
            cameras.setdefault(e["camera_index"], fields)
    split_of = {"train": [], "val": [], "test": []}
    (data / "flame_param").mkdir(parents=True)
    n_train = int(0.9 * T)
    for t in range(T):
        u = t / T * (SOURCE_TIMESTEPS - 1)  # interpolated motion over the small actor's timesteps
        k, w = int(u), u - int(u)
        b = min(k + 1, SOURCE_TIMESTEPS - 1)
        # the motion interpolated; shape and static offset belong to the subject: the same in every file
        motion = ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation")
        np.savez(data / "flame_param" / f"{t:05d}.npz",
                 **{key: ((1 - w) * params[k][key] + w * params[b][key]).astype(np.float32) if key in motion
                    else params[0][key] for key in params[k].files})
        for c in range(16):
            name, src = f"{t:05d}_{c:02d}.png", f"{round(u):05d}_{c:02d}.png"
            _link(full / "images" / src, data / "images" / name)
            _link(full / "fg_masks" / src, data / "fg_masks" / name)
            masks = mask_paths(data / "images" / name, data, masks_dir)
            _link(full / "keep" / src, masks.keep)
            _link(full / "mouth" / src, masks.mouth)
            entry = {"file_path": f"images/{name}", "fg_mask_path": f"fg_masks/{name}",
                     "flame_param_path": f"flame_param/{t:05d}.npz", "timestep_index": t, "camera_index": c,
                     **cameras[c]}
            split = "test" if t >= n_train else ("val" if c == FRONTAL else "train")
            split_of[split].append(entry)
    for split, entries in split_of.items():
        (data / f"transforms_{split}.json").write_text(json.dumps({"frames": entries}))
    shutil.copyfile(small / "canonical_flame_param.npz", data / "canonical_flame_param.npz")
    fit_mesh_pca(cfg, log=lambda *a: None)
    flame = FlameModel.from_config(cfg)
    avatar = build_avatar(cfg, ActorPaths(cfg), flame)
    save_checkpoint({"model": avatar.state_dict(), "step": 0, "elapsed": 0.0, "shaping": shaping_config(cfg, "regressor")},
                    ActorPaths(cfg).regressor_checkpoints, 0)
    return path


# ---------------------------------------------------------------- measurements (each in its own process)

def measure_loader(config: Path, steps: int, workers: int, cache_gb: float | None) -> dict:
    """In this process: the loader's items (what the workers deliver to the training process, before it
    turns them into float images on its device) over ``steps`` steps. -> images/s, peak RSS of this
    process and of its largest worker"""
    import torch

    from lib.config import load_config
    from lib.dataset.vhap import VhapExport
    from lib.train.data import TrainingImages

    cfg = load_config(config)
    cfg.data.workers = workers
    if cache_gb is not None:
        cfg.data.cache_gb = cache_gb
    torch.set_num_threads(1)
    export = VhapExport.from_config(cfg)
    images = TrainingImages(export, export.split("train"), cfg, 0, 1, 0, steps, torch.device("cpu"))
    items = iter(images.loader)
    next(items)  # the workers started
    start = time.perf_counter()
    for item in items:
        if "error" in item:
            raise item["error"]
    seconds = time.perf_counter() - start
    cached = images.draws.cache.used / GB if images.draws.cache else 0.0
    del items, images  # the workers end and are reaped: their peak joins RUSAGE_CHILDREN
    # A worker is a fork of this process, so its ru_maxrss counts from this process's size at the fork
    # (pages it shares, resident in both); this process itself is measured by VmHWM.
    return {"images_per_s": (steps - 1) / seconds, "workers": workers, "cache_gb": cfg.data.cache_gb,
            "cache_used_gb": cached, "rss_gb": peak_rss_gb(),
            "worker_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (1 << 20)}


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM) in GB. Not ``ru_maxrss``: Linux carries that across
    fork and exec, so a child of a large process would report the parent's size."""
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kb / (1 << 20)


# Runs a script as ``python SCRIPT ARGS`` would, then prints its peak resident set.
_RUN_AND_REPORT = """import atexit, runpy, sys
sys.path.insert(0, {repo!r})
from bench.scale import peak_rss_gb
atexit.register(lambda: print("PEAK_RSS_GB", peak_rss_gb(), flush=True))
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _child(args: list[str], log: Path) -> dict:
    """Run a script of the repository (or ``-c CODE``) in its own process. -> seconds and its peak RSS"""
    code = args[1] if args[0] == "-c" else _RUN_AND_REPORT.format(repo=str(REPO), argv=args)
    start = time.perf_counter()
    with open(log, "w") as out:
        code_ = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if code_ != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({code_}); see {log}:\n{log.read_text()[-3000:]}")
    peaks = [float(li.split()[1]) for li in log.read_text().splitlines() if li.startswith("PEAK_RSS_GB ")]
    return {"seconds": time.perf_counter() - start, "rss_gb": peaks[-1] if peaks else float("nan")}


def _loader(config: Path, steps: int, workers: int, cache_gb: float | None, log: Path) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from bench.scale import measure_loader; " \
           f"print('RESULT', json.dumps(measure_loader({str(config)!r}, {steps}, {workers}, {cache_gb!r})))"
    _child(["-c", code], log)
    line = next(li for li in log.read_text().splitlines() if li.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--parts", nargs="+", default=["loader", "gem", "test", "throughput"],
                        choices=["loader", "gem", "test", "throughput"])
    parser.add_argument("--test-frames", type=int, default=1000)
    parser.add_argument("--throughput-images", type=int, default=300)
    parser.add_argument("--fill-images", type=int, default=0, help="loader steps of the memory run (default: "
                        "enough to fill the cache)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to fabricate (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the fabricated data")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gem-scale-", dir=args.workdir))
    rows, throughput = [], []
    try:
        t0 = time.perf_counter()
        small, base = small_actor(work)
        print(f"small actor and its masks: {time.perf_counter() - t0:.0f} s", flush=True)
        for T in args.timesteps:
            t0 = time.perf_counter()
            config = big_actor(work, small, base, T)
            print(f"T = {T}: export, mesh PCA and regressor checkpoint fabricated in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            row = {"T": T, "images": 16 * T}
            if "loader" in args.parts:
                from lib.config import load_config
                from lib.train.data import CHANNELS

                cfg = load_config(config)
                fill = args.fill_images or int(cfg.data.cache_gb * GB / (HEIGHT * WIDTH * CHANNELS) * 1.1) + 50  # past the budget
                r = _loader(config, fill, cfg.data.workers, None, work / f"loader_{T}.log")
                row["loader"] = r
                print(f"  loader (workers {r['workers']}, cache {r['cache_gb']} GB of which {r['cache_used_gb']:.2f} GB "
                      f"filled, {fill} images): "
                      f"{r['images_per_s']:.0f} images/s, peak RSS {r['rss_gb']:.2f} GB (largest worker "
                      f"{r['worker_rss_gb']:.2f} GB)", flush=True)
            if "gem" in args.parts:
                r = _child(["pca_gauss.py", str(config), "gem.evaluate=false"], work / f"gem_{T}.log")
                report = json.loads((work / "experiments" / f"scale_{T}" / "default" / "gem" / "report.json").read_text())
                r.update({k: report[k] for k in ("gaussians", "timesteps") if k in report})
                r.update({k: report[k] for k in report if k.endswith("_mb") and not isinstance(report[k], dict)})
                row["gem"] = r
                print(f"  GEM build: {r['seconds']:.0f} s, peak RSS {r['rss_gb']:.2f} GB ({json.dumps({k: v for k, v in r.items() if k not in ('seconds', 'rss_gb')})})",
                      flush=True)
            if "test" in args.parts:
                r = _child(["test.py", str(config), "test.splits=[val]", f"test.max_frames={args.test_frames}"],
                           work / f"test_{T}.log")
                metrics = json.loads((work / "experiments" / f"scale_{T}" / "default" / "regressor" / "eval" /
                                      "metrics.json").read_text())
                r["frames"] = metrics["val"]["frames"]
                row["test"] = r
                print(f"  test.py: {r['frames']} frames in {r['seconds']:.0f} s ({r['frames'] / r['seconds']:.1f} "
                      f"frames/s), peak RSS {r['rss_gb']:.2f} GB", flush=True)
            if "throughput" in args.parts and T == args.timesteps[-1]:
                for workers in (0, 1, 2):
                    r = _loader(config, args.throughput_images, workers, 0.0, work / f"throughput_{workers}.log")
                    throughput.append(r)
                    print(f"  loader without cache, {workers} workers: {r['images_per_s']:.0f} images/s", flush=True)
            rows.append(row)
            if not args.keep:
                shutil.rmtree(work / f"actor_{T}", ignore_errors=True)  # the next T fabricates its own
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    _table(rows, throughput)


def _table(rows: list[dict], throughput: list[dict]) -> None:
    print("\n| T | images | loader peak GB (trainer / worker) | GEM build s | GEM peak GB | Gram MB | test.py frames/s | test.py peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        loader, gem, test = r.get("loader"), r.get("gem"), r.get("test")
        print(f"| {r['T']:,} | {r['images']:,} | "
              + (f"{loader['rss_gb']:.2f} / {loader['worker_rss_gb']:.2f}" if loader else "–") + " | "
              + (f"{gem['seconds']:.0f} | {gem['rss_gb']:.2f} | {gem.get('gram_mb', float('nan')):.1f}" if gem else "– | – | –")
              + " | " + (f"{test['frames'] / test['seconds']:.2f} | {test['rss_gb']:.2f}" if test else "– | –") + " |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        for part in ("loader", "gem", "test"):
            if part in first and part in last:
                print(f"{part}: peak RSS T={last['T']} / T={first['T']} = {last[part]['rss_gb'] / first[part]['rss_gb']:.3f}")
    if throughput:
        print("\n| workers | images/s at 802x550 (no cache) | per worker |")
        print("|---|---|---|")
        for r in throughput:
            per = r["images_per_s"] / r["workers"] if r["workers"] else float("nan")
            print(f"| {r['workers']} | {r['images_per_s']:.0f} | " + (f"{per:.0f}" if r["workers"] else "– (the loop decodes)") + " |")


if __name__ == "__main__":
    main()
