"""pca_gauss.py CONFIG [section.key=value ...] — stage 3, building GEM."""
from lib.cli import not_implemented, parse

if __name__ == "__main__":
    parse(__doc__)
    not_implemented("pca_gauss.py (stage 3, building GEM)")
