"""Thick/thin plane pairs for the through-plane predictor (:mod:`DiffusionCore.sr.throughplane`).

A pair is a thin plane ``(m*k, W)`` (the target) and its thick version ``(m, W)``: each thick row is the
mean of ``k`` consecutive thin rows (the slab average, the slice profile of a thick reconstruction). The
first axis plays the thick axis, the second is always an in-plane (fine) axis, as at inference. Two
kinds of thin planes are used:

* **through-plane**: a coronal or sagittal plane of a thin-slice CT, its rows the real thin slices;
* **in-plane** (self-supervision): an axial slice, one of its fine axes resampled to a thin spacing
  ``s = S / k`` for a thick spacing ``S`` drawn at random (each new row the mean of the signal over a box
  of width ``s``: :func:`box_resample`), so that it looks like a through-plane axis. In-plane detail is
  3-7x finer than the slice spacing, so these planes teach finer through-plane detail than the thin
  slices themselves carry. The same construction on the user's own thick scan drives test-time
  adaptation (:mod:`DiffusionCore.sr.adapt`): its axial slices are the only fine-resolution data it has.

Everything here is numpy on small crops; a batch of 16 planes takes a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import ConfigError, InputError
from ..intensity import hu_to_unit

#: Voxels above this HU belong to the body (for choosing crops that are not all air).
BODY_HU = -500.0


@dataclass
class PlaneSource:
    """A CT to cut planes from.

    Attributes:
        name: for logs.
        array: HU, float32, ``(a, b, c)`` with ``a`` the slice (coarse) axis.
        spacing: ``(a, b, c)`` spacing in mm.
        a0, a1: the range along ``a`` that may be used (a training or validation region).
        thin_reference: the ``a`` axis itself is thin enough to serve as a through-plane target
            (a thin-slice training CT); False for a thick scan (adaptation: in-plane pairs only).
    """

    name: str
    array: np.ndarray
    spacing: tuple[float, float, float]
    a0: int = 0
    a1: int | None = None
    thin_reference: bool = True

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(f"{self.name}: a plane source must be a 3D volume; got shape {self.array.shape}")
        self.a1 = self.array.shape[0] if self.a1 is None else int(self.a1)
        if not 0 <= self.a0 < self.a1 <= self.array.shape[0]:
            raise InputError(f"{self.name}: empty slice range {self.a0}..{self.a1}")
        region = self.array[self.a0 : self.a1]
        body = region > BODY_HU
        if not body.any():
            raise InputError(f"{self.name}: no voxel above {BODY_HU:g} HU in the range used: is it a CT in HU?")
        _, bs, cs = np.nonzero(body[:: max(1, body.shape[0] // 16)])  # a subsample of slices is enough
        self.box = (int(bs.min()), int(bs.max()) + 1, int(cs.min()), int(cs.max()) + 1)

    @property
    def length(self) -> int:
        return int(self.a1) - int(self.a0)


def box_resample(arr: np.ndarray, start: float, ratio: float, n: int) -> np.ndarray:
    """Resample ``arr`` along axis 0 onto ``n`` boxes of width ``ratio`` (in input rows) from ``start``.

    Output row ``j`` is the exact mean of the piecewise-constant input over ``[start + j*ratio,
    start + (j+1)*ratio)``: the slice profile of a reconstruction with that thickness.

    Args:
        arr: ``(L, ...)`` input.
        start: left edge of the first box, in input rows (``>= 0``).
        ratio: box width in input rows (``> 0``).
        n: number of output rows; ``start + n*ratio <= L``.
    """
    length = arr.shape[0]
    edges = start + ratio * np.arange(n + 1, dtype=np.float64)
    if edges[0] < -1e-9 or edges[-1] > length + 1e-6:
        raise InputError(f"box_resample: boxes {edges[0]:.3f}..{edges[-1]:.3f} leave the input (0..{length})")
    edges = np.clip(edges, 0.0, float(length))
    cum = np.concatenate([np.zeros((1,) + arr.shape[1:]), np.cumsum(arr, axis=0, dtype=np.float64)])
    i = np.minimum(np.floor(edges).astype(int), length - 1)
    t = (edges - i).reshape((-1,) + (1,) * (arr.ndim - 1))
    at_edges = cum[i] + t * arr[i]
    return (np.diff(at_edges, axis=0) / ratio).astype(np.float32)


def slab_mean(thin: np.ndarray, k: int) -> np.ndarray:
    """``(m*k, ...)`` -> ``(m, ...)``: the mean of each group of ``k`` rows."""
    m = thin.shape[0] // k
    return thin[: m * k].reshape((m, k) + thin.shape[1:]).mean(axis=1, dtype=np.float64).astype(np.float32)


def _window(lo: int, hi: int, size: int, limit: int, rng: np.random.Generator) -> int:
    """A start index for ``size`` voxels that overlaps the body range ``lo..hi`` within ``0..limit``."""
    if size >= limit:
        return 0
    first = max(0, min(lo, limit - size))
    last = max(first, min(hi - size, limit - size))
    return int(rng.integers(first, last + 1))


def through_plane_pair(
    src: PlaneSource, k: int, m: int, width: int, rng: np.random.Generator
) -> np.ndarray | None:
    """A thin ``(m*k, width)`` plane whose rows are real slices (coronal or sagittal), or None if the
    source's range is shorter than ``m*k`` slices."""
    n = m * k
    if not src.thin_reference or src.length < n:
        return None
    a = int(rng.integers(src.a0, int(src.a1) - n + 1))
    b0, b1, c0, c1 = src.box
    arr = src.array
    if rng.random() < 0.5:  # coronal: fix b, the plane spans c
        b = int(rng.integers(b0, b1))
        c = _window(c0, c1, width, arr.shape[2], rng)
        plane = arr[a : a + n, b, c : c + width]
    else:  # sagittal: fix c, the plane spans b
        c = int(rng.integers(c0, c1))
        b = _window(b0, b1, width, arr.shape[1], rng)
        plane = arr[a : a + n, b : b + width, c]
    if plane.shape[1] < width:
        return None
    return np.asarray(plane, dtype=np.float32)


