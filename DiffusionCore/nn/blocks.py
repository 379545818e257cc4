"""3D network blocks: residual blocks with timestep modulation, self-attention, anisotropic resampling.

Shapes: feature maps are ``(B, C, D, H, W)``; timestep embeddings are ``(B, E)``; strides and scale
factors are ``(z, y, x)`` tuples so a block can resample in-plane only (e.g. ``(1, 2, 2)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Triple = tuple[int, int, int]


def _triple(v: int | Sequence[int]) -> Triple:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or 3 values (z, y, x), got {v!r}")
    return t  # type: ignore[return-value]


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it (zero-initialised output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count ``<= max_groups`` that divides ``channels``."""
    groups = math.gcd(channels, max_groups)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Args:
        t: ``(B,)`` timesteps (any real values, typically ``0..1000``).
        dim: embedding size.

    Returns:
        ``(B, dim)`` float32 embedding (cos half, then sin half; zero-padded when ``dim`` is odd).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features followed by a 2-layer MLP: ``(B,)`` -> ``(B, out_dim)``."""

    def __init__(self, out_dim: int, freq_dim: int = 128) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive affine modulation ``x * (1 + scale) + shift`` (shift/scale broadcast over tokens)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class AdaLayerNorm(nn.Module):
    """LayerNorm whose shift and scale come from a conditioning vector (zero-initialised: starts as LN).

    Args:
        dim: token feature size. ``forward(x (B, N, dim), cond (B, cond_dim)) -> (B, N, dim)``.
    """

    def __init__(self, dim: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.to_shift_scale = zero_module(nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.to_shift_scale(F.silu(cond)).chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)


class ResBlock3d(nn.Module):
    """GroupNorm-SiLU-Conv x2 residual block, optionally modulated by a timestep embedding (scale-shift).

    Args:
        in_channels: input channels.
        out_channels: output channels (a 1x1x1 conv maps the skip when they differ).
        emb_dim: size of the embedding passed to ``forward``; ``None`` for an unconditioned block.
        dropout: dropout before the second conv.
        kernel: conv kernel per axis (z, y, x), e.g. ``(1, 3, 3)`` for an in-plane-only block.
        zero_init: zero the last conv so the block starts as the identity.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int | None = None,
        dropout: float = 0.0,
        kernel: int | Sequence[int] = 3,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        k = _triple(kernel)
        pad = tuple(x // 2 for x in k)
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, k, padding=pad)
        self.emb = nn.Linear(emb_dim, 2 * out_channels) if emb_dim else None
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, k, padding=pad)
        if zero_init:
            zero_module(self.conv2)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None and emb is not None:
            scale, shift = self.emb(F.silu(emb)).to(h.dtype)[:, :, None, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention3d(nn.Module):
    """Multi-head self-attention over the voxels of a (low-resolution) 3D feature map, residual.

    Without ``window`` every voxel attends to every other: cost grows with ``(D*H*W)^2``, so use it only at
    the coarsest levels. With ``window=(wd, wh, ww)`` the map is cut into non-overlapping windows of that
    many voxels and attention runs inside each window (cost linear in the map size). A map no larger than
    the window is attended globally, so a window equal to the training patch's grid at that level gives
    inference tiles the context the network was trained with. Edge windows are padded and the padding is
    masked out of the keys. The output projection starts at zero, so a fresh block is the identity.
    """

    def __init__(self, channels: int, num_heads: int = 4, window: Sequence[int] | None = None) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        if window is not None and (len(window) != 3 or min(int(w) for w in window) < 1):
            raise ValueError(f"attention window needs 3 positive sizes (z, y, x), got {window}")
        self.num_heads = num_heads
        self.window: tuple[int, int, int] | None = (
            tuple(int(w) for w in window) if window is not None else None  # type: ignore[assignment]
        )
        self.norm = group_norm(channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv3d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        win = self.window
        if win is None or (d <= win[0] and h <= win[1] and w <= win[2]):
            out = self._attend(qkv.reshape(b, 3 * c, 1, d * h * w), None)
            return x + self.proj(out.reshape(b, c, d, h, w))
        ws = tuple(min(a, s) for a, s in zip(win, (d, h, w)))
        n = tuple(-(-s // a) for s, a in zip((d, h, w), ws))
        pad = tuple(k * a - s for k, a, s in zip(n, ws, (d, h, w)))
        mask = None
        if any(pad):
            qkv = F.pad(qkv, (0, pad[2], 0, pad[1], 0, pad[0]))
            valid = torch.zeros(
                (1, 1) + tuple(k * a for k, a in zip(n, ws)), dtype=torch.bool, device=x.device
            )
            valid[..., :d, :h, :w] = True
            mask = _to_windows(valid, n, ws)  # (1, nwin, 1, L)
            mask = mask.expand(b, -1, -1, -1).reshape(b * mask.shape[1], 1, 1, mask.shape[-1])
        out = self._attend(_to_windows(qkv, n, ws).reshape(b * n[0] * n[1] * n[2], 3 * c, 1, -1), mask)
        out = _from_windows(out.reshape(b, n[0] * n[1] * n[2], c, -1), n, ws)
        return x + self.proj(out[..., :d, :h, :w].contiguous())

    def _attend(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``qkv`` ``(B', 3C, 1, L)`` -> attention output ``(B', C, L)``.

        ``mask`` ``(B', 1, 1, L)``: the keys to keep (``None``: all).
        """
        bb, c3, _, length = qkv.shape
        c = c3 // 3
        qkv = qkv.reshape(bb, 3, self.num_heads, c // self.num_heads, length)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B', heads, L, C/heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(-1, -2).reshape(bb, c, length)


def _to_windows(t: torch.Tensor, n: Sequence[int], ws: Sequence[int]) -> torch.Tensor:
    """``(B, C, n0*w0, n1*w1, n2*w2)`` -> ``(B, n0*n1*n2, C, w0*w1*w2)`` (window-major)."""
    b, c = t.shape[:2]
    t = t.reshape(b, c, n[0], ws[0], n[1], ws[1], n[2], ws[2])
    t = t.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return t.reshape(b, n[0] * n[1] * n[2], c, ws[0] * ws[1] * ws[2])


def _from_windows(t: torch.Tensor, n: Sequence[int], ws: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`_to_windows`: ``(B, nwin, C, L)`` -> ``(B, C, n0*w0, n1*w1, n2*w2)``."""
    b, _, c, _ = t.shape
    t = t.reshape(b, n[0], n[1], n[2], c, ws[0], ws[1], ws[2])
    t = t.permute(0, 4, 1, 5, 2, 6, 3, 7)
    return t.reshape(b, c, n[0] * ws[0], n[1] * ws[1], n[2] * ws[2])


class Downsample3d(nn.Module):
    """Strided 3D convolution; ``stride`` per axis (z, y, x), e.g. ``(1, 2, 2)`` for in-plane only."""

    def __init__(
        self, channels: int, stride: int | Sequence[int] = 2, out_channels: int | None = None
    ) -> None:
        super().__init__()
        s = _triple(stride)
        k = tuple(3 for _ in s)
        self.stride = s
        self.conv = nn.Conv3d(channels, out_channels or channels, k, stride=s, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3d(nn.Module):
    """Nearest-neighbour up-sampling by ``scale`` per axis (z, y, x), then a 3x3x3 convolution."""

    def __init__(
        self, channels: int, scale: int | Sequence[int] = 2, out_channels: int | None = None
    ) -> None:
        super().__init__()
        self.scale = _triple(scale)
        self.conv = nn.Conv3d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != (1, 1, 1):
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return self.conv(x)
