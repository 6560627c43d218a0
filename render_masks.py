"""render_masks.py CONFIG [section.key=value ...] — alpha and mouth masks.

For every frame of the actor's export (train, val and test splits) renders the tracked FLAME mesh
in the frame's camera and writes, next to the sequence's images/ folder:
  alpha_masks/<t>_<c>.png   the foreground mask without neck and torso (hair kept)
  mouth_masks/<t>_<c>.png   lips and mouth interior, slightly dilated
Frames whose masks exist are skipped. The rule is documented in lib/dataset/masks.py.
"""
import sys

from lib.cli import parse
from lib.dataset.masks import render_masks
from lib.dataset.vhap import VhapExport
from lib.flame.model import FlameModel
from lib.flame.safe_pickle import load_pickle
from lib.paths import resolve

if __name__ == "__main__":
    cfg, _ = parse(__doc__.splitlines()[0])
    try:
        export = VhapExport(resolve(cfg.actor.data_dir), ds_rate=1, cache_images=False)
        model = FlameModel.from_config(cfg)
        masks = load_pickle(resolve(cfg.actor.flame_masks))
        render_masks(export, model, masks)
    except (ValueError, FileNotFoundError) as e:  # DatasetError and FlameFormatError among them
        sys.exit(f"render_masks: {e}")
