"""Training losses of one cascade stage: v-loss, DRR re-projection loss (and optionally one in the view at right
angles to the input's), depth-prior loss, gradient loss, and optionally an L1 loss over the target's bone.

All volumes are in model units (HU window of ``DiffusionCore.intensity``); the DRR loss converts the
predicted clean volume back to HU, then to attenuation at 70 keV (``drr.hu_to_mu``), projects it with the
training geometry (axis-aligned parallel beam) and compares normalised line integrals with the target's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..intensity import hu_to_unit, unit_to_hu
from .cascade import StageModel
from .config import XrayLossWeights
from .data import gaussian_blur
from .drr import cross_view, hu_to_mu, project_parallel_axis
from .vdiffusion import alpha_sigma, q_sample

#: Floor on sigma in the diffusion-loss weight 1 / sigma^2 (v) or alpha^2 / sigma^2 (eps): bounds the weight at
#: small t, where the implied v / eps error is irreducible per-voxel noise that does not affect x0.
SIGMA_FLOOR = 0.3

#: HU above which a training CT's voxel counts as bone for the bone loss (cortical and trabecular bone of spine and
#: ribs; contrast-filled vessels above it count too).
BONE_HU = 200.0


def gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between finite differences along z, y, x of (B, 1, D, H, W) volumes."""
    loss = pred.new_zeros(())
    for dim in (2, 3, 4):
        loss = loss + (torch.diff(pred, dim=dim) - torch.diff(target, dim=dim)).abs().mean()
    return loss / 3


def line_integrals(vol_unit: torch.Tensor, spacing_mm: float, view: str) -> torch.Tensor:
    """Parallel-beam line integrals (B, 1, D, W|H) of a volume in model units with isotropic spacing."""
    return project_parallel_axis(hu_to_mu(unit_to_hu(vol_unit)), (spacing_mm,) * 3, view)


def drr_l1(pred_unit: torch.Tensor, target_unit: torch.Tensor, spacing_mm: float, view: str) -> torch.Tensor:
    """L1 between the DRRs of prediction and target, scaled by the target's 99th percentile per sample."""
    lp = line_integrals(pred_unit, spacing_mm, view)
    with torch.no_grad():
        lt = line_integrals(target_unit, spacing_mm, view)
        scale = torch.quantile(lt.flatten(1), 0.99, dim=1).clamp_min(1e-3).view(-1, 1, 1, 1)
    return ((lp - lt) / scale).abs().mean()


def bone_l1(pred: torch.Tensor, target: torch.Tensor, bone_hu: float = BONE_HU) -> torch.Tensor:
    """Mean absolute error (model units) over the voxels where ``target`` (B, 1, D, H, W) is above ``bone_hu``;
    0 where a cube (or patch) holds no bone."""
    mask = (target > float(hu_to_unit(bone_hu))).to(pred.dtype)
    return ((pred - target).abs() * mask).sum() / mask.sum().clamp(min=1.0)


def _ssim2d(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # data range 2 (model units)
    # the local means of a, b, a^2, b^2 and a*b in one blur over their channels
    ma, mb, maa, mbb, mab = gaussian_blur(torch.cat([a, b, a * a, b * b, a * b], dim=1), sigma).split(a.shape[1], 1)
    va, vb, cov = maa - ma**2, mbb - mb**2, mab - ma * mb
    return (((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean()


def structural_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM on the three central orthogonal slices (a perceptual-style loss needing no network)."""
    d, h, w = pred.shape[-3:]
    pairs = [
        (pred[:, :, d // 2], target[:, :, d // 2]),
        (pred[:, :, :, h // 2], target[:, :, :, h // 2]),
        (pred[..., w // 2], target[..., w // 2]),
    ]
    return sum(1 - _ssim2d(p, t) for p, t in pairs) / 3


def diffusion_loss(
    x0_pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, v_parameterization: bool
) -> torch.Tensor:
    """MSE of the v (or eps) implied by an x0 prediction at the same ``x_t``.

    With ``x_t`` fixed, ``v_hat - v = -(x0_hat - x0) / sigma`` and ``eps_hat - eps = -alpha (x0_hat - x0) /
    sigma``, so the v-MSE is the x0-MSE weighted by ``1 / sigma^2`` (= SNR + 1) and the eps-MSE by ``alpha^2 /
    sigma^2`` (= SNR); sigma is floored at :data:`SIGMA_FLOOR`.

    Args:
        x0_pred, x0: (B, 1, D, H, W) model units.
        t: (B,) diffusion times.
    """
    a, s = alpha_sigma(t.view(-1, 1, 1, 1, 1))
    s = s.clamp_min(SIGMA_FLOOR)
    weight = 1.0 / s**2 if v_parameterization else a**2 / s**2
    return (weight * (x0_pred - x0) ** 2).mean()


def training_times(
    cfg, b: int, has_prev: bool, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(b,) training times, uniform in [min_t, 1]; for stages 2-3 in [min_t, prev_stage_t], since their sampling
    starts from the noised previous volume at prev_stage_t and never visits later times."""
    min_t = cfg.diffusion.min_t
    max_t = float(cfg.diffusion.prev_stage_t) if has_prev else 1.0
    return torch.rand(b, generator=generator, device=device) * (max_t - min_t) + min_t


def stage_loss(
    model: StageModel,
    x0: torch.Tensor,
    xray: torch.Tensor,
    prev: torch.Tensor | None,
    weights: XrayLossWeights,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted training loss of one stage on one batch.

    Args:
        model: the stage.
        x0: (B, 1, R, R, R) target CT cube, model units.
        xray: (B, 1, H, W) DRR input, attenuation style.
        prev: (B, 1, r, r, r) previous-stage volume (stages 2-3) or None.
        weights: loss weights (``v_loss``, ``drr_loss``, ``cross_view_drr_loss``, ``depth_prior_loss``,
            ``perceptual_loss``, ``gradient_loss``, ``bone_loss``).
        generator: RNG for t and noise (deterministic tests).

    Returns:
        (total loss tensor, dict of the unweighted components as floats).
    """
    cfg = model.cfg
    b = x0.shape[0]
    t = training_times(cfg, b, prev is not None, generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    xt = q_sample(x0, t, eps)
    x0_pred, lifted = model(xt, t, xray, prev, return_lifted=True)
    x0_pred = x0_pred.float()
    parts: dict[str, torch.Tensor] = {
        "v_loss": diffusion_loss(x0_pred, x0, t, cfg.model.v_parameterization),
    }
    x0_pred = x0_pred.clamp(-1.5, 1.5)
    spacing = cfg.data.fov_mm / cfg.resolution
    if weights.drr_loss > 0:
        parts["drr_loss"] = drr_l1(x0_pred, x0, spacing, cfg.data.view)
    if weights.cross_view_drr_loss > 0:
        parts["cross_view_drr_loss"] = drr_l1(x0_pred, x0, spacing, cross_view(cfg.data.view))
    if weights.depth_prior_loss > 0 and lifted is not None:
        parts["depth_prior_loss"] = F.l1_loss(lifted.float(), x0)
    if weights.gradient_loss > 0:
        parts["gradient_loss"] = gradient_l1(x0_pred, x0)
    if weights.perceptual_loss > 0:
        parts["perceptual_loss"] = structural_loss(x0_pred, x0)
    if weights.bone_loss > 0:
        parts["bone_loss"] = bone_l1(x0_pred, x0)
    total = sum(getattr(weights, k) * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}
