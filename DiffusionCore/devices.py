"""Where a process computes: the torch device, and its place in a ``torchrun`` launch.

Inference and training both use these; only training joins a process group
(:mod:`DiffusionCore.train.distributed`). Under ``torchrun --nproc_per_node=N`` each process reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; without them a command is one process on one device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from .errors import ConfigError, ResourceError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global process index (0 .. world_size - 1).
        world_size: number of processes.
        local_rank: process index on this machine (selects the GPU).
        device: the device this process computes on.
        is_main: ``rank == 0``: the process that logs, saves checkpoints and writes outputs.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The torch device for ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Args:
        device: the requested device.
        local_rank: GPU index used for a bare ``"cuda"`` / ``"auto"`` (one GPU per process under torchrun).

    Raises:
        ResourceError: CUDA requested on a machine without a usable CUDA GPU.
        ConfigError: an unknown device string.
    """
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ResourceError(
                f"device {device!r} was requested but no CUDA GPU is usable here (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none'}): use --device cpu or auto, or install a CUDA build "
                "of PyTorch"
            )
        try:
            dev = torch.device(text)
        except RuntimeError as exc:
            raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
        index = dev.index if dev.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ResourceError(
                f"device cuda:{index} does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
            )
        return torch.device("cuda", index)
    raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc


def process_info(device: str | torch.device = "auto") -> DistInfo:
    """This process's place in a ``torchrun`` launch (a single process without one); no group is joined."""
    rank, world, local = env_int("RANK", 0), env_int("WORLD_SIZE", 1), env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=resolve_device(device, local),
                    is_main=rank == 0)  # fmt: skip


def shard_list(items: Sequence[T], info: DistInfo) -> list[T]:
    """This process's share of ``items`` (every ``world_size``-th item from ``rank``); all of them alone."""
    return list(items[info.rank :: info.world_size])
