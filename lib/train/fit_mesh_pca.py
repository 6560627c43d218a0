"""Stage 1: the mesh PCA of an actor and its canonical mesh, written into experiments/<actor>/<run>/mesh_pca/.

One head-space mesh per train + val timestep (the val split shares the training timesteps, seen
from the frontal camera); the test sequence is held out.
"""
from __future__ import annotations


import numpy as np
import torch

from lib.atomic import atomic_path
from lib.config import save_config
from lib.dataset.vhap import VhapExport, stack_flame_params
from lib.flame.model import FlameModel
from lib.lock import locks_run_folder
from lib.models.avatar import canonical_mesh, split_global_pose
from lib.models.mesh_pca import MeshPCA
from lib.paths import ActorPaths


@locks_run_folder(lambda cfg: ActorPaths(cfg).stage_dir("mesh_pca"), "the mesh PCA folder")
def fit_mesh_pca(cfg, log=print) -> MeshPCA:
    paths = ActorPaths(cfg)
    flame = FlameModel.from_config(cfg)
    export = VhapExport.from_config(cfg)
    files = dict(export.timesteps("train"))
    files.update(export.timesteps("val"))
    steps = sorted(files)
    batch = stack_flame_params([files[t] for t in steps], None, export.n_shape, export.n_expr, flame.v_template.shape[0])
    with torch.no_grad():
        verts, _, _ = split_global_pose(flame, batch)
        pca = MeshPCA.fit(verts, cfg.mesh_pca.n_components)
    ratio = pca.explained_variance_ratio().cumsum(0)
    log(f"mesh PCA of {verts.shape[0]} timesteps ({verts.shape[1]} vertices): {pca.n_components} components")
    for k in sorted({1, 2, 4, 8, 16, cfg.regressor.n_pca, pca.n_components}):
        if k <= pca.n_components:
            log(f"  first {k:3d} components explain {100 * float(ratio[k - 1]):6.2f}% of the variance")
    pca.save(paths.mesh_pca)

    row = steps.index(cfg.actor.identity_timestep) if cfg.actor.identity_timestep in files else 0
    identity = {k: None if v is None else v[row:row + 1] for k, v in batch.items()}
    canonical_file = export.root / "canonical_flame_param.npz"
    canonical = export.load_canonical_flame() if canonical_file.is_file() else None
    with torch.no_grad():
        verts_c = canonical_mesh(flame, identity, canonical, cfg.mesh_pca.canonical_jaw_deg)
    with atomic_path(paths.canonical_mesh, suffix=".npz") as tmp:
        np.savez(tmp, verts=verts_c.numpy())
    source = canonical_file.name if canonical is not None else f"jaw {cfg.mesh_pca.canonical_jaw_deg} deg"
    log(f"canonical mesh ({source}) -> {paths.canonical_mesh}")
    save_config(cfg, paths.stage_dir("mesh_pca") / "config.yml")
    log(f"mesh PCA -> {paths.mesh_pca}")
    return pca

