"""Building blocks shared by the models: 3D residual blocks, self-attention, timestep embeddings, AdaLN.

All blocks take and return ``(B, C, D, H, W)`` tensors unless said otherwise; strides and scale factors
are per-axis ``(z, y, x)`` tuples so that anisotropic (through-plane vs. in-plane) layouts are first-class.
"""

from .blocks import (
    AdaLayerNorm,
    Downsample3d,
    ResBlock3d,
    SelfAttention3d,
    TimestepEmbedder,
    Upsample3d,
    group_norm,
    modulate,
    timestep_embedding,
    zero_module,
)

__all__ = [
    "AdaLayerNorm",
    "Downsample3d",
    "ResBlock3d",
    "SelfAttention3d",
    "TimestepEmbedder",
    "Upsample3d",
    "group_norm",
    "modulate",
    "timestep_embedding",
    "zero_module",
]
