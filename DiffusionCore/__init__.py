"""DiffusionCore: diffusion models for CT, in pure PyTorch (no Slicer, no Qt).

The public API:

* :class:`Volume`, :func:`read_volume`, :func:`write_volume` - CT in HU with exact geometry;
* :func:`degrade`, :func:`thin_grid` - thick-slice simulation and the thin grid that undoes it;
* :func:`interpolate` - nearest / linear / cubic B-spline baselines;
* :mod:`DiffusionCore.metrics` - PSNR, 3D SSIM, HU-MAE, body mask, consistency;
* :func:`evaluate` - score methods on simulated thick slices;
* :func:`save_result` - write a model's result with its full provenance (marked synthetic, settings, weights);
* ``SuperResolver`` (``DiffusionCore.sr``) and ``XrayToCTGenerator`` (``DiffusionCore.xray``) - the models.

Everything user-facing raises :class:`DiffusionCoreError` subclasses with actionable messages; all of them that a
caller may catch are importable from here (``from DiffusionCore import NumericalError``).
"""

from .degrade import crop_to_slabs, degrade, thin_grid
from .errors import (
    Cancelled,
    ConfigError,
    DataUnavailableError,
    DiffusionCoreError,
    GeometryError,
    InputError,
    NumericalError,
    OutputError,
    ResourceError,
    WeightsError,
)
from .evaluate import MethodResultError, evaluate, register_method
from .interpolation import interpolate
from .results import save_result
from .version import __version__ as __version__
from .volume import Grid, Volume, read_volume, suggested_factor, thick_axis, write_volume

__all__ = [
    "Cancelled",
    "ConfigError",
    "DataUnavailableError",
    "DiffusionCoreError",
    "GeometryError",
    "Grid",
    "InputError",
    "MethodResultError",
    "NumericalError",
    "OutputError",
    "ResourceError",
    "Volume",
    "WeightsError",
    "crop_to_slabs",
    "degrade",
    "evaluate",
    "interpolate",
    "read_volume",
    "register_method",
    "save_result",
    "suggested_factor",
    "thick_axis",
    "thin_grid",
    "write_volume",
]
