"""pca_mesh.py CONFIG [section.key=value ...] — stage 1, mesh PCA.

PCA of the actor's tracked meshes (train + val timesteps, global pose removed) and its canonical
mesh, written to experiments/<actor>/mesh_pca/ with the resolved config.
"""
import sys

from lib.cli import parse
from lib.dataset.vhap import DatasetError
from lib.train.fit_mesh_pca import fit_mesh_pca

if __name__ == "__main__":
    cfg, _ = parse(__doc__)
    try:
        fit_mesh_pca(cfg)
    except (DatasetError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
