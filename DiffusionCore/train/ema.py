"""Exponential moving average (EMA) of the trained weights.

Diffusion networks are evaluated and shipped with an EMA of their weights: the raw weights of a run
trained at a useful learning rate move from step to step, and a sample drawn with them (several network
evaluations, each one's error feeding the next) varies far more than the training loss suggests. The
average is what validation scores, what the best checkpoint is chosen by, and what export writes.

The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a short run is not
dominated by its random initial weights.

:class:`ParameterEMA` is an ``nn.Module`` whose buffers are the averages, so a checkpoint stores and
restores it like any other model (an exact resume continues the same average).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .checkpoint import unwrap_model


def _buffer_name(model_name: str, param_name: str) -> str:
    return f"{model_name}__{param_name.replace('.', '__')}"


class ParameterEMA(nn.Module):
    """EMA of the trainable parameters of several named models.

    Args:
        models: name -> module; every parameter with ``requires_grad`` at construction is averaged.
        decay: the decay once warmed up (0 < decay < 1).
    """

    def __init__(self, models: Mapping[str, nn.Module], decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1 (exclusive), got {decay}")
        self.decay = float(decay)
        self._params: list[tuple[str, nn.Parameter]] = []
        for model_name, model in models.items():
            for name, p in unwrap_model(model).named_parameters():
                if p.requires_grad:
                    key = _buffer_name(model_name, name)
                    self.register_buffer(key, p.detach().clone().float())
                    self._params.append((key, p))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move the averages towards the current parameters (call after each optimizer step)."""
        w = 1.0 - self.current_decay()
        for key, p in self._params:
            avg = getattr(self, key)
            if avg.device != p.device:
                avg.data = avg.data.to(p.device)
            avg.lerp_(p.detach().float(), w)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to_models(self) -> None:
        """Overwrite the live parameters with the averages (for export)."""
        for key, p in self._params:
            p.copy_(getattr(self, key).to(p.device, p.dtype))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Run the block with the averaged weights in the models, then put the trained ones back."""
        saved = [p.detach().clone() for _, p in self._params]
        self.copy_to_models()
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), keep in zip(self._params, saved):
                    p.copy_(keep)


EMA_MODEL = "ema"


def load_checkpoint_averages(ckpt: str | os.PathLike, models: Mapping[str, nn.Module]) -> int:
    """Copy a checkpoint's EMA weights into ``models`` (by name) for export; returns how many tensors.

    A checkpoint written without EMA leaves the models as they are and returns 0.
    """
    from ..errors import WeightsError
    from ..weights.registry import load_safetensors
    from .checkpoint import read_checkpoint_info

    info = read_checkpoint_info(ckpt)
    fname = f"{EMA_MODEL}.safetensors"
    files = info.get("files", {})
    if fname not in files:
        return 0
    tensors, _ = load_safetensors(Path(info["path"]) / fname, expected_sha256=files[fname])
    params = {
        _buffer_name(model_name, name): p
        for model_name, model in models.items()
        for name, p in unwrap_model(model).named_parameters()
    }
    n = 0
    with torch.no_grad():
        for key, value in tensors.items():
            if key == "num_updates":
                continue
            if key not in params or params[key].shape != value.shape:
                raise WeightsError(
                    f"checkpoint {info['path']}: its EMA weight {key!r} does not fit the model; "
                    "export with the configuration it was trained with"
                )
            params[key].copy_(value.to(params[key].dtype))
            n += 1
    return n
