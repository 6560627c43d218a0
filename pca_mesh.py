"""pca_mesh.py CONFIG [section.key=value ...] — stage 1, mesh PCA.

PCA of the actor's tracked meshes (train + val timesteps, global pose removed) and its canonical
mesh, written to experiments/<actor>/<run>/mesh_pca/ with the resolved config.
"""
from lib.cli import main
from lib.train.fit_mesh_pca import fit_mesh_pca

if __name__ == "__main__":
    main(__doc__, lambda cfg, _: fit_mesh_pca(cfg))
