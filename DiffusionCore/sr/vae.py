"""3D KL autoencoder for CT patches in model units, with anisotropic (in-plane by default) compression.

Why our own network rather than ``monai.networks.nets.AutoencoderKL``: MONAI's down-sampling is a fixed
stride 2 along every axis. For through-plane super-resolution the latent must keep the z detail that the
model is asked to create, so the default here compresses in-plane only (strides ``(1, 2, 2)`` twice: a
``(D, H/4, W/4)`` latent with 4 channels, 4x fewer values than voxels), where MONAI's layout would halve z
as well. The blocks are the same kind (GroupNorm-SiLU-Conv residual blocks, optional middle attention,
off by default because it made the VAE ~3x slower on CPU).

Residual autoencoding (``shortcut``, as in DC-AE): the encoder's mean is ``learned(x) + fold(x)``, where
``fold`` moves each ``(fz, fy, fx)`` block of voxels into channels (averaged in groups when the latent has
fewer channels), and the decoder's output is ``learned(z) + unfold(z)``. The learned output layers start
at zero, so a fresh VAE is already a good autoencoder (exact when the latent has ``fz*fy*fx`` channels)
and training only has to learn the rest: a few hundred CPU steps instead of tens of thousands.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Downsample3d, ResBlock3d, SelfAttention3d, Upsample3d, group_norm
from .config import VAEConfig


def _prod_strides(strides: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    f = [1, 1, 1]
    for s in strides:
        for i in range(3):
            f[i] *= int(s[i])
    return (f[0], f[1], f[2])


def space_to_channels(x: torch.Tensor, f: Sequence[int]) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B, C*fz*fy*fx, D/fz, H/fy, W/fx)``: each block's voxels become channels."""
    b, c, d, h, w = x.shape
    fz, fy, fx = (int(v) for v in f)
    x = x.reshape(b, c, d // fz, fz, h // fy, fy, w // fx, fx).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * fz * fy * fx, d // fz, h // fy, w // fx)


def channels_to_space(z: torch.Tensor, f: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`space_to_channels`."""
    b, n, d, h, w = z.shape
    fz, fy, fx = (int(v) for v in f)
    c = n // (fz * fy * fx)
    z = z.reshape(b, c, fz, fy, fx, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return z.reshape(b, c, d * fz, h * fy, w * fx)


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat each channel, or average groups of channels, to get ``channels`` (one divides the other)."""
    n = x.shape[1]
    if n == channels:
        return x
    if channels % n == 0:
        return x.repeat_interleave(channels // n, dim=1)
    b, _, *rest = x.shape
    return x.reshape(b, channels, n // channels, *rest).mean(2)


def _check_shortcut(cfg: VAEConfig) -> None:
    n = math.prod(_prod_strides(cfg.downsample))
    if cfg.shortcut and n % cfg.latent_channels and cfg.latent_channels % n:
        raise ValueError(
            f"VAE shortcut: latent_channels ({cfg.latent_channels}) and the voxels per latent cell ({n}) "
            "must divide one another; change latent_channels or set shortcut false"
        )


class _Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch = list(cfg.channels)
        if len(cfg.downsample) != len(ch) - 1:
            raise ValueError(
                f"VAE: need {len(ch) - 1} downsample strides for {len(ch)} levels, got {cfg.downsample}"
            )
        self.conv_in = nn.Conv3d(1, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c = ch[0]
        for level, co in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock3d(c, co))
                c = co
            if level < len(ch) - 1:
                blocks.append(Downsample3d(c, cfg.downsample[level]))
        self.blocks = nn.ModuleList(blocks)
        self.mid = nn.ModuleList(
            [
                ResBlock3d(c, c),
                SelfAttention3d(c, 1) if cfg.mid_attention else nn.Identity(),
                ResBlock3d(c, c),
            ]
        )
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv3d(c, 2 * cfg.latent_channels, 3, padding=1)
        _check_shortcut(cfg)
        self.shortcut = bool(cfg.shortcut)
        self.factor = _prod_strides(cfg.downsample)
        self.latent_channels = cfg.latent_channels
        if self.shortcut:  # start as the fold alone, with a narrow posterior (log-variance -8)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
            with torch.no_grad():
                self.conv_out.bias[cfg.latent_channels :] = -8.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for blk in self.blocks:
            h = blk(h)
        for blk in self.mid:
            h = blk(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.shortcut:
            fold = _match_channels(space_to_channels(x, self.factor), self.latent_channels)
            out = torch.cat([out[:, : self.latent_channels] + fold, out[:, self.latent_channels :]], dim=1)
        return out


class _Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch = list(cfg.channels)[::-1]
        strides = list(cfg.downsample)[::-1]
        c = ch[0]
        self.conv_in = nn.Conv3d(cfg.latent_channels, c, 3, padding=1)
        self.mid = nn.ModuleList(
            [
                ResBlock3d(c, c),
                SelfAttention3d(c, 1) if cfg.mid_attention else nn.Identity(),
                ResBlock3d(c, c),
            ]
        )
        blocks: list[nn.Module] = []
        for level, co in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock3d(c, co))
                c = co
            if level < len(ch) - 1:
                # The up-sampling conv already maps to the next (narrower) level's channels, so the
                # costliest convolutions (at full resolution) run with the fewest channels.
                blocks.append(Upsample3d(c, strides[level], out_channels=ch[level + 1]))
                c = ch[level + 1]
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv3d(c, 1, 3, padding=1)
        self.shortcut = bool(cfg.shortcut)
        self.factor = _prod_strides(cfg.downsample)
        if self.shortcut:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for blk in self.mid:
            h = blk(h)
        for blk in self.blocks:
            h = blk(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.shortcut:
            out = out + channels_to_space(_match_channels(z, math.prod(self.factor)), self.factor)
        return out


class CTAutoencoderKL(nn.Module):
    """KL-regularised 3D autoencoder: ``(B, 1, D, H, W)`` model units <-> ``(B, C_lat, D/fz, H/fy, W/fx)``.

    Args:
        cfg: :class:`VAEConfig` (channels per level, latent channels, per-level strides, middle attention).
    """

    def __init__(self, cfg: VAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or VAEConfig()
        self.encoder = _Encoder(self.cfg)
        self.decoder = _Decoder(self.cfg)
        self.downsample: tuple[int, int, int] = _prod_strides(self.cfg.downsample)
        self.latent_channels = self.cfg.latent_channels

    def check_shape(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is ``(B, 1, D, H, W)`` with D, H, W multiples of the compression."""
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"VAE input must be (B, 1, D, H, W), got {tuple(x.shape)}")
        bad = [n for n, f in zip(x.shape[2:], self.downsample) if n % f]
        if bad:
            raise ValueError(
                f"VAE input spatial size {tuple(x.shape[2:])} must be a multiple of {self.downsample}"
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, logvar)``, each ``(B, C_lat, d, h, w)``, of a model-unit patch ``(B, 1, D, H, W)``."""
        self.check_shape(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, C_lat, d, h, w)`` -> model units ``(B, 1, D, H, W)`` (not clipped)."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct with a posterior sample: returns ``(recon, mean, logvar)``."""
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mean, logvar

    @staticmethod
    def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) summed over latent elements, averaged over the batch."""
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        return kl.flatten(1).sum(1).mean()
