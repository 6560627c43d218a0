"""render_masks.py CONFIG [section.key=value ...] — keep and mouth masks.

For every frame of the actor's export (train, val and test splits) renders the tracked FLAME mesh
in the frame's camera and writes, outside the dataset (which may be read-only), into the masks folder
data.masks_dir (by default experiments/<actor>/masks/, shared by the actor's runs):
  <sequence>/keep_masks/<t>_<c>.png    1 on the head (hair kept), 0 on neck and torso; the ground truth
                                       takes the foreground's soft alpha from the export's fg_masks
  <sequence>/mouth_masks/<t>_<c>.png   lips and mouth interior, slightly dilated
where <sequence> is the folder holding the frame's images/ folder. Frames whose masks exist are
skipped, so an interrupted run continues; alpha_masks/ of earlier versions are not read (every frame
gets keep masks anew). Runs on CUDA when there is one (train.device). The rule is
documented in lib/dataset/masks.py.
"""
from lib.cli import main
from lib.dataset.masks import render_masks
from lib.dataset.vhap import VhapExport
from lib.flame.model import FlameModel, load_regions
from lib.paths import ActorPaths, resolve
from lib.train.distributed import evaluation_device


def masks(cfg, _):
    export = VhapExport(resolve(cfg.actor.data_dir), n_shape=cfg.actor.n_shape,
                        n_expr=cfg.actor.n_expr, masks_dir=ActorPaths(cfg).masks)
    model = FlameModel.from_config(cfg).to(evaluation_device(cfg.train.device, cfg.train.threads))
    render_masks(export, model, load_regions(resolve(cfg.actor.flame_masks), model.v_template.shape[0]))


if __name__ == "__main__":
    main(__doc__.splitlines()[0], masks)
