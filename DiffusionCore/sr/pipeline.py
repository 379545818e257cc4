"""Whole-volume super-resolution: thick-slice CT in, thin-slice CT out (:class:`SuperResolver`).

The steps of :meth:`SuperResolver.run`:

1. check the input (finite, 3D) and find the thin grid (:func:`DiffusionCore.degrade.thin_grid`): the
   thick axis from the spacing (or ``axis``), the factor from :func:`~DiffusionCore.volume.suggested_factor`
   when neither a factor nor a target spacing is given;
2. cubic B-spline interpolation of the thick input onto the thin grid (the model's condition);
3. HU -> model units (:mod:`DiffusionCore.intensity`), the thick axis moved first so that patches are
   ``(D, H, W)`` with D through-plane, whatever the acquisition plane;
4. overlapping patches (:mod:`DiffusionCore.tiling`) sized to the memory available; one
   ``model.super_resolve_patch`` call per patch with its own seeded generator; smooth blending. The
   estimate is the posterior mean (one network evaluation per patch, deterministic) unless a sample is
   asked for (``estimate='sample'``, a step count, or ``num_samples`` > 1: the ResShift reverse chain);
5. model units -> HU and, optionally, data consistency (:func:`DiffusionCore.degrade.enforce_consistency`):
   the result degraded again (slab average along the axis) reproduces the input exactly;
6. with ``num_samples`` N > 1 the output is the mean of N samples and the report carries the per-voxel
   standard deviation (HU) as a Volume on the same grid: where the model is unsure.

The networks see the input in one canonical storage order (:func:`storage_flips`: an array axis stored against
its physical direction is reversed first, and their output reversed back), so that the same scan stored with its
rows, columns or slices reversed (a DICOM series and its NIfTI) gives the same result; the grids stay as they are.

The options of a run are one :class:`~DiffusionCore.sr.settings.SRRunSettings` (or the same names as keyword
arguments); :meth:`SuperResolver.plan` makes the checks that depend on the weights and decides the tiling
before any heavy work.

Progress is reported over adaptation, cubic interpolation (in chunks), the predictor's planes, resampling, data
consistency and ``samples x tiles x steps`` (1 step for the mean), each weighed by its measured cost and named in the
messages (known before the first step: :meth:`SuperResolver.plan`); the cancel event is
checked between steps and tiles and raises :class:`~DiffusionCore.errors.Cancelled`. The input Volume is
never modified. The output lies exactly on the thin grid.

Importing this module registers the ``sr`` method of :func:`DiffusionCore.evaluate.evaluate`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..degrade import (
    INTERSPACED_RUN_NOTE,
    MAX_FACTOR,
    check_interspaced,
    enforce_consistency,
    factor_cap_note,
    interspaced_slices,
    plan_thin_grid,
    slab_thickness_note,
    thick_axis,
    thin_grid,
)
from ..devices import resolve_device
from ..errors import (
    Cancelled,
    ConfigError,
    GeometryError,
    InputError,
    ResourceError,
    WeightsError,
)
from ..evaluate import MODEL_SETTINGS, register_method
from ..files import peak_rss_bytes
from ..geometry import across_axes_swapped, storage_flips
from ..intensity import HU_PER_UNIT, hu_to_unit, hu_to_unit_, unit_to_hu_
from ..interpolation import interpolate, single_axis
from ..tiling import (
    DEFAULT_OVERLAP,
    DEFAULT_PATCH_SIZE,
    MEMORY_SAFETY_FRACTION,
    MemoryBudget,
    Tile,
    TilePlan,
    choose_plan,
    device_available_memory,
    format_bytes,
    host_available_memory,
    memory_limit_from_env,
    separable_weight,
)
from ..volume import (
    AIR_HU,
    PADDING_THRESHOLD_HU,
    Grid,
    Volume,
    axis_index,
    check_ct,
    replace_padding_counted,
    require_ct,
    require_finite_voxels,
)
from ..weights.registry import register_architecture_check
from .adapt import AdaptSettings, adapt_predictor
from .config import MEAN, SAMPLE
from .model import requested_estimate
from .settings import MIN_PREDICTOR_RATIO, SRRunSettings, predictor_spacing_problem
from .throughplane import COMPONENT as THROUGHPLANE
from .throughplane import ThroughPlaneNet, body_box, channels_last, predict_residual

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]

#: Forward passes' worth of work in one optimizer step of test-time adaptation: its forward, and a backward of about
#: twice that. Weighs adaptation against the predictor on the progress bar (:func:`adaptation_units`).
ADAPT_STEP_PASSES = 3
#: What the whole-volume steps on the host cost against the through-plane predictor: their seconds per thin voxel over
#: the predictor's seconds per thin voxel it predicts (each voxel of the body box twice, once per in-plane
#: orientation); cubic interpolation's per thin voxel and input slice (a dense matrix over the slices). They weigh
#: these steps on the progress bar (:func:`host_step_units`). One torch thread, chest-dx (512x512x64 at 5 mm, x4):
#: the predictor 131 s for 1,024 planes (1.0 us per predicted voxel), consistency 4.1 s (63 ns per thin voxel; 9.0 s
#: for 128 slices), cubic 0.3-0.6 s (0.1 ns per voxel and slice), 7.9 s for 128 slices (0.46 ns) and 25 s for 300
#: slices to 1200 (0.26 ns).
CUBIC_COST = 3e-4
CONSISTENCY_COST = 0.065
#: Chunks the cubic interpolation runs in (slabs along an in-plane axis), so that the bar moves and cancel is checked
#: inside it; each column along the thick axis is interpolated alone, so the result is the whole volume's bit for bit.
INTERPOLATION_CHUNKS = 16
#: Columns of a float32 matrix product that BLAS kernels work on together (a multiple of any of their unrolls): a
#: chunk whose columns start at a multiple of it gets the whole product's arithmetic, bit for bit.
BLAS_ALIGN = 64
#: Used when the model's configuration does not say (the seed's defaults).
FALLBACK_STEPS = 15
FALLBACK_GUIDANCE = 1.0
#: Most patches per model call on a GPU (more gives little once the GPU is busy).
MAX_TILE_BATCH = 8
#: Whole-volume float32 arrays held at once (interpolated input, condition, blend accumulator, sample
#: output, consistency scratch), plus two for the running mean and variance of several samples.
_VOLUME_ARRAYS = 5
_VOLUME_ARRAYS_PER_EXTRA_STATS = 2


# -- helpers ------------------------------------------------------------------------------------------
def tile_seed(seed: int, sample: int, tile: int) -> int:
    """Independent, order-free seed for one (sample, tile) pair of a run with ``seed``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(sample), int(tile)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: ``MemoryError``, ``torch.OutOfMemoryError`` (CUDA) or the
    ``RuntimeError`` the CPU allocator raises ("can't allocate memory")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def tile_weight(tile: Tile, device: torch.device) -> torch.Tensor:
    """A tile's blending weight ``(D, H, W)`` built on ``device`` from its three 1D factors."""
    return separable_weight(*(torch.from_numpy(f).to(device) for f in tile.factors))


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("super-resolution cancelled; no output was written.")


def _require_volume(volume: Any, what: str) -> None:
    """Refuse anything but a :class:`~DiffusionCore.volume.Volume` (a bare array has no spacing: no thick axis)."""
    if not isinstance(volume, Volume):
        raise InputError(
            f"{what} needs a DiffusionCore Volume (a (z, y, x) array in HU with its spacing, origin and direction), "
            f"not a {type(volume).__module__}.{type(volume).__name__}: read a file or DICOM folder with "
            "DiffusionCore.read_volume(path), or wrap an array with DiffusionCore.Volume(array, spacing=(x_mm, y_mm, "
            "z_mm), origin=(x, y, z), direction=3x3 matrix)"
        )