def in_plane_pair(
    src: PlaneSource,
    k: int,
    m: int,
    width: int,
    rng: np.random.Generator,
    thick_mm: tuple[float, float] | float,
) -> np.ndarray | None:
    """A thin ``(m*k, width)`` plane made from one slice: one fine axis resampled to ``S / k`` mm.

    Args:
        thick_mm: the thick spacing ``S`` (mm), or a range to draw it from.
    """
    n = m * k
    a = int(rng.integers(src.a0, int(src.a1)))
    sl = src.array[a]  # (b, c)
    along_b = rng.random() < 0.5
    plane = sl if along_b else sl.T  # rows: the axis that plays the thick axis
    pitch = src.spacing[1] if along_b else src.spacing[2]
    b0, b1, c0, c1 = src.box
    (r_lo, r_hi), (w_lo, w_hi) = ((b0, b1), (c0, c1)) if along_b else ((c0, c1), (b0, b1))
    big_s = float(rng.uniform(*thick_mm)) if isinstance(thick_mm, Sequence) else float(thick_mm)
    thin_mm = max(big_s / k, pitch)
    ratio = thin_mm / pitch
    if n * ratio > plane.shape[0]:
        ratio = plane.shape[0] / float(n + 1)
        if ratio < 1.0:
            return None
    span = n * ratio
    lo = max(0.0, min(float(r_lo), plane.shape[0] - span))
    hi = max(lo, min(float(r_hi) - span, plane.shape[0] - span))
    start = float(rng.uniform(lo, hi))
    w = _window(w_lo, w_hi, width, plane.shape[1], rng)
    crop = plane[:, w : w + width]
    if crop.shape[1] < width:
        return None
    first = int(np.floor(start))
    last = min(plane.shape[0], int(np.ceil(start + span)) + 1)
    return box_resample(np.asarray(crop[first:last], dtype=np.float64), start - first, ratio, n)


