"""Run by the DDP tests under torchrun: trains the tiny regressor (or, with train.stage=mapping, the
mapping network), then saves this rank's weights."""
import os
import sys

import torch

from lib.config import load_config
from lib.train.fit_mapping import fit_mapping
from lib.train.trainer import train

if __name__ == "__main__":
    config, out, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    model = (fit_mapping if cfg.train.stage == "mapping" else train)(cfg, log=lambda *a: None)
    torch.save(model.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
