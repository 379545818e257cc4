"""Where a process computes: the torch device, and its place in a ``torchrun`` launch.

Inference and training both use these; only training joins a process group
(:mod:`DiffusionCore.train.distributed`). Under ``torchrun --nproc_per_node=N`` each process reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; without them a command is one process on one device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from .errors import ConfigError, ResourceError

T = TypeVar("T")

logger = logging.getLogger(__name__)
#: The unsupported-GPU warnings already given in this process (:func:`resolve_device`).
_SAID: set[str] = set()


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


def cuda_arch_problem(index: int) -> str | None:
    """Why GPU ``index`` cannot run this PyTorch build's kernels, or None when it can (or when the build does not say).

    A CUDA build of PyTorch holds kernels for a list of GPU architectures (``torch.cuda.get_arch_list()``: ``sm_XY``
    binaries and ``compute_XY`` PTX that the driver compiles for newer GPUs). A GPU of compute capability X.Y runs an
    ``sm_XZ`` binary with Z <= Y, or ``compute_XY`` PTX of an older or equal capability. PyTorch's CUDA 12.8 builds
    from 2.8 on hold none for Maxwell or Pascal (GeForce 900/1000) and from 2.11 none for Volta, yet
    ``torch.cuda.is_available()`` stays True there: the first kernel then fails with "no kernel image is available".
    """
    if getattr(torch.version, "hip", None):  # a ROCm build: AMD GPUs, named gfx*, whose support this cannot tell
        return None
    try:
        major, minor = torch.cuda.get_device_capability(index)
        arches = list(torch.cuda.get_arch_list())
    except Exception:  # noqa: BLE001 - no answer from the driver: let the GPU be tried, as before
        return None
    known = [(kind, int(number)) for kind, _, number in (arch.partition("_") for arch in arches)
             if kind in ("sm", "compute") and number.isdigit()]  # fmt: skip
    if not known:  # the build names nothing this understands (sm_90a alone): let the GPU be tried
        return None
    have = major * 10 + minor
    for kind, code in known:
        if kind == "sm" and code // 10 == major and code <= have:
            return None
        if kind == "compute" and code <= have:
            return None
    try:
        name = torch.cuda.get_device_name(index)
    except Exception:  # noqa: BLE001 - the name is only for the message
        name = f"GPU {index}"
    built = ", ".join(a for a in arches if a.startswith("sm_"))
    return (f"{name} (compute capability {major}.{minor}) is not supported by this PyTorch build (torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}; kernels for {built})")  # fmt: skip


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The torch device for ``"auto"`` (a CUDA GPU this PyTorch build can run, else CPU), ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``.

    Args:
        device: the requested device.
        local_rank: GPU index used for a bare ``"cuda"`` / ``"auto"`` (one GPU per process under torchrun).
        world_size: processes of the launch on this machine (torchrun's ``LOCAL_WORLD_SIZE``); with more than one,
            an explicit ``cuda:N`` other than ``cuda:<local_rank>`` is refused (every process would take GPU N).

    Raises:
        ResourceError: CUDA requested on a machine without a usable CUDA GPU, or on a GPU this PyTorch build has no
            kernels for.
        ConfigError: an unknown device string; ``cuda:N`` with several processes of the launch on this machine.
    """
    text = str(device).strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        problem = cuda_arch_problem(local_rank)
        if problem is None:
            return torch.device("cuda", local_rank)
        if problem not in _SAID:  # once per process: the Python API resolves "auto" at every run
            _SAID.add(problem)
            logger.warning("%s: computing on the CPU instead. To use the GPU, install a PyTorch build that supports "
                           "it.", problem)  # fmt: skip
        return torch.device("cpu")
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
        if dev.index is not None and world_size > 1 and dev.index != local_rank:
            raise ConfigError(
                f"device {device!r} names one GPU, but this machine runs {world_size} processes of the launch, each of "
                "which takes the GPU of its LOCAL_RANK: give --device cuda (or auto), and choose the GPUs with "
                "CUDA_VISIBLE_DEVICES"
            )
        index = dev.index if dev.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ResourceError(
                f"device cuda:{index} does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
            )
        problem = cuda_arch_problem(index)
        if problem is not None:
            raise ResourceError(f"{problem}: use --device cpu, or install a PyTorch build that supports this GPU")
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
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=resolve_device(device, local, env_int("LOCAL_WORLD_SIZE", world)),
                    is_main=rank == 0)  # fmt: skip


def shard_list(items: Sequence[T], info: DistInfo) -> list[T]:
    """This process's share of ``items`` (every ``world_size``-th item from ``rank``); all of them alone."""
    return list(items[info.rank :: info.world_size])
