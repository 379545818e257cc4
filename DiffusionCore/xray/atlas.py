"""An anatomical atlas for stage 1: the mean training CT, blurred, fitted to the radiograph by an affine map.

One frontal radiograph cannot say how deep anything lies, but every chest has its spine behind the heart and its
sternum in front. Trained on two CTs, the network alone does not learn to draw a spine (not even on its training
CTs). A stage with ``model.atlas_prior`` is given, beside the radiograph, a coarse volume that already has the
anatomy in place, and refines it as stages 2-3 refine the previous stage's volume (a residual on it):

* at generation, the weights' atlas (the mean of the training CTs, blurred by ``data.atlas_blur_voxels``) is
  registered to the radiograph (:func:`register_atlas`): a scale across (left-right and front-back tied), a
  scale along the body axis and two shifts in the detector plane, fitted by the normalised cross-correlation of
  its blurred DRR with the blurred radiograph. The front-back position is not fitted (the cubes are centred on
  the body front-to-back, :func:`~DiffusionCore.xray.data.body_ap_offset`);
* in training, the atlas of a sample is its own CT made coarse and wrong the way a registered atlas of another
  patient is (:func:`training_atlas`): blurred, randomly zoomed per axis, shifted and deformed. The network thus
  learns to keep the atlas where the radiograph does not contradict it and to correct it where it does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..intensity import unit_to_hu
from .data import gaussian_blur, render_training_drr

#: Registration settings: iterations of Adam, its step, the blur of both images (pixels of a 64^2 DRR), the
#: weight of the pull of the parameters toward the identity, the DRR's side.
REGISTRATION = {"iters": 150, "lr": 0.02, "sigma_px": 2.0, "prior": 0.02, "size": 64}


def _affine(params: torch.Tensor, view: str) -> torch.Tensor:
    """(B, 3, 4) ``affine_grid`` matrices from (B, 4) parameters: log scale across, log scale along the body
    axis, shift across the detector, shift along the body axis (normalised coordinates; the output reads the
    atlas at ``p / scale + shift``)."""
    b = params.shape[0]
    across, along = params[:, 0].exp(), params[:, 1].exp()
    theta = params.new_zeros(b, 3, 4)
    theta[:, 0, 0] = 1 / across  # x (W)
    theta[:, 1, 1] = 1 / across  # y (H)
    theta[:, 2, 2] = 1 / along  # z (D)
    theta[:, 0 if view == "pa" else 1, 3] = params[:, 2]  # the detector's columns: x for PA, y for lateral
    theta[:, 2, 3] = params[:, 3]
    return theta


def warp_atlas(atlas: torch.Tensor, params: torch.Tensor, view: str = "pa") -> torch.Tensor:
    """The atlas (1 or B, 1, R, R, R) model units, moved by (B, 4) parameters (see :func:`register_atlas`)."""
    b = params.shape[0]
    grid = F.affine_grid(_affine(params, view), [b, 1, *atlas.shape[-3:]], align_corners=False)
    return F.grid_sample(atlas.expand(b, -1, -1, -1, -1), grid, padding_mode="border", align_corners=False)


def normalised_cross_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation per sample of (B, 1, H, W) images."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)


def register_atlas(
    atlas: torch.Tensor, xray: torch.Tensor, fov_mm: float, view: str = "pa"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the atlas to radiographs: the affine map (:func:`warp_atlas`) whose DRR best matches each radiograph.

    Args:
        atlas: (1, 1, R, R, R) model units (not modified).
        xray: (B, 1, H, W) radiographs, attenuation style [0, 1], rows superior first (not modified).
        fov_mm: side of the cube, mm.
        view: ``pa`` or ``lateral``.

    Returns:
        (the registered atlas (B, 1, R, R, R) model units, the parameters (B, 4)); deterministic.
    """
    s = REGISTRATION
    atlas = atlas.detach().float()
    target = gaussian_blur(F.interpolate(xray.detach().float(), size=(s["size"],) * 2, mode="bilinear",
                                         align_corners=False, antialias=True), s["sigma_px"])  # fmt: skip
    params = torch.zeros(xray.shape[0], 4, device=xray.device, dtype=atlas.dtype, requires_grad=True)
    opt = torch.optim.Adam([params], lr=s["lr"])
    with torch.enable_grad():
        for _ in range(s["iters"]):
            moved = render_training_drr(unit_to_hu(warp_atlas(atlas, params, view)), fov_mm, s["size"], view)
            loss = (1 - normalised_cross_correlation(gaussian_blur(moved, s["sigma_px"]), target)).sum()
            loss = loss + s["prior"] * params.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    params = params.detach()
    with torch.no_grad():
        return warp_atlas(atlas, params, view), params


def training_atlas(
    truth: torch.Tensor, blur_voxels: float, zoom: float, shift_voxels: float, deform_voxels: float
) -> torch.Tensor:
    """What a registered atlas of another patient would look like for these CTs: each (B, 1, R, R, R) cube in
    model units blurred by ``blur_voxels``, zoomed per axis by ``exp(U(-zoom, zoom))``, shifted by up to
    ``shift_voxels`` and smoothly deformed (displacements of standard deviation ``deform_voxels``, varying over
    about a third of the cube), all random (the torch generator)."""
    b, r = truth.shape[0], truth.shape[-1]
    theta = truth.new_zeros(b, 3, 4)
    theta[:, [0, 1, 2], [0, 1, 2]] = torch.exp(-(torch.rand(b, 3, device=truth.device) * 2 - 1) * zoom)
    theta[:, :, 3] = (torch.rand(b, 3, device=truth.device) * 2 - 1) * shift_voxels * 2 / r
    grid = F.affine_grid(theta, list(truth.shape), align_corners=False)
    if deform_voxels > 0:
        field = torch.randn(b, 3, 4, 4, 4, device=truth.device)
        field = F.interpolate(field, size=(r, r, r), mode="trilinear", align_corners=True)
        grid = grid + (field * deform_voxels * 2 / r).permute(0, 2, 3, 4, 1)
    moved = F.grid_sample(truth, grid, padding_mode="border", align_corners=False)
    return gaussian_blur(moved, blur_voxels) if blur_voxels > 0 else moved
