"""pca_viewer.py CONFIG [section.key=value ...] — stage 3, GEM viewer."""
from lib.cli import not_implemented, parse

if __name__ == "__main__":
    parse(__doc__)
    not_implemented("pca_viewer.py (stage 3, GEM viewer)")
