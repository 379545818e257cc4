"""IRControlNet: a trainable copy of the UNet encoder, fed the low-resolution latent, steering the UNet.

Input: ``concat(x_t, y)`` (the noisy latent and the condition latent ``y`` of the cubic-interpolated thick
input). Output: one tensor per UNet skip plus one for the middle block, each through a zero-initialised
1x1x1 convolution, so a fresh ControlNet leaves the (pre-trained) UNet exactly unchanged. A per-sample
``scale`` (0 or 1) drops the condition for classifier-free guidance training and unguided evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import zero_module
from .config import UNetConfig
from .unet import LatentUNet, UNetEncoder


class IRControlNet(nn.Module):
    """ControlNet for image restoration (DiffBIR's IRControlNet, in 3D).

    Args:
        cfg: the UNet's :class:`UNetConfig` (the encoder is built identically).
        latent_channels: channels of ``x_t`` and of ``y``.
    """

    def __init__(self, cfg: UNetConfig, latent_channels: int) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = UNetEncoder(cfg, 2 * latent_channels)
        self.zero_convs = nn.ModuleList(
            [zero_module(nn.Conv3d(c, c, 1)) for c in self.encoder.skip_channels]
            + [zero_module(nn.Conv3d(self.encoder.out_channels, self.encoder.out_channels, 1))]
        )

    @torch.no_grad()
    def copy_from_unet(self, unet: LatentUNet) -> None:
        """Initialise the encoder from the UNet's (the ``x_t`` input channels copy, the ``y`` channels start at 0)."""
        src = unet.encoder.state_dict()
        own = self.encoder.state_dict()
        for k, v in src.items():
            if k == "conv_in.weight":
                w = torch.zeros_like(own[k])
                w[:, : v.shape[1]] = v
                own[k] = w
            elif k in own and own[k].shape == v.shape:
                own[k] = v.clone()
        self.encoder.load_state_dict(own)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Control residuals for the UNet.

        Args:
            x: ``(B, C, d, h, w)`` network input (scaled ``x_t``).
            y: ``(B, C, d, h, w)`` condition latent.
            t: ``(B,)`` timestep values.
            scale: ``(B,)`` per-sample multiplier (0 drops the condition); ``None`` = 1.

        Returns:
            ``len(skips) + 1`` tensors, the last for the middle block.
        """
        skips, mid, _ = self.encoder(torch.cat([x, y], dim=1), t)
        outs = [zc(h) for zc, h in zip(self.zero_convs, skips + [mid])]
        if scale is not None:
            s = scale.to(x.dtype).reshape(-1, 1, 1, 1, 1)
            outs = [o * s for o in outs]
        return outs
