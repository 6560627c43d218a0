"""train.py CONFIG [section.key=value ...] — training of the stage the config names (train.stage).

    python train.py configs/default.yml                       # one process
    torchrun --nproc_per_node=2 train.py configs/default.yml  # DDP (Gloo on CPU, NCCL on GPU)

Resumes from the newest checkpoint of the run folder when rerun.
"""
import sys

from lib.cli import parse
from lib.dataset.vhap import DatasetError
from lib.models.gem import GemError
from lib.models.image_encoder import EncoderError
from lib.models.mesh_pca import MeshPcaError
from lib.train.checkpoint import CheckpointError
from lib.train.fit_mapping import fit_mapping
from lib.train.trainer import train

if __name__ == "__main__":
    cfg, _ = parse(__doc__)
    try:
        fit_mapping(cfg) if cfg.train.stage == "mapping" else train(cfg)
    except (MeshPcaError, GemError, CheckpointError, DatasetError, EncoderError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
