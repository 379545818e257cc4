"""Overlapping patches over a whole volume, smooth blending, and the memory budget that sizes them.

A super-resolution model sees one patch ``(D, H, W)`` at a time. :func:`plan_tiles` lays a grid of
patches over the volume with (at least) the requested overlap; each tile carries a blending weight that
ramps smoothly (a raised cosine, ``sin^2``) across the overlap with its neighbours and equals 1 where the
tile is alone. The weights are separable and normalised per axis, so the weights of all tiles sum to one
at every voxel: blending the tiles of a per-voxel function reproduces the untiled result (to float32
rounding), and a model's tile seams fade out instead of showing as steps.

Sizes:

* patch sizes are rounded *down* to multiples of the model's latent down-sampling (at least one
  multiple, at least the model's ``min_patch``);
* a patch larger than the volume *shrinks to the volume* (rounded up to the next multiple);
* where the volume is still smaller than the patch (a dimension that is not a multiple, or below
  ``min_patch``) the volume is *padded at its end* by reflection (edge replication for a single slice)
  and the result cropped back: the output always has exactly the input's shape.

Memory: :func:`available_memory` reads the free memory (``/proc/meminfo`` ``MemAvailable`` and the cgroup
limit on the host, ``torch.cuda.mem_get_info`` on a GPU); :func:`choose_plan` halves the largest patch
dimension until the estimate fits and raises :class:`~DiffusionCore.errors.ResourceError` with the figures
when even the smallest patch does not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ResourceError
from .files import (  # noqa: F401  (re-exported: the memory helpers live in files.py, which needs no torch)
    MEMORY_LIMIT_ENV,
    format_bytes,
    host_available_memory,
    memory_limit_from_env,
    parse_memory_size,
)

logger = logging.getLogger(__name__)

Shape3 = tuple[int, int, int]

#: Seed defaults for the thin grid ``(D, H, W)``: D runs along the super-resolved (through-plane) axis.
DEFAULT_PATCH_SIZE: Shape3 = (32, 256, 256)
DEFAULT_OVERLAP: Shape3 = (8, 64, 64)
#: Fraction of the free memory a run may plan to use (the rest is head room for the allocator, the OS,
#: and estimates that are a little low).
MEMORY_SAFETY_FRACTION = 0.8


def _triple(values: int | Sequence[int], name: str) -> Shape3:
    if isinstance(values, int | np.integer):
        values = (int(values),) * 3
    vals = tuple(int(v) for v in values)
    if len(vals) != 3:
        raise ValueError(f"{name} needs three values (D, H, W); got {values!r}")
    return vals  # type: ignore[return-value]


def _round_down(n: int, m: int) -> int:
    return max(m, (n // m) * m)


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def fit_patch_size(
    volume_shape: Sequence[int],
    patch_size: Sequence[int],
    multiple: Sequence[int] = (1, 1, 1),
    min_patch: Sequence[int] = (1, 1, 1),
) -> Shape3:
    """The patch actually used: rounded down to ``multiple``, at least ``min_patch``, at most the volume.

    Args:
        volume_shape: ``(D, H, W)`` of the volume to tile.
        patch_size: requested ``(D, H, W)``.
        multiple: the model's latent down-sampling ``(fz, fy, fx)``; patch sizes must be multiples.
        min_patch: the smallest patch the model accepts.

    Returns:
        ``(D, H, W)``: a multiple of ``multiple``; when the volume is smaller than the request, the volume
        size rounded up to the next multiple (the volume is then padded to it).
    """
    out = []
    for n, p, m, lo in zip(volume_shape, patch_size, multiple, min_patch):
        if p < 1:
            raise ValueError(f"patch sizes must be positive; got {tuple(patch_size)}")
        size = _round_down(int(p), int(m))
        size = min(size, _round_up(int(n), int(m)))  # a patch never exceeds the (rounded-up) volume
        size = max(size, _round_up(int(lo), int(m)))
        out.append(size)
    return tuple(out)  # type: ignore[return-value]


def tile_starts(length: int, patch: int, overlap: int, align: int = 1) -> list[int]:
    """Tile starts covering ``[0, length)`` with at least ``overlap`` between neighbours, as evenly as possible.

    Args:
        length: the (padded) axis length.
        patch: tile length.
        overlap: least overlap between neighbouring tiles.
        align: starts on multiples of this (``length`` and ``patch`` must be multiples of it): the tokens or
            attention windows of a transformer, so that a patch computes what the whole grid computes.
    """
    if length <= patch:
        return [0]
    if align == 1:
        stride = max(1, patch - overlap)
        n = math.ceil((length - patch) / stride) + 1
        starts = np.round(np.linspace(0, length - patch, n)).astype(int)
        return sorted(set(int(s) for s in starts))
    units = (length - patch) // align
    max_step = max(1, (patch - overlap) // align)
    gaps = -(-units // max_step)
    base, extra = divmod(units, gaps)
    out = [0]
    for i in range(gaps):
        out.append(out[-1] + (base + (1 if i < extra else 0)) * align)
    return out


def _sin2_ramp(n: int) -> np.ndarray:
    """``n`` values rising smoothly from near 0 to near 1 (raised cosine, sampled at voxel centres)."""
    i = np.arange(n, dtype=np.float64)
    return np.sin(0.5 * np.pi * (i + 0.5) / n) ** 2


def blend_weights_1d(starts: Sequence[int], patch: int, length: int) -> list[np.ndarray]:
    """Per-tile 1D weights along one axis that sum to one at every position of ``[0, length)``.

    Each tile's raw weight is 1, ramping down over the part it shares with the previous and the next tile
    (``sin^2`` ramps, never exactly 0); the raw weights are then divided by their sum at each position.

    Args:
        starts: tile start indices (sorted), each tile ``patch`` long, together covering ``[0, length)``.
        patch: tile length.
        length: the (padded) axis length.

    Returns:
        One float64 array of length ``patch`` per tile.
    """
    raw = []
    for a, s in enumerate(starts):
        w = np.ones(patch, dtype=np.float64)
        if a > 0:
            left = min(patch, starts[a - 1] + patch - s)
            if left > 0:
                w[:left] *= _sin2_ramp(left)
        if a + 1 < len(starts):
            right = min(patch, s + patch - starts[a + 1])
            if right > 0:
                w[patch - right :] *= _sin2_ramp(right)[::-1]
        raw.append(w)
    total = np.zeros(length, dtype=np.float64)
    for s, w in zip(starts, raw):
        total[s : s + patch] += w
    if np.any(total <= 0):
        raise ValueError("the tiles do not cover the whole axis")
    return [w / total[s : s + patch] for s, w in zip(starts, raw)]


@dataclass(frozen=True)
class Tile:
    """One patch of a :class:`TilePlan`.

    Attributes:
        index: position in the plan's tile order.
        slices: where the patch lies in the *padded* volume, ``(z, y, x)`` slices.
        factors: the separable blending weight: three float32 1D arrays (lengths ``D``, ``H``, ``W``).
    """

    index: int
    slices: tuple[slice, slice, slice]
    factors: tuple[np.ndarray, np.ndarray, np.ndarray]

    @property
    def weight(self) -> np.ndarray:
        """The float32 blending weight of shape ``(D, H, W)`` (the outer product of :attr:`factors`)."""
        return separable_weight(*self.factors)


def separable_weight(wz, wy, wx):
    """The 3D weight ``wz ⊗ wy ⊗ wx`` of shape ``(D, H, W)`` from three 1D numpy arrays or tensors."""
    return wz[:, None, None] * wy[None, :, None] * wx[None, None, :]


@dataclass(frozen=True)
class TilePlan:
    """A grid of overlapping patches over a ``(D, H, W)`` volume.

    Attributes:
        volume_shape: the volume's shape.
        padded_shape: the shape after end padding (each axis at least the patch).
        patch_size: tile shape ``(D, H, W)``.
        overlap: the requested overlap (the actual overlap between neighbours is at least this, except
            where one tile covers an axis).
        starts: tile start indices per axis.
    """

    volume_shape: Shape3
    padded_shape: Shape3
    patch_size: Shape3
    overlap: Shape3
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    _weights: tuple[list[np.ndarray], ...] = field(repr=False, compare=False, default=())

    @property
    def grid_counts(self) -> Shape3:
        return tuple(len(s) for s in self.starts)  # type: ignore[return-value]

    @property
    def n_tiles(self) -> int:
        return int(np.prod(self.grid_counts))

    def tiles(self) -> Iterator[Tile]:
        """The tiles in z-major order, each with its (separable, normalised) blending weight."""
        index = 0
        pz, py, px = self.patch_size
        for a, sz in enumerate(self.starts[0]):
            for b, sy in enumerate(self.starts[1]):
                for c, sx in enumerate(self.starts[2]):
                    slices = (slice(sz, sz + pz), slice(sy, sy + py), slice(sx, sx + px))
                    factors = (self._weights[0][a], self._weights[1][b], self._weights[2][c])
                    yield Tile(index, slices, factors)
                    index += 1

    def pad(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` (shape ``volume_shape``) padded at the end of each axis to ``padded_shape``.

        Reflection (without repeating the edge voxel) where the axis has two or more voxels, edge
        replication for a single voxel.
        """
        if tuple(arr.shape) != self.volume_shape:
            raise ValueError(f"array shape {arr.shape} differs from the plan's {self.volume_shape}")
        out = arr
        for ax, (n, target) in enumerate(zip(self.volume_shape, self.padded_shape)):
            if target > n:
                widths = [(0, 0)] * 3
                widths[ax] = (0, target - n)
                out = np.pad(out, widths, mode="reflect" if n > 1 else "edge")
        return np.ascontiguousarray(out)

    def crop(self, arr: np.ndarray) -> np.ndarray:
        """The ``volume_shape`` corner of a padded array (a view)."""
        d, h, w = self.volume_shape
        return arr[:d, :h, :w]


