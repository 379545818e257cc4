"""Image quality in Hounsfield units.

All metrics clip both volumes to a stated HU range first (default ``[-1024, 2048]``, data range 3072):

* :func:`psnr` over the whole volume or inside a mask;
* :func:`ssim3d`, 3D SSIM with a Gaussian window (sigma 1.5, truncated at 3.5 sigma, K1 0.01, K2 0.03,
  population covariance) averaged over voxels at least one window radius from the border; the same
  definition as ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=3072)``;
* :func:`hu_mae` inside a mask;
* :func:`body_mask`: HU > -500, largest connected component, holes filled (in 3D and slice by slice, so
  the lungs count as body);
* :func:`consistency_psnr`: a super-resolved volume degraded again the same way against its input.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .degrade import Degradation, degrade
from .volume import Volume

HU_RANGE: tuple[float, float] = (-1024.0, 2048.0)
BODY_THRESHOLD_HU = -500.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _arr(x: Volume | np.ndarray) -> np.ndarray:
    return x.array if isinstance(x, Volume) else np.asarray(x)


def _check_pair(ref: np.ndarray, test: np.ndarray) -> None:
    if ref.shape != test.shape:
        raise ValueError(f"shapes differ: reference {ref.shape}, test {test.shape}")


def clip_hu(arr: np.ndarray, hu_range: tuple[float, float] = HU_RANGE) -> np.ndarray:
    return np.clip(arr, hu_range[0], hu_range[1])


def psnr(
    ref: Volume | np.ndarray,
    test: Volume | np.ndarray,
    hu_range: tuple[float, float] = HU_RANGE,
    mask: np.ndarray | None = None,
) -> float:
    """PSNR in dB with both volumes clipped to ``hu_range`` and peak = the range's width.

    Returns ``inf`` for identical volumes.
    """
    r, t = _arr(ref), _arr(test)
    _check_pair(r, t)
    diff = clip_hu(r.astype(np.float64), hu_range) - clip_hu(t.astype(np.float64), hu_range)
    if mask is not None:
        diff = diff[mask]
        if diff.size == 0:
            raise ValueError("the mask is empty")
    mse = float(np.mean(diff * diff))
    peak = hu_range[1] - hu_range[0]
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


def hu_mae(
    ref: Volume | np.ndarray,
    test: Volume | np.ndarray,
    mask: np.ndarray | None = None,
    hu_range: tuple[float, float] = HU_RANGE,
) -> float:
    """Mean absolute HU error (both clipped to ``hu_range``), inside ``mask`` when given."""
    r, t = _arr(ref), _arr(test)
    _check_pair(r, t)
    diff = np.abs(clip_hu(r.astype(np.float64), hu_range) - clip_hu(t.astype(np.float64), hu_range))
    if mask is not None:
        diff = diff[mask]
        if diff.size == 0:
            raise ValueError("the mask is empty")
    return float(diff.mean())


def body_mask(ref: Volume | np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Boolean body mask of a CT: ``HU > threshold``, the largest 3D component, holes filled.

    Holes are filled in 3D and then in every axial slice (array axis 0), so air spaces open to the edge
    of the scan in 3D (airways, lungs reaching the top slice) still count as body.
    """
    a = _arr(ref)
    fg = a > threshold
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(a.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    mask = ndimage.binary_fill_holes(mask)
    for z in range(mask.shape[0]):
        mask[z] = ndimage.binary_fill_holes(mask[z])
    return mask


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def ssim3d(
    ref: Volume | np.ndarray,
    test: Volume | np.ndarray,
    hu_range: tuple[float, float] = HU_RANGE,
    sigma: float = SSIM_SIGMA,
    chunk: int = 48,
) -> float:
    """Mean 3D SSIM (Gaussian window) of two volumes clipped to ``hu_range``.

    The mean runs over voxels at least one window radius (5 for sigma 1.5) from every border, where the
    window lies inside the volume; the boundary extension then never matters. Work is done in chunks
    along axis 0 so memory stays bounded for full-size CT.
    """
    r, t = _arr(ref), _arr(test)
    _check_pair(r, t)
    k1 = _gaussian_kernel(sigma, SSIM_TRUNCATE)
    rad = (len(k1) - 1) // 2
    if min(r.shape) <= 2 * rad:
        raise ValueError(f"volume {r.shape} is too small for a {2 * rad + 1}-voxel SSIM window")
    data_range = hu_range[1] - hu_range[0]
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    kern = torch.from_numpy(k1)
    weights = [
        kern.view(1, 1, -1, 1, 1).repeat(5, 1, 1, 1, 1),
        kern.view(1, 1, 1, -1, 1).repeat(5, 1, 1, 1, 1),
        kern.view(1, 1, 1, 1, -1).repeat(5, 1, 1, 1, 1),
    ]
    total, count = 0.0, 0
    n0 = r.shape[0]
    for start in range(rad, n0 - rad, chunk):
        stop = min(start + chunk, n0 - rad)
        x = torch.from_numpy(clip_hu(r[start - rad : stop + rad].astype(np.float64), hu_range))
        y = torch.from_numpy(clip_hu(t[start - rad : stop + rad].astype(np.float64), hu_range))
        stack = torch.stack([x, y, x * x, y * y, x * y])[None]
        for w in weights:
            stack = F.conv3d(stack, w, groups=5)
        ux, uy, uxx, uyy, uxy = stack[0]
        vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        total += float(s.sum())
        count += s.numel()
    return total / count


def consistency_psnr(
    output: Volume,
    thick_input: Volume,
    factor: int,
    axis: str | int = "z",
    degradation: Degradation = "slab",
    hu_range: tuple[float, float] = HU_RANGE,
) -> float:
    """PSNR between ``thick_input`` and ``output`` degraded again the same way.

    A correct super-resolution reproduces its own input: this is high (40+ dB) for a consistent result.
    """
    again = degrade(output, factor, axis, degradation)
    if again.shape != thick_input.shape:
        raise ValueError(
            f"the output degraded again has shape {again.shape}, the input {thick_input.shape}: "
            "the output is not on the input's thin grid"
        )
    return psnr(thick_input, again, hu_range)


def quality_report(
    reference: Volume,
    output: Volume,
    *,
    thick_input: Volume | None = None,
    factor: int | None = None,
    axis: str | int = "z",
    degradation: Degradation = "slab",
    mask: np.ndarray | None = None,
    hu_range: tuple[float, float] = HU_RANGE,
) -> dict[str, float]:
    """All SR metrics at once: psnr, psnr_body, ssim, hu_mae_body and (with an input) consistency_psnr."""
    if mask is None:
        mask = body_mask(reference)
    out = {
        "psnr": psnr(reference, output, hu_range),
        "psnr_body": psnr(reference, output, hu_range, mask),
        "ssim": ssim3d(reference, output, hu_range),
        "hu_mae_body": hu_mae(reference, output, mask, hu_range),
    }
    if thick_input is not None and factor is not None:
        out["consistency_psnr"] = consistency_psnr(output, thick_input, factor, axis, degradation, hu_range)
    return out
