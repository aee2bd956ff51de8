"""Data-parallel training under ``torchrun``: the process group, devices, and agreement.

Every process draws the same global batch from the same seeded generator and trains on its own
contiguous share (:meth:`~pyro_inflow.training.TrainConfig.rank_share`); DDP averages the
gradients, so the run follows single-process training with the same seed and global batch step
for step, up to the rounding of the all-reduce.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist
from torch import Tensor

__all__ = ["init_distributed", "world", "default_device", "check_same_on_all_ranks",
           "any_rank", "mean_over_ranks"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def default_device(device: str | torch.device | None) -> torch.device:
    """``device``, or by default the CPU (under NCCL, this process's ``cuda:LOCAL_RANK``).

    Raises:
        ValueError: a device name torch does not know, or a CUDA device this machine lacks.
    """
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: {device!r} is not a torch device (e.g. 'cpu', 'cuda', "
                             f"'cuda:1')") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {str(device)!r}, but torch sees no CUDA device here "
                             f"(torch.cuda.is_available() is False); train on 'cpu'")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device: {str(device)!r}, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return dev
    if world()[1] > 1 and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    Call it once at the start of a script launched with ``torchrun --nproc-per-node N``;
    :meth:`~pyro_inflow.InflationaryFlow.fit` then trains data-parallel. ``pyro-inflow train``
    calls it for you.

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per process); default NCCL when CUDA
            is available, else gloo.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` without an initialized group when the process was
        not started by ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``1``).
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        return world()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch_dist.init_process_group(backend)
    return world()


def check_same_on_all_ranks(fingerprint: str, settings: dict) -> None:
    """Refuse on every rank at once (not hang) when the processes' data or settings differ."""
    mine = (fingerprint, settings)
    everyone = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            what = "data" if theirs[0] != fingerprint else "settings"
            raise ValueError(f"fit: distributed rank {rank} was given different {what} than "
                             f"rank {torch_dist.get_rank()}; every process must pass the same")


def any_rank(flag: bool, size: int, device: torch.device) -> bool:
    """Whether ``flag`` is set on any of ``size`` ranks (every rank gets the same answer)."""
    if size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value: Tensor, size: int) -> float:
    """The mean of a scalar tensor over ``size`` ranks."""
    if size > 1:
        value = value.clone()
        torch_dist.all_reduce(value)
        value = value / size
    return float(value)
