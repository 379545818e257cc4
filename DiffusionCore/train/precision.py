"""Mixed precision for training, decided once for every model family: bfloat16 autocast on a GPU that
supports it, float32 everywhere else (on a CPU autocast is slower and changes nothing worth having)."""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)


def resolve_amp(requested: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a run that asks for mixed precision on ``device``: ``torch.bfloat16`` on a GPU
    that supports it, else ``None`` (float32), with an info note saying why the request is not honoured."""
    if not requested:
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        logger.info("mixed precision: this GPU has no bfloat16 support; training in float32")
        return None
    logger.info("mixed precision: bfloat16 autocast is used on GPUs only; training in float32 on %s", device.type)
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type, or a context that changes nothing when ``dtype`` is None.
    Parameters and gradients stay float32 either way."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
