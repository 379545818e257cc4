"""Training data for the SR models: volumes in model units, held-out regions, thick/thin patch pairs.

A training pair is made from one thin-slice patch: the thick acquisition is simulated along the patch's
first axis (slab average of ``k`` slices, or decimation), then cubic-B-spline-interpolated back onto the
thin grid exactly as at inference (:func:`DiffusionCore.interpolation.interpolate_1d`, the same
thin-grid convention as :func:`DiffusionCore.degrade.thin_grid`). With some probability an in-plane axis
plays the thick axis: in-plane detail (0.7 mm) is sharper than the slice spacing, so the model also
learns to restore finer through-plane detail than the thin slices themselves carry (self-supervision).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..intensity import hu_to_unit
from ..interpolation import interpolate_1d

logger = logging.getLogger(__name__)


@dataclass
class VolumeRegion:
    """A volume (model units, ``(z, y, x)``) and the z-range of it that a split may use."""

    name: str
    array: np.ndarray
    z0: int
    z1: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z1 - self.z0, self.array.shape[1], self.array.shape[2])

    def view(self) -> np.ndarray:
        return self.array[self.z0 : self.z1]


def load_regions(
    train: Sequence[str | Path],
    val: Sequence[str | Path] = (),
    val_fraction: float = 0.2,
    *,
    passed_over: list[tuple[Path, str]] | None = None,
) -> tuple[list[VolumeRegion], list[VolumeRegion]]:
    """Read training and validation volumes as model units.

    Args:
        train: folders, files or list files of training volumes (see ``collect_volumes``).
        val: held-out volumes; when empty, the top ``val_fraction`` of each training volume's slices is
            held out (never sampled for training).
        passed_over: where given, gets ``(path, why)`` of each volume found but passed over
            (:func:`~DiffusionCore.inputs.readable_volumes`).

    Returns:
        ``(train_regions, val_regions)``, each named by its volume's file or folder name, with as many parent
        folders as tell it from the others (:func:`~DiffusionCore.train.checkpoint.volume_names`).

    Raises:
        InputError: no volumes found, or a volume too small to hold out a z-range.
    """
    from ..inputs import collect_volumes, readable_volumes
    from ..train.checkpoint import volume_names

    if not train:
        raise InputError("no training data given: pass --data DIR_OR_LIST (or --data-dir with --train-split)")
    train_paths = collect_volumes(list(train))
    val_paths = collect_volumes(list(val)) if val else []
    every = [*train_paths, *val_paths]
    names = dict(zip((Path(p) for p in every), volume_names(every)))

    tr, va = [], []
    for p, vol in readable_volumes(train_paths, passed_over=passed_over):
        arr = hu_to_unit(vol.array)
        n = arr.shape[0]
        if val_paths or val_fraction <= 0:
            tr.append(VolumeRegion(names[Path(p)], arr, 0, n))
        else:
            cut = int(round(n * (1.0 - val_fraction)))
            if cut < 8 or n - cut < 8:
                raise InputError(
                    f"{p} has only {n} slices: too few to hold out {val_fraction:.0%} for validation; "
                    "pass --val-data (or --val-split) with separate volumes"
                )
            tr.append(VolumeRegion(names[Path(p)], arr, 0, cut))
            va.append(VolumeRegion(names[Path(p)] + "[val]", arr, cut, n))
    for p, vol in readable_volumes(val_paths, passed_over=passed_over):
        arr = hu_to_unit(vol.array)
        va.append(VolumeRegion(names[Path(p)], arr, 0, arr.shape[0]))
    logger.info("training on %d volume(s), validating on %d region(s)", len(tr), len(va))
    return tr, va


def thin_coordinates(n_thin: int, k: int, method: str) -> np.ndarray:
    """Continuous thick-slice index of each thin slice ``i`` (``(i - c) / k``, ``c`` the slab's centre)."""
    c = (k - 1) / 2.0 if method == "slab" else float((k - 1) // 2)
    return (np.arange(n_thin, dtype=np.float64) - c) / k


def degrade_and_interpolate(thin: np.ndarray, k: int, method: str = "slab") -> np.ndarray:
    """Thick-slice simulation along axis 0 and cubic interpolation back to the thin grid.

    Args:
        thin: ``(D, H, W)`` with ``D`` a multiple of ``k`` (model units or HU).
        k: slices per slab.
        method: ``"slab"`` (mean of each slab) or ``"decimate"`` (keep slice ``(k-1)//2`` of each slab).

    Returns:
        ``(D, H, W)`` float32: what a cubic B-spline up-sampling of the thick acquisition gives.
    """
    d = thin.shape[0]
    if d % k:
        raise ValueError(f"depth {d} is not a multiple of the factor {k}")
    m = d // k
    if method == "slab":
        thick = thin.reshape(m, k, *thin.shape[1:]).mean(axis=1)
    elif method == "decimate":
        thick = thin[(k - 1) // 2 :: k][:m]
    else:
        raise InputError(f"unknown degradation {method!r}: use 'slab' or 'decimate'")
    out = interpolate_1d(thick.astype(np.float32), thin_coordinates(d, k, method), 0, "cubic")
    return out.astype(np.float32)


def _orient(arr: np.ndarray, thick_axis: int) -> np.ndarray:
    return np.moveaxis(arr, thick_axis, 0)


def sample_pair(
    region: VolumeRegion,
    patch: tuple[int, int, int],
    k: int,
    rng: np.random.Generator,
    method: str = "slab",
    thick_axis: int = 0,
    margin_slabs: int = 2,
    affine_probability: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``(thin, cond)`` patch pair, both ``(D, H, W)`` float32 model units.

    Args:
        region: where to crop.
        patch: ``(D, H, W)``; ``D`` runs along ``thick_axis`` of the volume.
        k: thick/thin factor.
        thick_axis: 0 for z (the real slice axis), 1 or 2 for in-plane self-supervision.
        margin_slabs: extra slabs simulated on each side so the interpolation has real neighbours.
        affine_probability: chance of a small random rotation/zoom of the thin crop (cubic spline, so the
            target stays sharp) before the thick slices are simulated.
    """
    vol = _orient(region.view(), thick_axis)
    D, H, W = patch
    depth = int(np.ceil(D / k) + 2 * margin_slabs) * k
    need = (depth, H, W)
    if any(n < s for n, s in zip(vol.shape, need)):
        # Small volume: fall back to no margin, then refuse.
        depth = int(np.ceil(D / k)) * k
        need = (depth, H, W)
        if any(n < s for n, s in zip(vol.shape, need)):
            raise InputError(
                f"volume {region.name} ({vol.shape} along the sampled axes) is smaller than the patch {need}; "
                "use a smaller --patch-size"
            )
    start = [int(rng.integers(0, n - s + 1)) for n, s in zip(vol.shape, need)]
    crop = vol[start[0] : start[0] + need[0], start[1] : start[1] + H, start[2] : start[2] + W]
    crop = np.ascontiguousarray(crop, dtype=np.float32)
    if affine_probability > 0 and rng.random() < affine_probability:
        from ..train.augment import random_affine

        crop = random_affine(crop, rng, max_rot_deg=5.0, scale_range=(0.95, 1.05), order=3, pad_value=-1.0)
        crop = np.clip(crop, -1.0, 1.0).astype(np.float32)
    cond = degrade_and_interpolate(crop, k, method)
    off = ((need[0] - D) // (2 * k)) * k
    return crop[off : off + D].copy(), cond[off : off + D].copy()


def augment_pair(
    thin: np.ndarray, cond: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The same random flips (all axes) and an in-plane transpose (when square) applied to both patches."""
    for ax in range(3):
        if rng.random() < 0.5:
            thin, cond = np.flip(thin, ax), np.flip(cond, ax)
    if thin.shape[1] == thin.shape[2] and rng.random() < 0.5:
        thin, cond = thin.transpose(0, 2, 1), cond.transpose(0, 2, 1)
    return np.ascontiguousarray(thin), np.ascontiguousarray(cond)


def intensity_jitter(
    thin: np.ndarray, cond: np.ndarray, rng: np.random.Generator, scale: float = 0.03, shift: float = 0.02
) -> tuple[np.ndarray, np.ndarray]:
    """The same small affine intensity change (model units) on both patches (contrast/calibration jitter)."""
    a = 1.0 + rng.uniform(-scale, scale)
    b = rng.uniform(-shift, shift)
    return (thin * a + b).astype(np.float32), (cond * a + b).astype(np.float32)


def sample_batch(
    regions: Sequence[VolumeRegion],
    batch: int,
    patch: tuple[int, int, int],
    factors: Sequence[int],
    rng: np.random.Generator,
    method: str = "slab",
    inplane_probability: float = 0.0,
    augment: bool = True,
    affine_probability: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``batch`` random pairs: ``thin, cond`` ``(B, 1, D, H, W)`` model units and their factors.

    With ``augment``: random flips, in-plane transpose, intensity jitter, and (with
    ``affine_probability``) small rotations/zooms from :mod:`DiffusionCore.train.augment`.
    """
    thins, conds, ks = [], [], []
    aff = affine_probability if augment else 0.0
    for _ in range(batch):
        region = regions[int(rng.integers(len(regions)))]
        k = int(factors[int(rng.integers(len(factors)))])
        axis = 0
        if inplane_probability > 0 and rng.random() < inplane_probability:
            axis = int(rng.integers(1, 3))
        try:
            thin, cond = sample_pair(region, patch, k, rng, method, axis, affine_probability=aff)
        except InputError:
            if axis == 0:
                raise
            thin, cond = sample_pair(region, patch, k, rng, method, 0, affine_probability=aff)
        if augment:
            thin, cond = augment_pair(thin, cond, rng)
            thin, cond = intensity_jitter(thin, cond, rng)
        thins.append(thin)
        conds.append(cond)
        ks.append(k)
    return np.stack(thins)[:, None], np.stack(conds)[:, None], ks


def validation_depth(regions: Sequence[VolumeRegion], depth: int, factors: Sequence[int], multiple: int = 1) -> int:
    """The depth (slices) of the validation patches: the training patch's, or, where a held-out region is shorter
    (the top 20% of a scan of 100 slices is 20 slices, a patch 32), the largest depth that fits every region and is a
    multiple of every factor and of ``multiple`` (what the networks need along z). Validation patches share one depth
    (they are scored as one batch).

    Raises:
        InputError: a held-out region is too short for even the smallest such depth.
    """
    step = math.lcm(int(multiple), *(int(k) for k in factors))
    shortest = min(r.shape[0] for r in regions)
    if shortest >= depth:
        return int(depth)
    fit = shortest // step * step
    if fit < max(step, 4):
        short = min(regions, key=lambda r: r.shape[0])
        raise InputError(
            f"the held-out region {short.name} has {shortest} slices, too few for a validation patch (at least "
            f"{max(step, 4)} slices: a multiple of the factors {list(factors)}); hold out more slices (val_fraction) "
            "or pass --val-data with separate volumes"
        )
    logger.info("validation patches of %d slices: the held-out regions are shorter than the training patch's %d",
                fit, depth)  # fmt: skip
    return int(fit)


def validation_set(
    regions: Sequence[VolumeRegion],
    count: int,
    patch: tuple[int, int, int],
    factors: Sequence[int],
    method: str = "slab",
    seed: int = 1234,
    multiple: int = 1,
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """A fixed list of ``count`` held-out ``(thin, cond, k)`` patches along the real slice axis, of the training
    patch's size, or shallower where the held-out regions are (:func:`validation_depth`; ``multiple``: the depth the
    networks need a multiple of)."""
    if not regions:
        return []
    patch = (validation_depth(regions, patch[0], factors, multiple), *patch[1:])
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        region = regions[i % len(regions)]
        k = int(factors[i % len(factors)])
        thin, cond = sample_pair(region, patch, k, rng, method, 0)
        out.append((thin, cond, k))
    return out
