"""Differentiable digitally reconstructed radiographs (DRRs) in pure PyTorch.

Physics (stated once, used everywhere):

* HU -> linear attenuation ``mu`` (1/mm) at an effective energy, 70 keV by default, the effective energy of a
  120 kVp CT beam, so that HU measured by the CT maps linearly: ``mu = mu_water * (1 + HU / 1000)`` with
  ``mu_water = 0.0193 /mm`` (NIST XCOM, water at 70 keV), air -> 0. Above ``bone_threshold_hu`` the
  HU-to-mu slope is multiplied by ``bone_scale`` (1.0 = plain HU scaling, physically right at the CT's own
  energy; > 1 mimics a softer radiographic beam where bone attenuates relatively more).
* Beer-Lambert: ``I = I0 * exp(-L)`` with ``L`` the line integral of ``mu`` along the ray (dimensionless).
  The radiograph "attenuation style" used by the model is ``L`` scaled to [0, 1] (see
  :func:`radiograph_style`): air dark, bone bright, as radiographs are displayed.

Frame: the volume is centred at the isocentre; coordinates are millimetres along the array's index axes
``(x, y, z)`` = ``(W, H, D)`` (patient LPS for an axis-aligned CT: x to the patient's left, y posterior,
z superior). Views:

* ``pa`` (posterior-anterior): source behind the patient (+y), detector in front, rays along -y; image
  rows run superior -> inferior, columns run patient right -> left (the usual PA display).
* ``lateral`` (left lateral): source at the patient's right (-x), detector at the left, rays along +x;
  rows superior -> inferior, columns anterior -> posterior.

Projectors: :func:`project_parallel_axis` (axis-aligned parallel beam on the volume's own grid: a sum,
milliseconds), and :func:`render_drr` (parallel or cone beam, any detector, optional pose rotation) which
marches rays through the volume with trilinear sampling (``grid_sample``), chunked over detector rows so
memory stays bounded (a 256^3 volume fits in a few hundred MB), with gradients to the volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import GeometryError, InputError

#: Effective photon energy of the DRR physics (keV).
EFFECTIVE_ENERGY_KEV = 70.0
#: Linear attenuation of water at 70 keV, 1/mm (mass attenuation 0.1929 cm^2/g x 1 g/cm^3).
MU_WATER_PER_MM = 0.0193
#: Views this module renders.
VIEWS = ("pa", "lateral")


def cross_view(view: str) -> str:
    """The radiograph view at right angles to ``view`` (``pa`` <-> ``lateral``)."""
    return "lateral" if view == "pa" else "pa"


@dataclass(frozen=True)
class Attenuation:
    """HU -> linear attenuation mapping.

    Attributes:
        energy_kev: effective energy the coefficients refer to (documentation; the numbers below carry it).
        mu_water_per_mm: attenuation of water at that energy (1/mm).
        bone_threshold_hu: HU above which ``bone_scale`` multiplies the HU-to-mu slope.
        bone_scale: slope multiplier above the threshold (1.0 = linear HU scaling).
    """

    energy_kev: float = EFFECTIVE_ENERGY_KEV
    mu_water_per_mm: float = MU_WATER_PER_MM
    bone_threshold_hu: float = 200.0
    bone_scale: float = 1.0


def hu_to_mu(hu: torch.Tensor, attenuation: Attenuation | None = None) -> torch.Tensor:
    """Linear attenuation (1/mm) from Hounsfield units, differentiable.

    Args:
        hu: any shape, HU (air -1000, water 0).
        attenuation: the mapping; default 70 keV, plain HU scaling.

    Returns:
        Tensor of the same shape, 1/mm, >= 0 (air and below map to 0).
    """
    a = attenuation or Attenuation()
    rel = hu / 1000.0
    if a.bone_scale != 1.0:
        thr = a.bone_threshold_hu / 1000.0
        rel = torch.where(rel > thr, thr + a.bone_scale * (rel - thr), rel)
    return a.mu_water_per_mm * torch.clamp(1.0 + rel, min=0.0)


def beer_lambert(line_integral: torch.Tensor, i0: float = 1.0) -> torch.Tensor:
    """Transmitted intensity ``I0 * exp(-L)`` for line integrals ``L`` (dimensionless)."""
    return i0 * torch.exp(-line_integral)


def radiograph_style(
    line_integral: torch.Tensor, percentile: float = 99.5, eps: float = 1e-6
) -> torch.Tensor:
    """Line integrals scaled per image to the [0, 1] attenuation style of :class:`Radiograph`.

    ``L / quantile(L, percentile)`` clipped to [0, 1], per image, so air is 0 and the densest path ~1; the
    same normalisation real radiographs get after log-windowing (see ``radiograph.match_drr_style``).

    Args:
        line_integral: (B, 1, H, W) or (H, W) line integrals.
    """
    flat = line_integral.reshape(-1, line_integral.shape[-2] * line_integral.shape[-1])
    q = torch.quantile(flat.detach().float(), percentile / 100.0, dim=1).clamp_min(eps)
    shape = [flat.shape[0]] + [1] * 2
    out = line_integral.reshape(-1, *line_integral.shape[-2:]) / q.reshape(shape).to(line_integral.dtype)
    return out.clamp(0.0, 1.0).reshape(line_integral.shape)


@dataclass(frozen=True)
class DRRGeometry:
    """Projection geometry.

    Attributes:
        view: ``"pa"`` or ``"lateral"``.
        projection: ``"parallel"`` or ``"cone"``.
        detector_shape: (rows, cols) pixels.
        pixel_spacing: (row, col) mm on the detector.
        sdd: source-to-detector distance, mm (cone beam).
        sid: source-to-isocentre distance, mm (cone beam; the volume centre is the isocentre).
        rotation_deg: extra pose rotation of the source-detector pair about the volume centre, degrees,
            about the (x, y, z) axes (pose jitter for augmentation).
        translation_mm: shift of the source-detector pair, mm in (x, y, z).
        step_voxels: ray-marching step as a fraction of the smallest voxel size.
    """

    view: str = "pa"
    projection: str = "parallel"
    detector_shape: tuple[int, int] = (256, 256)
    pixel_spacing: tuple[float, float] = (1.5, 1.5)
    sdd: float = 1020.0
    sid: float = 800.0
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    step_voxels: float = 0.5
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise InputError(f"unknown view {self.view!r}: use one of {', '.join(VIEWS)}")
        if self.projection not in ("parallel", "cone"):
            raise InputError(f"unknown projection {self.projection!r}: use parallel or cone")
        if self.projection == "cone" and not (0 < self.sid < self.sdd):
            raise GeometryError(
                f"cone beam needs 0 < source-to-isocentre ({self.sid} mm) < source-to-detector ({self.sdd} mm)"
            )
        if min(self.detector_shape) < 1 or min(self.pixel_spacing) <= 0:
            raise GeometryError("detector shape and pixel spacing must be positive")

    @property
    def magnification(self) -> float:
        """Detector-plane magnification of the isocentre plane (1 for parallel beam)."""
        return self.sdd / self.sid if self.projection == "cone" else 1.0

    def with_detector_for(
        self,
        shape_zyx: tuple[int, int, int],
        spacing_zyx: tuple[float, float, float],
        detector_shape: tuple[int, int] | None = None,
    ) -> DRRGeometry:
        """The same geometry with a detector that covers the volume's projected field of view."""
        d, h, w = shape_zyx
        sz, sy, sx = spacing_zyx
        extent_rows = d * sz
        extent_cols = (w * sx) if self.view == "pa" else (h * sy)
        rows, cols = detector_shape or ((d, w) if self.view == "pa" else (d, h))
        m = self.magnification
        return replace(
            self, detector_shape=(rows, cols), pixel_spacing=(extent_rows * m / rows, extent_cols * m / cols)
        )


