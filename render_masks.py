"""render_masks.py CONFIG [section.key=value ...] — alpha and mouth masks.

For every frame of the actor's export (train, val and test splits) renders the tracked FLAME mesh
in the frame's camera and writes, next to the sequence's images/ folder:
  alpha_masks/<t>_<c>.png   the foreground mask without neck and torso (hair kept)
  mouth_masks/<t>_<c>.png   lips and mouth interior, slightly dilated
Frames whose masks exist are skipped. The rule is documented in lib/dataset/masks.py.
"""
from lib.cli import main
from lib.dataset.masks import render_masks
from lib.dataset.vhap import VhapExport
from lib.flame.model import FlameModel, load_regions
from lib.paths import resolve


def masks(cfg, _):
    export = VhapExport(resolve(cfg.actor.data_dir), n_shape=cfg.actor.n_shape,
                        n_expr=cfg.actor.n_expr)
    model = FlameModel.from_config(cfg)
    render_masks(export, model, load_regions(resolve(cfg.actor.flame_masks), model.v_template.shape[0]))


if __name__ == "__main__":
    main(__doc__.splitlines()[0], masks)
