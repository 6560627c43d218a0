"""pca_mesh.py CONFIG [section.key=value ...] — stage 1, mesh PCA."""
from lib.cli import not_implemented, parse

if __name__ == "__main__":
    parse(__doc__)
    not_implemented("pca_mesh.py (stage 1, mesh PCA)")