def plan_tiles(
    volume_shape: Sequence[int],
    patch_size: Sequence[int] | int = DEFAULT_PATCH_SIZE,
    overlap: Sequence[int] | int = DEFAULT_OVERLAP,
    *,
    multiple: Sequence[int] = (1, 1, 1),
    min_patch: Sequence[int] = (1, 1, 1),
) -> TilePlan:
    """Lay overlapping patches over a ``(D, H, W)`` volume.

    Args:
        volume_shape: ``(D, H, W)``.
        patch_size: requested patch; adjusted by :func:`fit_patch_size`.
        overlap: requested overlap per axis in voxels; clamped to half the patch.
        multiple: the model's latent down-sampling ``(fz, fy, fx)``.
        min_patch: the smallest patch the model accepts.

    Returns:
        The plan; tiles are spread evenly, so neighbours overlap by at least ``overlap``.
    """
    shape = _triple(volume_shape, "volume_shape")
    if min(shape) < 1:
        raise ValueError(f"cannot tile an empty volume of shape {shape}")
    patch = fit_patch_size(shape, _triple(patch_size, "patch_size"), multiple, min_patch)
    ov_req = _triple(overlap, "overlap")
    if min(ov_req) < 0:
        raise ValueError(f"overlap must not be negative; got {ov_req}")
    ov = tuple(min(o, p // 2) for o, p in zip(ov_req, patch))
    padded = tuple(max(n, p) for n, p in zip(shape, patch))
    starts = tuple(tuple(tile_starts(n, p, o)) for n, p, o in zip(padded, patch, ov))
    weights = tuple(
        [w.astype(np.float32) for w in blend_weights_1d(s, p, n)] for s, p, n in zip(starts, patch, padded)
    )
    return TilePlan(shape, padded, patch, ov, starts, weights)  # type: ignore[arg-type]


def apply_tiled(arr: np.ndarray, plan: TilePlan, fn: Callable[[np.ndarray, Tile], np.ndarray]) -> np.ndarray:
    """Run ``fn`` on every tile of ``arr`` and blend the results (float32, shape of ``arr``).

    Args:
        arr: ``(D, H, W)`` array of shape ``plan.volume_shape``.
        plan: the tiling.
        fn: maps a patch ``(D, H, W)`` (and its :class:`Tile`) to an array of the same shape.
    """
    padded = plan.pad(np.asarray(arr, dtype=np.float32))
    out = np.zeros(plan.padded_shape, dtype=np.float32)
    for tile in plan.tiles():
        pred = fn(padded[tile.slices], tile)
        out[tile.slices] += pred * tile.weight
    return np.ascontiguousarray(plan.crop(out))


# -- memory ------------------------------------------------------------------------------------------
def device_available_memory(device) -> int:
    """Free bytes on ``device``: on CUDA what the driver reports free (``torch.cuda.mem_get_info``) plus what
    PyTorch's caching allocator holds unused (reserved by an earlier run in this process, e.g. the previous
    volume of a batch, and reusable); the host's memory otherwise."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free) + max(int(cached), 0)
    return host_available_memory()


@dataclass(frozen=True)
class MemoryBudget:
    """What a run needs and what it may use, in bytes.

    Attributes:
        host_bytes: estimated peak host memory (whole-volume arrays, plus the patch when on the CPU).
        device_bytes: estimated peak accelerator memory for one patch (0 on the CPU).
        host_limit: host bytes the run may use.
        device_limit: accelerator bytes the run may use (``None`` on the CPU).
    """

    host_bytes: int
    device_bytes: int
    host_limit: int
    device_limit: int | None

    @property
    def fits(self) -> bool:
        if self.host_bytes > self.host_limit:
            return False
        return self.device_limit is None or self.device_bytes <= self.device_limit

    def describe(self) -> str:
        text = f"host {format_bytes(self.host_bytes)} of {format_bytes(self.host_limit)} usable"
        if self.device_limit is not None:
            text += f", GPU {format_bytes(self.device_bytes)} of {format_bytes(self.device_limit)} usable"
        return text

    def as_dict(self) -> dict:
        return {
            "host_estimate_bytes": int(self.host_bytes),
            "host_limit_bytes": int(self.host_limit),
            "device_estimate_bytes": int(self.device_bytes),
            "device_limit_bytes": None if self.device_limit is None else int(self.device_limit),
        }


def _shrink(patch: Shape3, multiple: Sequence[int], floor: Shape3) -> Shape3 | None:
    """Halve the largest dimension that can still shrink (rounded to ``multiple``); None at the floor."""
    order = sorted(range(3), key=lambda i: -patch[i] / max(1, multiple[i]))
    for ax in order:
        if patch[ax] > floor[ax]:
            new = list(patch)
            new[ax] = max(floor[ax], _round_down(patch[ax] // 2, multiple[ax]))
            return tuple(new)  # type: ignore[return-value]
    return None


def choose_plan(
    volume_shape: Sequence[int],
    patch_size: Sequence[int] | int,
    overlap: Sequence[int] | int,
    *,
    multiple: Sequence[int],
    min_patch: Sequence[int],
    patch_bytes: Callable[[Shape3], int],
    host_fixed_bytes: int,
    on_device: bool,
    host_limit: int,
    device_limit: int | None = None,
) -> tuple[TilePlan, MemoryBudget, list[Shape3]]:
    """The largest tiling (from the request down) whose memory estimate fits.

    Args:
        volume_shape: ``(D, H, W)`` of the thin-grid volume.
        patch_size, overlap: the request (see :func:`plan_tiles`).
        multiple, min_patch: the model's constraints.
        patch_bytes: estimated peak bytes to process one patch of a given shape (model activations).
        host_fixed_bytes: host bytes for whole-volume arrays (independent of the tiling).
        on_device: the patch runs on an accelerator (its memory counts against ``device_limit``).
        host_limit: usable host bytes.
        device_limit: usable accelerator bytes (``None`` on the CPU).

    Returns:
        ``(plan, budget, tried)``: ``tried`` lists the patch shapes that did not fit, in order.

    Raises:
        ResourceError: even the smallest patch does not fit; the message gives the estimate.
    """
    shape = _triple(volume_shape, "volume_shape")
    ov_req = _triple(overlap, "overlap")
    patch = fit_patch_size(shape, _triple(patch_size, "patch_size"), multiple, min_patch)
    floor = fit_patch_size(shape, min_patch, multiple, min_patch)
    tried: list[Shape3] = []
    while True:
        est = int(patch_bytes(patch))
        budget = MemoryBudget(
            host_bytes=int(host_fixed_bytes) + (0 if on_device else est),
            device_bytes=est if on_device else 0,
            host_limit=int(host_limit),
            device_limit=None if not on_device else int(device_limit if device_limit is not None else 1 << 62),
        )
        if budget.fits:
            if tried:
                logger.info(
                    "memory: patch %s does not fit; using %s (%s)", tried[0], patch, budget.describe()
                )
            ov = tuple(min(o, p // 2) for o, p in zip(ov_req, patch))
            return plan_tiles(shape, patch, ov, multiple=multiple, min_patch=min_patch), budget, tried
        tried.append(patch)
        if host_fixed_bytes > host_limit:
            break  # whole-volume arrays alone do not fit: smaller tiles cannot help
        smaller = _shrink(patch, multiple, floor)
        if smaller is None:
            break
        patch = smaller
    raise ResourceError(
        f"not enough memory for a volume of {shape[0]}x{shape[1]}x{shape[2]} voxels: the estimate with the "
        f"smallest patch {patch[0]}x{patch[1]}x{patch[2]} is {budget.describe()}. Free memory, use a "
        "smaller volume (crop it) or fewer samples, or run on a machine with more memory."
    )
