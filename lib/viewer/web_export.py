"""Static web export of a GEM: a folder that plays the avatar in any browser with WebGL2, with no
Python, no server and nothing downloaded (``pca_viewer.py CONFIG --export-web OUT_DIR``).

    OUT_DIR/index.html      the page (open it from a static server, or from disk: file://)
    OUT_DIR/gem_player.js   our WebGL2 player (lib/viewer/web_static/): evaluates the GEM on the GPU
                            every frame, sorts by depth, splats with the rasterizer's rules
    OUT_DIR/gem.js          the compressed GEM and its coefficient tracks (lib.viewer.compressed),
                            gzipped, base85 in a script: a page opened from file:// may run scripts but
                            not fetch

Why our own splatter and not a library: the page must evaluate GEM's bases per frame (a library takes
fixed Gaussians) and match our rasterizer's rules exactly (0.3 px^2 low-pass, gsplat's tangent clamp,
alpha thresholds, front-to-back compositing), and nothing may be fetched from a CDN or npm; the
whole player is one file of a few hundred lines.

Tracks, each coefficient rows [T, K] (the compressed model's kept components) with the GEM pose
R [T, 3, 3], t [T, 3] that ``render_gem`` applies:
    fitted            the GEM's own coefficients of its training timesteps
    self-reenactment  the mapping network's prediction on the test split (test.camera's timesteps, as
                      test.py scores them, posed with the refitted tracking it kept), when a mapping
                      checkpoint exists
    <source>          each cross-identity reenactment test.py TARGET SOURCE wrote (its track.pt)
The camera starts at the identity camera (the one the sweeps and the viser viewer use) and orbits
about the head's centre in the identity pose.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from lib.atomic import load_torch
from lib.dataset.vhap import VhapExport
from lib.eval.mapping import export_mapping, self_reenactment_track
from lib.flame.model import FlameModel
from lib.models.flame_refinement import load_refinement
from lib.models.gem import ATTRIBUTES, GaussianEigenModel, GemError
from lib.models.mapping import MappingNetwork
from lib.paths import ActorPaths
from lib.train.data import ActorData
from lib.viewer.compressed import encode_gem, gzipped, kept_index, pack, write_js
from lib.viewer.sweeps import identity_view

STATIC = Path(__file__).parent / "web_static"


def track_arrays(i: int, coefficients: dict[str, torch.Tensor], R: torch.Tensor, t: torch.Tensor,
                 keep: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Container arrays of track i: coefficients (attribute -> [T, K_a] of the full model) reduced to
    the kept components and flattened [T, K'], R [T, 3, 3], t [T, 3]."""
    flat = torch.cat([coefficients[a].detach().cpu().float()[:, keep[a]] for a in ATTRIBUTES], 1)
    return {f"track.{i}.coefficients": flat.numpy(), f"track.{i}.R": R.detach().cpu().float().numpy(),
            f"track.{i}.t": t.detach().cpu().float().numpy()}


