"""train.py CONFIG [section.key=value ...] — training of the stage the config names (train.stage).

    python train.py configs/default.yml                       # one process
    torchrun --nproc_per_node=2 train.py configs/default.yml  # DDP (Gloo on CPU, NCCL on GPU)

Resumes from the newest checkpoint of the run folder when rerun.
"""
from lib.cli import main
from lib.train.fit_mapping import fit_mapping
from lib.train.trainer import train

if __name__ == "__main__":
    main(__doc__, lambda cfg, _: fit_mapping(cfg) if cfg.train.stage == "mapping" else train(cfg))
