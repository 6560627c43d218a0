"""train.py CONFIG [section.key=value ...] — training (regressor or mapping network)."""
from lib.cli import not_implemented, parse

if __name__ == "__main__":
    parse(__doc__)
    not_implemented("train.py (training (regressor or mapping network))")
