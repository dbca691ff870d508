"""Where and how the computation runs: the device, CPU threads and the torchrun context.

Everything that executes a network (``infer``, ``explain``, ``train``, the CLI and the plugin)
resolves its device and threads here, so that ``auto`` means the same everywhere.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ciml_core.errors import CimlError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unavailable device is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CimlError("device 'cuda' requested but torch.cuda.is_available() is False "
                        f"(torch {torch.__version__} build without CUDA, or no GPU visible)")
    return device


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def background_threads() -> int:
    """Torch threads for a job that runs beside an interactive thread (the napari GUI): every
    core but one, so that the event loop keeps running while the kernels use the rest."""
    return max(1, available_cores() - 1)


_THREADS_LOCK = threading.Lock()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(n)`` (process-wide) and restore it after."""
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _THREADS_LOCK:
            torch.set_num_threads(before)


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and its device."""

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


def setup_distributed(device: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1).

    gloo on CPU, nccl on CUDA; each process takes the GPU of its LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world_size > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, dev)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list, ctx: DistContext) -> list:
    """This rank's share of a list (round-robin), e.g. the cases to predict."""
    return items[ctx.rank :: ctx.world_size]