def write_web_export(out_dir: str | Path, model: GaussianEigenModel, tracks: list[dict], view: dict,
                     viewer: dict, energy: float, bits: int, min_bits: int = 2) -> dict:
    """The folder of a GEM and its tracks.

    tracks: [{name, label, coefficients: attribute -> [T, K_a], R [T, 3, 3], t [T, 3]}] (at least one);
    view: {viewmat [4, 4], K [3, 3], width, height, background [3], target [3]} (world, OpenCV);
    viewer: {sliders, sigma, fps}. -> sizes in bytes {gem: the gzipped GEM alone, total: the folder, and
    each file's}
    """
    if not tracks:
        raise GemError("a web export needs at least one coefficient track")
    out_dir = Path(out_dir)
    meta, arrays = encode_gem(model, energy, bits, min_bits)
    gem_bytes = len(gzipped(pack(meta, arrays)))
    keep = kept_index(model, {a: [b["components"] for b in meta["attributes"][a]["blocks"]] for a in ATTRIBUTES})
    entries = []
    for i, tr in enumerate(tracks):
        arrays.update(track_arrays(i, tr["coefficients"], tr["R"], tr["t"], keep))
        entries.append({"name": tr["name"], "label": tr["label"], "frames": int(tr["R"].shape[0])})
    meta.update(tracks=entries, viewer=viewer,
                view={k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in view.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_js(out_dir / "gem.js", gzipped(pack(meta, arrays)))
    for name in ("index.html", "gem_player.js"):
        shutil.copyfile(STATIC / name, out_dir / name)
    (out_dir / "gem.js").chmod(0o644)  # written atomically through a private temp file; others serve it
    sizes = {p.name: p.stat().st_size for p in out_dir.iterdir() if p.name in ("index.html", "gem_player.js", "gem.js")}
    return {"gem": gem_bytes, "total": sum(sizes.values()), **sizes}


def actor_data(cfg) -> tuple[VhapExport, ActorData]:
    """The actor's export and its posed parameters on the CPU, as GEM was fitted: the timesteps the
    regressor refined with its corrections (the held-out ones are never refined)."""
    export = VhapExport.from_config(cfg)
    return export, ActorData(export, FlameModel.from_config(cfg), torch.device("cpu"), keep_meshes=False,
                             refinement=load_refinement(ActorPaths(cfg)))


def actor_tracks(cfg, model: GaussianEigenModel, net: MappingNetwork | None, log=print) -> list[dict]:
    """The tracks of an actor's run that exist (module docstring); net: the mapping network or None."""
    paths = ActorPaths(cfg)
    export, data = actor_data(cfg)
    steps = [int(s) for s in model.timesteps]
    with torch.no_grad():
        R, t = data.gem_pose(steps)
    tracks = [{"name": "fitted", "label": "fitted frames", "coefficients": model.coefficients, "R": R, "t": t}]
    if net is not None:
        predicted = self_reenactment_track(cfg, model, net, export, data, log)
        tracks.append({"name": "self_reenactment", "label": "self-reenactment (test)", **predicted})
    for track_file in sorted((paths.mapping / "reenact").glob("*/track.pt")):
        state = load_torch(track_file, GemError, "rerun test.py TARGET SOURCE")
        coefficients = {a: c for a, c in state["coefficients"].items()}
        if any(coefficients[a].shape[1] != model.n_components(a) for a in ATTRIBUTES):
            log(f"skipped {track_file}: made with another GEM (rerun test.py TARGET SOURCE)")
            continue
        source = track_file.parent.name
        tracks.append({"name": f"reenact_{source}", "label": f"driven by {source}", "coefficients": coefficients,
                       "R": state["R"], "t": state["t"]})
    return tracks


def export_web(cfg, out_dir: str | Path, log=print) -> dict:
    """pca_viewer.py --export-web: the actor's GEM (the mapping network's, if one fine-tuned it) and its
    tracks, compressed with viewer.export_energy / export_bits / export_min_bits. -> sizes in bytes"""
    model, net = export_mapping(cfg, log)
    camera, R, t = identity_view(cfg)
    centre = model.reconstruct(model.zero_coefficients()).means[0].mean(0).cpu()
    view = {"viewmat": camera.viewmat.numpy(), "K": camera.K.numpy(), "width": camera.width, "height": camera.height,
            "background": list(cfg.data.background), "target": (R[0] @ centre + t[0]).numpy()}
    v = cfg.viewer
    tracks = actor_tracks(cfg, model, net, log)
    sizes = write_web_export(out_dir, model, tracks, view, {"sliders": v.sliders, "sigma": v.sigma, "fps": v.fps},
                             v.export_energy, v.export_bits, v.export_min_bits)
    log(f"web export -> {out_dir}: {sizes['total'] / 1e6:.2f} MB ({', '.join(tr['label'] for tr in tracks)}); "
        f"the compressed GEM {sizes['gem'] / 1e6:.2f} MB against {model.nbytes() / 1e6:.2f} MB in fp32; "
        f"open {Path(out_dir) / 'index.html'} in a browser")
    return sizes
