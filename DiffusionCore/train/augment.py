"""3D data augmentation for training on few CT volumes, reproducible from one ``numpy.random.Generator``.

All functions take an array whose *last three* axes are spatial ``(z, y, x)`` (leading axes, e.g.
channels, are transformed identically) and a generator; the same generator state always gives the same
output. Intensities are HU unless stated otherwise (``hu_jitter`` shifts are in HU, padding defaults to air,
-1024 HU). Geometric transforms are spatially coherent: rotations use the voxel spacing when given, so a
10 degree rotation is 10 degrees in millimetres even on anisotropic voxels.

:class:`Augmenter` chains them as configured by :class:`AugmentConfig`::

    augment = Augmenter(AugmentConfig(crop_size=(32, 64, 64)))
    rng = np.random.default_rng(seed)
    patch = augment(volume.array, rng, spacing_zyx=volume.spacing_zyx)   # (32, 64, 64) float32, HU

Geometric resampling smooths a little (linear interpolation by default); for super-resolution targets
that must keep their sharpness, set ``interp_order=3`` or lower ``affine_p`` / ``elastic_p``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

AIR_HU = -1024.0


def _spatial_shape(arr: np.ndarray) -> tuple[int, int, int]:
    if arr.ndim < 3:
        raise ValueError(
            f"augmentation needs an array with 3 spatial axes (..., z, y, x), got shape {arr.shape}"
        )
    return tuple(int(s) for s in arr.shape[-3:])  # type: ignore[return-value]


def _per_channel(arr: np.ndarray, fn) -> np.ndarray:
    """Apply ``fn`` (3D array -> 3D array) to every leading-axis slice of ``arr``."""
    if arr.ndim == 3:
        return fn(arr)
    flat = arr.reshape((-1, *arr.shape[-3:]))
    out = np.stack([fn(a) for a in flat])
    return out.reshape((*arr.shape[:-3], *out.shape[-3:]))


# ---------------------------------------------------------------------------------------------- crop / flip


def random_crop_box(
    shape: Sequence[int], size: Sequence[int], rng: np.random.Generator
) -> tuple[slice, slice, slice]:
    """A random crop window of ``size`` inside a volume of ``shape`` (both ``(z, y, x)`` voxels).

    Axes where the volume is smaller than ``size`` get the whole axis (see :func:`random_crop` for padding).
    """
    box = []
    for n, s in zip(shape, size, strict=True):
        if s <= 0:
            raise ValueError(f"crop size must be positive, got {tuple(size)}")
        start = int(rng.integers(0, n - s + 1)) if n > s else 0
        box.append(slice(start, start + min(s, n)))
    return tuple(box)  # type: ignore[return-value]


def _pad_to(arr: np.ndarray, size: Sequence[int], pad_value: float) -> np.ndarray:
    shape = _spatial_shape(arr)
    if all(n >= s for n, s in zip(shape, size, strict=True)):
        return arr
    pads = [(0, 0)] * (arr.ndim - 3)
    for n, s in zip(shape, size, strict=True):
        extra = max(0, s - n)
        pads.append((extra // 2, extra - extra // 2))
    return np.pad(arr, pads, mode="constant", constant_values=pad_value)


def random_crop(
    arr: np.ndarray, size: Sequence[int], rng: np.random.Generator, pad_value: float = AIR_HU
) -> np.ndarray:
    """A random ``size`` = ``(d, h, w)`` window of ``arr`` (..., z, y, x); padded with ``pad_value`` (HU)
    and centred where the volume is smaller than the window."""
    box = random_crop_box(_spatial_shape(arr), size, rng)
    return _pad_to(arr[(..., *box)], size, pad_value)


def center_crop(arr: np.ndarray, size: Sequence[int], pad_value: float = AIR_HU) -> np.ndarray:
    """The central ``size`` window of ``arr`` (padded with ``pad_value`` where it is smaller)."""
    box = []
    for n, s in zip(_spatial_shape(arr), size, strict=True):
        start = max(0, (n - s) // 2)
        box.append(slice(start, start + min(s, n)))
    return _pad_to(arr[(..., *box)], size, pad_value)


def random_flip(
    arr: np.ndarray, rng: np.random.Generator, axes: Sequence[int] = (2,), p: float = 0.5
) -> np.ndarray:
    """Flip each spatial axis in ``axes`` (0 = z, 1 = y, 2 = x) with probability ``p``."""
    out = arr
    for axis in axes:
        if rng.random() < p:
            out = np.flip(out, axis=arr.ndim - 3 + int(axis))
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------------------------- affine


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """3x3 rotation in (z, y, x) coordinates: rotations about the z, y and x axes, applied in that order.

    Args:
        angles_deg: ``(about_z, about_y, about_x)`` in degrees. ``about_z`` turns within the axial (y, x)
            plane.
    """
    az, ay, ax = (math.radians(a) for a in angles_deg)
    # Axes are ordered (z, y, x); a rotation "about z" mixes y and x, etc.
    rz = np.array([[1, 0, 0], [0, math.cos(az), -math.sin(az)], [0, math.sin(az), math.cos(az)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rx = np.array([[math.cos(ax), -math.sin(ax), 0], [math.sin(ax), math.cos(ax), 0], [0, 0, 1]])
    return rx @ ry @ rz


def apply_affine(
    arr: np.ndarray,
    angles_deg: Sequence[float] = (0.0, 0.0, 0.0),
    scale: float = 1.0,
    *,
    spacing_zyx: Sequence[float] | None = None,
    order: int = 1,
    pad_value: float = AIR_HU,
) -> np.ndarray:
    """Rotate and zoom ``arr`` (..., z, y, x) about its centre, keeping its shape.

    Args:
        angles_deg: rotation ``(about_z, about_y, about_x)`` in degrees (physical, see ``spacing_zyx``).
        scale: zoom factor; ``> 1`` enlarges the anatomy (the output shows a smaller field of view).
        spacing_zyx: voxel size in mm (z, y, x); rotations are done in millimetres. ``None``: isotropic.
        order: spline interpolation order (0 nearest, 1 linear, 3 cubic).
        pad_value: value for voxels that come from outside the input (HU).
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    shape = _spatial_shape(arr)
    spacing = np.asarray(spacing_zyx if spacing_zyx is not None else (1.0, 1.0, 1.0), dtype=np.float64)
    rot = rotation_matrix(angles_deg)
    # Output voxel o maps to input voxel i = c + S^-1 R^T S (o - c) / scale (S = diag(spacing)).
    matrix = (np.diag(1.0 / spacing) @ rot.T @ np.diag(spacing)) / scale
    center = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    offset = center - matrix @ center
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32

    def one(a: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(
            a.astype(dtype, copy=False), matrix, offset=offset, order=order, mode="constant", cval=pad_value
        )

    return _per_channel(arr, one)


def random_affine(
    arr: np.ndarray,
    rng: np.random.Generator,
    max_rot_deg: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    *,
    spacing_zyx: Sequence[float] | None = None,
    order: int = 1,
    pad_value: float = AIR_HU,
) -> np.ndarray:
    """A random small rotation (each angle uniform in +-``max_rot_deg``) and zoom (uniform in
    ``scale_range``) about the centre; see :func:`apply_affine`."""
    angles = rng.uniform(-max_rot_deg, max_rot_deg, size=3)
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    return apply_affine(arr, angles, scale, spacing_zyx=spacing_zyx, order=order, pad_value=pad_value)


def elastic(
    arr: np.ndarray,
    rng: np.random.Generator,
    sigma: float = 6.0,
    alpha: float = 3.0,
    *,
    order: int = 1,
) -> np.ndarray:
    """Smooth random deformation of ``arr`` (..., z, y, x).

    Args:
        sigma: smoothness of the displacement field (Gaussian sigma, voxels).
        alpha: standard deviation of the displacement along each axis (voxels); displacements are clipped
            at ``3 * alpha``.
        order: spline interpolation order.
    """
    shape = _spatial_shape(arr)
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    coords = []
    for g in grids:
        # A periodic filter keeps the field statistics the same everywhere, borders included.
        field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
        std = float(field_.std())
        disp = np.clip(field_ * (alpha / std), -3.0 * alpha, 3.0 * alpha) if std > 0 else 0.0
        coords.append(g + disp)
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32

    def one(a: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(a.astype(dtype, copy=False), coords, order=order, mode="nearest")

    return _per_channel(arr, one)


def hu_jitter(
    arr: np.ndarray, rng: np.random.Generator, scale: float = 0.03, shift: float = 20.0
) -> np.ndarray:
    """Random contrast and offset: ``arr * (1 + u) + v``, ``u`` uniform in +-``scale``, ``v`` in +-``shift`` HU.

    Scaling is about 0 HU (water stays near 0), mimicking calibration differences between scanners.
    """
    a = 1.0 + float(rng.uniform(-scale, scale))
    b = float(rng.uniform(-shift, shift))
    return (arr * a + b).astype(
        arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32, copy=False
    )


# ---------------------------------------------------------------------------------------------- composition


@dataclass
class AugmentConfig:
    """Which augmentations to apply, and how strongly (one sentence per field for config files)."""

    crop_size: tuple[int, int, int] | None = field(
        default=None, metadata={"help": "Random crop (z, y, x) in voxels; null keeps the whole volume."}
    )
    flip_axes: tuple[int, ...] = field(
        default=(2,), metadata={"help": "Spatial axes that may be flipped (0 = z, 1 = y, 2 = x)."}
    )
    flip_p: float = field(default=0.5, metadata={"help": "Probability of flipping each axis in flip_axes."})
    affine_p: float = field(default=0.5, metadata={"help": "Probability of a random rotation and zoom."})
    max_rot_deg: float = field(default=10.0, metadata={"help": "Largest rotation about each axis, degrees."})
    scale_range: tuple[float, float] = field(
        default=(0.9, 1.1), metadata={"help": "Range of the random zoom factor."}
    )
    elastic_p: float = field(default=0.25, metadata={"help": "Probability of a smooth elastic deformation."})
    elastic_sigma: float = field(default=6.0, metadata={"help": "Smoothness of the elastic field, voxels."})
    elastic_alpha: float = field(
        default=1.5, metadata={"help": "Standard deviation of the elastic displacement, voxels."}
    )
    hu_p: float = field(default=0.5, metadata={"help": "Probability of a random HU contrast/offset change."})
    hu_scale: float = field(default=0.03, metadata={"help": "Largest relative contrast change (0.03 = 3%)."})
    hu_shift: float = field(default=20.0, metadata={"help": "Largest HU offset."})
    interp_order: int = field(
        default=1, metadata={"help": "Spline order for rotation/zoom/elastic resampling (1 linear, 3 cubic)."}
    )
    pad_value: float = field(default=AIR_HU, metadata={"help": "Value for voxels outside the volume (HU)."})

    def __post_init__(self) -> None:
        for name in ("flip_p", "affine_p", "elastic_p", "hu_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if self.crop_size is not None and any(s <= 0 for s in self.crop_size):
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ValueError(f"flip_axes must be among 0, 1, 2, got {self.flip_axes}")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")


class Augmenter:
    """Random crop, rotation/zoom, elastic deformation, flips and HU jitter, in that order.

    When a crop and a geometric transform are both enabled, a larger window is cropped first, transformed,
    and centre-cropped, so no padding from the rotation shows in the patch.

    Args:
        config: an :class:`AugmentConfig`, a dict of its fields, or ``None`` (defaults).
    """

    def __init__(self, config: AugmentConfig | dict[str, Any] | None = None) -> None:
        if config is None:
            config = AugmentConfig()
        elif isinstance(config, dict):
            from ..config import load_config

            config = load_config(config, AugmentConfig)
        self.config = config

    def _margin_size(self, size: Sequence[int]) -> tuple[int, ...]:
        c = self.config
        theta = math.radians(min(c.max_rot_deg, 45.0))
        factor = (math.cos(theta) + math.sin(theta)) / min(c.scale_range[0], 1.0)
        extra = 2 * math.ceil(3 * c.elastic_alpha) if c.elastic_p > 0 else 0
        return tuple(int(math.ceil(s * factor)) + extra + 2 for s in size)

    def __call__(
        self,
        arr: np.ndarray | torch.Tensor,
        rng: np.random.Generator,
        spacing_zyx: Sequence[float] | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Augment one volume or patch.

        Args:
            arr: ``(..., z, y, x)`` array or tensor, HU.
            rng: the generator all random choices come from.
            spacing_zyx: voxel size in mm, for physically correct rotations.

        Returns:
            The augmented ``(..., *crop_size)`` float32 array (a CPU tensor if a tensor was given).
        """
        as_tensor = isinstance(arr, torch.Tensor)
        a = arr.detach().cpu().numpy() if as_tensor else np.asarray(arr)
        a = a.astype(np.float32, copy=False)
        c = self.config
        do_affine = rng.random() < c.affine_p
        do_elastic = rng.random() < c.elastic_p
        geometric = do_affine or do_elastic
        if c.crop_size is not None:
            window = self._margin_size(c.crop_size) if geometric else c.crop_size
            a = random_crop(a, window, rng, pad_value=c.pad_value)
        if do_affine:
            a = random_affine(
                a,
                rng,
                c.max_rot_deg,
                c.scale_range,
                spacing_zyx=spacing_zyx,
                order=c.interp_order,
                pad_value=c.pad_value,
            )
        if do_elastic:
            a = elastic(a, rng, c.elastic_sigma, c.elastic_alpha, order=c.interp_order)
        if c.crop_size is not None and geometric:
            a = center_crop(a, c.crop_size, pad_value=c.pad_value)
        a = random_flip(a, rng, c.flip_axes, c.flip_p)
        if rng.random() < c.hu_p:
            a = hu_jitter(a, rng, c.hu_scale, c.hu_shift)
        a = np.ascontiguousarray(a, dtype=np.float32)
        return torch.from_numpy(a) if as_tensor else a
