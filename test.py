"""test.py CONFIG [section.key=value ...] — evaluation and reenactment."""
from lib.cli import not_implemented, parse

if __name__ == "__main__":
    parse(__doc__)
    not_implemented("test.py (evaluation and reenactment)")
