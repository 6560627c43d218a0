"""test.py CONFIG [SOURCE_CONFIG] [section.key=value ...] — evaluation of the stage the config names (train.stage).

Regressor: renders val (novel view), test (novel expression, camera test.camera) and an orbit around
the head from the newest checkpoint; writes PNGs, MP4s and metrics.json (PSNR full frame and inside
the head mask, SSIM, L1, LPIPS when its weights are configured) into the run's eval/ folder.
Mapping network: self-reenactment on the test split, predicted against ground-truth GEM coefficients
(metrics.json); with SOURCE_CONFIG, cross-identity reenactment instead: that actor's motion drives
this avatar (videos in experiments/<actor>/mapping/reenact/<source actor>/).
"""
import sys

from lib.cli import parse
from lib.dataset.vhap import DatasetError
from lib.eval.evaluate import evaluate
from lib.eval.mapping import evaluate_mapping, reenact
from lib.models.gem import GemError
from lib.models.image_encoder import EncoderError
from lib.models.mesh_pca import MeshPcaError
from lib.train.checkpoint import CheckpointError

if __name__ == "__main__":
    cfg, args = parse(__doc__, source=True)
    try:
        if args.source is not None:
            if cfg.train.stage != "mapping":
                sys.exit("error: cross-identity reenactment (test.py CONFIG SOURCE_CONFIG) drives the mapping "
                         "network: CONFIG must have train.stage: mapping (e.g. configs/mapping.yml)")
            reenact(cfg, args.source)
        elif cfg.train.stage == "mapping":
            evaluate_mapping(cfg)
        else:
            evaluate(cfg)
    except (MeshPcaError, GemError, CheckpointError, DatasetError, EncoderError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