def interpolate_cubic(
    volume: Volume,
    grid: Grid,
    axis: int,
    *,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """Cubic B-spline interpolation of ``volume`` onto ``grid`` (:func:`~DiffusionCore.interpolation.interpolate`),
    in :data:`INTERPOLATION_CHUNKS` slabs along an in-plane axis: ``progress(chunks_done, chunks)`` after each, cancel
    checked before each. A new float32 array in ``grid``'s layout, equal bit for bit to the whole volume's.

    Each slab keeps the whole grids' origin and spacing (only its in-plane size differs), so its index map along
    ``axis``, and with it every interpolation weight, is the whole volume's; only the slab's array is used.
    """
    along = next(a for a in range(3) if a != axis)  # the outer in-plane axis: contiguous slabs
    size = grid.shape[along]
    # a slab's columns of the matrix product (its voxels per thin slice) a multiple of BLAS_ALIGN: every column is
    # computed by the same kernel as in the whole volume's product, so the sums are the same bit for bit
    inner = int(np.prod([grid.shape[a] for a in range(3) if a not in (axis, along)]))
    step = BLAS_ALIGN // math.gcd(inner, BLAS_ALIGN)
    chunks = max(1, min(INTERPOLATION_CHUNKS, size // step))
    if single_axis(volume.grid, grid) is None:  # resampled in 3D (SimpleITK): slabs would see other neighbours
        chunks = 1
    if chunks == 1:
        _check_cancel(cancel)
        whole = interpolate(volume, grid, "cubic").array
        if np.may_share_memory(whole, volume.array) or whole.dtype != np.float32:
            whole = whole.astype(np.float32)  # the caller may change it in place: never the input's array
        if progress is not None:
            progress(1, 1)
        return whole
    out = np.empty(grid.shape, dtype=np.float32)
    edges = [min(size, step * int(round(i * size / step / chunks))) for i in range(chunks)] + [size]
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        _check_cancel(cancel)
        cut = [slice(None)] * 3
        cut[along] = slice(int(a), int(b))
        src_shape, dst_shape = list(volume.shape), list(grid.shape)
        src_shape[along] = dst_shape[along] = int(b - a)
        src = Volume.from_grid(Grid(tuple(src_shape), volume.grid.spacing, volume.grid.origin, volume.grid.direction),
                               volume.array[tuple(cut)])
        dst = Grid(tuple(dst_shape), grid.spacing, grid.origin, grid.direction)
        out[tuple(cut)] = interpolate(src, dst, "cubic").array
        if progress is not None:
            progress(i + 1, chunks)
    return out


def finer_than_pixels_note(volume: Volume, grid: Grid, axis: int) -> str:
    """A warning when ``grid``'s slices along ``axis`` are clearly finer than ``volume``'s pixels in plane (e.g. a thin
    0.6 mm CT made 0.15 mm at x4): a large result with nothing to gain, usually a thin scan given by mistake; ``""``
    otherwise."""
    out_mm = float(grid.spacing_zyx[axis])
    in_plane = min(float(s) for a, s in enumerate(volume.spacing_zyx) if a != axis)
    if out_mm >= FINER_THAN_PIXELS * in_plane:
        return ""
    in_mm = float(volume.spacing_zyx[axis])
    said = (f"the result's slices will be {out_mm:.3g} mm apart, finer than the input's {in_plane:.3g} mm pixels "
            f"({grid.shape[axis]} slices, {format_bytes(4 * int(np.prod(grid.shape)))} as float32)")  # fmt: skip
    useful = int(in_mm / (USEFUL_SLICES_OF_PIXELS * in_plane) + 1e-9)  # the most that keeps slices about a pixel apart
    if useful < 2:  # the slices are about as thin as the pixels: no factor gains anything
        return (f"{said}: its {in_mm:.3g} mm slices are thin already; super-resolution is for slices several times "
                "thicker than the pixels")  # fmt: skip
    factor = in_mm / out_mm
    shown = f"x{factor:.0f}" if abs(factor - round(factor)) < 0.01 else f"{factor:.3g} times"
    return (f"{said}: the factor ({shown}) is too high for {in_mm:.3g} mm slices; the largest useful factor is "
            f"x{useful} ({in_mm / useful:.3g} mm slices), or a target spacing of {in_mm / useful:.3g} mm or more")


#: Slices this much finer than the input's pixels are warned of (:func:`finer_than_pixels_note`).
FINER_THAN_PIXELS = 0.75
#: The largest useful factor (:func:`finer_than_pixels_note`) gives slices at least this share of a pixel apart.
USEFUL_SLICES_OF_PIXELS = 0.9


def host_step_units(cost: float, thin_voxels: int, m: int, box: tuple[int, int, int, int], factor: int) -> int:
    """Progress units (the predictor's planes) of a whole-volume step on the host that costs ``cost`` per thin voxel
    (:data:`CONSISTENCY_COST`; :data:`CUBIC_COST` times the input's slices) over ``thin_voxels``, against the
    predictor's ``m`` thick slices, ``factor`` and body ``box``: a plane is ``factor x m`` thin rows of the box's mean
    plane width (as in :func:`adaptation_units`), predicted once."""
    h0, h1, w0, w1 = box
    h, w = max(1, h1 - h0), max(1, w1 - w0)
    plane_voxels = factor * m * 2.0 * h * w / (h + w)
    return max(1, int(round(cost * thin_voxels / plane_voxels)))


# -- the storage order the networks see ---------------------------------------------------------------
# -- the through-plane predictor's heads -------------------------------------------------------------
def nearest_head(factors: Sequence[int], ratio: float) -> int:
    """The through-plane predictor's head (a trained factor) that a run at spacing ratio ``ratio`` (input / output
    slice spacing) uses: the nearest, the smaller of two equally near. The result is resampled onto the asked-for
    grid when the ratio is not that factor."""
    return min((int(f) for f in factors), key=lambda f: (abs(f - ratio), f))


def missing_head_note(factors: Sequence[int], ratio: float, weights: str = "") -> str:
    """What to tell the user when a run asks for a whole factor (given, suggested from the spacing, or a target
    spacing that many times finer) that the through-plane predictor has no head for, or ``""``: the result is then
    another head's, resampled onto the grid. Quiet for a ratio between factors (every predictor resamples there, as
    the README says) and so for the shipped weights, whose heads are 2..8.

    Args:
        factors: the predictor's heads (``ThroughPlaneNet.factors``). ratio: input / output slice spacing.
        weights: the weights' name or file, for the message.
    """
    asked = int(round(ratio))
    if abs(ratio - asked) > 1e-6 or not 2 <= asked <= MAX_FACTOR or asked in factors:
        return ""
    heads = ", ".join(f"x{int(f)}" for f in sorted(factors))
    used = nearest_head(factors, ratio)
    usable = [str(int(f)) for f in sorted(factors) if 2 <= f <= MAX_FACTOR]
    choices = " or ".join([", ".join(usable[:-1]), usable[-1]] if len(usable) > 1 else usable)
    return (
        f"{'the weights ' + weights if weights else 'these weights'} have through-plane predictor heads for {heads} "
        f"only: x{asked} was made with the x{used} head and resampled onto the x{asked} grid; for a direct result "
        f"choose factor {choices}, or train weights with factor {asked} (model.factors)"
    )


#: The options of a run (fields of :class:`~DiffusionCore.sr.settings.SRRunSettings`) that act on the latent diffusion
#: stage alone (its guidance, its patches, its patches per call): weights without one (a through-plane predictor alone,
#: as the shipped sr-default) leave them unused. The step and sample counts ask for posterior samples, which such
#: weights cannot give: :meth:`SuperResolver.resolve_estimate` refuses them instead.
DIFFUSION_STAGE_SETTINGS = ("guidance", "patch_size", "overlap", "tile_batch")


def diffusion_stage_settings(settings: SRRunSettings) -> list[str]:
    """The options of :data:`DIFFUSION_STAGE_SETTINGS` that ``settings`` sets (``None`` is the default), in that order."""
    return [name for name in DIFFUSION_STAGE_SETTINGS if getattr(settings, name) is not None]


def no_diffusion_stage_note(options: Sequence[str], weights: str = "") -> str:
    """One line for a user who set ``options`` (named as the front end names them: ``--guidance-scale``,
    ``--guidanceScale``, ``Guidance scale``) that act on the diffusion stage alone, with weights that have none: they
    have no effect, and why. ``""`` when ``options`` is empty. Each front end says it once per run.

    Args:
        options: the options set, as the user knows them. weights: the weights' name or file, for the message.
    """
    options = list(options)
    if not options:
        return ""
    named = options[0] if len(options) == 1 else f"{', '.join(options[:-1])} and {options[-1]}"
    one = len(options) == 1
    return (
        f"{named} {'has' if one else 'have'} no effect with {'the weights ' + weights if weights else 'these weights'}: "
        f"{'it acts' if one else 'they act'} on the latent diffusion stage alone, and these weights are a through-plane "
        "predictor without one"
    )


# -- reports ----------------------------------------------------------------------------------------
def _geometry_settings(volume: Volume, grid: Grid, axis: int, factor: int | None) -> dict[str, Any]:
    """The report's description of the grids of a run, in one axis order, x, y, z (3D Slicer's and ITK's), named
    in each key (the array's z, y, x shape beside x, y, z spacings read as a wrong pairing)."""
    return {
        "factor": factor,
        "axis": "zyx"[axis],
        "input_spacing_xyz_mm": list(volume.spacing),
        "output_spacing_xyz_mm": list(grid.spacing),
        "output_size_xyz": list(grid.shape)[::-1],
    }


def _add_consistency_psnr(report: dict[str, Any], output: Volume, volume: Volume, axis: int, factor: int | None) -> None:
    """For an integer subdivision: how well the output, thickened again, reproduces the input (dB)."""
    if factor is not None and output.shape[axis] == volume.shape[axis] * factor:
        from ..metrics import consistency_psnr

        report["consistency_psnr"] = float(consistency_psnr(output, volume, factor, axis, "slab"))


# -- the pipeline -----------------------------------------------------------------------------------
@dataclass
class SRPlan:
    """What :meth:`SuperResolver.plan` decides for a run before any heavy work.

    Attributes:
        grid: the thin grid written. axis: its array axis. factor: the integer factor (None: not an integer
            subdivision; it labels the report).
        estimate: 'mean' or 'sample'. steps: network evaluations per patch (1 for the mean).
        requested_steps: the step count asked for (or the weights' default; 1 for the mean). guidance: the
            guidance scale.
        patch_size, overlap: the patch and overlap asked for (the defaults filled in).
        device: where the networks run.
        predictor_factor: the factor the through-plane predictor runs at (None: cubic interpolation only).
        box: the body box the predictor runs in (thick axis first), or None.
        adapt_units, interp_units, pre_units, resample_units, consistency_units: progress units (the predictor's
            planes) of the adaptation, the cubic interpolation, the predictor, the resampling onto a grid that is not
            the predictor's factor, and the data consistency of a run without a diffusion stage.
        tiling: the patches (None for weights without a diffusion stage). budget: its memory estimate.
        reduced_from: the patch sizes tried first that did not fit in memory. batch: patches per model call.
        total: the progress total.
    """

    grid: Grid
    axis: int
    factor: int | None
    estimate: str
    steps: int
    requested_steps: int
    guidance: float
    patch_size: tuple[int, ...]
    overlap: tuple[int, ...]
    device: torch.device
    predictor_factor: int | None
    box: tuple[int, int, int, int] | None
    adapt_units: int
    pre_units: int
    interp_units: int = 0
    resample_units: int = 0
    consistency_units: int = 0
    tiling: TilePlan | None = None
    budget: MemoryBudget | None = None
    reduced_from: list[tuple[int, int, int]] = field(default_factory=list)
    batch: int = 1
    total: int = 0

    @property
    def start_units(self) -> int:
        """Progress units of the starting point (:meth:`SuperResolver.starting_point`): adaptation, interpolation,
        predictor and resampling."""
        return self.adapt_units + self.interp_units + self.pre_units + self.resample_units


def adapt_record(adapt: AdaptSettings | None, done: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a result's provenance records of its adaptation: the request (``seconds``, ``steps``: what the command line
    asked, which a rerun compares), the optimizer steps it ran (``steps_run``: a time budget's count, which
    ``--adapt-steps`` reproduces), where it was not done, why (``skipped``), and where its network was not used
    (it diverged: :func:`~DiffusionCore.sr.adapt.discard_reason`), why (``discarded``); None without adaptation."""
    if adapt is None:
        return None
    done = done or {}
    record: dict[str, Any] = {"seconds": adapt.seconds, "steps": adapt.steps, "steps_run": int(done.get("steps", 0))}
    if not done or done.get("skipped"):
        record["skipped"] = done.get("skipped") or "not run"
    elif done.get("discarded"):
        record["discarded"] = done["discarded"]
    return record


def adaptation_note(predictor_report: dict[str, Any] | None) -> str:
    """The report's note for an adaptation whose network was discarded (``""`` for any other)."""
    done = (predictor_report or {}).get("adaptation") or {}
    if not done.get("discarded"):
        return ""
    return f"adaptation discarded, the result uses the unadapted predictor: {done['discarded']}"


def check_same_in_plane(volume: Volume, grid: Grid, axis: int) -> None:
    """Refuse a thin ``grid`` for :meth:`SuperResolver.run_to_grid` that differs from ``volume``'s grid other than
    along array ``axis``: another in-plane size, spacing, direction, or in-plane position.

    Raises:
        GeometryError: naming what differs.
    """
    src = volume.grid
    problems = []
    for a in range(3):
        if a == axis:
            continue
        name = "zyx"[a]
        if src.shape[a] != grid.shape[a]:
            problems.append(f"{grid.shape[a]} voxels along {name} where the input has {src.shape[a]}")
        elif not math.isclose(src.spacing_zyx[a], grid.spacing_zyx[a], rel_tol=1e-5):
            problems.append(f"a spacing of {grid.spacing_zyx[a]:.6g} mm along {name} where the input's is "
                            f"{src.spacing_zyx[a]:.6g} mm")
    if not problems and not np.allclose(src.direction_matrix, grid.direction_matrix, rtol=0, atol=1e-6):
        problems.append("another direction")
    if not problems:
        # the origin's move in the grid's own axes (not the transpose: a sheared grid's axes are not orthogonal)
        shift = np.linalg.solve(grid.direction_matrix, np.asarray(grid.origin, float) - np.asarray(src.origin, float))
        for a in range(3):  # the origin's shift along each in-plane index axis (column 2 - a)
            if a != axis and abs(shift[2 - a]) > 1e-3 * src.spacing_zyx[a]:
                problems.append(f"its origin moved {shift[2 - a]:.4g} mm along {'zyx'[a]}")
    if problems:
        raise GeometryError(
            f"run_to_grid writes the input's own in-plane grid and refines only axis {'zyx'[axis]}; the grid given has "
            f"{'; '.join(problems)}. Make the grid with DiffusionCore.thin_grid(volume, factor, axis=...), or resample "
            "the result afterwards"
        )


#: Host memory the through-plane predictor's run needs per output voxel, writing included: the thin volume (4 bytes;
#: the predictor adds its residual into the cubic interpolation, batch by batch), the float32 input (4 / factor), data
#: consistency's scratch (about 1.5), and the writer's: none for a NIfTI, NRRD or MetaImage file (its voxels are
#: streamed from the array, :func:`~DiffusionCore.volume.write_volume`), 6 for a DICOM series (its whole-volume
#: rounded float32 and int16 copies, ``dicom_out.pixel_encoding``). Refitted on 2026-12-07 (probe 46 inputs), with
#: ``/usr/bin/time -v python -m DiffusionCore sr IN OUT.nii.gz --factor 4 --threads 1`` (shipped sr-default, CPU),
#: "Maximum resident set size" of the whole process, Python, PyTorch and the weights (0.35-0.4 GB) included:
#:
#: * chest-dx 512x512x64 x4 ``--no-adapt`` (67.1 M output voxels): 0.996 GB (1.26 GB before the writer's copy went);
#: * chest-dx x4, default adaptation, ``--output-dtype int16``: 1.114 GB (the adaptation adds about 0.12 GB);
#: * 512x512x150 x4 ``--no-adapt`` (157.3 M): 1.801 GB, at data consistency (1.45 GB predicting, 1.37 GB writing);
#:   the slope between the two sizes is 8.9 bytes per voxel, the intercept 0.40 GB;
#: * the same volume as a DICOM series: its write adds 6.06 bytes per voxel to the 1.36 GB before it (2.32 GB).
#:
#: What the run adds to the process as the check finds it (input read, weights loaded: 0.34-0.36 GB) is then 0.66 and
#: 0.77 GB at 67.1 M voxels, 1.44 GB at 157.3 M (7.5 bytes per voxel beyond the fixed part) and 1.96 GB for the
#: DICOM output (10.7 bytes per voxel). The check cannot tell the output's format, so 11 bytes plus 256 MiB: 2 %
#: above the DICOM output's addition, 30-53 % above a file output's, and within 11 % of the whole process's peak for
#: the file outputs (1.01 GB at 67.1 M voxels, 2.00 GB at 157.3 M). Making the DICOM writer convert slab by slab would let this fall to about 8.5 bytes. Before: 16
#: bytes, fitted on 3-10 M-voxel volumes where the process's own memory looked like a per-voxel cost, and the
#: writer's whole-volume copy: 31-65 % above what large runs took.
PREDICTOR_BYTES_PER_VOXEL = 11
#: What the run needs beside that, whatever the volume's size (not the process itself: ``--memory-limit`` caps the
#: run's working memory): a plane batch's feature maps, the adaptation's batches and network copies (about 0.12 GB),
#: the writer's buffers.
PREDICTOR_FIXED_BYTES = 256 * 2**20


def without_padding(volume: Volume) -> tuple[Volume, str]:
    """``volume`` with the padding markers outside the scan circle (-2048, -3024, ... below
    :data:`~DiffusionCore.volume.PADDING_THRESHOLD_HU` and reaching the edge of their slice) set to air, as
    :func:`~DiffusionCore.volume.read_volume` sets them in a file's voxels (:func:`~DiffusionCore.volume.replace_padding`),
    and a note saying how many; ``(volume, "")`` itself when it has none (a volume read from a file). The caller's
    array is not modified: the replacement is made in a copy.

    An in-memory volume (an array, ``Volume.from_sitk`` of an image read with SimpleITK) is then super-resolved as
    its file is by the ``sr`` command: the model never sees -3024 HU beside the body."""
    arr = volume.array
    if float(arr.min()) >= PADDING_THRESHOLD_HU:  # nothing that low: no copy
        return volume, ""
    source = str(volume.metadata.get("source") or "the input volume")
    # its own copy, replaced in place (the caller's array may be one replace_padding would change in place)
    out, replaced = replace_padding_counted(np.array(arr, dtype=np.float32, copy=True), source)
    if not replaced:  # values that low inside the image only: measurements, kept as read_volume keeps them
        return volume, ""
    note = (f"{replaced} voxel{'s' if replaced != 1 else ''} below {PADDING_THRESHOLD_HU:g} HU reaching the image's "
            f"edge (outside the scan circle) taken as padding and set to air ({AIR_HU:g} HU), as reading a file does "
            "(the input volume itself is unchanged)")  # fmt: skip
    return volume.with_array(out), note


def spacing_order_note(volume: Volume, grid: Grid, axis: int) -> str:
    """A warning for a volume built in memory (no ``metadata["source"]``: not read from a file) whose thick axis,
    found from the spacing, is not array axis 0, the axis a ``(z, y, x)`` numpy array has its slices along: most
    likely its spacing was given in the array's ``(z, y, x)`` order where :class:`~DiffusionCore.volume.Volume` takes
    ``(x, y, z)``, and the run would up-sample the rows or columns. ``""`` for any other volume: a file's spacing comes
    from its header, so a scan read from a file and stored with its slices along another axis is run as it is.
    """
    if axis == 0 or "source" in volume.metadata:
        return ""
    x, y, z = volume.spacing
    name = "zyx"[axis]
    return (
        f"the volume's thickest spacing is along array axis {axis} ({name}, {volume.spacing_zyx[axis]:.3g} mm), not "
        f"axis 0 (z), where a (z, y, x) array has its slices: its spacing was given as (x, y, z) = ({x:.3g}, {y:.3g}, "
        f"{z:.3g}) mm, so the run up-samples array axis {name} ({volume.shape} -> {grid.shape}). If the spacing was "
        f"meant in the array's (z, y, x) order, give Volume(array, spacing=({z:.3g}, {y:.3g}, {x:.3g})), which is "
        f"(x, y, z); if the slices really are along {name}, pass axis={name!r} to say so"
    )


def predictor_bytes(voxels: int) -> int:
    """Host memory a through-plane predictor's run onto ``voxels`` output voxels needs, beside the process itself."""
    return int(voxels) * PREDICTOR_BYTES_PER_VOXEL + PREDICTOR_FIXED_BYTES


def check_predictor_memory(shape: tuple[int, ...], memory_limit: int | None, factor: int, factors: list[int]) -> None:
    """Refuse a through-plane predictor's run onto a grid of ``shape`` whose estimate (:func:`predictor_bytes`) exceeds
    ``memory_limit`` (``--memory-limit``), else ``$DIFFUSIONCORE_MEMORY_LIMIT`` or the free memory
    (:func:`~DiffusionCore.files.check_memory_for`), naming a smaller factor of ``factors`` that fits
    (:func:`smaller_factor_advice`). The run makes it once the volume is read; ``sr`` and the Slicer batch CLI make it
    from a file's header before reading it.

    Raises:
        ResourceError: the estimate does not fit.
    """
    from ..files import check_memory_for

    voxels = math.prod(int(n) for n in shape)
    needed = predictor_bytes(voxels)
    available = memory_limit if memory_limit is not None else (memory_limit_from_env() or host_available_memory())
    advice = smaller_factor_advice(voxels, available, factor, factors)
    what = f"super-resolving onto {'x'.join(map(str, shape))} voxels"
    if memory_limit is None:
        check_memory_for(needed, what, advice)
    elif needed > memory_limit:
        raise ResourceError(f"not enough memory: {what} needs about {format_bytes(needed)}, above the limit of "
                            f"{format_bytes(memory_limit)}; raise the limit, or {advice}")  # fmt: skip


def smaller_factor_advice(voxels: int, available: int, factor: int, factors: list[int]) -> str:
    """What to do when a predictor run of ``factor`` onto ``voxels`` output voxels does not fit in ``available``
    bytes: the largest smaller factor the weights have whose run fits (the output shrinks in proportion), else crop
    the volume."""
    fits = [k for k in factors if k < factor and predictor_bytes(voxels * k // factor) <= available]
    if fits:
        k = max(fits)
        return (f"use a smaller factor (--factor {k} needs about {format_bytes(predictor_bytes(voxels * k // factor))}"
                "), or crop the volume")  # fmt: skip
    return "crop the volume (fewer slices, or a smaller field of view)"


class SuperResolver:
    """Thick-slice CT -> thin-slice CT: a through-plane predictor and/or a latent diffusion model.

    The starting point is the thick input cubic-interpolated onto the thin grid, plus, when the weights
    have a through-plane predictor (:mod:`DiffusionCore.sr.throughplane`), its predicted residual
    (optionally after adapting a copy of it to the input scan: :mod:`DiffusionCore.sr.adapt`). A latent
    diffusion model, when present, refines that starting point patch by patch (it is ResShift's ``y``).
    Data consistency comes last.

    Args:
        model: an :class:`DiffusionCore.sr.model.SRModel` (or any module with the same interface:
            ``super_resolve_patch``, ``estimate_patch_memory``, ``latent_downsample``, ``min_patch``,
            ``weights_sha256``, ``config``), or ``None`` for weights that hold a predictor only.
        weights_name: a name for reports (registry name or file).
        predictor: the through-plane predictor, or ``None``.
        weights_sha256: the weights file's sha256 (default: the model's).
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        *,
        weights_name: str | None = None,
        predictor: ThroughPlaneNet | None = None,
        weights_sha256: str | None = None,
    ):
        if model is None and predictor is None:
            raise ConfigError("a SuperResolver needs a diffusion model, a through-plane predictor, or both")
        self.model = model
        self.predictor = predictor
        self.weights_name = weights_name
        self._weights_sha256 = weights_sha256

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_file: str | os.PathLike, *, allow_unregistered: bool = False) -> SuperResolver:
        """Load registered weights by name, or a safetensors file (checked against the registry).

        A file whose metadata says ``component="throughplane"`` holds a through-plane predictor only; any
        other SR file is a latent diffusion model (:meth:`SRModel.from_pretrained`). torch's global random state is
        left as it was (the layers' default initialisation draws from it before the weights overwrite them).
        """
        from ..weights.registry import resolve_weights
        from .model import SRModel

        resolved = resolve_weights(name_or_file, family="sr", allow_unregistered=allow_unregistered)
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: the networks are built on the CPU
            if resolved.metadata.get("component") == THROUGHPLANE:
                predictor = load_predictor(resolved)
                return cls(None, weights_name=str(name_or_file), predictor=predictor, weights_sha256=resolved.sha256)
            return cls(SRModel.from_resolved(resolved), weights_name=str(name_or_file))  # checked once, warned once

    @classmethod
    def from_files(
        cls, vae_path: str | os.PathLike, diffusion_path: str | os.PathLike, *, allow_unregistered: bool = False
    ) -> SuperResolver:
        """Load separate VAE and diffusion weights files (``--vae-checkpoint`` and ``--diffusion-checkpoint``),
        each checked against the registry like ``--weights`` (``allow_unregistered``: accept files in none); torch's
        global random state is left as it was, as by :meth:`from_pretrained`."""
        from .model import SRModel

        with torch.random.fork_rng(devices=[]):  # the layers' initialisation draws from the CPU generator
            model = SRModel.from_files(vae_path, diffusion_path, allow_unregistered=allow_unregistered)
        return cls(model, weights_name=f"{vae_path} + {diffusion_path}")

    @classmethod
    def tiny(cls, seed: int = 0) -> SuperResolver:
        """A tiny random-weight model for tests and self-tests. Its images are meaningless."""
        from .model import SRModel

        return cls(SRModel.tiny(seed=seed), weights_name="tiny-test-model (random weights)")

    @classmethod
    def tiny_predictor(cls, seed: int = 0) -> SuperResolver:
        """A tiny random-weight through-plane predictor without a diffusion stage, for tests and self-tests. torch's
        global random state is as it was (the layers' default initialisation draws from it, then is overwritten by
        the seeded weights)."""
        from .throughplane import tiny_predictor

        with torch.random.fork_rng(devices=[]):
            predictor = tiny_predictor(seed)
        return cls(None, predictor=predictor, weights_name="tiny-test-predictor (random weights)",
                   weights_sha256="0" * 64)

    @classmethod
    def default(cls) -> SuperResolver:
        """The default registered SR weights (see :func:`default_weights_name`)."""
        return cls.from_pretrained(default_weights_name())

    # -- defaults ----------------------------------------------------------------------------------
    @property
    def has_diffusion_stage(self) -> bool:
        """Whether the weights hold a latent diffusion stage (else a through-plane predictor alone)."""
        return self.model is not None

    def unused_settings(self, settings: SRRunSettings) -> list[str]:
        """The options ``settings`` sets that these weights leave unused: those of the diffusion stage
        (:func:`diffusion_stage_settings`) when they have none; ``[]`` otherwise."""
        return [] if self.has_diffusion_stage else diffusion_stage_settings(settings)

    @property
    def default_steps(self) -> int:
        cfg = getattr(getattr(self.model, "config", None), "diffusion", None)
        return int(getattr(cfg, "num_inference_steps", FALLBACK_STEPS))

    @property
    def default_estimate(self) -> str:
        """'mean' or 'sample': what the weights return when nothing else is asked for."""
        return MEAN if self.model is None else self.model.default_estimate

    def resolve_estimate(self, estimate: str | None, steps: int | None, num_samples: int) -> str:
        """The estimate a run makes: as asked; else 'sample' when a step count or several samples are asked
        for (both only mean something for samples); else the weights' default.

        Raises:
            ConfigError: 'mean' with several samples or a step count other than 1, an unknown estimate, or
                'mean' for DDIM weights.
        """
        estimate = requested_estimate(estimate, steps, num_samples)
        if self.model is None:
            if estimate == SAMPLE:
                raise ConfigError(
                    f"the weights {self.weights_name} are a through-plane predictor without a diffusion stage: "
                    "they give one deterministic estimate. Drop --estimate sample, --num-steps and "
                    "--num-samples, or use weights with a diffusion stage."
                )
            return MEAN
        return self.model.resolve_estimate(estimate)

    @property
    def default_guidance(self) -> float:
        cfg = getattr(getattr(self.model, "config", None), "diffusion", None)
        return float(getattr(cfg, "guidance_scale", FALLBACK_GUIDANCE))

    def _tile_batch(
        self, requested: int | None, plan: TilePlan, dev: torch.device, device_limit: int | None
    ) -> int:
        """Tiles per model call: as asked (at least 1: :class:`~DiffusionCore.sr.settings.SRRunSettings` checks
        it), else 1 on the CPU (no gain there) and on a GPU the most (up to :data:`MAX_TILE_BATCH`) whose memory
        estimate fits."""
        if requested is not None:
            return min(int(requested), plan.n_tiles)
        if dev.type == "cpu" or device_limit is None:
            return 1
        best = 1
        for b in range(2, min(MAX_TILE_BATCH, plan.n_tiles) + 1):
            if int(self.model.estimate_patch_memory(plan.patch_size, batch=b, device=dev)) > device_limit:
                break
            best = b
        return best

    def effective_steps(self, steps: int) -> int:
        """Network evaluations per patch for a requested step count (a process with ``T`` steps runs at
        most ``T``); the progress total is counted in these."""
        process = getattr(self.model, "diffusion", None)
        if process is not None and hasattr(process, "set_timesteps"):
            return max(1, len(process.set_timesteps(int(steps))))
        return int(steps)

    # -- running -----------------------------------------------------------------------------------
    def target_grid(
        self,
        volume: Volume,
        *,
        factor: int | None = None,
        target_spacing: float | None = None,
        axis: str | int | None = None,
    ) -> tuple[Grid, int, int | None]:
        """The thin grid a run writes, its array axis, and the integer factor (``None`` for a spacing): see
        :func:`DiffusionCore.degrade.plan_thin_grid`, the one place this is decided.

        Raises:
            GeometryError: isotropic input (no thick axis), both factor and spacing, bad values.
        """
        planned = plan_thin_grid(volume, factor=factor, target_spacing=target_spacing, axis=axis)
        thick = thick_axis(volume.grid)
        if axis is not None and thick is not None and thick != planned[1]:  # a thin axis named by hand
            sp = volume.grid.spacing_zyx
            logger.warning(
                "axis %s (%.3g mm) is not the volume's thick axis (%s, %.3g mm): the run up-samples %s and leaves the "
                "%.3g mm slices as they are, and the model was trained on thick axes; leave --axis out to use %s",
                "zyx"[planned[1]], sp[planned[1]], "zyx"[thick], sp[thick], "zyx"[planned[1]], sp[thick], "zyx"[thick],
            )
        return planned

    def run(
        self,
        volume: Volume,
        settings: SRRunSettings | None = None,
        *,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> tuple[Volume, dict[str, Any]]:
        """Super-resolve a thick-slice CT onto its thin grid.

        Args:
            volume: the thick-slice CT (HU); not modified. Padding markers outside the scan circle (below -1500 HU
                and reaching the edge of their slice: -2048, -3024, ...) are taken as air (-1024 HU) in a copy,
                as :func:`~DiffusionCore.volume.read_volume` takes them in a file (:func:`without_padding`), so an
                in-memory volume (e.g. ``Volume.from_sitk`` of an image read with SimpleITK) gives the ``sr``
                command's result for its file; ``notes`` say how many voxels were replaced. A volume built in
                memory (no ``metadata["source"]``) whose thickest spacing is not along array axis 0 gets a warning
                and a note (:func:`spacing_order_note`: spacing given in the array's (z, y, x) order instead of
                (x, y, z)) unless ``axis`` is given.
            settings: the run's options (:class:`~DiffusionCore.sr.settings.SRRunSettings`: factor or target
                spacing, axis, estimate, steps, guidance, seed, device, patches, samples, data consistency,
                memory limit, tile batch, non-CT input, adaptation); default: all defaults. ``adapt`` is an
                :class:`~DiffusionCore.sr.adapt.AdaptSettings`, ``True`` for the default ``AdaptSettings()`` (what
                the ``sr`` command does unless ``--no-adapt``), or None / ``False`` for no adaptation (the default
                here); anything else is a ConfigError. An adaptation that diverges is discarded: the result is the
                unadapted predictor's, and ``notes`` and the adaptation's record say why.
            progress: ``progress(done, total, message)``; ``total`` = samples x tiles x steps.
            cancel: set it to stop between steps and tiles (raises Cancelled).
            **overrides: options by name (the fields of ``SRRunSettings``), applied over ``settings``:
                ``run(vol, factor=4, seed=1)``.

        The estimate is 'mean' (the posterior mean: one network evaluation per patch, deterministic, the
        smallest squared error) or 'sample' (a draw from the posterior: the reverse chain, plausible texture,
        more squared error: up to twice); by default 'sample' when ``steps`` or ``num_samples`` > 1 is given,
        else the weights' ``estimate`` (see :meth:`resolve_estimate`). ``num_samples`` N > 1 needs 'sample';
        the mean of N samples has (1 + 1/N) times the squared error of 'mean'. The sampling noise of a model
        call is drawn for its patches together, so the output for a seed depends on ``tile_batch`` (and on
        nothing else but the settings).

        Returns:
            ``(output, report)``: the thin-slice Volume (HU, exactly on the thin grid) and a dict with
            ``settings`` (the options used), ``predictor`` (``used``, ``factor``, ``resampled_to_grid``,
            ``adaptation``), ``timings`` (seconds per stage, e.g. ``predictor``, ``interpolate``, ``model``,
            ``blend``, ``consistency``, and ``total``, as in :meth:`XrayToCTGenerator.run`), ``tiles``, ``memory``,
            ``weights_sha256``, ``uncertainty`` (a Volume of per-voxel standard deviation in HU, or None),
            ``notes`` (when something was changed or is worth saying), ``input_sha256`` (the input's
            :meth:`~DiffusionCore.volume.Volume.content_sha256`) and, for an integer factor, ``consistency_psnr`` (dB).

        Raises:
            InputError: not a Volume (a bare array has no geometry), NaN/Inf voxels, a constant volume, non-CT
                intensities (unless ``allow_non_ct``), an interspaced series (unless ``allow_interspaced``:
                :func:`~DiffusionCore.degrade.check_interspaced`; refused before any work).
            GeometryError: isotropic input, bad factor or spacing, both a factor and a spacing.
            ConfigError: settings that contradict each other or the weights, an ``adapt`` of another type.
            NumericalError: a result with NaN or infinite voxels (never returned).
            ResourceError: not enough memory even for the smallest patch. Cancelled: cancel was set.
        """
        _require_volume(volume, "SuperResolver.run")
        settings = SRRunSettings.of(settings, overrides)
        if settings.allow_non_ct:
            check_ct(volume, "input volume")
            if float(volume.array.min()) == float(volume.array.max()):
                require_ct(volume, "input volume")  # constant: refused even when non-CT is allowed
        else:
            require_ct(volume, "input volume")
        # padding outside the scan circle becomes air, as read_volume does for a file (on a copy; none when read)
        volume, padding = without_padding(volume)
        grid, ax, k = self.target_grid(
            volume, factor=settings.factor, target_spacing=settings.target_spacing, axis=settings.axis
        )
        # a volume built from an array with its spacing in (z, y, x) order would be run along its rows or columns
        order = spacing_order_note(volume, grid, ax) if settings.axis is None else ""
        if order:
            logger.warning(order)
        # the factor suggested from the spacing, capped (plan_thin_grid has said so): the report keeps it too
        capped = factor_cap_note(volume, ax) if settings.factor is None and settings.target_spacing is None else ""
        # a target spacing of the slices over a whole number is that factor's run (degrade.whole_factor)
        settings = settings.replace(factor=k, axis=ax, target_spacing=None if k is not None else settings.target_spacing)
        check_interspaced(volume, ax, allow=settings.allow_interspaced,
                          what=str(volume.metadata.get("source") or "the input volume"))  # fmt: skip
        note = slab_thickness_note(volume, ax)
        if note and interspaced_slices(volume, ax) is not None:  # allowed, or it was refused above
            note = f"{note}; {INTERSPACED_RUN_NOTE}"
        if note:
            logger.warning(note)
            # the adaptation's check-batch gain is then measured on another task: it says so (adapt.pairs_caveat)
            if settings.adapt is not None:
                thickness = float(volume.metadata["slice_thickness_mm"])
                adapt = dataclasses.replace(settings.adapt, slice_thickness_mm=thickness)
                settings = settings.replace(adapt=adapt)
        out, report = self.run_to_grid(volume, grid, settings, progress=progress, cancel=cancel)
        notes = [n for n in (padding, order, capped, note) if n]
        if notes:
            report["notes"] = [*report.get("notes", []), *notes]
        return out, report

    # -- the starting point: cubic interpolation plus the through-plane predictor --------------------
    def predictor_factor(self, volume: Volume | Grid, grid: Grid, axis: int) -> int | None:
        """The factor the through-plane predictor runs at for this thin grid: the trained factor nearest
        to the spacing ratio (the result is then resampled onto ``grid`` when the ratio is not that
        integer); None without a predictor or for a ratio under :data:`MIN_PREDICTOR_RATIO`."""
        if self.predictor is None:
            return None
        ratio = float(volume.spacing_zyx[axis]) / float(grid.spacing_zyx[axis])
        if ratio < MIN_PREDICTOR_RATIO:
            return None
        k = nearest_head(self.predictor.factors, ratio)
        return k if volume.shape[axis] >= 2 else None

    def starting_point(
        self,
        volume: Volume,
        grid: Grid,
        axis: int,
        factor: int | None,
        *,
        adapt: AdaptSettings | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        progress: Callable[[int, str], None] | None = None,
        cancel: threading.Event | None = None,
        timings: dict[str, float] | None = None,
        box: tuple[int, int, int, int] | None = None,
        units: SRPlan | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The thin-grid volume (HU, float32, a new array in ``grid``'s layout) that the diffusion stage
        refines, or that is the result when there is none: cubic interpolation plus the through-plane
        predictor's residual at ``factor`` (see :meth:`predictor_factor`; None: cubic only).

        Progress counts, in the units of the run's plan (``units``: :meth:`plan`, whose units weigh each step by its
        cost), adaptation (when asked; without a plan :func:`adaptation_units`), the cubic interpolation (in chunks:
        :func:`interpolate_cubic`), one unit per predicted plane (the two in-plane sizes of the body box added) and
        the resampling onto a grid that is not the predictor's factor, so that the bar moves with the time spent;
        each step's messages name it. ``box`` is the body box (:func:`~DiffusionCore.sr.throughplane.body_box` of
        the input, thick axis first) when the caller already has it.

        Returns:
            ``(hu, report)``: the volume, and ``{"used", "factor", "adaptation", ...}`` for the run report.
        """
        timings = {} if timings is None else timings

        def tell(d: int, message: str) -> None:
            if progress is not None:
                progress(d, message)

        def interpolating(start: int, n_units: int, what: str = "interpolating (cubic)") -> Callable[[int, int], None]:
            """A chunk callback of :func:`interpolate_cubic` counting ``n_units`` from ``start``."""
            return lambda i, n: tell(start + n_units * i // n, f"{what}, {i}/{n}")

        t0 = time.perf_counter()
        if factor is None or self.predictor is None:
            tell(0, "interpolating (cubic)")
            hu = interpolate_cubic(volume, grid, axis, cancel=cancel)  # a new float32 array: the caller may change it
            timings["interpolate"] = timings.get("interpolate", 0.0) + time.perf_counter() - t0
            why = "no through-plane predictor in these weights" if self.predictor is None else (
                f"no trained factor near the spacing ratio (trained: {self.predictor.factors})")
            return hu, {"used": False, "reason": why, "adaptation": None if adapt is None else {"skipped": why, "steps": 0}}
        net = self.predictor
        k = int(factor)
        thick = np.moveaxis(volume.array, axis, 0)
        order = [axis] + [a for a in range(3) if a != axis]
        spacing = tuple(float(volume.spacing_zyx[a]) for a in order)
        # the networks see the canonical storage order (storage_flips), thick axis first; the grids stay as they are
        flips = tuple(order.index(a) for a in storage_flips(volume.direction))
        offset = 0
        adapt_report = None
        box = box or body_box(thick)  # the air around the patient has no residual: not predicted
        if adapt is not None:
            a_units = adaptation_units(adapt, net, thick.shape[0], box, k, device) if units is None else units.adapt_units
            tell(0, "adapting to this scan")
            seen, seen_spacing = np.flip(thick, flips), spacing
            if across_axes_swapped(volume.direction, axis):  # its random pairs drawn in one order whatever the storage
                seen, seen_spacing = np.swapaxes(seen, 1, 2), (spacing[0], spacing[2], spacing[1])
            net, adapt_report = adapt_predictor(
                net, np.ascontiguousarray(seen, dtype=np.float32), seen_spacing, k, adapt, seed=seed,
                device=device,
                progress=lambda frac, msg: tell(int(round(frac * a_units)), msg), cancel=cancel,
            )
            timings["adapt"] = time.perf_counter() - t0
            offset = a_units
            t0 = time.perf_counter()
        kgrid, exact = predictor_grid(volume, grid, axis, k)
        i_units = 0 if units is None else units.interp_units
        tell(offset, "interpolating (cubic)")
        hu = interpolate_cubic(volume, kgrid, axis, progress=interpolating(offset, i_units), cancel=cancel)
        offset += i_units
        timings["interpolate"] = timings.get("interpolate", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        net.to(device).eval()
        h0, h1, w0, w1 = box
        # a new (m, h, w) array; the body box is mirror-symmetric, so the flipped crop is the canonical array's crop
        thick_units = torch.from_numpy(np.ascontiguousarray(np.flip(hu_to_unit(thick[:, h0:h1, w0:w1]), flips)))
        # the residual goes straight into the cubic volume, seen in the networks' order (a flipped view: reversed
        # slabs give their thin slices reversed), so no second volume-sized array is made
        target = np.flip(np.moveaxis(hu, axis, 0)[:, h0:h1, w0:w1], flips)
        predict_residual(
            net, thick_units, k, device=device, cancel=cancel, into=target, scale=HU_PER_UNIT,
            progress=lambda d, _t, msg: tell(offset + d, msg),
        )
        del thick_units, target
        if not exact:  # the predictor's own integer grid, resampled onto the asked-for spacing
            offset += planes_in(box)
            r_units = 0 if units is None else units.resample_units
            tell(offset, "resampling onto the grid (cubic)")
            hu = interpolate_cubic(Volume.from_grid(kgrid, hu), grid, axis, cancel=cancel,
                                   progress=interpolating(offset, r_units, "resampling onto the grid (cubic)"))
        timings["predictor"] = time.perf_counter() - t0
        return hu, {"used": True, "factor": k, "resampled_to_grid": not exact, "adaptation": adapt_report}

    def _run_predictor_only(
        self,
        volume: Volume,
        plan: SRPlan,
        settings: SRRunSettings,
        *,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
        t_start: float,
    ) -> tuple[Volume, dict[str, Any]]:
        """:meth:`run_to_grid` for weights without a diffusion stage: the starting point, then consistency."""
        grid, axis, factor, dev = plan.grid, plan.axis, plan.factor, plan.device
        predictor_factor, estimate = plan.predictor_factor, plan.estimate
        seed, memory_limit, adapt = settings.seed, settings.memory_limit, settings.adapt
        data_consistency = settings.data_consistency
        if predictor_factor is None:
            raise GeometryError(predictor_spacing_problem(
                volume.spacing_zyx[axis], grid.spacing_zyx[axis], self.predictor.factors)  # type: ignore[union-attr]
                or "the through-plane predictor needs at least 2 slices along the thick axis")
        check_predictor_memory(grid.shape, memory_limit, predictor_factor, self.predictor.factors)  # type: ignore[union-attr]
        box, total = plan.box, plan.total  # the body box the plan found; adaptation and predicted planes

        def tell(d: int, message: str) -> None:
            if progress is not None:
                progress(min(d, total), total, message)

        timings: dict[str, float] = {"consistency": 0.0}
        hu, predictor_report = self.starting_point(
            volume, grid, axis, predictor_factor, adapt=adapt, seed=seed, device=dev, progress=tell, cancel=cancel,
            timings=timings, box=box, units=plan,
        )
        _check_cancel(cancel)
        out = Volume.from_grid(grid, hu)
        if data_consistency:  # one call (DiffusionCore.degrade): the bar moves past it when it is done
            tell(plan.start_units, "data consistency")
            t0 = time.perf_counter()
            out = enforce_consistency(out, volume, axis, in_place=True)
            timings["consistency"] = time.perf_counter() - t0
            _check_cancel(cancel)
            tell(plan.start_units + plan.consistency_units, "data consistency done")
        require_finite_voxels(out.array, "the super-resolved volume")
        output = Volume.from_grid(
            grid, out.array, source=volume.metadata.get("source", ""), method="sr", synthetic=True,
            weights_sha256=self.weights_sha256,
        )
        timings["total"] = time.perf_counter() - t_start
        report: dict[str, Any] = {
            "settings": {
                **_geometry_settings(volume, grid, axis, factor),
                "estimate": estimate,
                "steps": 0,
                "requested_steps": None,
                "guidance": None,
                "seed": int(seed),
                "device": str(dev),
                "patch_size": None,
                "overlap": None,
                "num_samples": 1,
                "tile_batch": None,
                "data_consistency": bool(data_consistency),
                "weights": self.weights_name,
                "torch_threads": torch.get_num_threads(),
                "adapt": adapt_record(adapt, predictor_report.get("adaptation")),
            },
            "predictor": predictor_report,
            "timings": timings,
            "tiles": {"count": 0, "grid": [], "overhead": 0.0, "reduced_from": []},
            "memory": {"peak_rss_bytes": peak_rss_bytes(), "cuda_max_allocated_bytes": (
                int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None)},
            "weights_sha256": self.weights_sha256,
            "uncertainty": None,
        }
        _add_consistency_psnr(report, output, volume, axis, factor)
        tell(total, "done")
        logger.info("super-resolution done in %.1f s (through-plane predictor, x%d head%s)", timings["total"],
                    predictor_factor, ", resampled onto the asked-for grid" if predictor_report["resampled_to_grid"] else "")
        return output, report

    def _memory_limits(self, dev: torch.device, memory_limit: int | None) -> tuple[int, int | None]:
        if memory_limit is None:
            memory_limit = memory_limit_from_env()
        if memory_limit is not None:
            return int(memory_limit), (int(memory_limit) if dev.type == "cuda" else None)
        host = int(host_available_memory() * MEMORY_SAFETY_FRACTION)
        if dev.type == "cuda":
            return host, int(device_available_memory(dev) * MEMORY_SAFETY_FRACTION)
        return host, None

    def run_to_grid(
        self,
        volume: Volume,
        grid: Grid,
        settings: SRRunSettings | None = None,
        *,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> tuple[Volume, dict[str, Any]]:
        """:meth:`run` onto a given thin ``grid`` (differing from the input's only along the settings' ``axis``,
        which must be given: the same size, spacing, direction and position in-plane, else GeometryError).

        Arguments as for :meth:`run`; ``factor`` (when the grid is an integer subdivision) only labels the
        report and enables its ``consistency_psnr``; ``target_spacing`` and ``allow_non_ct`` are not used.
        The run is :meth:`plan`, then the tile loop (:meth:`_refine`), then the report (:meth:`_tiled_report`).
        A whole factor the predictor has no head for is warned of, and said in the report's ``notes``
        (:func:`missing_head_note`).
        """
        t_start = time.perf_counter()
        _require_volume(volume, "SuperResolver.run_to_grid")
        settings = SRRunSettings.of(settings, overrides)
        if settings.axis is not None:
            check_same_in_plane(volume, grid, axis_index(settings.axis))
        plan = self.plan(volume, grid, settings)  # warns of slices finer than the pixels: the report says it too
        notes = [finer_than_pixels_note(volume, grid, plan.axis)]
        if self.predictor is not None and plan.predictor_factor is not None:
            ratio = float(volume.spacing_zyx[plan.axis]) / float(grid.spacing_zyx[plan.axis])
            notes.append(missing_head_note(self.predictor.factors, ratio, self.weights_name))
            if notes[-1]:
                logger.warning(notes[-1])
        if self.model is None:
            out, report = self._run_predictor_only(
                volume, plan, settings, progress=progress, cancel=cancel, t_start=t_start
            )
        else:
            mean, m2, timings, predictor_report = self._refine(
                volume, plan, settings, progress=progress, cancel=cancel
            )
            out, report = self._tiled_report(
                volume, plan, settings, mean, m2, timings, predictor_report, progress=progress, t_start=t_start
            )
        notes.append(adaptation_note(report.get("predictor")))
        unused = no_diffusion_stage_note(self.unused_settings(settings), str(self.weights_name or ""))
        if unused:  # the front ends say it in their own option names (DIFFUSION_STAGE_FLAGS); a script reads it here
            logger.debug(unused)
            notes.append(unused)
        notes = [n for n in notes if n]
        if notes:
            report["notes"] = [*report.get("notes", []), *notes]
        report["input_sha256"] = volume.content_sha256()  # the result names the very scan it came from
        return out, report

    def plan(self, volume: Volume, grid: Grid, settings: SRRunSettings) -> SRPlan:
        """Everything a run onto ``grid`` decides before any heavy work: the checks that depend on the weights
        (the estimate, a predictor to adapt), the step count and guidance, the device, the predictor's factor
        and body box and, with a diffusion stage, the patches that fit in memory and the patches per call. The
        diffusion model is moved to the device first (its memory estimates are for it there).

        Raises:
            ConfigError: an estimate the weights cannot give, adaptation without a predictor, no axis.
            ResourceError: not enough memory even for the smallest patch.
        """
        if settings.axis is None:
            raise ConfigError("run_to_grid needs the axis along which the grid is finer than the input")
        axis = axis_index(settings.axis)
        note = finer_than_pixels_note(volume, grid, axis)
        if note:
            logger.warning(note)
        num_samples = settings.num_samples
        estimate = self.resolve_estimate(settings.estimate, settings.steps, num_samples)
        guidance = self.default_guidance if settings.guidance is None else float(settings.guidance)
        if estimate == MEAN:
            steps = requested_steps = 1
        else:
            steps = self.default_steps if settings.steps is None else int(settings.steps)
            requested_steps = steps
            steps = self.effective_steps(steps)
        patch_req = tuple(DEFAULT_PATCH_SIZE if settings.patch_size is None else settings.patch_size)
        overlap_req = tuple(DEFAULT_OVERLAP if settings.overlap is None else settings.overlap)
        dev = resolve_device(settings.device)
        model = self.model
        adapt = settings.adapt
        if adapt is not None and self.predictor is None and not adapt.optional:
            raise ConfigError(
                f"adaptation fine-tunes the through-plane predictor, and the weights {self.weights_name} have none: "
                "use --no-adapt or weights with a predictor (the default weights have one)"
            )
        predictor_factor = self.predictor_factor(volume, grid, axis)
        box = body_box(np.moveaxis(volume.array, axis, 0)) if predictor_factor is not None else None
        pre_units = planes_in(box) if box is not None else 0
        adapt_units = interp_units = resample_units = consistency_units = 0
        if predictor_factor is not None and box is not None:
            m, k = volume.shape[axis], predictor_factor
            if adapt is not None and self.predictor is not None:
                adapt_units = adaptation_units(adapt, self.predictor, m, box, k, dev)
            kgrid, exact = predictor_grid(volume, grid, axis, k)
            interp_units = host_step_units(CUBIC_COST * m, int(np.prod(kgrid.shape)), m, box, k)
            if not exact:
                resample_units = host_step_units(CUBIC_COST * k * m, int(np.prod(grid.shape)), m, box, k)
            if model is None and settings.data_consistency:
                consistency_units = host_step_units(CONSISTENCY_COST, int(np.prod(grid.shape)), m, box, k)
        plan = SRPlan(
            grid=grid, axis=axis, factor=settings.factor, estimate=estimate, steps=steps,
            requested_steps=requested_steps, guidance=guidance, patch_size=patch_req, overlap=overlap_req,
            device=dev, predictor_factor=predictor_factor, box=box, adapt_units=adapt_units, pre_units=pre_units,
            interp_units=interp_units, resample_units=resample_units, consistency_units=consistency_units,
        )  # fmt: skip
        plan.total = plan.start_units + consistency_units
        if model is None:
            return plan
        model.to(dev)
        model.eval()
        decoder = getattr(getattr(model, "vae", None), "decoder", None)
        if dev.type == "cpu" and decoder is not None:  # its full-resolution convolutions: ~20% faster
            decoder.to(memory_format=torch.channels_last_3d)

        # memory budget and tiling (before any heavy work)
        thin_dhw = tuple(int(s) for s in np.moveaxis(np.empty(grid.shape, dtype=np.uint8), axis, 0).shape)
        voxels = int(np.prod(grid.shape))
        n_arrays = _VOLUME_ARRAYS + (_VOLUME_ARRAYS_PER_EXTRA_STATS if num_samples > 1 else 0)
        host_fixed = voxels * 4 * n_arrays
        on_device = dev.type != "cpu"

        def patch_bytes(shape: tuple[int, int, int]) -> int:
            est = int(model.estimate_patch_memory(shape, batch=1, device=dev))
            return est + (0 if on_device else int(np.prod(shape)) * 4 * 3)  # weight, prediction, condition

        host_limit, device_limit = self._memory_limits(dev, settings.memory_limit)
        tiling, budget, tried = choose_plan(
            thin_dhw,
            patch_req,
            overlap_req,
            multiple=tuple(int(v) for v in model.latent_downsample),
            min_patch=tuple(int(v) for v in model.min_patch),
            patch_bytes=patch_bytes,
            host_fixed_bytes=host_fixed,
            on_device=on_device,
            host_limit=host_limit,
            device_limit=device_limit,
        )
        if tried:
            logger.warning(
                "the patch %s does not fit in memory; using %s (%d tiles)",
                "x".join(map(str, tried[0])), "x".join(map(str, tiling.patch_size)), tiling.n_tiles,
            )  # fmt: skip
        plan.tiling, plan.budget, plan.reduced_from = tiling, budget, tried
        plan.batch = self._tile_batch(settings.tile_batch, tiling, dev, device_limit)
        plan.total = plan.start_units + num_samples * tiling.n_tiles * steps
        return plan

    def _refine(
        self,
        volume: Volume,
        plan: SRPlan,
        settings: SRRunSettings,
        *,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, float], dict[str, Any]]:
        """The tiled stage of :meth:`run_to_grid`: the starting point as the model's condition, then every sample
        over every tile (:meth:`_sample_tiles`).

        Returns:
            The mean (HU) on the plan's grid, the sum of squared deviations of the samples (None for one),
            the timings so far and the predictor's report.
        """
        model, tiling, grid, axis, dev = self.model, plan.tiling, plan.grid, plan.axis, plan.device
        assert tiling is not None and plan.budget is not None
        total = plan.total
        done = 0

        def report_progress(message: str) -> None:
            if progress is not None:
                progress(done, total, message)

        report_progress(f"{tiling.n_tiles} tiles x {plan.steps} steps")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        # condition: the starting point (cubic interpolation, plus the predictor's residual when there is
        # one) on the thin grid, HU -> model units, thick axis first, padded
        def pre_progress(d: int, message: str) -> None:
            nonlocal done
            done = d
            report_progress(message)

        timings = {"model": 0.0, "blend": 0.0, "consistency": 0.0}
        units, predictor_report = self.starting_point(
            volume, grid, axis, plan.predictor_factor, adapt=settings.adapt, seed=settings.seed, device=dev,
            progress=pre_progress, cancel=cancel, timings=timings, box=plan.box, units=plan,
        )  # fmt: skip
        t0 = time.perf_counter()
        hu_to_unit_(torch.from_numpy(units))
        flips = storage_flips(volume.direction)  # the model sees the canonical storage order, as the predictor does
        cond = torch.from_numpy(tiling.pad(np.moveaxis(np.flip(units, flips), axis, 0)))
        del units
        timings["interpolate"] += time.perf_counter() - t0
        done = plan.start_units

        mean, m2, done = self._sample_tiles(
            model, cond, tiling, volume, grid, axis, num_samples=settings.num_samples, batch=plan.batch,
            steps=plan.steps, guidance=plan.guidance, estimate=plan.estimate, seed=settings.seed, dev=dev,
            budget=plan.budget, cancel=cancel, data_consistency=settings.data_consistency, timings=timings,
            done=done, tell=lambda at, message: progress(at, total, message) if progress is not None else None,
            flips=flips,
        )  # fmt: skip
        return mean, m2, timings, predictor_report

    def _tiled_report(
        self,
        volume: Volume,
        plan: SRPlan,
        settings: SRRunSettings,
        mean: np.ndarray,
        m2: np.ndarray | None,
        timings: dict[str, float],
        predictor_report: dict[str, Any],
        *,
        progress: ProgressFn | None,
        t_start: float,
    ) -> tuple[Volume, dict[str, Any]]:
        """The output Volume, the uncertainty map of several samples and the report of a tiled run."""
        tiling, grid, axis, dev = plan.tiling, plan.grid, plan.axis, plan.device
        assert tiling is not None and plan.budget is not None
        num_samples, factor = settings.num_samples, plan.factor
        # voxels the model processes per output voxel (overlap and padding make it > 1)
        overhead = tiling.n_tiles * float(np.prod(tiling.patch_size)) / float(np.prod(tiling.volume_shape))
        tiles_info = {"count": tiling.n_tiles, "grid": list(tiling.grid_counts), "overhead": overhead}
        require_finite_voxels(mean, "the super-resolved volume")
        output = Volume.from_grid(
            grid,
            mean,
            **{
                "source": volume.metadata.get("source", ""),
                "method": "sr",
                "synthetic": True,
                "weights_sha256": self.weights_sha256,
            },
        )
        uncertainty = None
        if num_samples > 1 and m2 is not None:
            std = np.sqrt(np.maximum(m2 / (num_samples - 1), 0.0)).astype(np.float32)
            uncertainty = Volume.from_grid(grid, std, method="sr-std", unit="HU standard deviation")
        timings["total"] = time.perf_counter() - t_start
        report: dict[str, Any] = {
            "settings": {
                **_geometry_settings(volume, grid, axis, factor),
                "estimate": plan.estimate,
                "steps": plan.steps,
                "requested_steps": plan.requested_steps,
                "guidance": plan.guidance,
                "seed": int(settings.seed),
                "device": str(dev),
                "patch_size": list(tiling.patch_size),
                "overlap": list(tiling.overlap),
                "requested_patch_size": list(plan.patch_size),
                "requested_overlap": list(plan.overlap),
                "num_samples": int(num_samples),
                "tile_batch": plan.batch,
                "data_consistency": bool(settings.data_consistency),
                "weights": self.weights_name,
                "torch_threads": torch.get_num_threads(),
                "adapt": adapt_record(settings.adapt, predictor_report.get("adaptation")),
            },
            "predictor": predictor_report,
            "timings": timings,
            "tiles": {**tiles_info, "reduced_from": [list(t) for t in plan.reduced_from]},
            "memory": {
                **plan.budget.as_dict(),
                "peak_rss_bytes": peak_rss_bytes(),
                "cuda_max_allocated_bytes": (
                    int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None
                ),
            },
            "weights_sha256": self.weights_sha256,
            "uncertainty": uncertainty,
        }
        _add_consistency_psnr(report, output, volume, axis, factor)
        if progress is not None:
            progress(plan.total, plan.total, "done")
        logger.info(
            "super-resolution done in %.1f s (%d tiles, %d steps, peak RSS %s)",
            timings["total"], tiling.n_tiles, plan.steps, format_bytes(report["memory"]["peak_rss_bytes"]),
        )  # fmt: skip
        return output, report

    def _sample_tiles(
        self, model, cond: torch.Tensor, plan, volume: Volume, grid: Grid, axis: int, *, num_samples: int,
        batch: int, steps: int, guidance: float, estimate: str, seed: int, dev: torch.device, budget,
        cancel: threading.Event | None, data_consistency: bool, timings: dict[str, float], done: int,
        tell: Callable[[int, str], None], flips: tuple[int, ...] = (),
    ) -> tuple[np.ndarray, np.ndarray | None, int]:
        """The tile loop of :meth:`run_to_grid`: every sample over every tile (``batch`` tiles per model call),
        blended, made consistent with the input, and folded into a running mean and variance (Welford, HU).
        ``tell(done, message)`` reports progress, counting from ``done``. ``flips``: the array axes the condition
        was flipped along (:func:`storage_flips`); each sample is flipped back before consistency.

        Returns:
            The mean volume's array on ``grid``, the sum of squared deviations (``None`` for one sample) and the
            progress count reached.
        """
        mean: np.ndarray | None = None
        m2: np.ndarray | None = None
        with torch.inference_mode():
            for sample in range(num_samples):
                acc = torch.zeros(plan.padded_shape, dtype=torch.float32)
                tiles = plan.tiles()
                while group := list(itertools.islice(tiles, batch)):
                    _check_cancel(cancel)
                    base, nb = done, len(group)
                    first, last = group[0].index + 1, group[-1].index + 1
                    label = f"sample {sample + 1}/{num_samples}, tile {first}{f'-{last}' if nb > 1 else ''}/{plan.n_tiles}"

                    def on_step(i: int, n: int, _base: int = base, _nb: int = nb, _label: str = label) -> None:
                        nonlocal done
                        done = min(_base + steps * _nb, max(done + _nb, _base + int(i) * _nb))
                        tell(done, f"{_label}, step {(done - _base) // _nb}/{steps}")
                        _check_cancel(cancel)

                    t0 = time.perf_counter()
                    patch = torch.stack([cond[t.slices] for t in group])[:, None].to(dev)
                    # one CPU generator per call, seeded by its first tile: the same noise on any device
                    gen = torch.Generator().manual_seed(tile_seed(seed, sample, group[0].index))
                    try:
                        pred = model.super_resolve_patch(
                            patch, steps=steps, guidance=guidance, generator=gen, cancel=cancel,
                            step_callback=on_step, estimate=estimate,
                        )
                    except (RuntimeError, MemoryError) as exc:
                        if not is_out_of_memory(exc):
                            raise
                        del patch
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                        raise ResourceError(
                            f"out of memory on {dev} while running the model on {nb} patch(es) of "
                            f"{'x'.join(map(str, plan.patch_size))} voxels (the estimate was {budget.describe()}). "
                            "Use smaller patches (--patch-size), --tile-batch 1, a lower "
                            "DIFFUSIONCORE_MEMORY_LIMIT, "
                            + ("the CPU (--device cpu), " if dev.type == "cuda" else "")
                            + "or a machine with more memory."
                        ) from None
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t1 = time.perf_counter()
                    # weighted where the prediction is (the GPU), summed into the accumulator on the host
                    weights = torch.stack([tile_weight(t, dev) for t in group])
                    weighted = (pred[:, 0].float() * weights).cpu()
                    del pred, weights
                    for tile, p in zip(group, weighted):
                        acc[tile.slices] += p
                    timings["model"] += t1 - t0
                    timings["blend"] += time.perf_counter() - t1
                    _check_cancel(cancel)
                    done = base + steps * nb
                    tell(done, f"{label} done")
                t0 = time.perf_counter()
                hu = unit_to_hu_(acc).numpy()
                del acc
                # copies only where the crop or the axis order needs it
                sample_vol = Volume.from_grid(
                    grid, np.ascontiguousarray(np.flip(np.moveaxis(plan.crop(hu), 0, axis), flips))
                )
                del hu
                timings["blend"] += time.perf_counter() - t0
                if data_consistency:
                    t0 = time.perf_counter()
                    sample_vol = enforce_consistency(sample_vol, volume, axis, in_place=True)
                    timings["consistency"] += time.perf_counter() - t0
                # running mean and variance (Welford) over samples, in HU
                if mean is None:
                    mean = sample_vol.array  # a new array each sample: updated in place below
                    if num_samples > 1:
                        m2 = np.zeros_like(mean)
                else:
                    delta = sample_vol.array - mean
                    mean += delta / (sample + 1)
                    m2 += delta * (sample_vol.array - mean)  # type: ignore[operator]
                del sample_vol

        assert mean is not None
        return mean, m2, done

    @property
    def weights_sha256(self) -> str:
        if self._weights_sha256:
            return str(self._weights_sha256)
        return str(getattr(self.model, "weights_sha256", ""))


# -- weights, default weights and the evaluate methods ----------------------------------------------
def predictor_grid(volume: Volume, grid: Grid, axis: int, factor: int) -> tuple[Grid, bool]:
    """The thin grid the through-plane predictor writes at ``factor`` and whether it is ``grid`` (then it is returned
    itself); else the run resamples it onto ``grid``."""
    kgrid = thin_grid(volume, factor, axis=axis)
    exact = kgrid.shape == grid.shape and np.allclose(kgrid.spacing, grid.spacing, rtol=0, atol=1e-6) and np.allclose(
        kgrid.origin, grid.origin, rtol=0, atol=1e-4)
    return (grid, True) if exact else (kgrid, False)


def planes_in(box: tuple[int, int, int, int]) -> int:
    """Planes the through-plane predictor runs on inside a body box (the progress units of that stage)."""
    h0, h1, w0, w1 = box
    return (h1 - h0) + (w1 - w0)


def adaptation_units(
    adapt: AdaptSettings, net: ThroughPlaneNet, m: int, box: tuple[int, int, int, int], factor: int,
    device: torch.device | str = "cpu",
) -> int:
    """Progress units of test-time adaptation, counted in the predictor's planes (one unit each), so that the bar
    moves with the time spent: adaptation took about half of a default run on the sample scans, but had a fixed
    tenth of the bar.

    With a step count, the units are the work of those steps against that of one of the predictor's planes: each
    step is :data:`ADAPT_STEP_PASSES` passes over ``batch_size`` planes of ``thick_rows x width`` thick pixels, a
    predictor's plane one pass over ``m`` thick rows of the body box's width (the network's cost grows with its
    input's pixels). On 2 CPU cores, chest-dx at x4: 900 units for the default 400 steps against 1,024 planes, and
    45 s against 50 s measured. With a time budget, the units are that time over the predictor's measured time per
    plane (one small batch of planes, timed after a first call).
    """
    h0, h1, w0, w1 = box
    h, w = max(1, h1 - h0), max(1, w1 - w0)
    plane_pixels = m * 2.0 * h * w / (h + w)  # the predictor's planes: h of width w, w of width h
    if adapt.steps is not None:
        work = int(adapt.steps) * ADAPT_STEP_PASSES * adapt.batch_size * adapt.thick_rows * adapt.width
        return max(1, int(round(work / plane_pixels)))
    planes = torch.zeros((4, 1, m, int(round(plane_pixels / m))), dtype=torch.float32, device=device)
    run = channels_last(net).to(device).eval()
    sync = torch.cuda.synchronize if planes.is_cuda else (lambda: None)
    with torch.no_grad():
        run(planes, factor)  # the first call allocates; the second is what a plane costs
        sync()
        t0 = time.perf_counter()
        run(planes, factor)
        sync()
        per_plane = max((time.perf_counter() - t0) / planes.shape[0], 1e-6)
    return max(1, int(round(float(adapt.seconds) / per_plane)))


def load_predictor(resolved) -> ThroughPlaneNet:
    """The through-plane predictor of checked weights (:class:`~DiffusionCore.weights.registry.ResolvedWeights`).

    Raises:
        WeightsError: no predictor configuration, tensors that do not fit it, or non-finite values.
    """
    _predictor_config(resolved.path, resolved.metadata)  # before the tensors are read
    return _predictor_from(resolved.path, resolved.metadata, resolved.load())


def _predictor_config(path, metadata: dict[str, Any]) -> dict[str, Any]:
    config = metadata.get("config")
    cfg = config.get("throughplane") if isinstance(config, dict) else None
    if not isinstance(cfg, dict):
        raise WeightsError(
            f"{path} says it holds a through-plane predictor but has no configuration for it (its 'config' is "
            f"{type(config).__name__ if config is not None else 'missing'}, not an object with 'throughplane'): "
            "the through-plane predictor's configuration is invalid; use other weights, or export them again"
        )
    return cfg


def _predictor_from(path, metadata: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ThroughPlaneNet:
    from .throughplane import from_state

    cfg = _predictor_config(path, metadata)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(
            f"{path} holds non-finite values (NaN/Inf) in {len(bad)} tensor(s), e.g. {bad[0]}: the "
            "training that wrote it diverged; use other weights"
        )
    try:
        return from_state(tensors, cfg, str(path))
    except (TypeError, ValueError, ConfigError) as exc:
        raise WeightsError(f"{path}: the through-plane predictor's configuration is invalid ({exc})") from exc


def check_weights_architecture(path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Check that the tensors of an ``sr`` family file fit the architecture its metadata records, as loading
    does (:meth:`SuperResolver.from_pretrained`, :meth:`SRModel.from_files`), without running it: the latent
    diffusion model is built on the meta device only; a through-plane predictor (small) is built.

    Raises:
        WeightsError: an unknown component, no or an invalid configuration, or tensors that do not fit it.
    """
    from ..config import load_config
    from ..nn.architecture import build_on_meta, check_state_fits, weights_architecture
    from .config import SRConfig
    from .model import SRModel

    component = metadata.get("component", "sr")
    if component == THROUGHPLANE:
        _predictor_from(path, metadata, tensors)
        return
    prefixes = {"sr": ("vae.", "denoiser."), "vae": ("vae.",), "diffusion": ("denoiser.",)}.get(component) \
        if isinstance(component, str) else None  # fmt: skip
    if prefixes is None:
        raise WeightsError(f"{path} records the SR component {component!r}, which no SR model loads; use other weights")
    config = metadata.get("config")
    if not isinstance(config, dict):
        raise WeightsError(f"{path} has no SR configuration ('config') in its metadata; re-export it with DiffusionCore")
    with weights_architecture(str(path)):
        cfg = load_config(config, SRConfig)
        probe = build_on_meta(lambda: SRModel(cfg), "the SR model")
    expected = {k: v for k, v in probe.state_dict().items() if k.startswith(prefixes)}
    check_state_fits(expected, tensors, str(path))


register_architecture_check("sr", check_weights_architecture)  # weights import and verify compare with it


def default_weights_name() -> str:
    """The registered SR weights used when none are named: the first available entry of family ``sr``
    (bundled registry first, then the user's).

    Raises:
        WeightsError: no SR weights are registered (or their files are missing).
    """
    from ..weights.registry import default_weights_name as registry_default

    return registry_default(
        "sr", "SR", "pass --weights NAME_OR_FILE (a registered name or a .safetensors file; add "
        "--allow-unregistered-weights for a file you trust), or --vae-checkpoint and --diffusion-checkpoint."
    )


_RESOLVERS: dict[tuple[str, bool], SuperResolver] = {}
_RESOLVERS_LOCK = threading.Lock()


def _resolver_for(weights: str | None, allow_unregistered: bool) -> SuperResolver:
    name = weights or default_weights_name()
    key = (str(name), bool(allow_unregistered))
    with _RESOLVERS_LOCK:
        if key not in _RESOLVERS:
            _RESOLVERS[key] = SuperResolver.from_pretrained(name, allow_unregistered=allow_unregistered)
        return _RESOLVERS[key]


def _evaluate_sr(thick: Volume, grid: Grid, options: dict) -> Volume:
    """The ``sr`` method of :func:`DiffusionCore.evaluate.evaluate`.

    Options: ``weights`` (name or file; default: :func:`default_weights_name`), ``estimate``, ``num_steps``, ``device``,
    ``seed``, ``allow_unregistered`` (bool), ``resolver`` (a ready :class:`SuperResolver`, for scripts),
    ``adapt`` (:class:`~DiffusionCore.sr.adapt.AdaptSettings` for the ``sr+adapt`` method); and evaluate's run keys
    ``progress`` (``progress(done, total, message)`` of this run) and ``cancel`` (a ``threading.Event``). ``sr`` is the weights
    as they are (``sr --no-adapt``); ``sr+adapt`` is what the ``sr`` command does by default.
    """
    resolver = options.get("resolver") or _resolver_for(options.get("weights"), bool(options.get("allow_unregistered")))
    ax = None
    for a in range(3):
        if grid.shape[a] != thick.shape[a] or abs(grid.spacing_zyx[a] - thick.spacing_zyx[a]) > 1e-6:
            if ax is not None:
                raise InputError("the sr method needs a target grid that differs from the input along one axis")
            ax = a
    if ax is None:
        raise InputError("the target grid equals the input grid: nothing to super-resolve")
    ratio = thick.spacing_zyx[ax] / grid.spacing_zyx[ax]
    k = int(round(ratio)) if abs(ratio - round(ratio)) < 1e-6 else None
    settings = SRRunSettings(
        factor=k,
        axis=ax,
        steps=options.get("num_steps"),
        estimate=options.get("estimate"),
        device=options.get("device") or "auto",
        seed=int(options.get("seed") or 0),
        adapt=options.get("adapt") if options.get("adapting") else None,
    )
    # evaluate's run keys: the progress within the method's share, and its cancel event (adaptation included)
    out, report = resolver.run_to_grid(thick, grid, settings, progress=options.get("progress"),
                                       cancel=options.get("cancel"))  # fmt: skip
    if isinstance(options.get("report"), dict):  # what evaluate's report says of this method
        options["report"].update(_evaluation_details(report))
    return out


def _evaluation_details(report: dict[str, Any]) -> dict[str, Any]:
    """What :func:`DiffusionCore.evaluate.evaluate` records of an ``sr`` / ``sr+adapt`` run: the weights and their
    sha256, the settings the figures depend on, and the adaptation's record (steps, seconds, check-batch loss and
    gain over cubic before and after)."""
    settings = report.get("settings", {})
    return {
        "weights": settings.get("weights"),
        "weights_sha256": report.get("weights_sha256"),
        **{k: settings.get(k) for k in MODEL_SETTINGS},
        "adaptation": (report.get("predictor") or {}).get("adaptation"),
        "timings": report.get("timings"),
    }


def _evaluate_cubic_dc(thick: Volume, grid: Grid, options: dict) -> Volume:
    """The ``cubic+dc`` method: cubic B-spline interpolation followed by the same data-consistency step
    as ``sr`` (so that ``sr`` minus ``cubic+dc`` is the network's own share)."""
    ax = next(a for a in range(3) if grid.shape[a] != thick.shape[a] or abs(grid.spacing_zyx[a] - thick.spacing_zyx[a]) > 1e-6)
    out = interpolate(thick, grid, "cubic")
    arr = out.array if out.array.dtype == np.float32 and not np.may_share_memory(out.array, thick.array) else out.array.astype(np.float32)
    return enforce_consistency(Volume.from_grid(grid, arr), thick, ax, in_place=True)


def _evaluate_sr_adapt(thick: Volume, grid: Grid, options: dict) -> Volume:
    """The ``sr+adapt`` method (what the ``sr`` command does by default): ``sr`` with test-time adaptation on
    the thick input (``options["adapt"]``, default :class:`~DiffusionCore.sr.adapt.AdaptSettings`: the
    default step count)."""
    return _evaluate_sr(thick, grid, {**options, "adapt": options.get("adapt") or AdaptSettings(), "adapting": True})


#: Why the model methods fit slab-averaged thick slices only (``evaluate --degradation decimate`` refuses them).
_DC_SLAB = "its data-consistency step makes the slab averages of the result equal the thick slices"
_SR_SLAB = f"the network was trained on slab-averaged thick slices, and {_DC_SLAB}"
_ADAPT_SLAB = f"the network was trained, and is adapted on pairs made, with slab-averaged thick slices, and {_DC_SLAB}"

register_method("sr", _evaluate_sr, slab_only=_SR_SLAB)
register_method("sr+adapt", _evaluate_sr_adapt, slab_only=_ADAPT_SLAB)
register_method("cubic+dc", _evaluate_cubic_dc, slab_only=_DC_SLAB)
