"""CT slice super-resolution: 3D VAE + ResShift latent diffusion + UNet with IRControlNet.

* :class:`~DiffusionCore.sr.model.SRModel` - one patch in, one patch out (model units);
* :mod:`DiffusionCore.intensity` - HU <-> model units (the only place);
* ``SuperResolver`` (:mod:`DiffusionCore.sr.pipeline`) - whole volumes, tiling, progress, cancel;
* :mod:`DiffusionCore.sr.training` - ``train vae`` / ``train sr``.
"""

from __future__ import annotations

from typing import Any

from ..intensity import HU_WINDOW, hu_to_unit, unit_to_hu
from .config import SRConfig
from .model import SRModel

__all__ = ["HU_WINDOW", "SRConfig", "SRModel", "SuperResolver", "hu_to_unit", "unit_to_hu"]


def __getattr__(name: str) -> Any:
    if name == "SuperResolver":
        from .pipeline import SuperResolver

        return SuperResolver
    raise AttributeError(name)


def __dir__() -> list[str]:
    """List the lazily imported ``SuperResolver`` too, so ``dir()`` and tab completion show it."""
    return sorted(set(globals()) | set(__all__))
