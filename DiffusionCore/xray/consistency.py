"""Re-projection (DRR) consistency: make a generated CT's radiograph agree with the input radiograph.

A generated volume is one plausible CT; the input radiograph says exactly how much attenuation lies along
each ray. In the training geometry (parallel beam along the view axis, one detector pixel per voxel column)
the line integral of a ray is the sum of the attenuation of its voxel column, so scaling a column's
attenuation by ``target / current`` makes that ray agree exactly while keeping where, along the ray, the
model put the tissue. This is the radiograph's counterpart of super-resolution's data-consistency step:
the network decides the depth distribution, the measurement decides the totals.

The input is in the attenuation style of :func:`drr.radiograph_style` (line integrals divided by their
99.5th percentile and clipped to [0, 1]), so its absolute scale is unknown (a uniformly denser body gives
the same radiograph); the scale is the median, over the rays, of the volume's line integral over the
radiograph's, so the step keeps the model's overall density and corrects the rays that disagree with it.
Rays clipped in the radiograph (its densest 0.5%) carry only a lower bound: they take the median factor of
the measured rays of their detector row. Rays the radiograph shows as air cross no body: whatever the volume
holds on them is scaled down to what the radiograph allows (outline artefacts go). Elsewhere the per-ray
factor is bounded, so a radiograph that disagrees with the model (another view, a collimated edge) cannot
blow the volume up; rays where the volume holds almost no attenuation are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..intensity import hu_to_unit, unit_to_hu
from .drr import MU_WATER_PER_MM, hu_to_mu, project_parallel_axis


@dataclass(frozen=True)
class ConsistencySettings:
    """Bounds of the per-ray correction.

    Attributes:
        max_ratio: largest factor by which a ray's attenuation is scaled up (its inverse: down).
        min_signal: input rays at or below this (attenuation style) are air: the volume is emptied there.
        max_signal: input rays at or above this are clipped in the radiograph and left alone.
    """

    max_ratio: float = 4.0
    min_signal: float = 0.02
    max_signal: float = 0.995


def _view_dim(view: str) -> int:
    return 3 if view == "pa" else 4


def drr_consistency(
    vol_unit: torch.Tensor,
    xray: torch.Tensor,
    fov_mm: float,
    view: str = "pa",
    settings: ConsistencySettings | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scale each ray's attenuation so the volume's parallel-beam DRR matches the input radiograph.

    Args:
        vol_unit: (B, 1, R, R, R) generated volume, model units (not modified).
        xray: (B, 1, H, W) input radiograph, attenuation style [0, 1], rows superior first.
        fov_mm: side of the cube, mm.
        view: ``pa`` or ``lateral`` (the training view).
        settings: correction bounds.

    Returns:
        (corrected volume (B, 1, R, R, R) in model units, ``{"rays_corrected": fraction of detector pixels
        changed, "rays_emptied": fraction of detector pixels whose rays were emptied (the radiograph shows air
        there), "mean_abs_log_ratio": mean |log factor| over the changed rays that were scaled, not emptied}``).
    """
    s = settings or ConsistencySettings()
    r = vol_unit.shape[-1]
    sp = fov_mm / r
    hu = unit_to_hu(vol_unit.float())
    mu = hu_to_mu(hu)
    line = project_parallel_axis(mu, (sp, sp, sp), view)  # (B, 1, R, R), rows superior first
    ref = F.interpolate(xray.float(), size=line.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    top = torch.quantile(line.flatten(1), 0.995, dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    usable = (ref > s.min_signal) & (ref < s.max_signal) & (line > 1e-3 * top)
    # the radiograph's absolute scale: the median over the usable rays of volume / radiograph, so the
    # correction keeps the model's overall density and moves only what disagrees with the others
    scale = torch.stack([
        (line[i][usable[i]] / ref[i][usable[i]]).median() if bool(usable[i].any()) else top[i].reshape(())
        for i in range(line.shape[0])
    ]).view(-1, 1, 1, 1)  # fmt: skip
    ratio = torch.where(usable, ref * scale / line.clamp_min(1e-12), torch.ones_like(line))
    ratio = ratio.clamp(1.0 / s.max_ratio, s.max_ratio)
    # rays clipped in the radiograph (the densest) say only "at least this much": they take the median factor
    # of the measured rays of their detector row, which cross the same slice of the body
    clipped = (ref >= s.max_signal) & (line > 1e-3 * top)
    row = torch.nanmedian(torch.where(usable, ratio, torch.full_like(ratio, float("nan"))), dim=-1, keepdim=True)
    row_known = ~torch.isnan(row.values)
    ratio = torch.where(clipped & row_known, row.values.nan_to_num(1.0).expand_as(ratio), ratio)
    # rays the radiograph shows as (nearly) air cross no body: what the volume holds there is removed
    air = (ref <= s.min_signal) & (line > 1e-3 * top)
    ratio = torch.where(air, (ref * scale / line.clamp_min(1e-12)).clamp(0.0, 1.0), ratio)
    usable = usable | (clipped & row_known) | air
    # back to the volume's (z, x) or (z, y) layout: undo the projector's superior-first flip, then broadcast
    # along the ray axis
    factor = torch.flip(ratio, dims=[2]).unsqueeze(_view_dim(view))
    mu_new = mu * factor
    hu_new = torch.where(mu > 0, 1000.0 * (mu_new / MU_WATER_PER_MM - 1.0), hu)
    changed = usable & ((ratio - 1).abs() > 1e-6)
    # rays emptied outright (factor 0: the radiograph shows air there) have no finite log factor: they are
    # counted on their own, and the mean |log factor| is over the rays that were scaled
    emptied = changed & (ratio <= 0)
    scaled = changed & ~emptied
    stats = {
        "rays_corrected": float(changed.float().mean()),
        "rays_emptied": float(emptied.float().mean()),
        "mean_abs_log_ratio": float(ratio[scaled].log().abs().mean()) if bool(scaled.any()) else 0.0,
    }
    return hu_to_unit(hu_new).to(vol_unit.dtype), stats
