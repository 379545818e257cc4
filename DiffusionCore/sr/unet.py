"""3D latent UNet with timestep embedding, low-resolution self-attention and per-level (z, y, x) strides.

Why our own network rather than ``monai.networks.nets.DiffusionModelUNet``: we need per-axis strides
(the latent of a thin-slice patch is not cubic), ControlNet residuals added to *every* skip and to the
middle block with per-sample masks (condition dropout / guidance), and gradient checkpointing per block.
The encoder half (:class:`UNetEncoder`) is shared with the IRControlNet, which is a trainable copy of it.

Shapes: ``x`` ``(B, C_in, d, h, w)`` latent; ``t`` ``(B,)`` float timestep values (0..1000).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import (
    Downsample3d,
    ResBlock3d,
    SelfAttention3d,
    TimestepEmbedder,
    Upsample3d,
    group_norm,
    zero_module,
)
from .config import UNetConfig


class _Layer(nn.Module):
    """One UNet step: optional res block (time-modulated), optional attention, optional resampling."""

    def __init__(
        self,
        res: nn.Module | None = None,
        attn: nn.Module | None = None,
        resample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.res = res
        self.attn = attn
        self.resample = resample

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.res is not None:
            h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h)
        if self.resample is not None:
            h = self.resample(h)
        return h


def _run(layer: nn.Module, h: torch.Tensor, emb: torch.Tensor, use_ckpt: bool) -> torch.Tensor:
    if use_ckpt and torch.is_grad_enabled():
        return checkpoint(layer, h, emb, use_reentrant=False)
    return layer(h, emb)


def _check_cfg(cfg: UNetConfig) -> None:
    n = len(cfg.channel_mult)
    if len(cfg.downsample) != n - 1:
        raise ValueError(f"UNet: need {n - 1} downsample strides for {n} levels, got {cfg.downsample}")
    if len(cfg.attention_levels) != n:
        raise ValueError(f"UNet: attention_levels needs {n} entries, got {cfg.attention_levels}")


class UNetEncoder(nn.Module):
    """Input conv, down path and middle block; returns every skip tensor and the middle output.

    Args:
        cfg: :class:`UNetConfig`.
        in_channels: channels of the network input.
    """

    def __init__(self, cfg: UNetConfig, in_channels: int) -> None:
        super().__init__()
        _check_cfg(cfg)
        mc = cfg.model_channels
        self.emb_dim = 4 * mc
        self.time_embed = TimestepEmbedder(self.emb_dim)
        self.conv_in = nn.Conv3d(in_channels, mc, 3, padding=1)
        self.skip_channels: list[int] = [mc]
        self.down = nn.ModuleList()
        c = mc
        n = len(cfg.channel_mult)
        for lvl, mult in enumerate(cfg.channel_mult):
            co = mc * mult
            for _ in range(cfg.num_res_blocks):
                attn = (
                    SelfAttention3d(co, cfg.num_heads, cfg.attention_window)
                    if cfg.attention_levels[lvl]
                    else None
                )
                self.down.append(_Layer(ResBlock3d(c, co, self.emb_dim, cfg.dropout), attn))
                c = co
                self.skip_channels.append(c)
            if lvl < n - 1:
                self.down.append(_Layer(resample=Downsample3d(c, cfg.downsample[lvl])))
                self.skip_channels.append(c)
        self.mid = _Layer(
            ResBlock3d(c, c, self.emb_dim, cfg.dropout),
            SelfAttention3d(c, cfg.num_heads, cfg.attention_window),
        )
        self.mid2 = _Layer(ResBlock3d(c, c, self.emb_dim, cfg.dropout))
        self.out_channels = c
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(
        self, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Returns ``(skips, middle, emb)``: skips in down-path order, middle ``(B, C, ...)``, emb ``(B, E)``."""
        emb = self.time_embed(t.to(x.device))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = _run(layer, h, emb, self.gradient_checkpointing)
            skips.append(h)
        h = _run(self.mid, h, emb, self.gradient_checkpointing)
        h = _run(self.mid2, h, emb, self.gradient_checkpointing)
        return skips, h, emb


class LatentUNet(nn.Module):
    """The latent denoiser's base network.

    Args:
        cfg: :class:`UNetConfig`.
        in_channels: latent channels of the input ``x_t``.
        out_channels: channels of the prediction (latent channels).

    ``forward(x (B, C, d, h, w), t (B,), control=None) -> (B, out_channels, d, h, w)``; ``control`` is a
    list of tensors added to each skip and (last entry) to the middle block, as an IRControlNet returns.
    The output layer starts at zero: a fresh model predicts "no change".
    """

    def __init__(self, cfg: UNetConfig, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = UNetEncoder(cfg, in_channels)
        mc = cfg.model_channels
        emb = self.encoder.emb_dim
        skip_ch = list(self.encoder.skip_channels)
        c = self.encoder.out_channels
        self.up = nn.ModuleList()
        n = len(cfg.channel_mult)
        for lvl in reversed(range(n)):
            co = mc * cfg.channel_mult[lvl]
            for i in range(cfg.num_res_blocks + 1):
                sc = skip_ch.pop()
                attn = (
                    SelfAttention3d(co, cfg.num_heads, cfg.attention_window)
                    if cfg.attention_levels[lvl]
                    else None
                )
                up = (
                    Upsample3d(co, cfg.downsample[lvl - 1]) if (lvl > 0 and i == cfg.num_res_blocks) else None
                )
                self.up.append(_Layer(ResBlock3d(c + sc, co, emb, cfg.dropout), attn, up))
                c = co
        self.norm_out = group_norm(c)
        self.conv_out = zero_module(nn.Conv3d(c, out_channels, 3, padding=1))
        self.downsample: tuple[int, int, int] = tuple(  # type: ignore[assignment]
            int(torch.prod(torch.tensor([s[i] for s in cfg.downsample] or [1]))) for i in range(3)
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, control: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        skips, h, emb = self.encoder(x, t)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"control has {len(control)} tensors, the UNet needs {len(skips) + 1}")
            skips = [s + c for s, c in zip(skips, control[:-1])]
            h = h + control[-1]
        ckpt = self.encoder.gradient_checkpointing
        for layer in self.up:
            h = _run(layer, torch.cat([h, skips.pop()], dim=1), emb, ckpt)
        return self.conv_out(F.silu(self.norm_out(h)))
