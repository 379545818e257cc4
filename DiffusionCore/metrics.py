"""Image quality in Hounsfield units.

All metrics clip both volumes to a stated HU range first (default ``[-1024, 2048]``, data range 3072):

* :func:`psnr` over the whole volume or inside a mask;
* :func:`ssim3d`, 3D SSIM with a Gaussian window (sigma 1.5, truncated at 3.5 sigma, K1 0.01, K2 0.03,
  population covariance) averaged over voxels at least one window radius from the border; the same
  definition as ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=3072)``;
* :func:`hu_mae` inside a mask;
* :func:`body_mask`: HU > -500, the largest connected component and every other one that is a body part
  (:data:`BODY_MASK_DEFINITION`), holes filled (in 3D and slice by slice, so the lungs count as body);
* :func:`consistency_psnr`: a super-resolved volume degraded again the same way against its input.

Both volumes must hold the same voxels: the same shape and, when both are :class:`~DiffusionCore.volume.Volume` objects,
the same grid in space (:data:`GRID_MATCH_VOXELS`), else a ``GeometryError`` says how far apart they lie; a NaN voxel
in either is an ``InputError`` that counts them (a score of NaN would pass unnoticed into a table).

Scoring several volumes against one reference: wrap it once in a :class:`ReferenceStats` and pass that
wherever a reference is asked for. What depends on the reference alone (its body mask, its local SSIM
mean and variance) is then computed on first use and shared, and the figures are the same as with the
bare array.

Masks select the voxels scored (``True`` inside): a bool array of the volumes' shape ``(z, y, x)``, e.g.
:func:`body_mask` or ``labels == k``. An integer or float array holding only 0 and 1 (a label file read with
SimpleITK or nibabel) is taken as ``mask != 0``; any other value, dtype or shape is an ``InputError`` (a uint8 mask
used as it is would index voxels by number, not select them, and give a wrong score without a word).

``hu_range`` and ``mask`` are keyword-only in every metric (``psnr(ref, test, mask=m)``): :func:`psnr` and
:func:`hu_mae` once took them by position in opposite orders. A call that still passes them by position works, in the
old order, with a ``DeprecationWarning``; a range must be two finite numbers ``(lo, hi)`` with ``lo < hi``.

Large volumes are processed in slabs along array axis 0, so the temporaries stay small whatever the
volume's size.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from .degrade import Degradation, degrade
from .errors import ConfigError, GeometryError, InputError
from .volume import Volume

HU_RANGE: tuple[float, float] = (-1024.0, 2048.0)
BODY_THRESHOLD_HU = -500.0
#: A connected component of HU > -500 other than the largest counts as body (a second limb, an arm held away from the
#: trunk) when it holds at least this much tissue (mm^3) and passes the square rule below. Measured on the sample
#: CTs: the specks in the air around the patient are at most 3.5 cm^3 (chest-dx; 0.8 cm^3 on chest-lidc), where one
#: leg of a 44 mm slab of legs is 109 cm^3. Size alone cannot tell the CT table from a limb: the table is 311 cm^3 on
#: chest-lidc and 1,037 cm^3 on chest-dx, 6.5% of the trunk there, about what a forearm beside an abdomen is.
BODY_PART_MIN_MM3 = 10_000.0
#: The square rule: some axial slice of the component holds a square of this side (mm) whole. A limb does (a wrist
#: or a child's forearm, 35-40 mm across, holds a 25 mm square); the table does not (a plate or shell: the widest
#: square in its cross-section is 4.2 mm on chest-lidc and 10.1 mm on chest-dx; 16.4 mm, three voxels, on their
#: 5.5 mm X-ray cubes, where the resampling's smoothing thickens it).
BODY_PART_MIN_SIDE_MM = 25.0
#: The body mask in one line, for reports and tables.
BODY_MASK_DEFINITION = (
    f"HU > {BODY_THRESHOLD_HU:g}: the largest 3D component and every other one of at least "
    f"{BODY_PART_MIN_MM3 / 1000:g} cm^3 whose cross-section in some axial slice holds a "
    f"{BODY_PART_MIN_SIDE_MM:g} x {BODY_PART_MIN_SIDE_MM:g} mm square (a limb, not the table or debris); "
    "holes filled in 3D and in each axial slice"
)
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
#: Voxels per slab of the slab-wise PSNR and MAE (one 512 x 512 slice, 2 MiB of float64): temporaries
#: stay in the CPU's cache and are reused by the allocator instead of mapping fresh pages every time.
CHUNK_VOXELS = 1 << 18
#: SSIM output voxels per slab (2 slices of 512 x 512): the in-plane passes then run in the CPU's cache.
SSIM_SLAB_VOXELS = 1 << 19


class ReferenceStats:
    """A reference volume plus what the metrics derive from it alone, computed once on first use.

    Pass it instead of the reference to :func:`psnr`, :func:`hu_mae`, :func:`ssim3d`, :func:`body_mask`
    and :func:`quality_report` to score several volumes against one reference without recomputing its
    body mask and its local SSIM moments. The arrays it hands out are read-only; the reference is not
    copied, so it must not be changed while the stats are in use.

    Memory: the reference itself (not copied) plus, per ``(hu_range, sigma)`` used, two float32 maps of
    the SSIM-valid region (the volume less one window radius at every border), plus one bool mask per
    threshold used.

    Args:
        reference: the reference CT, ``(z, y, x)`` in HU.
    """

    def __init__(self, reference: Volume | np.ndarray) -> None:
        self.array = _arr(reference)
        self.grid = reference.grid if isinstance(reference, Volume) else None  # checked against each test volume
        self.slice_axis = axial_axis(reference)  # where the body mask fills holes slice by slice
        self.spacing_zyx = _spacing_zyx(reference)  # what sizes the body mask's parts in mm
        if self.array.ndim != 3:
            raise InputError(f"a reference needs a 3D array (z, y, x); got shape {self.array.shape}")
        self._masks: dict[float, np.ndarray] = {}
        self._moments: dict[tuple[float, float, float], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    def body_mask(self, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
        """The reference's :func:`body_mask` (bool, read-only)."""
        key = float(threshold)
        if key not in self._masks:
            mask = _body_mask(self.array, key, self.slice_axis, self.spacing_zyx)
            mask.setflags(write=False)
            self._masks[key] = mask
        return self._masks[key]

    def local_moments(
        self, hu_range: tuple[float, float] = HU_RANGE, sigma: float = SSIM_SIGMA
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian-weighted local mean and (population) variance of the clipped reference.

        Returns:
            ``(mean, variance)``, float32, read-only, each of shape ``shape - 2 * radius`` per axis (the
            SSIM window's centres that lie a whole window inside the volume; radius 5 for sigma 1.5).
        """
        key = (*check_hu_range(hu_range), float(sigma))
        if key not in self._moments:
            taps = _gaussian_kernel(sigma, SSIM_TRUNCATE)
            _check_window(self.array.shape, taps)
            rad = _radius(taps)
            mean = np.empty(tuple(s - 2 * rad for s in self.array.shape), np.float32)
            var = np.empty_like(mean)
            for out, x in _ssim_slabs(self.array, rad, hu_range):
                mean[out] = _gaussian_valid(x, taps)
                x *= x
                var[out] = _gaussian_valid(x, taps)
                var[out] -= mean[out] * mean[out]
            mean.setflags(write=False)
            var.setflags(write=False)
            self._moments[key] = (mean, var)
        return self._moments[key]


def _arr(x: Volume | np.ndarray | ReferenceStats) -> np.ndarray:
    if isinstance(x, (Volume, ReferenceStats)):
        return x.array
    return np.asarray(x)


def _spacing_zyx(x: Volume | np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm in array order; 1 mm for a bare array."""
    return tuple(float(s) for s in x.spacing_zyx) if isinstance(x, Volume) else (1.0, 1.0, 1.0)


#: Two volumes of one shape are on the same grid when no voxel lies further apart than this share of the smallest
#: voxel size: rounding of origins and direction cosines in file headers stays far below it; a one-voxel shift, a
#: flipped axis or another voxel size is far above it.
GRID_MATCH_VOXELS = 0.1
_RESAMPLE_ADVICE = ("scores compare voxel by voxel, so both volumes must be on the same grid (resample one onto the "
                    "other's grid first, e.g. DiffusionCore.interpolate(test, ref.grid, 'cubic'))")


def _grid_of(x: object) -> object:
    if isinstance(x, Volume):
        return x.grid
    return x.grid if isinstance(x, ReferenceStats) else None


def _check_pair(ref: Volume | np.ndarray | ReferenceStats, test: Volume | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two volumes' arrays, once they are known to hold the same voxels: the same shape and, where both carry
    their geometry (a :class:`Volume`), the same place in space."""
    from .geometry import grid_distance_mm

    r, t = _arr(ref), _arr(test)
    if r.shape != t.shape:
        raise GeometryError(f"shapes differ: reference {r.shape}, test {t.shape} (z, y, x): {_RESAMPLE_ADVICE}")
    a, b = _grid_of(ref), _grid_of(test)
    if a is not None and b is not None:
        apart = grid_distance_mm(a.index_to_physical(), b.index_to_physical(), r.shape)
        if apart > GRID_MATCH_VOXELS * min(min(a.spacing), min(b.spacing)):
            raise GeometryError(
                f"the volumes have the same shape {r.shape} but lie on different grids: the same voxel is up to "
                f"{apart:.3g} mm apart (reference spacing {_mm(a.spacing)}, origin {_mm(a.origin)}; test spacing "
                f"{_mm(b.spacing)}, origin {_mm(b.origin)}): {_RESAMPLE_ADVICE}")  # fmt: skip
    return r, t


def _mm(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ") mm"


def _refuse_nan(value: float, ref: np.ndarray, test: np.ndarray) -> float:
    """``value`` when it is a number; else the volumes hold NaN voxels, which no score is defined for."""
    if not math.isnan(value):
        return value
    counts = [(name, int(np.count_nonzero(np.isnan(a)))) for name, a in (("reference", ref), ("test", test))]
    held = " and ".join(f"the {name} volume holds {n:,} NaN voxel{'s' if n != 1 else ''}" for name, n in counts if n)
    raise InputError(f"cannot score: {held or 'a volume holds NaN voxels'}; a score is defined only for finite HU "
                     "(replace or mask them first, e.g. np.nan_to_num(array, nan=-1024))")  # fmt: skip


def _slabs(shape: tuple[int, ...], voxels: int, start: int = 0, stop: int | None = None) -> Iterator[slice]:
    """Consecutive slices along axis 0 covering ``[start, stop)``, about ``voxels`` voxels each."""
    stop = shape[0] if stop is None else stop
    step = max(1, voxels // max(1, math.prod(shape[1:])))
    for s in range(start, stop, step):
        yield slice(s, min(s + step, stop))


def check_hu_range(hu_range: Any) -> tuple[float, float]:
    """``hu_range`` as two floats ``(lo, hi)``.

    Raises:
        ConfigError: it is not two finite numbers with ``lo < hi`` (a reversed or empty range would clip both
            volumes to one value and score them as identical: PSNR ``inf``).
    """
    try:
        lo, hi = (float(v) for v in hu_range)
    except (TypeError, ValueError):
        shape = np.shape(hu_range) if isinstance(hu_range, np.ndarray) else None
        got = (f"an array of shape {shape}, dtype {hu_range.dtype}" if shape is not None else repr(hu_range)[:80])
        hint = " (a mask? pass it as mask=...)" if shape is not None and len(shape) == 3 else ""
        raise ConfigError(f"hu_range must be two numbers (lo, hi) in HU, e.g. {HU_RANGE}; got {got}{hint}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
        raise ConfigError(f"hu_range must be two finite numbers (lo, hi) with lo < hi, e.g. {HU_RANGE}; got "
                          f"({lo:g}, {hi:g}): both volumes are clipped to it before scoring, so an empty or reversed "
                          "range would score any two volumes as identical")  # fmt: skip
    return lo, hi


def check_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``mask`` as a bool array of ``shape`` (``True``: the voxels scored).

    A bool array is returned as it is; an integer or float array holding only 0 and 1 (a label file read with
    SimpleITK or nibabel is usually uint8, nibabel's ``get_fdata()`` float64) as ``mask != 0``.

    Raises:
        GeometryError: the mask's shape is not ``shape``.
        InputError: it holds values other than 0 and 1 (a label map: select a label, ``labels == k``), or is of a
            dtype that is not bool, integer or float.
    """
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise GeometryError(f"the mask has shape {m.shape}, the volumes {tuple(shape)} (z, y, x): give a mask of the "
                            "volumes' shape (e.g. body_mask(ref))")  # fmt: skip
    if m.dtype == np.bool_:
        return m
    advice = ("a mask is a bool array, True inside the voxels to score (e.g. body_mask(ref)); an integer or float "
              "array of 0 and 1 is taken as mask != 0")  # fmt: skip
    if m.dtype.kind not in "iuf":
        raise InputError(f"the mask has dtype {m.dtype}: {advice}")
    if m.dtype.kind in "iu":  # two passes, no temporary of the volume's size
        bad = 0 if m.size == 0 or (m.min() >= 0 and m.max() <= 1) else int(np.count_nonzero((m != 0) & (m != 1)))
    else:
        bad = int(np.count_nonzero((m != 0) & (m != 1)))  # NaN counts as neither
    if bad:
        finite = m[np.isfinite(m)] if m.dtype.kind == "f" else m
        span = f"values from {finite.min():g} to {finite.max():g}" if finite.size else "no finite value"
        raise InputError(
            f"the mask (dtype {m.dtype}, shape {m.shape}) holds {bad:,} voxel{'s' if bad != 1 else ''} that are "
            f"neither 0 nor 1 ({span}): {advice}; for a label map, select the label (labels == k) or the labels "
            "(labels > 0)"
        )
    return m != 0


_F = TypeVar("_F", bound=Callable[..., Any])


def _keyword_only(*old_order: str) -> Callable[[_F], _F]:
    """Make the parameters ``old_order`` keyword-only, as the signature says, while a call that still passes them by
    position (in ``old_order``, as before) works with a ``DeprecationWarning`` naming the keywords to use."""

    def wrap(fn: _F) -> _F:
        import inspect

        params = inspect.signature(fn).parameters.values()
        n_positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if len(args) > n_positional:
                extra = args[n_positional:]
                if len(extra) > len(old_order):
                    raise TypeError(f"{fn.__name__}() takes {n_positional} positional arguments but {len(args)} "
                                    "were given")  # fmt: skip
                names = old_order[: len(extra)]
                for name, value in zip(names, extra):
                    if name in kwargs:
                        raise TypeError(f"{fn.__name__}() got multiple values for argument {name!r}")
                    kwargs[name] = value
                warnings.warn(
                    f"{fn.__name__}(): passing {', '.join(names)} by position is deprecated and will be refused in a "
                    f"later version; pass {', '.join(f'{n}=...' for n in names)} by keyword",
                    DeprecationWarning, stacklevel=2,
                )  # fmt: skip
                args = args[:n_positional]
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def clip_hu(arr: np.ndarray, hu_range: tuple[float, float] = HU_RANGE) -> np.ndarray:
    lo, hi = check_hu_range(hu_range)
    return np.clip(arr, lo, hi)


def _clipped_differences(
    ref: np.ndarray, test: np.ndarray, hu_range: tuple[float, float], mask: np.ndarray | None
) -> Iterator[np.ndarray]:
    """``clip(ref) - clip(test)`` in float64 (exact for float32 input), slab by slab, inside ``mask`` (bool, of the
    volumes' shape: :func:`check_mask`)."""
    for sl in _slabs(ref.shape, CHUNK_VOXELS):
        d = clip_hu(ref[sl], hu_range).astype(np.float64)  # clipping first is exact and cheaper
        d -= clip_hu(test[sl], hu_range)
        yield d if mask is None else d[mask[sl]]


@_keyword_only("hu_range", "mask")
def psnr(
    ref: Volume | np.ndarray | ReferenceStats,
    test: Volume | np.ndarray,
    *,
    hu_range: tuple[float, float] = HU_RANGE,
    mask: np.ndarray | None = None,
) -> float:
    """PSNR in dB with both volumes clipped to ``hu_range`` and peak = the range's width.

    Args:
        ref, test: ``(z, y, x)`` in HU, of one shape (and one grid when both are Volumes).
        hu_range: ``(lo, hi)`` HU, ``lo < hi`` (keyword-only).
        mask: score only these voxels (keyword-only): bool ``(z, y, x)``, or 0/1 integers or floats
            (:func:`check_mask`).

    Returns ``inf`` for identical volumes.

    Raises:
        ConfigError: a ``hu_range`` that is not ``lo < hi``. InputError: a mask of values other than 0/1, an empty
            mask, NaN voxels. GeometryError: shapes or grids that differ.
    """
    hu_range = check_hu_range(hu_range)
    r, t = _check_pair(ref, test)
    mask = None if mask is None else check_mask(mask, r.shape)
    sq, n = 0.0, 0
    for d in _clipped_differences(r, t, hu_range, mask):
        sq += float(np.dot(d.ravel(), d.ravel()))
        n += d.size
    if n == 0:
        raise InputError("the mask is empty: no voxel to score; give a mask that selects some voxels")
    mse = _refuse_nan(sq / n, r, t)
    peak = hu_range[1] - hu_range[0]
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


@_keyword_only("mask", "hu_range")
def hu_mae(
    ref: Volume | np.ndarray | ReferenceStats,
    test: Volume | np.ndarray,
    *,
    mask: np.ndarray | None = None,
    hu_range: tuple[float, float] = HU_RANGE,
) -> float:
    """Mean absolute HU error (both clipped to ``hu_range``), inside ``mask`` when given.

    ``mask`` and ``hu_range`` are keyword-only and checked as in :func:`psnr`.
    """
    hu_range = check_hu_range(hu_range)
    r, t = _check_pair(ref, test)
    mask = None if mask is None else check_mask(mask, r.shape)
    total, n = 0.0, 0
    for d in _clipped_differences(r, t, hu_range, mask):
        total += float(np.abs(d, out=d).sum())
        n += d.size
    if n == 0:
        raise InputError("the mask is empty: no voxel to score; give a mask that selects some voxels")
    return _refuse_nan(total / n, r, t)


#: Face connectivity in 3D, and face connectivity inside each axial slice only (no link along axis 0).
#: Face connectivity (scipy.ndimage.generate_binary_structure(3, 1)), and the same within one slice; scipy.ndimage is
#: imported only where a mask is computed, so that `import DiffusionCore` stays light (3D Slicer imports it at start).
_FACES_3D = np.zeros((3, 3, 3), bool)
_FACES_3D[1, 1, :] = _FACES_3D[1, :, 1] = _FACES_3D[:, 1, 1] = True
_FACES_IN_SLICE = np.zeros((3, 3, 3), bool)
_FACES_IN_SLICE[1] = _FACES_3D[1]


def axial_axis(ref: Volume | np.ndarray) -> int:
    """The array axis that steps from one axial slice to the next: the one whose direction runs most nearly
    along the patient's head-foot (LPS S) axis; 0 for a bare array (``(z, y, x)`` with z the slice axis)."""
    if not isinstance(ref, Volume):
        return 0
    d = np.asarray(ref.direction, dtype=np.float64).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(d[2])))  # index axis c (x, y, z) -> array axis 2 - c


def _fill_holes(mask: np.ndarray, structure: np.ndarray, border_axes: tuple[int, ...]) -> np.ndarray:
    """``mask`` with every background component that touches no border of ``border_axes`` filled.

    With ``structure`` face connectivity this is ``scipy.ndimage.binary_fill_holes`` (in 3D, or in every
    slice when the structure links no slices and the borders are those of the slices), in one labelling.
    """
    from scipy import ndimage

    labels, n = ndimage.label(~mask, structure)
    open_to_border = np.zeros(n + 1, bool)  # per label; label 0 is the mask itself, kept
    for ax in border_axes:
        open_to_border[np.take(labels, 0, axis=ax)] = True
        open_to_border[np.take(labels, -1, axis=ax)] = True
    open_to_border[0] = False
    return ~open_to_border[labels]


def _holds_square(part: np.ndarray, side_px: tuple[int, int], in_plane: tuple[int, int]) -> bool:
    """Whether some slice of the bool block ``part`` holds a ``side_px`` rectangle (pixels along the array axes
    ``in_plane``) whole: a binary erosion by it, as two 1D minimum filters, is not empty."""
    from scipy import ndimage

    m = part.view(np.uint8)
    for ax, n in zip(in_plane, side_px):
        if m.shape[ax] < n:
            return False
        m = ndimage.minimum_filter1d(m, n, axis=ax, mode="constant", cval=0)
        if not m.any():
            return False
    return True


def _body_parts(
    labels: np.ndarray, sizes: np.ndarray, slice_axis: int, spacing_zyx: tuple[float, float, float]
) -> np.ndarray:
    """Labels (1..n) of the components that are body: the largest, and every other one of at least
    :data:`BODY_PART_MIN_MM3` whose cross-section in some axial slice holds a :data:`BODY_PART_MIN_SIDE_MM` square."""
    from scipy import ndimage

    largest = int(np.argmax(sizes))
    big = np.flatnonzero(sizes * math.prod(spacing_zyx) >= BODY_PART_MIN_MM3)
    big = big[big != largest]
    if big.size == 0:  # nothing else large enough: no further pass over the labels
        return np.array([largest])
    in_plane = tuple(a for a in range(3) if a != slice_axis)
    side_px = tuple(max(1, math.ceil(BODY_PART_MIN_SIDE_MM / spacing_zyx[a])) for a in in_plane)
    boxes = ndimage.find_objects(labels, max_label=int(big.max()))
    parts = [int(i) for i in big if _holds_square(labels[boxes[i - 1]] == i, side_px, in_plane)]
    return np.array([largest, *parts])


def _body_mask(
    a: np.ndarray, threshold: float, slice_axis: int = 0, spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(a > threshold)
    if n == 0:
        return np.zeros(a.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    parts = _body_parts(labels, sizes, slice_axis, spacing_zyx)
    if parts.size == 1:
        mask = labels == int(parts[0])
    else:
        keep = np.zeros(n + 1, bool)
        keep[parts] = True
        mask = keep[labels]
    del labels
    mask = _fill_holes(mask, _FACES_3D, (0, 1, 2))
    in_slice = np.moveaxis(_FACES_IN_SLICE, 0, slice_axis)
    return _fill_holes(mask, in_slice, tuple(a for a in range(3) if a != slice_axis))


def body_mask(ref: Volume | np.ndarray | ReferenceStats, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Boolean body mask of a CT (:data:`BODY_MASK_DEFINITION`).

    Voxels above ``threshold`` HU, grouped into 3D components (face connectivity). The largest is the body;
    another one is a body part too (a second leg, an arm held away from the trunk) when it holds at least
    :data:`BODY_PART_MIN_MM3` mm^3 and some axial slice of it holds a :data:`BODY_PART_MIN_SIDE_MM` mm square whole.
    That leaves out the CT table (a plate or shell, thinner than that square) and the specks in the air around
    the patient (smaller than that volume), and gives the same mask as "the largest component" on the sample
    CTs and every region of them the published figures use. Sizes are in mm from a :class:`Volume`'s spacing; a
    bare array counts as 1 mm voxels.

    Holes are filled in 3D and then in every axial slice (:func:`axial_axis`: array axis 0 for a bare array,
    else the axis the volume's direction puts along the patient's head-foot axis, so a scan stored in sagittal
    or coronal slices gets the same mask), so air spaces open to the edge of the scan in 3D (airways, lungs
    reaching the top slice) still count as body. For a :class:`ReferenceStats` this is its cached (read-only)
    mask.
    """
    if isinstance(ref, ReferenceStats):
        return ref.body_mask(threshold)
    return _body_mask(_arr(ref), threshold, axial_axis(ref), _spacing_zyx(ref))


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _radius(taps: np.ndarray) -> int:
    return (len(taps) - 1) // 2


def ssim_window(sigma: float = SSIM_SIGMA) -> int:
    """Voxels along each axis of the 3D SSIM window (11 for sigma 1.5): a volume must be at least this long along
    every axis to be scored."""
    return 2 * _radius(_gaussian_kernel(sigma, SSIM_TRUNCATE)) + 1


def _check_window(shape: tuple[int, ...], taps: np.ndarray) -> None:
    rad = _radius(taps)
    if min(shape) <= 2 * rad:
        raise InputError(f"volume {tuple(shape)} is too small for a {2 * rad + 1}-voxel SSIM window: score volumes "
                         f"of at least {2 * rad + 1} voxels along each axis")  # fmt: skip


def _gaussian_valid(a: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter of a float32 ``(z, y, x)`` block, 'valid' along every axis.

    Three 1D passes of the (symmetric) ``taps``; the output is ``2 * radius`` shorter along each axis and
    holds the window means whose window lies entirely inside ``a``, so no border rule is involved.
    """
    rad = _radius(taps)
    w = taps.astype(a.dtype)
    for axis in range(3):
        v = np.moveaxis(a, axis, 0)  # a view: the pass runs along its first axis
        n = v.shape[0] - 2 * rad
        out = v[rad : rad + n] * w[rad]
        pair = np.empty_like(out)
        for i in range(rad):  # taps i and 2 rad - i are equal
            np.add(v[i : i + n], v[2 * rad - i : 2 * rad - i + n], out=pair)
            pair *= w[i]
            out += pair
        a = np.moveaxis(out, 0, axis)
    return a


def _ssim_slabs(
    arr: np.ndarray,
    rad: int,
    hu_range: tuple[float, float],
    other: np.ndarray | None = None,
    slices: int | None = None,
) -> Iterator[tuple]:
    """Slab by slab along axis 0: the index of the slab's output in the valid region, and the clipped
    float32 input block (with its ``rad``-slice halo) of ``arr`` (and of ``other`` when given).

    ``slices`` output slices per slab; by default about SSIM_SLAB_VOXELS output voxels."""
    voxels = SSIM_SLAB_VOXELS if slices is None else slices * math.prod(arr.shape[1:])
    for sl in _slabs(arr.shape, voxels, rad, arr.shape[0] - rad):
        inp = slice(sl.start - rad, sl.stop + rad)
        out = slice(sl.start - rad, sl.stop - rad)
        x = clip_hu(arr[inp], hu_range).astype(np.float32, copy=False)
        if other is None:
            yield out, x
        else:
            yield out, x, clip_hu(other[inp], hu_range).astype(np.float32, copy=False)


@_keyword_only("hu_range", "sigma", "chunk")
def ssim3d(
    ref: Volume | np.ndarray | ReferenceStats,
    test: Volume | np.ndarray,
    *,
    hu_range: tuple[float, float] = HU_RANGE,
    sigma: float = SSIM_SIGMA,
    chunk: int | None = None,
) -> float:
    """Mean 3D SSIM (Gaussian window) of two volumes clipped to ``hu_range``.

    The mean runs over voxels at least one window radius (5 for sigma 1.5) from every border, where the
    window lies inside the volume; the boundary extension then never matters. The Gaussian is applied as
    three 1D passes in float32 (the mean is summed in float64), slab by slab along axis 0 so memory stays
    bounded for full-size CT. With a :class:`ReferenceStats` the reference's local mean and variance are
    computed once and reused.

    Args:
        hu_range: ``(lo, hi)`` HU, ``lo < hi``; the data range is its width (keyword-only, as ``sigma`` and ``chunk``).
        chunk: output slices per slab; by default about :data:`SSIM_SLAB_VOXELS` voxels.
    """
    hu_range = check_hu_range(hu_range)
    stats = ref if isinstance(ref, ReferenceStats) else ReferenceStats(ref)
    r, t = _check_pair(stats, test)
    taps = _gaussian_kernel(sigma, SSIM_TRUNCATE)
    _check_window(r.shape, taps)
    rad = _radius(taps)
    mu_x, var_x = stats.local_moments(hu_range, sigma)
    data_range = hu_range[1] - hu_range[0]
    c1 = np.float32((SSIM_K1 * data_range) ** 2)
    c2 = np.float32((SSIM_K2 * data_range) ** 2)
    total = 0.0
    for out, x, y in _ssim_slabs(r, rad, hu_range, t, chunk):
        ux, vx = mu_x[out], var_x[out]
        x *= y
        uxy = _gaussian_valid(x, taps)
        uy = _gaussian_valid(y, taps)
        y *= y
        vy = _gaussian_valid(y, taps)
        vy -= uy * uy  # uyy - uy^2
        uxy -= ux * uy  # covariance
        num = (2 * ux * uy + c1) * (2 * uxy + c2)
        den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
        num /= den
        total += float(num.sum(dtype=np.float64))
    return _refuse_nan(total / mu_x.size, r, t)


@_keyword_only("hu_range")
def consistency_psnr(
    output: Volume,
    thick_input: Volume,
    factor: int,
    axis: str | int = "z",
    degradation: Degradation = "slab",
    *,
    hu_range: tuple[float, float] = HU_RANGE,
) -> float:
    """PSNR between ``thick_input`` and ``output`` degraded again the same way.

    A correct super-resolution reproduces its own input: this is high (40+ dB) for a consistent result.
    """
    again = degrade(output, factor, axis, degradation)
    if again.shape != thick_input.shape:
        raise GeometryError(
            f"the output degraded again has shape {again.shape}, the input {thick_input.shape}: "
            "the output is not on the input's thin grid (give the factor and axis that made the thick input)"
        )
    return psnr(thick_input, again, hu_range=hu_range)


def quality_report(
    reference: Volume | ReferenceStats,
    output: Volume,
    *,
    thick_input: Volume | None = None,
    factor: int | None = None,
    axis: str | int = "z",
    degradation: Degradation = "slab",
    mask: np.ndarray | None = None,
    hu_range: tuple[float, float] = HU_RANGE,
) -> dict[str, float]:
    """All SR metrics at once: psnr, psnr_body, ssim, hu_mae_body and (with an input) consistency_psnr.

    Scoring several outputs against one reference: pass ``ReferenceStats(reference)`` as ``reference``
    (the body mask and the SSIM's reference moments are then computed once). ``mask``: the region of the
    ``_body`` scores (default :func:`body_mask` of the reference), checked as in :func:`psnr`.
    """
    hu_range = check_hu_range(hu_range)
    mask = body_mask(reference) if mask is None else check_mask(mask, _arr(reference).shape)
    out = {
        "psnr": psnr(reference, output, hu_range=hu_range),
        "psnr_body": psnr(reference, output, hu_range=hu_range, mask=mask),
        "ssim": ssim3d(reference, output, hu_range=hu_range),
        "hu_mae_body": hu_mae(reference, output, mask=mask, hu_range=hu_range),
    }
    if thick_input is not None and factor is not None:
        out["consistency_psnr"] = consistency_psnr(output, thick_input, factor, axis, degradation, hu_range=hu_range)
    return out
