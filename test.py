"""test.py CONFIG [section.key=value ...] — evaluation of the stage the config names (train.stage).

Renders val (novel view), test (novel expression, camera test.camera) and an orbit around the
head from the newest checkpoint; writes PNGs, MP4s and metrics.json (PSNR full frame and inside
the head mask, SSIM, L1, LPIPS when its weights are configured) into the run's eval/ folder.
"""
import sys

from lib.cli import parse
from lib.dataset.vhap import DatasetError
from lib.eval.evaluate import evaluate
from lib.eval.mapping import evaluate_mapping
from lib.models.gem import GemError
from lib.models.mesh_pca import MeshPcaError
from lib.train.checkpoint import CheckpointError

if __name__ == "__main__":
    cfg, _ = parse(__doc__)
    try:
        evaluate_mapping(cfg) if cfg.train.stage == "mapping" else evaluate(cfg)
    except (MeshPcaError, GemError, CheckpointError, DatasetError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