@dataclass
class PairSettings:
    """How batches of plane pairs are drawn.

    Attributes:
        thick_rows: ``m``, thick rows per plane (the thin plane has ``m*k``).
        width: in-plane width of a plane.
        through_plane_probability: share of pairs cut from real thin slices (when the source has them);
            the rest are in-plane pairs.
        thick_mm: range of the thick spacing ``S`` simulated by in-plane pairs (mm).
        intensity_jitter: +- relative scale of (HU + 1024), the same for the pair.
        kernel_jitter: the reconstruction kernel varies from scanner to scanner: each thin plane is smoothed
            (a Gaussian of up to this many pixels' sigma) or sharpened (unsharp masking of up to this gain,
            sigma 1 pixel) at random before its thick plane is made, so the pair stays consistent (0: off).
        input_noise_hu: the standard deviation (HU) of white noise added to the thick plane only, drawn per pair
            in ``[0, input_noise_hu]`` (or in ``[lo, hi]`` for a pair of numbers): scans noisier than the
            training CTs (lower dose, sharper kernels) give noisy thick slices whose thin estimate should still
            be the clean one (0: off).
    """

    thick_rows: int = 16
    width: int = 96
    through_plane_probability: float = 0.5
    thick_mm: tuple[float, float] = (2.0, 6.0)
    intensity_jitter: float = 0.05
    kernel_jitter: float = 0.0
    input_noise_hu: float | tuple[float, float] = 0.0

    def __post_init__(self) -> None:
        for name in ("intensity_jitter", "kernel_jitter", "input_noise_hu"):
            v = np.atleast_1d(np.asarray(getattr(self, name), dtype=np.float64))
            if not np.isfinite(v).all() or (v < 0).any() or v.size > 2 or (v.size == 2 and v[0] > v[1]):
                raise ConfigError(f"pair settings: {name} must be a finite number >= 0 (input_noise_hu also a range "
                                  f"[lo, hi]); got {getattr(self, name)}")

    @property
    def input_noise_range(self) -> tuple[float, float]:
        """``(lo, hi)`` of the thick planes' noise standard deviation in HU."""
        v = self.input_noise_hu
        return (0.0, float(v)) if np.isscalar(v) else (float(v[0]), float(v[1]))


def kernel_look(thin: np.ndarray, u: float) -> np.ndarray:
    """``thin`` (HU) smoothed by a Gaussian of sigma ``-u`` pixels (``u < 0``) or sharpened by unsharp masking of gain
    ``u`` (sigma 1 pixel, ``u > 0``): the same anatomy as another reconstruction kernel would show it."""
    if u < 0:
        return ndimage.gaussian_filter(thin, -u, mode="nearest").astype(np.float32)
    if u > 0:
        return (thin + u * (thin - ndimage.gaussian_filter(thin, 1.0, mode="nearest"))).astype(np.float32)
    return thin


def sample_pairs(
    sources: Sequence[PlaneSource],
    k: int,
    batch: int,
    settings: PairSettings,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of pairs for factor ``k``: ``(thick (B, 1, m, W), thin (B, 1, m*k, W))`` in model units.

    Sources are chosen in proportion to their size; each pair is flipped at random along both axes, its
    intensities scaled a little, and (``settings.kernel_jitter``, ``settings.input_noise_hu``) given another
    kernel's look and noise on its thick plane.

    Raises:
        InputError: no source yields a pair of this size (volumes too small for the plane).
    """
    m, width = int(settings.thick_rows), int(settings.width)
    weights = np.array([s.length * s.array.shape[1] * s.array.shape[2] for s in sources], dtype=np.float64)
    weights /= weights.sum()
    thins: list[np.ndarray] = []
    failures = 0
    while len(thins) < batch:
        src = sources[int(rng.choice(len(sources), p=weights))]
        if src.thin_reference and rng.random() < settings.through_plane_probability:
            thin = through_plane_pair(src, k, m, width, rng)
        else:
            thin = None
        if thin is None:
            thin = in_plane_pair(src, k, m, width, rng, settings.thick_mm)
        if thin is None:
            failures += 1
            if failures > 50 * batch:
                raise InputError(
                    f"no plane of {m * k}x{width} voxels fits in the training volumes (factor {k}): use smaller "
                    "planes (thick_rows, width) or larger volumes"
                )
            continue
        if rng.random() < 0.5:
            thin = thin[::-1]
        if rng.random() < 0.5:
            thin = thin[:, ::-1]
        if settings.intensity_jitter > 0:
            scale = 1.0 + float(rng.uniform(-1, 1)) * settings.intensity_jitter
            thin = (thin + 1024.0) * scale - 1024.0
        if settings.kernel_jitter > 0:
            thin = kernel_look(np.asarray(thin, dtype=np.float32), float(rng.uniform(-1, 1)) * settings.kernel_jitter)
        thins.append(np.ascontiguousarray(thin, dtype=np.float32))
    thin_hu = np.stack(thins)[:, None]  # (B, 1, n, W)
    thick_hu = slab_mean(np.moveaxis(thin_hu, 2, 0), k)
    thick_hu = np.moveaxis(thick_hu, 0, 2)
    lo, hi = settings.input_noise_range
    if hi > 0:
        sd = rng.uniform(lo, hi, size=(thick_hu.shape[0], 1, 1, 1))
        thick_hu = (thick_hu + sd * rng.standard_normal(thick_hu.shape)).astype(np.float32)
    return hu_to_unit(thick_hu), hu_to_unit(thin_hu)
