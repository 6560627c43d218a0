"""test.py CONFIG [SOURCE_CONFIG] [section.key=value ...] — evaluation of the stage the config names (train.stage).

Regressor: renders val (novel view), test (novel expression, camera test.camera) and an orbit around
the head from the newest checkpoint; writes PNGs, MP4s and metrics.json (PSNR full frame and inside
the head mask, SSIM, L1, LPIPS when its weights are configured) into the run's eval/ folder.
Mapping network: self-reenactment on the test split, predicted against ground-truth GEM coefficients
(metrics.json); with SOURCE_CONFIG, cross-identity reenactment instead: that actor's motion drives
this avatar (videos in experiments/<actor>/<run>/mapping/reenact/<source actor>/).
"""
from lib.cli import main
from lib.config import ConfigError
from lib.eval.evaluate import evaluate
from lib.eval.mapping import evaluate_mapping, reenact


def test(cfg, args):
    if args.source is not None:
        if cfg.train.stage != "mapping":
            raise ConfigError("cross-identity reenactment (test.py CONFIG SOURCE_CONFIG) drives the mapping "
                              "network: CONFIG must have train.stage: mapping (e.g. configs/mapping.yml)")
        reenact(cfg, args.source)
    elif cfg.train.stage == "mapping":
        evaluate_mapping(cfg)
    else:
        evaluate(cfg)


if __name__ == "__main__":
    main(__doc__, test, source=True)
