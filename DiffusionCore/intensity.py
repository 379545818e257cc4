"""HU <-> model units: the one place where the models' intensity window is defined (SR and X-ray to CT).

Model units are HU clipped to :data:`HU_WINDOW` and mapped linearly to ``[-1, 1]``: -1024 HU (air) -> -1,
2048 HU (dense bone / contrast) -> +1. One model unit is 1536 HU. Every network, training loop and
pipeline of both families converts through these functions and nowhere else.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

#: HU range mapped to [-1, 1]; values outside are clipped (the same window the PSNR figures use).
HU_WINDOW: tuple[float, float] = (-1024.0, 2048.0)

#: HU per model unit (half the window width).
HU_PER_UNIT: float = (HU_WINDOW[1] - HU_WINDOW[0]) / 2.0

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _float32_copy(x) -> np.ndarray:
    """A new C-contiguous float32 array with the values of ``x`` (the caller's array is never changed);
    the conversions then run in place on it with torch's threads (a volume is 64M+ voxels)."""
    return np.array(x, dtype=np.float32, order="C", copy=True)


def hu_to_unit(x: ArrayT) -> ArrayT:
    """HU -> model units in ``[-1, 1]`` (clipped to :data:`HU_WINDOW` first).

    Args:
        x: numpy array or torch tensor in HU, any shape. numpy results are float32.
    """
    lo, hi = HU_WINDOW
    if isinstance(x, torch.Tensor):
        return (x.clamp(lo, hi) - lo) / HU_PER_UNIT - 1.0
    out = _float32_copy(x)
    hu_to_unit_(torch.from_numpy(out))
    return out


def unit_to_hu(x: ArrayT) -> ArrayT:
    """Model units -> HU (values clipped to ``[-1, 1]``, so the result lies in :data:`HU_WINDOW`).

    Args:
        x: numpy array or torch tensor in model units, any shape. numpy results are float32.
    """
    lo, _ = HU_WINDOW
    if isinstance(x, torch.Tensor):
        return (x.clamp(-1.0, 1.0) + 1.0) * HU_PER_UNIT + lo
    out = _float32_copy(x)
    unit_to_hu_(torch.from_numpy(out))
    return out


def hu_to_unit_(x: torch.Tensor) -> torch.Tensor:
    """:func:`hu_to_unit` in place on a float tensor (no whole-volume temporaries); returns ``x``."""
    lo, hi = HU_WINDOW
    return x.clamp_(lo, hi).sub_(lo).div_(HU_PER_UNIT).sub_(1.0)


def unit_to_hu_(x: torch.Tensor) -> torch.Tensor:
    """:func:`unit_to_hu` in place on a float tensor (no whole-volume temporaries); returns ``x``."""
    return x.clamp_(-1.0, 1.0).add_(1.0).mul_(HU_PER_UNIT).add_(HU_WINDOW[0])
