"""Data-parallel training through ``torchrun`` (torch DDP): NCCL on CUDA, Gloo on CPU.

``torchrun --nproc_per_node=N train.py CONFIG`` sets RANK / WORLD_SIZE / LOCAL_RANK; a plain
``python train.py`` runs as a single process with the same code path (world size 1, no process
group). Every rank trains on its own random frames; DDP averages the gradients, so the weights stay
identical on all ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", threads: int = 0) -> DistInfo:
    """Join the process group when launched by torchrun; choose the device and CPU thread count.

    device: 'auto' (CUDA when available), 'cpu' or 'cuda'. threads: CPU threads per process,
    0 = the machine's cores shared evenly among the processes on this node.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    set_threads(threads, local_world)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def evaluation_device(device: str = "auto", threads: int = 0) -> torch.device:
    """Device and CPU threads of a one-process evaluation (test.py): CUDA unless device is 'cpu' or
    there is none, so a model trained on a GPU can be evaluated on a CPU-only machine."""
    set_threads(threads)
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, a container's cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def set_threads(threads: int, processes: int = 1) -> None:
    """CPU threads of this process (torch's, which the CPU renderer follows): ``threads``, or 0 = the
    cores this process may use, shared by ``processes``."""
    torch.set_num_threads(threads if threads > 0 else max(1, usable_cores() // max(processes, 1)))


def broadcast_float(info: DistInfo, value: float) -> float:
    """Rank 0's ``value`` on every rank (the value itself without a process group)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.broadcast(t, src=0)
    return float(t)


def average_gradients(info: DistInfo, params: list[torch.Tensor]) -> None:
    """Average the gradients of tensors DDP does not manage (e.g. a fine-tuned GEM basis) over the ranks."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
