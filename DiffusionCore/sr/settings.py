"""The options of one super-resolution run: :class:`SRRunSettings`, checked once when it is built.

The ``sr`` command, the Slicer batch CLI (CTDiffusionSRBatch), the Slicer module's logic and the ``sr``
evaluation methods each build one :class:`SRRunSettings` from their own inputs and hand it to
:meth:`SuperResolver.run <DiffusionCore.sr.pipeline.SuperResolver.run>` (or ``run_to_grid``). The checks that
need no weights (ranges, options that contradict each other) run here, with the error types and messages the
commands report; the checks that depend on the weights (which estimate they give, whether there is a
predictor to adapt) are made by :meth:`SuperResolver.plan <DiffusionCore.sr.pipeline.SuperResolver.plan>`.

This module imports no torch at its top (the ``DiffusionCore.sr`` package does).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, GeometryError
from ..seeds import check_seed

if TYPE_CHECKING:
    import torch

    from .adapt import AdaptSettings

#: The least spacing ratio (input / output slice spacing) the through-plane predictor runs at; its smallest factor
#: is 2, and a finer grid is resampled from the nearest factor's.
MIN_PREDICTOR_RATIO = 1.5


def predictor_spacing_problem(input_spacing: float, target_spacing: float, factors: list[int]) -> str:
    """Why weights with a through-plane predictor of ``factors`` cannot make slices ``target_spacing`` mm apart
    from slices ``input_spacing`` mm apart, naming the spacings that work; ``""`` when they can.

    The ``sr`` command refuses such a run with this message, and the Slicer module before its job starts.
    """
    ratio = float(input_spacing) / float(target_spacing)
    if ratio >= MIN_PREDICTOR_RATIO:
        return ""
    return (
        f"the target spacing ({target_spacing:.3g} mm) is only {ratio:.2f} times finer than the input's "
        f"{input_spacing:.3g} mm; the through-plane predictor needs at least {MIN_PREDICTOR_RATIO:g} (its factors "
        f"are {min(factors)}-{max(factors)}): choose a target spacing of at most "
        f"{input_spacing / MIN_PREDICTOR_RATIO:.3g} mm, e.g. {input_spacing / 2:.3g} mm (x2)"
    )


def adapt_settings(adapt: Any) -> AdaptSettings | None:
    """The :class:`~DiffusionCore.sr.adapt.AdaptSettings` of a run's ``adapt`` option: itself, ``True`` for the
    default adaptation (as the ``sr`` command adapts by default), None for ``False`` or None (none).

    Raises:
        ConfigError: anything else (a dict, a number of steps), naming ``AdaptSettings``.
    """
    if adapt is None or adapt is False:
        return None
    from .adapt import AdaptSettings  # it imports torch; this module does not

    if adapt is True:
        return AdaptSettings()
    if not isinstance(adapt, AdaptSettings):
        raise ConfigError(
            f"adapt must be an AdaptSettings (from DiffusionCore.sr.adapt import AdaptSettings; e.g. "
            f"adapt=AdaptSettings(steps=100)), True for the default adaptation, or None/False for none; got "
            f"{type(adapt).__name__} {adapt!r}"
        )
    return adapt


@dataclass(frozen=True)
class SRRunSettings:
    """What one super-resolution run is asked to do (``None`` means "the default" where it is allowed).

    Attributes:
        factor: slices per thick slice (2..8); default from the spacing. For ``run_to_grid`` it only labels
            the report (an integer subdivision) and enables its ``consistency_psnr``.
        target_spacing: alternatively the output slice spacing in mm (not together with ``factor``).
        axis: the thick array axis ``z``/``y``/``x`` (or 0, 1, 2); default: detected from the spacing.
        steps: sampling steps of the 'sample' estimate (default: the weights' ``num_inference_steps``); giving
            a count asks for a sample unless ``estimate`` says otherwise.
        guidance: classifier-free guidance scale (1.0 = off; default: the weights' setting).
        estimate: 'mean' or 'sample' (see :meth:`SuperResolver.resolve_estimate
            <DiffusionCore.sr.pipeline.SuperResolver.resolve_estimate>`); default: from ``steps``,
            ``num_samples`` and the weights.
        seed: random seed; the same seed gives the same output on the same device with the same thread count.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or a ``torch.device``.
        patch_size: patch ``(D, H, W)`` on the thin grid, D along the axis (default 32x256x256).
        overlap: overlap between patches ``(D, H, W)`` (default 8x64x64).
        num_samples: N > 1 averages N samples and reports their per-voxel standard deviation.
        data_consistency: correct the output so that degrading it again reproduces the input.
        memory_limit: usable bytes (host and GPU); default: ``$DIFFUSIONCORE_MEMORY_LIMIT`` or the free memory.
        tile_batch: patches per model call (default: 1 on the CPU, on a GPU as many as fit).
        allow_non_ct: run on a volume whose intensities do not look like CT in HU.
        allow_interspaced: run on an interspaced series (slices at most half as thick as their spacing, with gaps
            between them: an HRCT-type protocol), which is refused otherwise
            (:func:`~DiffusionCore.degrade.check_interspaced`); the result may then hold bright rims at edges.
        adapt: fine-tune a copy of the through-plane predictor on the input scan first
            (:class:`~DiffusionCore.sr.adapt.AdaptSettings`); ``True``: the default ``AdaptSettings()``; None or
            ``False``: no adaptation (anything else is a ConfigError). This object's default is None; the ``sr``
            command, the Slicer module and its batch CLI pass ``AdaptSettings(optional=True)`` unless told not to
            (adaptation is on by default for users).

    Raises:
        ConfigError: a step count below 1, fewer than 1 sample, an unknown estimate or one that contradicts the
            steps or samples, a patch size or overlap that is not three positive (non-negative) values, a tile batch
            below 1, a memory limit that is not a positive number of bytes, an ``adapt`` that is not an
            ``AdaptSettings``, a bool or None. GeometryError: both a factor and a target spacing.
    """

    factor: int | None = None
    target_spacing: float | None = None
    axis: str | int | None = None
    steps: int | None = None
    guidance: float | None = None
    estimate: str | None = None
    seed: int = 0
    device: str | torch.device = "auto"
    patch_size: tuple[int, int, int] | None = None
    overlap: tuple[int, int, int] | None = None
    num_samples: int = 1
    data_consistency: bool = True
    memory_limit: int | None = None
    tile_batch: int | None = None
    allow_non_ct: bool = False
    allow_interspaced: bool = False
    adapt: AdaptSettings | None = None

    def __post_init__(self) -> None:
        for name in ("patch_size", "overlap"):  # argparse gives lists: equal values make equal settings
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.adapt is not None:
            object.__setattr__(self, "adapt", adapt_settings(self.adapt))
        self.check()

    def check(self) -> None:
        """The checks that need no weights (run when the settings are built; see the class's Raises)."""
        from .model import requested_estimate  # it imports torch; this module does not

        check_seed(self.seed)  # 32 bits: a larger one repeated a smaller one's output
        if self.steps is not None and int(self.steps) < 1:
            raise ConfigError(f"the number of sampling steps must be at least 1; got {self.steps}")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be at least 1; got {self.num_samples}")
        requested_estimate(self.estimate, self.steps, self.num_samples)  # 'mean' with samples or steps
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            raise ConfigError(f"patch size needs three positive values (D H W); got {self.patch_size}")
        if self.overlap is not None and (len(self.overlap) != 3 or min(self.overlap) < 0):
            raise ConfigError(f"overlap needs three values of 0 or more (D H W); got {self.overlap}")
        if self.tile_batch is not None and int(self.tile_batch) < 1:
            raise ConfigError(f"tile batch must be 1 or more; got {self.tile_batch}")
        limit = self.memory_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Real)
                                  or not math.isfinite(limit) or limit <= 0):
            raise ConfigError(f"the memory limit must be a positive number of bytes; got {limit!r}")
        if self.factor is not None and self.target_spacing is not None:
            raise GeometryError("give either a factor or a target spacing, not both.")

    def replace(self, **changes: Any) -> SRRunSettings:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(
        cls, settings: SRRunSettings | None = None, overrides: Mapping[str, Any] | None = None
    ) -> SRRunSettings:
        """``settings`` (default: all defaults) with ``overrides`` (keyword arguments of ``run``) applied.

        Raises:
            TypeError: ``settings`` is not an :class:`SRRunSettings`, or an override names no option.
        """
        if settings is None:
            return cls(**(overrides or {}))
        if not isinstance(settings, SRRunSettings):
            raise TypeError(f"settings must be an SRRunSettings; got {type(settings).__name__}")
        return dataclasses.replace(settings, **overrides) if overrides else settings
