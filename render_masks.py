"""render_masks.py CONFIG [section.key=value ...] — alpha and mouth masks."""
from lib.cli import not_implemented, parse

if __name__ == "__main__":
    parse(__doc__)
    not_implemented("render_masks.py (alpha and mouth masks)")
