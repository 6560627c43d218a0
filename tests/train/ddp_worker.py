"""Run by test_ddp under torchrun: trains the tiny regressor, then saves this rank's weights."""
import os
import sys

import torch

from lib.config import load_config
from lib.train.trainer import train

if __name__ == "__main__":
    config, out, *overrides = sys.argv[1:]
    avatar = train(load_config(config, overrides), log=lambda *a: None)
    torch.save(avatar.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
