"""Data parallelism (torchrun) and devices."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


# ---- distributed -------------------------------------------------------------------------------
def maybe_init_distributed(device: str = "auto") -> tuple[int, int]:
    """(rank, world size). Under ``torchrun`` (WORLD_SIZE > 1) initialise the process group
    once: nccl when ``device`` resolves to CUDA, gloo on CPU. The caller destroys it when done."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(resolve_device(device))
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0: the one process that writes and logs."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def resolve_device(name: str) -> torch.device:
    """The run's device: "auto" is CUDA when available, else CPU; bare "cuda" is GPU LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_reduce_sum(t: Tensor, world: int) -> Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t
