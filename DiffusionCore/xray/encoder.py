"""Multi-scale radiograph encoder: feature maps at several scales, a global embedding and tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock2d(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU, and a residual connection."""

    def __init__(self, ch_in: int, ch_out: int):
        super().__init__()
        self.block = nn.Sequential(
            _group_norm(ch_in), nn.SiLU(), nn.Conv2d(ch_in, ch_out, 3, padding=1),
            _group_norm(ch_out), nn.SiLU(), nn.Conv2d(ch_out, ch_out, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class XrayEncoder(nn.Module):
    """Encode a radiograph into multi-scale features, a global vector and a token sequence.

    Args:
        channels: output channels of each scale; scale ``i`` has resolution ``xray_resolution / 2^(i+1)``.
        embed_dim: width of the global embedding and of the tokens.
        token_side: the coarsest features are pooled to ``token_side x token_side`` tokens.
    """

    def __init__(self, channels: list[int], embed_dim: int, token_side: int):
        super().__init__()
        self.stem = nn.Conv2d(1, channels[0], 3, padding=1)
        blocks, downs = [], []
        ch = channels[0]
        for c in channels:
            downs.append(nn.Conv2d(ch, c, 3, stride=2, padding=1))
            blocks.append(ResBlock2d(c, c))
            ch = c
        self.downs = nn.ModuleList(downs)
        self.blocks = nn.ModuleList(blocks)
        self.token_side = token_side
        self.to_tokens = nn.Linear(ch, embed_dim)
        self.token_pos = nn.Parameter(torch.zeros(1, token_side * token_side, embed_dim))
        nn.init.normal_(self.token_pos, std=0.02)
        self.to_global = nn.Sequential(nn.Linear(ch, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.out_channels = list(channels)

    def forward(self, xray: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Args:
            xray: (B, 1, H, W) attenuation style in [0, 1].

        Returns:
            features: list of (B, C_i, H / 2^(i+1), W / 2^(i+1));
            global_embedding: (B, embed_dim);
            tokens: (B, token_side^2, embed_dim).
        """
        h = self.stem(xray * 2.0 - 1.0)
        feats = []
        for down, block in zip(self.downs, self.blocks):
            h = block(down(h))
            feats.append(h)
        pooled = F.adaptive_avg_pool2d(h, self.token_side).flatten(2).transpose(1, 2)
        tokens = self.to_tokens(pooled) + self.token_pos
        glob = self.to_global(h.mean(dim=(2, 3)))
        return feats, glob, tokens
