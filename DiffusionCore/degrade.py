"""Thick-slice simulation and the thin-slice grid that undoes it.

A thick CT reconstruction integrates over a slab of tissue: its slice profile is (close to) a box of the
slice thickness. ``slab_average`` simulates that from a thin-slice volume: the mean of ``k`` consecutive
slices, one slice per slab. ``decimate`` keeps one thin slice per slab instead (an easier, different
degradation; figures must say which one they use).

Geometry is exact: the thick volume's spacing along the axis is ``k`` times the thin spacing and its
origin sits at the centre of the first slab (slab average) or on the kept slice (decimation), so it lies
in the same physical place as the thin volume in any viewer. ``thin_grid`` gives the grid a
super-resolution or interpolation writes to; for a slab-averaged volume it is the original thin grid, and
``plan_thin_grid`` is the one decision of that grid and its factor for a super-resolution run.
``enforce_consistency`` inverts the slab average on the thin grid: it corrects a thin volume so that its
slab averages reproduce the thick input (the last step of super-resolution), with no thin voxel darker than
air (:func:`physical_floor`).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

from .errors import GeometryError, InputError, NumericalError, not_for_this_tool
from .geometry import storage_flips
from .interpolation import cubic_matrix
from .volume import AIR_HU, THICK_AXIS_MIN_RATIO, Grid, Volume, axis_index, suggested_factor, thick_axis

Degradation = Literal["slab", "decimate"]
DEGRADATIONS = ("slab", "decimate")
MAX_FACTOR = 8

logger = logging.getLogger(__name__)


def _check_factor(factor: int, n: int, axis: int) -> int:
    if isinstance(factor, float) and not float(factor).is_integer():
        raise GeometryError(f"the factor must be a whole number; got {factor}. Use a target spacing instead.")
    k = int(factor)
    if k < 2:
        raise GeometryError(f"factor {factor}: nothing to do (use 2 or more).")
    if k > MAX_FACTOR:
        raise GeometryError(
            f"factor {k} is above the supported maximum of {MAX_FACTOR}: so few slices carry too little "
            "information to reconstruct from."
        )
    if n // k < 2:
        raise GeometryError(
            f"{n} slices along axis {'zyx'[axis]} give fewer than 2 slabs of {k}; use a smaller factor."
        )
    return k


def _shift_origin(grid: Grid, axis: int, thin_offset: float) -> tuple[float, float, float]:
    """Origin moved by ``thin_offset`` voxels along array axis ``axis`` (index axis ``2 - axis``)."""
    idx = 2 - axis
    d = grid.direction_matrix[:, idx]
    return tuple(float(o) for o in np.asarray(grid.origin) + d * grid.spacing[idx] * thin_offset)


def _scaled_spacing(spacing: tuple[float, float, float], axis: int, scale: float) -> tuple[float, float, float]:
    sp = list(spacing)
    sp[2 - axis] = sp[2 - axis] * scale
    return tuple(sp)  # type: ignore[return-value]


def slab_crop(n: int, factor: int, *, reverse: bool = False) -> slice:
    """The array indices kept when ``n`` slices are cut to whole slabs of ``factor``.

    The ``n % factor`` slices left over are dropped at the end of the scan that lies furthest along the axis's
    canonical direction (:func:`~DiffusionCore.geometry.storage_flips`): the last ones of the array, or the first
    ones when the axis is stored ``reverse`` of that direction. A scan stored either way is then cut into the
    same physical slabs.
    """
    kept = n - n % int(factor)
    return slice(n - kept, n) if reverse else slice(0, kept)


def _kept_slices(vol: Volume, factor: int, axis: int) -> slice:
    return slab_crop(vol.shape[axis], factor, reverse=axis in storage_flips(vol.direction))


def degrade(vol: Volume, factor: int, axis: str | int = "z", method: Degradation = "slab") -> Volume:
    """Simulate a thick-slice acquisition along ``axis``.

    Args:
        vol: thin-slice volume.
        factor: slices per slab ``k`` (2..8). Slices that do not fill a slab are dropped, at the same physical
            end whatever the storage order (:func:`slab_crop`; :func:`crop_to_slabs` is the thin volume kept).
        axis: array axis ``z``/``y``/``x`` (0/1/2).
        method: ``"slab"`` (mean of ``k`` slices, a box slice profile) or ``"decimate"`` (keep the slice
            at index ``(k - 1) // 2`` of each slab).

    Returns:
        The thick volume, with spacing ``k`` times larger along the axis and exact origin: the centre of each
        slab (slab) or the kept slice (decimate).
    """
    ax = axis_index(axis)
    k = _check_factor(factor, vol.shape[ax], ax)
    kept = _kept_slices(vol, k, ax)
    m = vol.shape[ax] // k
    arr = np.moveaxis(vol.array, ax, 0)[kept]
    if method == "slab":
        thick = arr.reshape(m, k, *arr.shape[1:]).mean(axis=1, dtype=np.float64).astype(np.float32)
        offset = (k - 1) / 2.0
    elif method == "decimate":
        c = (k - 1) // 2
        thick = arr[c::k][:m].copy()
        offset = float(c)
    else:
        raise InputError(f"unknown degradation {method!r}: use one of {', '.join(DEGRADATIONS)}")
    grid = vol.grid
    return Volume(
        np.moveaxis(thick, 0, ax),
        _scaled_spacing(vol.spacing, ax, k),
        _shift_origin(grid, ax, kept.start + offset),
        vol.direction.copy(),
        {**_thick_slices_metadata(vol, ax, k, method), "degradation": method, "factor": k, "axis": "zyx"[ax]},
    )


#: What a DICOM reader records of a series' own slices (their thickness, how the files' values and positions
#: varied): of the thin reference, not of a thick volume simulated from it.
_SLICE_RECORDS = ("slice_thickness_values_mm", "slice_position_deviation_mm")


def _thick_slices_metadata(vol: Volume, ax: int, k: int, method: str) -> dict:
    """The metadata of a volume simulated by :func:`degrade` from ``vol``: its own, except what it says of the thin
    slices along the slice axis (array axis 0, the only one with a recorded thickness). A slab average of ``k`` slices
    is a slice as thick as its new spacing; a decimated series keeps its thin slices' thickness, with gaps between
    them (an interspaced series, as super-resolution then says). Before 2026-12-07 the thin reference's thickness was
    kept for slabs too, and a thick volume made from a DICOM reference was refused as interspaced."""
    meta = dict(vol.metadata)
    if ax != 0:
        return meta
    for key in _SLICE_RECORDS:
        meta.pop(key, None)
    if method == "slab" and meta.get("slice_thickness_mm"):
        meta["slice_thickness_mm"] = float(vol.spacing_zyx[0]) * k
    return meta


def crop_to_slabs(vol: Volume, factor: int, axis: str | int = "z") -> Volume:
    """The thin volume cut to a whole number of slabs (the reference grid for evaluating ``degrade``): the
    slices :func:`slab_crop` keeps, with the origin moved when the first ones are dropped."""
    ax = axis_index(axis)
    k = _check_factor(factor, vol.shape[ax], ax)
    kept = _kept_slices(vol, k, ax)
    arr = np.moveaxis(vol.array, ax, 0)[kept]
    return Volume(np.moveaxis(arr, 0, ax).copy(), vol.spacing, _shift_origin(vol.grid, ax, kept.start),
                  vol.direction.copy(), dict(vol.metadata))  # fmt: skip


# -- data consistency: the correction that the slab degradation maps back onto the thick input ----------
def consistency_operator(
    thick: Grid, thin: Grid, axis: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The linear map that corrects a thin-grid volume so its slab averages equal the thick input.

    Along ``axis`` let ``S`` (m x n) average the thin slices whose centres fall inside each thick slab
    (for an integer factor k: exactly :func:`degrade` with ``method="slab"``) and ``B`` (n x m) be cubic
    B-spline interpolation from thick slice centres to thin slice centres (the same spline as the cubic
    baseline). The correction of a thin volume ``y`` is ``B a`` with ``a`` solving ``S B a = x - S y``: a
    smooth (C2) curve through each column whose slab averages make up the per-slab mean difference. Then
    ``S (y + B a) = x`` exactly, and nothing changes where the slab means already agree.

    Args:
        thick: the input's grid.
        thin: the output grid (differs from ``thick`` only along ``axis``).
        axis: array axis (0, 1, 2).

    Returns:
        ``(M, S, rows, slab)``: ``M`` (n x r) float64 maps the slab differences of the ``r`` slabs listed in
        ``rows`` (those holding at least one thin slice centre) to the thin-grid correction; ``S`` (r x n)
        is the slab average (:func:`slab_operator`); ``slab`` (n,) the slab of each thin slice (:func:`slab_of`).
    """
    s_mat, rows, coords, slab = _slab_operator(thick, thin, axis)
    b_mat = cubic_matrix(thick.shape[axis], coords)
    system = s_mat @ b_mat  # (r x m): slab averages of each spline basis function
    m_mat = b_mat @ np.linalg.pinv(system)
    return m_mat, s_mat, rows, slab


def slab_operator(thick: Grid, thin: Grid, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(S, rows, coords)``: ``S`` (r x n) averages the thin slices whose centres fall in each of the ``r``
    thick slabs listed in ``rows`` (those holding at least one); ``coords`` are the thin slice centres in
    thick index units."""
    return _slab_operator(thick, thin, axis)[:3]


def _slab_operator(thick: Grid, thin: Grid, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`slab_operator` and the slab of each thin slice (:func:`slab_of`)."""
    idx = 2 - axis
    to_thick = np.linalg.inv(thick.index_to_physical()) @ thin.index_to_physical()
    n, m = thin.shape[axis], thick.shape[axis]
    coords = to_thick[idx, idx] * np.arange(n) + to_thick[idx, 3]
    slab = slab_of(coords, m, reverse=axis in storage_flips(thick.direction))
    inside = slab >= 0
    counts = np.bincount(slab[inside], minlength=m)
    rows = np.flatnonzero(counts > 0)
    s_mat = np.zeros((m, n))
    s_mat[slab[inside], np.flatnonzero(inside)] = 1.0
    return s_mat[rows] / counts[rows, None], rows, coords, slab


#: Slices at most this thick (mm) are thin enough to be the through-plane target: averaged k at a time they give the
#: 5-10 mm inputs that the SR command is run on. Thicker ones only teach thick-to-thicker (training pairs) and are no
#: thin truth to score against (an evaluation reference).
THIN_SLICE_MM = 3.0


#: How far a series' recorded slice thickness may differ from its slice spacing (as a share of the spacing) before a
#: run says that its slices are not the contiguous slabs that super-resolution assumes: rounding only. Headers give a
#: nominal thickness to two or three digits (0.6 for 0.625 mm and 1.2 for 1.25 mm are 4% off) and the spacing comes
#: from the slices' positions (hundredths of a mm on 5 mm), so 5% passes every rounding; any real overlap or gap is
#: named. The 20% band this replaced let 6 mm slices every 5 mm (20% overlap) and 4 mm slices every 5 mm (1 mm gaps)
#: through without a word (probe 33, F11), although the model, its adaptation pairs and the consistency step all take
#: the slices as exactly as thick as their spacing.
SLAB_THICKNESS_TOLERANCE = 0.05

#: A series whose slices are at most this share of their spacing thick is interspaced (an HRCT-type protocol: thin
#: slices with wide gaps), and super-resolution refuses it unless allowed (:func:`check_interspaced`). Measured on
#: probe 33 (sr --no-adapt against the thin truth, cubic B-spline interpolation of the same input as the baseline):
#: a phantom with 1.25 mm slices every 6.25 mm (ratio 0.2) scored below cubic (39.3 vs 39.9 dB) with 1,200-1,970 HU
#: rims on an 800 HU rod (cubic: none); LIDC chest with 2.5 mm slices every 7.5 mm (0.33) scored +0.2 dB over cubic
#: (+2.6 dB on 7.5 mm slabs) with 2,777 voxels over the local truth maximum + 200 HU against cubic's 64; 2.5 mm every
#: 5 mm (0.5) still held 181 such voxels against cubic's 7 (+1.4 dB). Half the spacing, where the gaps are as wide
#: as the slices, is thus already out of the model's domain; between that and the tolerance the run goes on with the
#: slab-thickness note.
INTERSPACED_MAX_RATIO = 0.5
#: The rounding :data:`INTERSPACED_MAX_RATIO` allows: a spacing measured from positions written to a few decimals
#: (5.0003 or 4.9997 mm for 5) must not decide whether 2.5 mm slices are refused (probe 35).
INTERSPACED_ROUNDING = 0.01


def slab_thickness_note(volume: Volume, axis: int) -> str:
    """What a DICOM series' SliceThickness says against the thick-slice model, or ``""``.

    Super-resolution (the predictor, its adaptation pairs and the data-consistency step) takes each thick slice as
    the average of the slab between its neighbours: thickness = spacing. An overlapping reconstruction (thicker than
    the spacing) and one with gaps (thinner slices) are not that; the note says what it means for the result.
    Only the slice axis of a series (array axis 0) has a recorded thickness.
    """
    thickness = volume.metadata.get("slice_thickness_mm")
    if not thickness or axis != 0:
        return ""
    return thickness_note(float(thickness), float(volume.spacing_zyx[0]))


def thickness_note(thickness: float, spacing: float) -> str:
    """:func:`slab_thickness_note`'s words for slices ``thickness`` mm thick and ``spacing`` mm apart along the slice
    axis, or ``""`` when they agree within :data:`SLAB_THICKNESS_TOLERANCE` (also what a result's provenance says of
    its input: :func:`DiffusionCore.results.sr_provenance`)."""
    if thickness > spacing * (1 + SLAB_THICKNESS_TOLERANCE):
        return (
            f"the series' slices are {thickness:g} mm thick but {spacing:g} mm apart (an overlapping reconstruction): "
            f"super-resolution takes each slice as the average of the {spacing:g} mm slab around it, so the result "
            f"keeps part of the blur of the thicker slices; where the scanner also reconstructed {thickness:g} mm "
            f"slices without overlap, that series fits the model"
        )
    if thickness < spacing * (1 - SLAB_THICKNESS_TOLERANCE):
        return (
            f"the series' slices are {thickness:g} mm thick but {spacing:g} mm apart, with gaps between them: "
            f"super-resolution takes each slice as the average of the whole {spacing:g} mm "
            "slab around it, so what lies in the gaps is an estimate from the slices on either side, not measured"
        )
    return ""


def interspaced_slices(
    thick: Volume | Grid, axis: str | int | None = None, thickness_mm: float | None = None
) -> tuple[float, float] | None:
    """``(thickness, spacing)`` in mm when ``thick`` is an interspaced series along ``axis`` (default: its thick axis):
    its recorded SliceThickness is at most :data:`INTERSPACED_MAX_RATIO` of its slice spacing; else None (no recorded
    thickness, another axis, or slices thick enough). Only the slice axis of a series (array axis 0) has one.
    ``thickness_mm``: the SliceThickness (default: a Volume's ``slice_thickness_mm`` metadata; a Grid has none)."""
    grid = thick.grid if isinstance(thick, Volume) else thick
    if thickness_mm is None and isinstance(thick, Volume):
        thickness_mm = thick.metadata.get("slice_thickness_mm")
    ax = thick_axis(grid) if axis is None else axis_index(axis)
    if not thickness_mm or ax != 0:
        return None
    spacing = float(grid.spacing_zyx[0])
    return (float(thickness_mm), spacing) if is_interspaced(float(thickness_mm), spacing) else None


def is_interspaced(thickness: float, spacing: float) -> bool:
    """Whether slices ``thickness`` mm thick and ``spacing`` mm apart are interspaced: at most
    :data:`INTERSPACED_MAX_RATIO` of the spacing thick (up to :data:`INTERSPACED_ROUNDING`)."""
    return thickness <= spacing * INTERSPACED_MAX_RATIO * (1 + INTERSPACED_ROUNDING)


def check_interspaced(
    thick: Volume | Grid,
    axis: str | int | None = None,
    *,
    thickness_mm: float | None = None,
    allow: bool = False,
    what: str = "the input volume",
    how_to_allow: str = "pass --allow-interspaced (allow_interspaced=True in Python)",
) -> None:
    """Refuse an interspaced series (:func:`interspaced_slices`, same arguments) before any work, unless ``allow``
    (``SRRunSettings.allow_interspaced``, ``sr --allow-interspaced``). ``how_to_allow`` ends the message: the way the
    caller's front end runs it anyway.

    Raises:
        InputError: marked not for this tool (:func:`~DiffusionCore.errors.not_for_this_tool`: a batch passes it
            over), saying what was found, why it is refused and what to do.
    """
    found = interspaced_slices(thick, axis, thickness_mm)
    if found is None or allow:
        return
    thickness, spacing = found
    raise not_for_this_tool(InputError(
        f"{what} has {thickness:g} mm slices {spacing:g} mm apart: an interspaced protocol (as HRCT makes), its "
        f"slices covering {thickness / spacing:.0%} of the spacing. To run it anyway, {how_to_allow}; or interpolate "
        "the gaps instead (cubic resampling keeps the measured slices). Refused because super-resolution restores slabs "
        "that cover the whole spacing: on such gaps it paints bright rims at edges and measured no better than "
        "interpolation."
    ))  # fmt: skip


#: What a run of an interspaced series adds to its slab-thickness note when it was allowed to go on.
INTERSPACED_RUN_NOTE = (
    "run anyway, as asked: the result may hold bright rims at edges that are not in the patient, and on such series "
    "it measured no better than interpolation"
)


#: How near (in thick-slice units) a thin slice centre must be to the border of two slabs to count as on it: far above
#: the rounding of the geometry's affines (1e-15), far below any real offset (a 0.001 mm shift of 5 mm slices: 2e-4).
SLAB_BORDER_TOLERANCE = 1e-6


def no_thick_axis(grid: Grid, how: str) -> GeometryError:
    """The refusal of a volume without one thick axis (:func:`~DiffusionCore.volume.thick_axis` None): (nearly)
    isotropic, or two axes equally coarse beside a fine one (5 x 5 x 0.8 mm: a reformat), which is not isotropic and
    needs the axis chosen. ``how`` says how to choose one."""
    sp = np.asarray(grid.spacing_zyx, dtype=float)
    shown = ", ".join(f"{s:.3g}" for s in sp)
    coarse = [a for a in range(3) if sp[a] >= THICK_AXIS_MIN_RATIO * sp.min()]
    if len(coarse) >= 2:
        named = " and ".join(f"{'zyx'[a]} ({sp[a]:.3g} mm)" for a in coarse)
        return not_for_this_tool(GeometryError(
            f"two axes are equally coarse, {named}, beside a fine one (spacing z, y, x = {shown} mm): there is no "
            f"single thick axis to super-resolve. {how}"
        ))  # fmt: skip
    return not_for_this_tool(GeometryError(
        f"the volume is already (nearly) isotropic (spacing z, y, x = {shown} mm): there is no thick axis to "
        f"super-resolve. {how}"
    ))


def slab_of(coords: np.ndarray, m: int, *, reverse: bool = False) -> np.ndarray:
    """The thick slab (0..m-1) whose extent holds each thin slice centre (``coords`` in thick index units), or -1
    for a centre outside all ``m`` slabs. A centre on the border of two slabs belongs to the one further along the
    axis's physical direction (:func:`~DiffusionCore.geometry.storage_flips`): the higher index, or the lower one
    when the array axis is stored ``reverse`` of it, so the same slices fall in the same slabs in either order. A
    centre within :data:`SLAB_BORDER_TOLERANCE` of a border is on it: the coordinates come from a product of
    floating-point affines (5 mm slices to 2 mm ones: 1.499999999999996 for a border at 1.5), and rounding must not
    decide the slab, or the same scan stored head first and feet first gets other slabs (up to 1254 HU apart)."""
    border = np.round(coords - 0.5) + 0.5
    coords = np.where(np.abs(coords - border) < SLAB_BORDER_TOLERANCE, border, coords)
    slab = (np.ceil(coords - 0.5) if reverse else np.floor(coords + 0.5)).astype(int)
    slab[(slab < 0) | (slab >= m)] = -1
    return slab


def _along_axis(mat: np.ndarray, arr: np.ndarray, axis: int) -> np.ndarray:
    """``mat`` (p x n) applied along ``axis`` of ``arr`` as one float32 matrix product; the axis comes first."""
    moved = np.moveaxis(arr, axis, 0)
    flat = np.ascontiguousarray(moved, dtype=np.float32).reshape(moved.shape[0], -1)
    return (mat.astype(np.float32) @ flat).reshape((mat.shape[0],) + moved.shape[1:])


def slab_means(arr: np.ndarray, thick: Grid, thin: Grid, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Slab averages of a thin-grid array along ``axis`` (see :func:`slab_operator`; the axis first) and
    their rows."""
    s_mat, rows, _ = slab_operator(thick, thin, axis)
    return _along_axis(s_mat, arr, axis), rows


def physical_floor(thick: Volume) -> float:
    """The lowest value a thin voxel may take: air (-1024 HU), or the input's own darkest value if that is
    lower (a scanner whose air noise reaches below -1024 HU). Nothing in a CT is darker than air, so a value
    below it is an interpolation overshoot (cubic ringing at an air boundary), never anatomy."""
    return min(float(np.min(thick.array)), AIR_HU)


#: Voxels that must share the input's largest value for it to count as the scanner's cap (values are stored up to
#: a limit, often 3071 HU, and everything denser is clipped to it: a plateau a reconstruction never makes by chance).
SATURATED_VOXELS = 64


def physical_ceiling(thick: Volume) -> float | None:
    """The highest value a thin voxel may take, or None: the input's maximum when it is the scanner's cap (at least
    :data:`SATURATED_VOXELS` voxels hold exactly it; both sample chests are clipped so, at 2976 and 3071 HU). Thin
    slices from the same scanner are clipped at that cap too, so the consistency step must not push a thin voxel
    above it (next to metal or dense contrast beside air it did, by up to 2,600 HU). Without such a plateau thin
    slices may be brighter than any thick slab, up to the highest value the series' files can store
    (``metadata["stored_max_hu"]``, from a DICOM series' BitsStored and rescale: 3071 HU for 12 bits with an
    intercept of -1024, which a thin series of the same scanner cannot exceed either); when that is not known either,
    there is no ceiling."""
    top = float(np.max(thick.array))
    if int(np.count_nonzero(thick.array == top)) >= SATURATED_VOXELS:
        return top
    stored = thick.metadata.get("stored_max_hu")
    try:
        stored = float(stored) if stored is not None else None
    except (TypeError, ValueError):
        return None
    # a file whose pixels lie above what its BitsStored allows (a writer's slip) says nothing about a cap
    return stored if stored is not None and np.isfinite(stored) and stored >= top else None


def check_ringing_depth(lowest_value: float, floor: float, highest_input: float) -> None:
    """Refuse a thin volume that reaches further below the floor than interpolation ringing can: more than twice
    the input's own value range (``highest_input`` - ``floor``) below it. Cubic ringing and its consistency
    correction stay within about half that range (-2,600 HU on a chest of -1024..2976 HU at 0.7 mm); a value
    beyond it comes from a broken model, and raising it to air would hide that.

    Raises:
        NumericalError: ``lowest_value`` lies below ``floor - 2 * (highest_input - floor)``.
    """
    bound = floor - 2.0 * max(highest_input - floor, 0.0)
    if lowest_value < bound:
        raise NumericalError(
            f"the super-resolved volume reaches {lowest_value:.6g} HU, more than twice the input's value range "
            f"below air ({bound:.6g} HU); interpolation ringing does not go that deep, so the computation failed "
            "numerically. Nothing was written. Check the weights and options; if they are right, report it (on the command line, --debug shows the traceback)."
        )


def floor_within_slabs(arr: np.ndarray, slab: np.ndarray, floor: float) -> None:
    """Raise the voxels of ``arr`` (thin slices along axis 0, float32, changed in place) that lie below
    ``floor`` to it, keeping every slab's mean: in each column of a slab the excess is taken back evenly from
    that column's voxels still above the floor (the Euclidean projection onto "same slab mean, nothing below
    the floor", found by repeating until no voxel is below: each round puts at least one more voxel of every
    column still short on the floor, so a slab of k thin slices takes at most k rounds). Thin slices in no slab
    (``slab`` -1) are only clipped. A slab whose mean is itself below the floor cannot be mended and ends at the
    floor.

    Args:
        arr: (n, ...) thin-grid values, the slab axis first.
        slab: (n,) the slab of each thin slice (``-1``: outside every slab).
        floor: the lowest allowed value.
    """
    if not (arr < floor).any():
        return
    for s in np.unique(slab):
        idx = np.flatnonzero(slab == s)
        block = arr[idx]  # a copy: (k, ...)
        columns = (block < floor).any(axis=0)  # only the columns holding a low voxel change
        if not columns.any():
            continue
        sub = block[:, columns]  # (k, c)
        if s >= 0 and len(idx) > 1:
            for _ in range(len(idx) + 1):
                low = sub < floor
                if not low.any():
                    break
                lift = np.subtract(sub.dtype.type(floor), sub, out=np.zeros_like(sub), where=low)
                excess = lift.sum(axis=0)  # per column: what raising its low voxels adds to the slab
                sub[low] = floor
                free = sub > floor
                count = free.sum(axis=0, dtype=sub.dtype)
                share = np.divide(excess, count, out=np.zeros_like(excess), where=count > 0)
                np.subtract(sub, share, out=sub, where=free)
        np.maximum(sub, floor, out=sub)  # outside the slabs, a slab whose mean lies below the floor, rounding
        block[:, columns] = sub
        arr[idx] = block


#: Blocks of the first in-plane axis that :func:`enforce_consistency` corrects one at a time (its scratch memory is
#: about this share of the thin volume, twice).
CONSISTENCY_BLOCKS = 16


def enforce_consistency(
    output: Volume, thick: Volume, axis: int, *, in_place: bool = False, floor: bool = True
) -> Volume:
    """``output`` (thin grid) corrected so that its slab averages along ``axis`` equal ``thick``.

    Adds back the per-slab mean difference, spread smoothly with a cubic B-spline (see
    :func:`consistency_operator`). The result degraded again with ``degrade(..., method="slab")``
    reproduces ``thick`` to float32 rounding. With ``floor`` no voxel ends below :func:`physical_floor`: cubic
    ringing at air boundaries would otherwise leave voxels darker than air (down to about -2400 HU on a chest
    at 5 mm); they are raised to it and the slab's other voxels give the excess back
    (:func:`floor_within_slabs`), so the slab averages still reproduce ``thick``. Likewise no voxel ends above
    the scanner's cap when the input is clipped at one (:func:`physical_ceiling`). A volume reaching much further
    below air than ringing can is refused first (:func:`check_ringing_depth`).

    Raises:
        NumericalError: see :func:`check_ringing_depth` (only with ``floor``).

    Args:
        output: the super-resolved volume (HU) on the thin grid of ``thick``.
        thick: the thick input (HU).
        axis: the super-resolved array axis.
        in_place: add the correction into ``output.array`` (a float32 array the caller owns) instead of
            a copy; saves a whole-volume allocation.
        floor: keep every voxel at or above :func:`physical_floor` and at or below :func:`physical_ceiling`
            (default); False leaves the values as the correction makes them.
    """
    m_mat, s_mat, rows, slab = consistency_operator(thick.grid, output.grid, axis)
    if in_place and output.array.dtype == np.float32 and output.array.flags.writeable:
        arr = output.array
    else:
        arr = output.array.astype(np.float32)  # a copy
    view = np.moveaxis(arr, axis, 0)
    thick_rows = np.moveaxis(thick.array, axis, 0)[rows]
    s32, m32 = s_mat.astype(np.float32), m_mat.astype(np.float32)
    # in blocks of the first in-plane axis: the slab means, their difference to the input and the correction of a
    # block at a time, so the correction never takes a whole thin volume beside the output
    size = view.shape[1]
    step = max(1, -(-size // CONSISTENCY_BLOCKS))
    for j in range(0, size, step):
        block = view[:, j : j + step]
        flat = np.ascontiguousarray(block).reshape(block.shape[0], -1)
        diff = thick_rows[:, j : j + step].astype(np.float32).reshape(len(rows), -1) - s32 @ flat
        block += (m32 @ diff).reshape(block.shape)  # in place through the view: float32 sums
    if floor:
        lowest, highest = physical_floor(thick), physical_ceiling(thick)
        check_ringing_depth(float(view.min()), lowest, float(np.max(thick.array)))
        floor_within_slabs(view, slab, lowest)
        if highest is not None and float(view.max()) > highest:  # the same, upside down: only raises voxels
            np.negative(view, out=view)
            floor_within_slabs(view, slab, -highest)
            np.negative(view, out=view)
    return output if arr is output.array else output.with_array(arr)


#: How close the ratio of a slice spacing to a target spacing must be to a whole number to count as one: spacings
#: carry the rounding of their files (a float32 NIfTI header stores 1.4 mm as 1.39999998, DICOM positions written
#: with four decimals give 4.9999999 mm), far below this; slice spacings that really differ by 0.01% do not occur.
WHOLE_FACTOR_RTOL = 1e-4


def whole_factor(spacing: float, target_spacing: float) -> int | None:
    """``k`` when ``target_spacing`` is ``spacing / k`` for a whole ``k`` in 2..:data:`MAX_FACTOR`, up to the
    rounding of files (:data:`WHOLE_FACTOR_RTOL`); else None. Such a target spacing gives exactly ``--factor k``'s
    grid and run."""
    ratio = float(spacing) / float(target_spacing)
    k = int(round(ratio))
    return k if 2 <= k <= MAX_FACTOR and abs(ratio - k) <= WHOLE_FACTOR_RTOL * k else None


def thin_grid(
    thick: Volume | Grid,
    factor: int | None = None,
    *,
    target_spacing: float | None = None,
    axis: str | int | None = None,
) -> Grid:
    """The thin-slice grid for a thick volume: ``factor`` times more slices, or a target spacing in mm.

    Thin slices tile each thick slab: the first thin slice centre lies half a thin spacing above the lower
    edge of the first slab. For a volume made by ``degrade(vol, k, method="slab")`` with ``factor=k`` this
    is exactly the grid of ``crop_to_slabs(vol, k)``; a decimated volume's slices are no slab centres, so its
    thin slices are those of the cropped reference instead (``crop_to_slabs(vol, k).grid``, what
    :func:`~DiffusionCore.evaluate.evaluate` scores on). With a target spacing that does not divide the slice
    spacing, the thin slices are centred in the thick extent (the part of a thin spacing left over is split
    between both ends), so a scan stored in reverse order gets the same slice positions.

    Args:
        thick: the thick volume (or its grid).
        factor: integer up-sampling factor along the axis.
        target_spacing: alternatively, the wanted slice spacing in mm (smaller than the current one).
        axis: array axis; default: the thick axis detected from spacing.

    Raises:
        GeometryError: isotropic input without an explicit axis, neither or both of factor and spacing,
            or a target spacing that is not smaller than the current one.
    """
    grid = thick.grid if isinstance(thick, Volume) else thick
    if axis is None:
        ax = thick_axis(grid)
        if ax is None:
            raise no_thick_axis(grid, "Pass an axis explicitly if you really want to up-sample one.")
    else:
        ax = axis_index(axis)
    s = grid.spacing[2 - ax]
    n = grid.shape[ax]
    if (factor is None) == (target_spacing is None):
        raise GeometryError("give either a factor or a target spacing, not both or neither.")
    if factor is not None:
        if isinstance(factor, float) and not float(factor).is_integer():
            raise GeometryError(f"the factor must be a whole number; got {factor}.")
        k = int(factor)
        if k < 2 or k > MAX_FACTOR:
            raise GeometryError(f"factor {factor} is outside 2..{MAX_FACTOR}.")
        t = s / k
        n_new = n * k
    else:
        t = float(target_spacing)  # type: ignore[arg-type]
        if not np.isfinite(t) or t <= 0 or t >= s:
            raise GeometryError(
                f"target spacing {target_spacing} mm must be positive and below the current {s:.3g} mm."
            )
        if s / t > MAX_FACTOR + 1e-6:
            raise GeometryError(f"target spacing {t} mm is more than {MAX_FACTOR}x finer than the {s:.3g} mm slices: give "
                                f"a target spacing of {s / MAX_FACTOR:.3g} mm or more (or --factor {MAX_FACTOR} at most).")  # fmt: skip
        k = whole_factor(s, t)
        if k is not None:  # the slice spacing over a whole number, within the rounding of files: --factor k's grid
            t = s / k
            n_new = n * k
        else:
            n_new = int(np.floor(n * s / t + 1e-6))
    shape = list(grid.shape)
    shape[ax] = n_new
    # first thin centre: lower slab edge (-s/2) plus half a thin slice (t/2), in units of thick voxels; when the
    # thin slices do not fill the thick extent exactly (a target spacing that does not divide the slice spacing),
    # what is left over is split between both ends, so the grid is the same physical set of slices whichever
    # end of the scan its file stores first
    leftover = max(n * s - n_new * t, 0.0)
    offset_thick = (-s / 2.0 + leftover / 2.0 + t / 2.0) / s
    return Grid(
        shape=tuple(shape),  # type: ignore[arg-type]
        spacing=_scaled_spacing(grid.spacing, ax, t / s),
        origin=_shift_origin(grid, ax, offset_thick),
        direction=grid.direction,
    )


def factor_cap_note(thick: Volume | Grid, axis: int) -> str:
    """What a run without ``--factor`` or ``--target-spacing`` says when its suggested factor (slices as thin as the
    in-plane spacing) is above :data:`MAX_FACTOR`, or ``""``: the output's slices are the finest the model makes,
    thicker than the in-plane spacing."""
    grid = thick.grid if isinstance(thick, Volume) else thick
    if suggested_factor(grid, axis) <= MAX_FACTOR:
        return ""
    s = float(grid.spacing_zyx[axis])
    inplane = float(np.delete(np.asarray(grid.spacing_zyx), axis).max())
    return (
        f"the slices are {s:g} mm apart, {s / inplane:.3g} times the in-plane spacing; using the largest supported "
        f"factor {MAX_FACTOR}: slices of {s / MAX_FACTOR:.3g} mm, not the {inplane:.3g} mm of the in-plane spacing "
        f"(no model here goes finer than {MAX_FACTOR} times the slice spacing)"
    )


def plan_thin_grid(
    thick: Volume | Grid,
    *,
    factor: int | None = None,
    target_spacing: float | None = None,
    axis: str | int | None = None,
) -> tuple[Grid, int, int | None]:
    """The one decision of what a super-resolution run produces: the thin grid, its array axis, and the
    integer factor (``None`` when a target spacing is given). Without a factor or spacing, the factor is
    suggested from the spacing and clamped to :data:`MAX_FACTOR`.

    Used by the SR pipeline, the ``sr`` command and the Slicer module (which shows the factor before a run).

    Raises:
        GeometryError: isotropic input (no thick axis), both factor and spacing, an axis that is not thicker
            than the others, bad values.
    """
    grid = thick.grid if isinstance(thick, Volume) else thick
    if factor is not None and target_spacing is not None:
        raise GeometryError("give either a factor or a target spacing, not both.")
    ax = thick_axis(grid) if axis is None else axis_index(axis)
    if ax is None:
        raise no_thick_axis(grid, "Pass --axis (and --factor) if you really want to up-sample one.")
    others = [a for a in range(3) if a != ax]
    sp = grid.spacing_zyx
    if max(sp[a] for a in others) >= THICK_AXIS_MIN_RATIO * min(sp[a] for a in others):
        logger.warning("the two axes across the slices differ (%s): the model takes both for fine in-plane axes, and a "
                       "factor from the spacing follows the coarser; super-resolution of such a volume is untested",
                       ", ".join(f"{'zyx'[a]} {sp[a]:.3g} mm" for a in others))  # fmt: skip
    if factor is None and target_spacing is None:
        factor = suggested_factor(grid, ax)
        if factor < 2:
            raise GeometryError(
                f"axis {'zyx'[ax]} is not thicker than the others (spacing z, y, x = "
                f"{', '.join(f'{s:.3g}' for s in grid.spacing_zyx)} mm): give --factor or --target-spacing."
            )
        if factor > MAX_FACTOR:
            logger.warning(factor_cap_note(grid, ax))
            factor = MAX_FACTOR
        else:
            logger.info("factor %d, from the spacing: %.3g mm slices to %.3g mm, about the in-plane pixel (a factor or a "
                        "target spacing given chooses another)", factor, grid.spacing_zyx[ax], grid.spacing_zyx[ax] / factor)  # fmt: skip
    out = thin_grid(grid, factor, target_spacing=target_spacing, axis=ax)
    if factor is None:  # a target spacing of the slice spacing over a whole number is that factor
        factor = whole_factor(grid.spacing_zyx[ax], target_spacing)
    return out, ax, (int(factor) if factor is not None else None)
