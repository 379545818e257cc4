"""Hybrid ViT blocks on voxel tokens: AdaLN-Zero modulation, (windowed) SDPA self-attention, cross-attention.

A block maps tokens (B, N, C) laid out on a (G, G, G) grid, conditioned on a vector ``cond`` (B, C) (time +
X-ray + previous-stage embeddings) and on X-ray tokens (B, T, C). With AdaLN-Zero every residual branch is
scaled by a gate predicted from ``cond`` by a zero-initialised linear layer, so a fresh block is exactly the
identity (the DiT recipe). Self-attention uses ``scaled_dot_product_attention`` over all tokens when there
are at most ``max_full_tokens`` of them, else over non-overlapping ``window^3`` windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation of tokens (B, N, C) by per-sample shift/scale (B, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of continuous times t (B,) in [0, 1] (scaled by 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Attention(nn.Module):
    """Multi-head attention with SDPA; self-attention when ``context`` is None."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        ctx = x if context is None else context
        q = self.q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def _to_windows(x: torch.Tensor, grid: int, w: int) -> torch.Tensor:
    b, _, c = x.shape
    g = grid // w
    x = x.view(b, g, w, g, w, g, w, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b * g**3, w**3, c)


def _from_windows(x: torch.Tensor, b: int, grid: int, w: int) -> torch.Tensor:
    c = x.shape[-1]
    g = grid // w
    x = x.view(b, g, g, g, w, w, w, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, grid**3, c)


class HybridViTBlock(nn.Module):
    """One block: (windowed) self-attention, cross-attention to X-ray tokens, MLP; AdaLN-Zero gated.

    Args:
        dim: token width C.
        heads: attention heads.
        mlp_ratio: MLP hidden width / C.
        use_adaln: AdaLN-Zero (identity at init) or plain pre-norm residual blocks.
        cross_attention: attend to X-ray tokens.
        window: window side in tokens for windowed attention.
        max_full_tokens: above this token count, windowed attention is used.
        memory_efficient: allow windowed attention (False: always global).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, *, use_adaln: bool = True,
                 cross_attention: bool = True, window: int = 8, max_full_tokens: int = 4096,
                 memory_efficient: bool = True):  # fmt: skip
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not use_adaln, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.cross = Attention(dim, heads) if cross_attention else None
        self.norm_c = nn.LayerNorm(dim, eps=1e-6) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not use_adaln, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.use_adaln = use_adaln
        n_mod = 7 if cross_attention else 6
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mod * dim)) if use_adaln else None
        self.window = window
        self.max_full_tokens = max_full_tokens
        self.memory_efficient = memory_efficient
        self.reset_adaln()

    def reset_adaln(self) -> None:
        """Zero the modulation layer: every gate is 0, so the block is the identity."""
        if self.adaln is not None:
            nn.init.zeros_(self.adaln[-1].weight)
            nn.init.zeros_(self.adaln[-1].bias)

    def _self_attention(self, x: torch.Tensor, grid: int, windowed: bool | None = None) -> torch.Tensor:
        n = x.shape[1]
        if windowed is None:
            windowed = self.memory_efficient and n > self.max_full_tokens
        if not windowed or grid % self.window:
            return self.attn(x)
        b = x.shape[0]
        return _from_windows(self.attn(_to_windows(x, grid, self.window)), b, grid, self.window)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        context: torch.Tensor | None,
        grid: int,
        windowed: bool | None = None,
    ) -> torch.Tensor:
        """Args:
        x: tokens (B, G^3, C) in (z, y, x) raster order.
        cond: conditioning vector (B, C).
        context: X-ray tokens (B, T, C) or None.
        grid: G.
        windowed: force windowed (True) or global (False) self-attention; None decides by the token count
            (windows above ``max_full_tokens``). A patch of a larger grid passes the whole grid's choice.
        """
        if self.adaln is not None:
            mods = self.adaln(cond).chunk(self.adaln[-1].out_features // x.shape[-1], dim=-1)
            sh1, sc1, g1, sh2, sc2, g2 = mods[:6]
            gc = mods[6] if len(mods) > 6 else None
            x = x + g1[:, None] * self._self_attention(modulate(self.norm1(x), sh1, sc1), grid, windowed)
            if self.cross is not None and context is not None:
                x = x + gc[:, None] * self.cross(self.norm_c(x), context)
            return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))
        x = x + self._self_attention(self.norm1(x), grid, windowed)
        if self.cross is not None and context is not None:
            x = x + self.cross(self.norm_c(x), context)
        return x + self.mlp(self.norm2(x))
