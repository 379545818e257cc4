"""One training script for CPU, one GPU, or several GPUs under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=N`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR`` /
``MASTER_PORT``) for each process; :func:`init_distributed` reads them and joins the process group
(NCCL on CUDA, Gloo on CPU and where PyTorch has no NCCL: Windows, macOS). Without them the same code runs as a
single process and every helper below becomes a no-op::

    info = init_distributed(cfg.device)
    model = wrap_model(model.to(info.device), info)
    my_files = shard_list(files, info)      # DiffusionCore.devices.shard_list
    ...
    loss_value = all_reduce_mean(loss.detach(), info)
    if info.is_main:
        save_training_state(...)
    cleanup(info)
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist
from torch import nn

from ..devices import DistInfo, env_int, resolve_device

logger = logging.getLogger(__name__)


def process_group_backend(device: torch.device) -> str:
    """The ``torch.distributed`` backend for processes training on ``device``: NCCL for CUDA where this PyTorch has it
    (the Linux builds), else Gloo: the Windows and macOS builds of PyTorch have no NCCL."""
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


def init_distributed(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group if launched by torchrun, else describe a single process.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (each process then uses GPU ``LOCAL_RANK``).
        timeout_s: how long collective operations wait for the slowest process.

    Returns:
        The :class:`DistInfo` of this process.

    Raises:
        ResourceError: CUDA requested but unavailable.
        ConfigError: malformed torchrun environment variables; ``cuda:N`` with several processes.
    """
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", 0)
    # cuda:N refused when several processes train on this machine
    dev = resolve_device(device, local_rank, env_int("LOCAL_WORLD_SIZE", world_size))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = process_group_backend(dev)
        if dev.type == "cuda" and backend != "nccl" and rank == 0:
            logger.warning("this PyTorch has no NCCL (its Windows and macOS builds do not): the GPUs exchange "
                           "gradients through Gloo, which is slower; multi-GPU training is fastest on Linux")
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        logger.info("joined process group: rank %d of %d (%s, device %s)", rank, world_size, backend, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


def _plain_strides(sizes: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(sizes):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def settle_ambiguous_strides(model: nn.Module) -> int:
    """Give each parameter outside a convolution that ``channels_last`` left with odd strides on its size-1
    dimensions the plain strides of a contiguous tensor; returns how many. Values and memory order stay as they are.

    ``model.to(memory_format=torch.channels_last)`` turns a ``(1, C, 1, 1)`` parameter (the through-plane predictor's
    factor embedding) into strides ``(C, 1, C, C)``, where a contiguous one has ``(C, 1, 1, 1)``: the same memory.
    DDP lays out each gradient bucket view with its parameter's strides, while the gradient of such a parameter (a
    sum over the broadcast dimensions) comes with the plain ones, so every process warned "Grad strides do not match
    bucket view strides" at its first backward pass. Convolution weights keep theirs: a convolution picks its memory
    format from its weight, and their gradients come in the weight's layout.
    """
    settled = 0
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for param in module.parameters(recurse=False):
            if param.is_contiguous() and param.stride() != _plain_strides(param.shape):
                param.data = param.data.clone(memory_format=torch.contiguous_format)  # same values, same order
                settled += 1
    return settled


def wrap_model(model: nn.Module, info: DistInfo, **ddp_kwargs) -> nn.Module:
    """``DistributedDataParallel(model)`` when several processes train, else the model itself.

    The model must already be on ``info.device``. Extra keyword arguments go to DDP (e.g.
    ``find_unused_parameters=True`` for models with conditional branches). Parameters whose strides are ambiguous
    (:func:`settle_ambiguous_strides`) get the plain ones first, so that DDP's bucket views match their gradients.
    """
    if not info.distributed:
        return model
    settle_ambiguous_strides(model)
    if info.device.type == "cuda":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index], output_device=info.device.index, **ddp_kwargs
        )
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def all_reduce_mean(value: float | torch.Tensor, info: DistInfo) -> float | torch.Tensor:
    """The mean of ``value`` over all processes (a float for a float, a tensor for a tensor).

    Args:
        value: a Python number or a tensor (any shape; reduced element-wise, on ``info.device``).
        info: this process's :class:`DistInfo`.
    """
    if not info.distributed:
        return value
    if isinstance(value, torch.Tensor):
        t = value.detach().to(info.device).clone()
        if not t.is_floating_point():
            t = t.to(torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / info.world_size).to(value.device)
    t = torch.tensor(float(value), dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world_size


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` holds on any process (``flag`` itself for one process). A stop that one rank sees (a
    STOP file, a signal, its time limit) must stop every rank at the same step, else the others wait forever."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    """Wait until every process gets here (no-op for a single process)."""
    if info.distributed and dist.is_initialized():
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def cleanup(info: DistInfo, *, completed: bool = False) -> None:
    """Leave the process group (call once at the end of training, also after errors).

    ``completed``: every rank reached the normal end of training, so all wait for each other before leaving. After an
    error the other ranks may never come, so there is no waiting then.

    The DistributedDataParallel wrapper holds the process group: callers drop theirs first, and the garbage left in
    reference cycles is collected here, so that the group's C++ object and Gloo's worker threads end now, while the
    interpreter is whole. Left to interpreter finalization, a rank could abort in those threads ("terminate called
    without an active exception", seen twice in CI on the two-process X-ray training, after the weights were
    written; the waiting alone, added first, did not prevent it).
    """
    if info.distributed and dist.is_initialized():
        import gc

        gc.collect()
        if completed:
            barrier(info)
        dist.destroy_process_group()
        gc.collect()
