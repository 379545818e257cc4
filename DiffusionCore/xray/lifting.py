"""Depth lifting: radiograph features back-projected along the rays into the voxel grid.

The training geometry is a parallel beam (``drr.project_parallel_axis``), so a detector pixel (row, col)
sees exactly the voxel column (z, x) for a PA view (rows superior first, so z is flipped) or (z, y) for a
lateral view. Each feature is spread along the ray's depth axis with a learnable anatomical depth prior: a
mixture of Gaussian bands (anterior / mid / posterior at initialisation, as in the seed), mixed per
channel, plus a learnable depth embedding. A 1x1x1 head turns the lifted features into a coarse volume,
the "lifting-only" estimate (trained by the depth-prior loss; a baseline of ``evaluate-xray``).

That estimate lives on the token grid (8^3 cells for stage 1) and each ray's depth profile is a mix of a few
broad bands, so it cannot place anything as narrow as the spine. :class:`RayProfileHead` (``model.lifting_profile``)
adds a full-resolution one: a 2D network over the radiograph that outputs, for every pixel, the value of each voxel
along its ray (the depth axis as channels).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Initial band centres along the depth axis (0 = anterior / patient right, 1 = posterior / left).
DEFAULT_BAND_CENTRES = (0.25, 0.5, 0.75)


class DepthPrior(nn.Module):
    """Per-channel depth weights from K learnable Gaussian bands.

    Args:
        channels: feature channels.
        bands: number of bands K (3: anterior, mid, posterior).
    """

    def __init__(self, channels: int, bands: int = 3):
        super().__init__()
        centres = torch.linspace(0.2, 0.8, bands) if bands != 3 else torch.tensor(DEFAULT_BAND_CENTRES)
        self.centres = nn.Parameter(centres.clone())
        self.log_widths = nn.Parameter(torch.full((bands,), -1.9))  # width ~0.15 of the depth
        self.mix = nn.Parameter(torch.zeros(channels, bands))

    def forward(self, depth: int) -> torch.Tensor:
        """Weights (C, depth) for ``depth`` positions; each channel's weights average to ~1."""
        pos = (torch.arange(depth, device=self.centres.device, dtype=self.centres.dtype) + 0.5) / depth
        g = torch.exp(-0.5 * ((pos[None] - self.centres[:, None]) / self.log_widths.exp()[:, None]) ** 2)
        g = g / g.mean(dim=1, keepdim=True).clamp_min(1e-6)  # (K, depth), mean 1 per band
        return torch.softmax(self.mix, dim=1) @ g


class DepthLifting(nn.Module):
    """Lift multi-scale 2D features (B, C_i, h_i, w_i) to voxel features (B, C, G, G, G).

    Args:
        in_channels: channels of each encoder scale.
        out_channels: voxel feature channels.
        bands: depth-prior bands.
        use_prior: False spreads features uniformly (ablation; the prior is still a module, unused).
    """

    def __init__(self, in_channels: list[int], out_channels: int, bands: int = 3, use_prior: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(sum(in_channels), out_channels, 1)
        self.prior = DepthPrior(out_channels, bands)
        self.use_prior = use_prior
        self.depth_embed = nn.Parameter(torch.zeros(out_channels, 64))
        self.head = nn.Conv3d(out_channels, 1, 1)

    def forward(self, feats: list[torch.Tensor], grid: int, view: str = "pa") -> torch.Tensor:
        """Args:
            feats: encoder features, list of (B, C_i, h_i, w_i).
            grid: voxel grid side G.
            view: ``pa`` (depth axis y) or ``lateral`` (depth axis x).

        Returns:
            (B, C, G, G, G) voxel features, array order (z, y, x).
        """
        maps = [F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False) for f in feats]
        f2d = self.proj(torch.cat(maps, dim=1)).flip(2)  # rows superior-first -> z ascending
        c = f2d.shape[1]
        weights = self.prior(grid) if self.use_prior else torch.ones(c, grid, device=f2d.device)
        emb = F.interpolate(self.depth_embed[None], size=grid, mode="linear", align_corners=False)[0]
        if view == "pa":  # image (z, x); depth along y
            vol = f2d[:, :, :, None, :] * weights[None, :, None, :, None] + emb[None, :, None, :, None]
        else:  # image (z, y); depth along x
            vol = f2d[:, :, :, :, None] * weights[None, :, None, None, :] + emb[None, :, None, None, :]
        return vol

    def lifted_volume(
        self, voxel_feats: torch.Tensor, resolution: int | tuple[int, int, int]
    ) -> torch.Tensor:
        """Coarse volume estimate (B, 1, R, R, R) in model units (unclamped) from lifted features (B, C, G, G, G).

        ``resolution`` may be a (D, H, W) triple for a non-cubic block of features (a patch's part).
        """
        size = (resolution,) * 3 if isinstance(resolution, int) else tuple(resolution)
        coarse = self.head(voxel_feats)
        # linear, not squashed: a tanh here saturates at air (-1) early in training, where it passes no
        # gradient and the depth-prior loss stops teaching the lifting anything (callers clamp for display)
        return F.interpolate(coarse, size=size, mode="trilinear", align_corners=False)


class RayProfileHead(nn.Module):
    """The attenuation at every depth along every ray, at the stage's full resolution: a 2D convolutional network
    over the encoder's features (all scales, resized to the stage's R x R), the radiograph itself and each pixel's
    place on the detector, whose R output channels are the R voxels along the pixel's ray.

    Args:
        in_channels: channels of each encoder scale.
        width: the network's width.
        resolution: the stage's grid side R (rays per detector side and voxels per ray).
        blocks: residual 3x3 convolutions.
    """

    def __init__(self, in_channels: list[int], width: int, resolution: int, blocks: int = 3):
        super().__init__()
        self.resolution = resolution
        self.inp = nn.Conv2d(sum(in_channels) + 3, width, 1)
        self.body = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(blocks))
        self.out = nn.Conv2d(width, resolution, 1)
        nn.init.zeros_(self.out.weight)  # starts as no correction to the coarse estimate
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: list[torch.Tensor], xray: torch.Tensor, view: str = "pa") -> torch.Tensor:
        """Args:
            feats: encoder features, list of (B, C_i, h_i, w_i).
            xray: (B, 1, H, W) the radiograph the features came from, attenuation style [0, 1].
            view: ``pa`` (depth axis y) or ``lateral`` (depth axis x).

        Returns:
            (B, 1, R, R, R) volume in model units, array order (z, y, x).
        """
        r = self.resolution
        size = (r, r)
        maps = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats]
        img = F.interpolate(xray.to(maps[0].dtype), size=size, mode="bilinear", align_corners=False, antialias=True)
        axis = torch.linspace(-1.0, 1.0, r, device=img.device, dtype=img.dtype)
        rows, cols = torch.meshgrid(axis, axis, indexing="ij")
        coords = torch.stack([rows, cols])[None].expand(img.shape[0], 2, r, r)
        h = F.silu(self.inp(torch.cat([*maps, img * 2.0 - 1.0, coords], dim=1)))
        for conv in self.body:
            h = h + F.silu(conv(h))
        prof = self.out(h).flip(2)  # (B, depth, rows, cols); rows superior-first -> z ascending
        vol = prof.permute(0, 2, 1, 3) if view == "pa" else prof.permute(0, 2, 3, 1)
        return vol[:, None]