def _rotation_matrix(angles_deg: tuple[float, float, float]) -> torch.Tensor:
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = torch.tensor([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = torch.tensor([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return (rz @ ry @ rx).to(torch.float64)


def _view_axes(view: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ray direction, detector column axis, detector row axis) in the volume frame (x, y, z)."""
    if view == "pa":
        return (torch.tensor([0.0, -1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -1.0]))
    return (torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, -1.0]))


def detector_rays(geometry: DRRGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions for every detector pixel, volume frame, mm.

    Returns:
        origins (rows, cols, 3) and directions (rows, cols, 3), float64, (x, y, z) order. Origins lie on
        the source side well outside any volume; for the cone beam they are the source point.
    """
    g = geometry
    d, u, v = (a.to(torch.float64) for a in _view_axes(g.view))
    rot = _rotation_matrix(g.rotation_deg)
    d, u, v = rot @ d, rot @ u, rot @ v
    shift = torch.tensor(g.translation_mm, dtype=torch.float64)
    rows, cols = g.detector_shape
    sr, sc = g.pixel_spacing
    r = (torch.arange(rows, dtype=torch.float64) - (rows - 1) / 2) * sr
    c = (torch.arange(cols, dtype=torch.float64) - (cols - 1) / 2) * sc
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    offsets = cc[..., None] * u + rr[..., None] * v  # (rows, cols, 3) in the detector plane
    if g.projection == "cone":
        source = -g.sid * d + shift
        pixels = source + g.sdd * d + offsets
        dirs = pixels - source
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins = source.expand_as(dirs).clone()
    else:
        far = 1.0e4
        origins = offsets / geometry.magnification - far * d + shift
        dirs = d.expand_as(origins).clone()
    return origins, dirs


def _ray_box(
    origins: torch.Tensor, dirs: torch.Tensor, half: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays through the box [-half, half] (slab method); exit < entry: miss."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t1 = (-half - origins) * inv
    t2 = (half - origins) * inv
    tmin = torch.minimum(t1, t2).amax(dim=-1)
    tmax = torch.maximum(t1, t2).amin(dim=-1)
    return tmin.clamp_min(0.0), tmax


def _march_chunk(mu: torch.Tensor, pts_norm: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Sum of trilinear samples along rays. mu (B,1,D,H,W); pts_norm (R, S, 3) in [-1,1] (x,y,z); step (R,)."""
    b = mu.shape[0]
    grid = pts_norm[None, None].expand(b, 1, *pts_norm.shape)  # (B, 1, R, S, 3)
    samples = F.grid_sample(mu, grid.to(mu.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return samples[:, 0, 0].sum(dim=-1) * step.to(mu.dtype)  # (B, R)


def render_drr(
    mu: torch.Tensor,
    spacing_zyx: tuple[float, float, float],
    geometry: DRRGeometry,
    *,
    max_samples_per_chunk: int = 4_000_000,
) -> torch.Tensor:
    """Line integrals of attenuation through a volume, by ray marching with trilinear sampling.

    Args:
        mu: (B, 1, D, H, W) linear attenuation, 1/mm (see :func:`hu_to_mu`); gradients flow back to it.
        spacing_zyx: voxel size (z, y, x) in mm.
        geometry: detector, view, parallel or cone beam.
        max_samples_per_chunk: rays are processed in chunks of at most this many samples (memory bound);
            each chunk is recomputed in the backward pass instead of storing its sample grid.

    Returns:
        (B, 1, rows, cols) line integrals ``L`` (dimensionless); ``exp(-L)`` is the transmission.
    """
    if mu.ndim != 5 or mu.shape[1] != 1:
        raise InputError(
            f"render_drr needs a (B, 1, D, H, W) attenuation tensor; got shape {tuple(mu.shape)}"
        )
    b, _, dd, hh, ww = mu.shape
    sz, sy, sx = (float(s) for s in spacing_zyx)
    half = torch.tensor([ww * sx / 2, hh * sy / 2, dd * sz / 2], dtype=torch.float64)
    origins, dirs = detector_rays(geometry)
    rows, cols = geometry.detector_shape
    origins = origins.reshape(-1, 3)
    dirs = dirs.reshape(-1, 3)
    t0, t1 = _ray_box(origins, dirs, half)
    hit = t1 > t0
    step_mm = geometry.step_voxels * min(sx, sy, sz)
    chord_max = float((t1 - t0).clamp_min(0).max()) if bool(hit.any()) else 0.0
    n_samples = max(2, int(math.ceil(chord_max / step_mm)))
    out = torch.zeros(b, rows * cols, dtype=mu.dtype, device=mu.device)
    idx = torch.nonzero(hit).squeeze(1)
    if idx.numel() == 0:
        return out.reshape(b, 1, rows, cols)
    frac = (torch.arange(n_samples, dtype=torch.float64) + 0.5) / n_samples  # midpoint rule
    rays_per_chunk = max(1, max_samples_per_chunk // (n_samples * max(b, 1)))
    results = []
    for start in range(0, idx.numel(), rays_per_chunk):
        sel = idx[start : start + rays_per_chunk]
        a, e = t0[sel], t1[sel]
        ts = a[:, None] + frac[None] * (e - a)[:, None]  # (R, S)
        pts = origins[sel, None, :] + ts[..., None] * dirs[sel, None, :]  # (R, S, 3) mm
        pts_norm = (pts / half).to(device=mu.device, dtype=torch.float32)
        step = ((e - a) / n_samples).to(device=mu.device, dtype=torch.float32)
        if mu.requires_grad and torch.is_grad_enabled():
            results.append(checkpoint(_march_chunk, mu, pts_norm, step, use_reentrant=False))
        else:
            results.append(_march_chunk(mu, pts_norm, step))
    vals = torch.cat(results, dim=1)
    out = out.index_copy(1, idx.to(mu.device), vals)
    return out.reshape(b, 1, rows, cols)


def project_parallel_axis(
    mu: torch.Tensor, spacing_zyx: tuple[float, float, float], view: str = "pa"
) -> torch.Tensor:
    """Axis-aligned parallel-beam line integrals on the volume's own grid (a sum; fast, differentiable).

    Equal to :func:`render_drr` with a parallel beam and a detector matching the volume's grid.

    Args:
        mu: (B, 1, D, H, W) attenuation, 1/mm.
        spacing_zyx: voxel size (z, y, x) mm.
        view: ``"pa"`` -> (B, 1, D, W); ``"lateral"`` -> (B, 1, D, H); rows superior first.
    """
    if mu.ndim != 5:
        raise InputError(f"project_parallel_axis needs (B, 1, D, H, W); got shape {tuple(mu.shape)}")
    if view == "pa":
        line = mu.sum(dim=3) * spacing_zyx[1]
    elif view == "lateral":
        line = mu.sum(dim=4) * spacing_zyx[2]
    else:
        raise InputError(f"unknown view {view!r}: use one of {', '.join(VIEWS)}")
    return torch.flip(line, dims=[2])


def drr_from_hu(
    hu: torch.Tensor | np.ndarray,
    spacing_zyx: tuple[float, float, float],
    geometry: DRRGeometry | None = None,
    *,
    view: str = "pa",
    attenuation: Attenuation | None = None,
) -> torch.Tensor:
    """Convenience: HU volume(s) -> line integrals. ``geometry=None`` uses the fast axis-aligned projector.

    Args:
        hu: (D, H, W) or (B, 1, D, H, W) HU.
        spacing_zyx: voxel size (z, y, x) mm.
        geometry: projection geometry, or None for :func:`project_parallel_axis` with ``view``.

    Returns:
        (B, 1, rows, cols) line integrals (B = 1 for a single volume).
    """
    t = torch.as_tensor(np.asarray(hu, dtype=np.float32)) if isinstance(hu, np.ndarray) else hu
    if t.ndim == 3:
        t = t[None, None]
    if t.ndim != 5:
        raise InputError(f"expected a (D, H, W) or (B, 1, D, H, W) HU volume; got shape {tuple(t.shape)}")
    mu = hu_to_mu(t.float(), attenuation)
    if geometry is None:
        return project_parallel_axis(mu, spacing_zyx, view)
    return render_drr(mu, spacing_zyx, geometry)
