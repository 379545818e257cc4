"""The hybrid-ViT cascade: one :class:`StageModel` per resolution (64^3 -> 128^3 -> 256^3).

A stage predicts v (or eps) for a noisy volume ``x_t`` (model units, HU window of
``DiffusionCore.intensity``) conditioned on the radiograph (through depth lifting, a global embedding in
AdaLN-Zero, and cross-attention tokens) and, for stages 2-3, on the previous stage's volume upsampled to this
stage's grid. :class:`UnifiedHybridViTCascade` holds the stages and keeps the seed's API
(``from_pretrained``, ``generate``, ``generate_stage1/2/3``).

Grids larger than one pass (e.g. the shipped ``stage3_384`` config, or 256^3 on a small memory budget) run
over cubic patches (:func:`plan_patches`): the radiograph encoding, the depth lifting and the previous-stage
volume are computed once for the whole grid; at every DDIM step the token network runs patch by patch, each
patch reading positional embeddings, lifted features and the previous volume at its place in the grid and the
whole radiograph through cross-attention and AdaLN; the patch outputs are blended (raised-cosine weights of
``DiffusionCore.tiling``) and the refinement head runs over the blended grid in chunks with a halo. Where the grid's
attention is windowed, patches are window-aligned and the result equals the whole-grid pass (to float
rounding); where it is global, patches overlap and approximate it. Training draws random patches (see
``train.patch_stage_loss``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import config_to_dict, load_config
from ..errors import ConfigError, InputError, ResourceError, WeightsError
from ..nn.architecture import build_checked, build_from_weights, weights_architecture
from ..tiling import (
    MEMORY_SAFETY_FRACTION,
    blend_weights_1d,
    device_available_memory,
    format_bytes,
    tile_starts,
)
from ..weights.registry import register_architecture_check
from .atlas import register_atlas
from .config import (
    XrayStageConfig,
    patch_alignment,
    stages_geometry_problem,
    tiny_stage_config,
    windowed_attention,
)
from .data import gaussian_blur
from .encoder import XrayEncoder
from .lifting import DepthLifting, RayProfileHead
from .vdiffusion import VDiffusion, q_sample, skip_scales
from .vit import HybridViTBlock, modulate, timestep_embedding

logger = logging.getLogger(__name__)

#: Weights family name in the registry.
FAMILY = "xray"

#: The grid sizes of the tiny random-weight test cascade's stages (:meth:`UnifiedHybridViTCascade.tiny`), one per stage:
#: ``xray2ct --tiny-test-model`` plans its ``--save-stages`` files from their number before it builds the model.
TINY_RESOLUTIONS: tuple[int, ...] = (16, 32)


# -- patches ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StageCondition:
    """What a stage's denoiser needs besides ``x_t`` and ``t``, computed once for the whole grid; a patch
    reads its part of it.

    Attributes:
        tokens: (B, T, C) X-ray tokens (cross-attention).
        glob: (B, C) global X-ray embedding (AdaLN).
        prev_cond: (B, C) embedding of the whole previous-stage volume (AdaLN), None for stage 1.
        lifted: (B, C, G, G, G) depth-lifted X-ray features on the whole token grid, or None.
        prev: (B, 1, N, N, N) previous-stage volume on this grid (N = R, or the padded side of a
            :class:`PatchPlan`), model units; None for stage 1.
        rays: the radiograph at the grid's resolution, one value per ray: (B, 1, R, 1, R) for a PA view (depth
            along y), (B, 1, R, R, 1) for a lateral one; None unless the refinement head reads it
            (``model.refine_xray``).
        profile: (B, 1, N, N, N) the full-resolution lifting volume (``model.lifting_profile``), model units;
            None without that head.
        base: (B, 1, N, N, N) the lifting-only volume of the whole grid, which the output corrects (stage 1 with
            ``model.lifting_residual``; computed once per radiograph), model units; None otherwise.
    """

    tokens: torch.Tensor
    glob: torch.Tensor
    prev_cond: torch.Tensor | None
    lifted: torch.Tensor | None
    prev: torch.Tensor | None
    rays: torch.Tensor | None = None
    profile: torch.Tensor | None = None
    base: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class PatchPlan:
    """Cubic patches over a stage's grid, padded at its end to ``padded`` voxels per side.

    Attributes:
        resolution: the stage's grid side R (voxels).
        padded: the grid side the patches cover (a multiple of the alignment, >= R); voxels past R are
            padding (reflected) and cropped away.
        patch: patch side (voxels).
        starts: patch corners along each axis (the same for z, y and x).
        windowed: self-attention in windows of the whole grid (patches are then exact) or global inside
            each patch (patches approximate the whole-grid pass; their overlaps are blended).
        weights: per start, the 1D blending weight (``tiling.blend_weights_1d``: raised-cosine ramps
            across overlaps, summing to one at every voxel).
    """

    resolution: int
    padded: int
    patch: int
    starts: tuple[int, ...]
    windowed: bool
    weights: tuple[np.ndarray, ...] = dataclasses.field(repr=False, compare=False)

    @property
    def n_tiles(self) -> int:
        return len(self.starts) ** 3

    @property
    def overlap(self) -> int:
        """The smallest overlap (voxels) of neighbouring patches (0 for a single patch per axis)."""
        if len(self.starts) < 2:
            return 0
        return min(self.patch - (b - a) for a, b in zip(self.starts, self.starts[1:]))

    def describe(self) -> dict[str, Any]:
        return {"patches": self.n_tiles, "patch": self.patch, "overlap": self.overlap,
                "padded": self.padded, "windowed_attention": self.windowed}  # fmt: skip

    def tiles(
        self, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[tuple[int, int, int], torch.Tensor]]:
        """``((z, y, x) corner, (P, P, P) float32 weight)`` of every patch, z-major."""
        w = [torch.as_tensor(v, dtype=torch.float32, device=device) for v in self.weights]
        for a, sz in enumerate(self.starts):
            for b, sy in enumerate(self.starts):
                wzy = w[a][:, None] * w[b][None, :]
                for c, sx in enumerate(self.starts):
                    yield (sz, sy, sx), wzy[:, :, None] * w[c][None, None, :]


def plan_patches(cfg: XrayStageConfig, patch: int, overlap: int | None = None) -> PatchPlan:
    """Lay cubic patches of side ``patch`` over the stage's grid.

    Patch sides and corners are multiples of :func:`config.patch_alignment` (a token; a window of the whole
    grid where its attention is windowed). The grid is padded at its end to a multiple of that alignment.
    With windowed attention (and the linear token head) every patch computes exactly what the whole-grid pass
    computes for its voxels, so the patches only tile (no overlap); with global attention inside patches, or a
    convolutional decoder (whose convolutions would read across a patch's border), they overlap by at least
    ``overlap`` (default ``model.patch_overlap``, at most half a patch; patches of one alignment unit cannot
    overlap) and are blended.

    Args:
        cfg: the stage configuration.
        patch: requested side in voxels (rounded down to the alignment, at least one alignment unit, at
            most the padded grid).
        overlap: least overlap in voxels (global attention only).
    """
    align = patch_alignment(cfg)
    r = cfg.resolution
    padded = -(-r // align) * align
    side = min(padded, max(align, int(patch) // align * align))
    windowed = windowed_attention(cfg)
    exact = windowed and not cfg.model.decoder_channels  # a decoder's convolutions read across patch borders
    ov = 0 if exact else min(side // 2, cfg.model.patch_overlap if overlap is None else int(overlap))
    starts = tile_starts(padded, side, ov, align)
    weights = blend_weights_1d(starts, side, padded)
    return PatchPlan(r, padded, side, tuple(starts), windowed, tuple(weights))


def _noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``, drawn where ``generator`` lives (torch's default generator of
    ``device`` without one). ``XrayToCTGenerator.run`` passes a CPU generator, so that a seed gives the same noise on
    the CPU and on a GPU (whose generator draws another stream), as SR's sampling does; at most a 256^3 cube of it."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def _usable_memory(device: torch.device | str) -> int:
    """Bytes a sampling run may plan to use on ``device``: its free memory (on a GPU that already counts what this
    process holds cached there, :func:`~DiffusionCore.tiling.device_available_memory`), times
    ``tiling.MEMORY_SAFETY_FRACTION``."""
    return int(device_available_memory(torch.device(device)) * MEMORY_SAFETY_FRACTION)


def detail_only(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, D, H, W; even sides) less the mean of each of its 2x2x2 blocks: what a grid of half the resolution
    cannot hold. Every block of the result sums to zero, so adding it to a volume keeps that volume's block means
    (``model.keep_coarse``; a patch is block-aligned because its origin is a multiple of the token size)."""
    if any(s % 2 for s in x.shape[2:]):
        raise InputError(f"detail_only needs even sides; got {tuple(x.shape[2:])}")
    return x - F.interpolate(F.avg_pool3d(x, 2), scale_factor=2, mode="nearest")


def _crop(x: torch.Tensor, origin: tuple[int, int, int], side: int) -> torch.Tensor:
    """The (B, C, side, side, side) cube of ``x`` at ``origin``."""
    z, y, w = origin
    return x[:, :, z : z + side, y : y + side, w : w + side]


def _pad_end(x: torch.Tensor, side: int) -> torch.Tensor:
    """Pad the last three axes of ``x`` at their end to ``side`` (reflection; edge repeat when too short)."""
    pad = side - x.shape[-1]
    if pad <= 0:
        return x
    mode = "reflect" if pad < x.shape[-1] else "replicate"
    return F.pad(x, (0, pad, 0, pad, 0, pad), mode=mode)


def _chunked(fn: nn.Module, x: torch.Tensor, chunk: int, halo: int) -> torch.Tensor:
    """``fn(x)`` for a stack of same-padded convolutions reading ``halo`` voxels around each output voxel,
    evaluated over cubes of ``chunk`` voxels with ``halo`` voxels of context (equal to one whole pass)."""
    n = x.shape[-1]
    if chunk >= n:
        return fn(x)
    out = None
    for z in range(0, n, chunk):
        for y in range(0, n, chunk):
            for w in range(0, n, chunk):
                lo = [max(0, v - halo) for v in (z, y, w)]
                hi = [min(n, v + chunk + halo) for v in (z, y, w)]
                part = fn(x[:, :, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
                if out is None:
                    out = x.new_empty(x.shape[0], part.shape[1], *x.shape[2:])
                a = [v - lo_ for v, lo_ in zip((z, y, w), lo)]
                e = [min(n, v + chunk) - v for v in (z, y, w)]
                out[:, :, z : z + e[0], y : y + e[1], w : w + e[2]] = part[
                    :, :, a[0] : a[0] + e[0], a[1] : a[1] + e[1], a[2] : a[2] + e[2]
                ]
    return out


class VoxelDecoder(nn.Module):
    """Token features (B, C, g, g, g) to voxels (B, 1, S, S, S), S = g * 2^levels: per level a 2x transposed
    convolution, then a 3^3 convolution that also reads the voxel context (x_t and the like) averaged to that
    level's resolution, so each level can place what the tokens say by what the volume shows there. The last
    convolution starts at zero, so an untrained decoder outputs zero, as the linear head does.

    Args:
        width: token feature width C.
        channels: one width per level (coarse to fine).
        context: channels of the voxel context read at every level.
    """

    def __init__(self, width: int, channels: list[int] | tuple[int, ...], context: int):
        super().__init__()
        self.ups = nn.ModuleList()
        self.convs = nn.ModuleList()
        cin = width
        for ch in channels:
            self.ups.append(nn.ConvTranspose3d(cin, ch, 2, stride=2))
            self.convs.append(nn.Conv3d(ch + context, ch, 3, padding=1))
            cin = ch
        self.out = nn.Conv3d(cin, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        side = context.shape[-1]
        for up, conv in zip(self.ups, self.convs):
            h = F.silu(up(h))
            f = side // h.shape[-1]
            part = context if f == 1 else F.avg_pool3d(context, f)
            h = F.silu(conv(torch.cat([h, part.to(h.dtype)], dim=1)))
        return self.out(h)


class StageModel(nn.Module):
    """One cascade stage (see module docstring).

    Args:
        cfg: the stage configuration (resolution, xray_resolution, model settings).
    """

    def __init__(self, cfg: XrayStageConfig):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        c, p = m.voxel_channels, m.patch_size
        self.grid = cfg.resolution // p
        self.encoder = XrayEncoder(list(m.encoder_channels), c, m.xray_tokens)
        self.lifting = (
            DepthLifting(list(m.encoder_channels), c, m.depth_bands) if m.use_depth_lifting else None
        )
        #: Stage 1 with ``model.atlas_prior`` refines its registered atlas as stages 2-3 refine the previous volume.
        self.uses_atlas = cfg.stage == 1 and m.atlas_prior
        self.has_prev = cfg.stage > 1 or self.uses_atlas
        #: Stage 1 with ``model.lifting_residual``: the output is a correction on the lifting-only volume.
        self.lifting_residual = cfg.stage == 1 and m.lifting_residual
        #: Stage 1 with ``model.lifting_mean_prior``: the full-resolution lifting volume is the mean CT plus a correction.
        self.uses_mean_prior = cfg.stage == 1 and m.lifting_mean_prior
        # The atlas and the lifting's prior come from the cascade's mean training CT (:meth:`derive_priors`): derived,
        # never stored in the weights, so they cannot disagree with it.
        r = cfg.resolution
        if self.uses_atlas:
            self.register_buffer("atlas", torch.full((1, 1, r, r, r), -1.0), persistent=False)
        if self.uses_mean_prior:
            self.register_buffer("mean_prior", torch.full((1, 1, r, r, r), -1.0), persistent=False)
        self.profile = (
            RayProfileHead(list(m.encoder_channels), m.lifting_profile, cfg.resolution)
            if m.lifting_profile and self.lifting is not None
            else None
        )
        #: Volumes read beside x_t, voxel by voxel: the previous stage's (stages 2-3), the full-resolution lifting.
        self.n_volumes = int(self.has_prev) + int(self.profile is not None)
        self.patch_embed = nn.Conv3d(1 + self.n_volumes, c, p, stride=p)
        self.pos = nn.Parameter(torch.zeros(3, c, self.grid))
        nn.init.normal_(self.pos, std=0.02)
        self.time_mlp = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.prev_embed = (
            nn.Sequential(
                nn.Conv3d(1, c, p, stride=p),
                nn.SiLU(),
                nn.AdaptiveAvgPool3d(1),
                nn.Flatten(),
                nn.Linear(c, c),
            )
            if self.has_prev
            else None
        )
        self.blocks = nn.ModuleList(
            HybridViTBlock(c, m.vit_heads, m.mlp_ratio, use_adaln=m.use_adaln, cross_attention=m.cross_attention,
                           window=m.window_size, max_full_tokens=m.max_full_tokens,
                           memory_efficient=m.use_memory_efficient)
            for _ in range(m.vit_depth)
        )  # fmt: skip
        self.final_norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))
        nn.init.zeros_(self.final_adaln[-1].weight)
        nn.init.zeros_(self.final_adaln[-1].bias)
        self.final = self.decoder = None
        if m.decoder_channels:  # the tokens are decoded to voxels by convolutions that also read the volume
            context = 1 + self.n_volumes + (2 if m.refine_xray else 0)
            self.decoder = VoxelDecoder(c, m.decoder_channels, context)
        else:  # a linear map from each token to its p^3 voxels
            self.final = nn.Linear(c, p**3)
            nn.init.zeros_(self.final.weight)
            nn.init.zeros_(self.final.bias)
        self.gradient_checkpointing = cfg.training.gradient_checkpointing
        self.refine = None
        if m.refine_channels > 0:  # sees the token output, x_t and the base: removes patch seams, adds detail
            k = m.refine_channels
            self.refine = nn.Sequential(
                nn.Conv3d((5 if m.refine_xray else 3) + int(self.profile is not None), k, 3, padding=1), nn.SiLU(),
                nn.Conv3d(k, k, 3, padding=1), nn.SiLU(),
                nn.Conv3d(k, 1, 3, padding=1),
            )  # fmt: skip
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)
        #: The :class:`PatchPlan` of the last :meth:`sample` call (None: one whole-grid pass).
        self.last_plan: PatchPlan | None = None

    @property
    def resolution(self) -> int:
        return self.cfg.resolution

    def prepare_xray(self, xray: torch.Tensor) -> torch.Tensor:
        """Resize a (B, 1, H, W) radiograph in [0, 1] to this stage's ``xray_resolution``."""
        r = self.cfg.xray_resolution
        if xray.shape[-2:] != (r, r):
            xray = F.interpolate(xray, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return xray

    def prepare_prev(self, prev: torch.Tensor) -> torch.Tensor:
        """Upsample a previous-stage volume (B, 1, r, r, r) to this stage's grid (trilinear)."""
        r = self.cfg.resolution
        if prev.shape[-3:] != (r, r, r):
            prev = F.interpolate(prev, size=(r, r, r), mode="trilinear", align_corners=False)
        return prev

    @property
    def dtype(self) -> torch.dtype:
        """The type of the stage's weights: every tensor a run makes (noise, times) takes it, not torch's default type
        (a caller's ``torch.set_default_dtype(torch.float64)`` would otherwise meet float32 weights)."""
        return next(self.parameters()).dtype

    @property
    def refine_halo(self) -> int:
        """Voxels of context the refinement head reads around a voxel (0 without the head)."""
        if self.refine is None:
            return 0
        return sum(
            (mod.kernel_size[0] - 1) // 2 * mod.dilation[0]
            for mod in self.refine
            if isinstance(mod, nn.Conv3d)
        )

    @torch.no_grad()
    def derive_priors(self, mean_ct: torch.Tensor) -> None:
        """Derive the priors that stage 1 reads from the cascade's mean training CT (1, 1, R, R, R), model units: the
        atlas (``model.atlas_prior``; blurred by ``data.atlas_blur_voxels``) and the lifting's mean
        (``model.lifting_mean_prior``). Nothing to do for other stages."""
        if self.uses_atlas:
            blur = self.cfg.data.atlas_blur_voxels
            self.atlas.copy_(gaussian_blur(mean_ct.float(), blur) if blur > 0 else mean_ct)
        if self.uses_mean_prior:
            self.mean_prior.copy_(mean_ct)

    def _ray_profile(self, feats: list[torch.Tensor], prepared: torch.Tensor) -> torch.Tensor | None:
        """The full-resolution lifting volume (B, 1, R, R, R): the ray head's output, on the mean CT with
        ``model.lifting_mean_prior``; None without the head."""
        if self.profile is None:
            return None
        prof = self.profile(feats, prepared, self.cfg.data.view)
        return prof + self.mean_prior.to(prof.dtype) if self.uses_mean_prior else prof

    def registered_atlas(self, xray: torch.Tensor) -> torch.Tensor:
        """The weights' atlas fitted to each (B, 1, H, W) radiograph (B, 1, R, R, R), model units (``model.atlas_prior``;
        :func:`~DiffusionCore.xray.atlas.register_atlas`)."""
        if not self.uses_atlas:
            raise InputError(f"stage {self.cfg.stage} has no atlas (model.atlas_prior is off)")
        return register_atlas(self.atlas, xray, self.cfg.data.fov_mm, self.cfg.data.view)[0]

    def condition(self, xray: torch.Tensor, prev: torch.Tensor | None = None) -> StageCondition:
        """Everything the denoiser needs besides ``x_t`` and ``t``, for the whole grid (once per radiograph).

        Args:
            xray: (B, 1, H, W) radiograph, attenuation style [0, 1] (resized to xray_resolution).
            prev: (B, 1, r, r, r) previous-stage volume in model units (stages 2-3; required there); for stage 1
                with ``model.atlas_prior`` its atlas (default: the weights' atlas registered to ``xray``).
        """
        if self.uses_atlas and prev is None:
            prev = self.registered_atlas(xray)
        if self.has_prev and prev is None:
            raise InputError(f"stage {self.cfg.stage} needs the previous stage's volume")
        prepared = self.prepare_xray(xray)
        feats, glob, tokens = self.encoder(prepared)
        lifted = self.lifting(feats, self.grid, self.cfg.data.view) if self.lifting is not None else None
        profile = self._ray_profile(feats, prepared)
        prev_up = prev_cond = None
        if self.has_prev:
            prev_up = self.prepare_prev(prev)
            prev_cond = self.prev_embed(prev_up)
        rays = None
        if self.cfg.model.refine_xray and (self.refine is not None or self.decoder is not None):
            r = self.cfg.resolution
            img = F.interpolate(xray.float(), size=(r, r), mode="bilinear", align_corners=False, antialias=True)
            img = img.flip(2)  # rows superior-first -> z ascending
            rays = img[:, :, :, None, :] if self.cfg.data.view == "pa" else img[:, :, :, :, None]
        r = self.cfg.resolution
        base = self._lifted_part(lifted, profile, (0, 0, 0), r) if self.lifting_residual else None
        return StageCondition(tokens=tokens, glob=glob, prev_cond=prev_cond, lifted=lifted, prev=prev_up, rays=rays,
                              profile=profile, base=base)  # fmt: skip

    def _refine_input(
        self, out: torch.Tensor, x_t: torch.Tensor, base: torch.Tensor, ctx: StageCondition,
        origin: tuple[int, int, int],
    ) -> torch.Tensor:
        """The refinement head's input over the cube at ``origin``: the token output, x_t and the base, then
        (``model.refine_xray``) the radiograph value of each voxel's ray and the voxel's depth in [-1, 1], then
        (``model.lifting_profile``) the full-resolution lifting volume."""
        profile = [] if ctx.profile is None else [_crop(ctx.profile, origin, out.shape[-1]).to(out.dtype)]
        return torch.cat([out, x_t, base, *self._ray_parts(ctx, origin, out), *profile], dim=1)

    def _volumes(self, ctx: StageCondition, origin: tuple[int, int, int], like: torch.Tensor) -> list[torch.Tensor]:
        """The volumes read beside x_t over the cube of ``like`` at ``origin`` (:attr:`n_volumes` of them)."""
        s = like.shape[-1]
        return [_crop(v, origin, s).to(like.dtype) for v in (ctx.prev, ctx.profile) if v is not None]

    def _decoder_context(
        self, x_t: torch.Tensor, ctx: StageCondition, origin: tuple[int, int, int]
    ) -> torch.Tensor:
        """What the decoder reads beside the tokens over the cube at ``origin``: x_t, the previous stage's
        volume (stages 2-3), the full-resolution lifting volume (``model.lifting_profile``), and the ray parts of
        :meth:`_refine_input` (``model.refine_xray``)."""
        return torch.cat([x_t, *self._volumes(ctx, origin, x_t), *self._ray_parts(ctx, origin, x_t)], dim=1)

    def _ray_parts(
        self, ctx: StageCondition, origin: tuple[int, int, int], like: torch.Tensor
    ) -> list[torch.Tensor]:
        """The radiograph value of each voxel's ray and the voxel's depth in [-1, 1] over the cube of ``like``
        at ``origin`` (two (B, 1, S, S, S) tensors), or nothing without ``model.refine_xray``."""
        parts: list[torch.Tensor] = []
        if ctx.rays is not None:
            b, s = like.shape[0], like.shape[-1]
            r = self.cfg.resolution
            depth_axis = 3 if self.cfg.data.view == "pa" else 4
            sl = [slice(None), slice(None)] + [slice(o, o + s) for o in origin]
            sl[depth_axis] = slice(None)  # the rays are constant along the depth axis
            rays = ctx.rays[tuple(sl)].to(like.dtype)
            o = origin[depth_axis - 2]
            depth = torch.linspace(-1.0, 1.0, r, device=like.device, dtype=like.dtype)
            if o + s > r:  # a patch reaching into the padding of a padded grid: the depths run on past 1
                extra = torch.arange(1, o + s - r + 1, device=like.device, dtype=like.dtype) * (2.0 / max(r - 1, 1))
                depth = torch.cat([depth, 1.0 + extra])
            depth = depth[o : o + s]
            shape = [1, 1, 1, 1, 1]
            shape[depth_axis] = s
            parts += [rays.expand(b, 1, s, s, s), depth.view(shape).expand(b, 1, s, s, s)]
        return parts

    def _check_patch(self, x_t: torch.Tensor, origin: tuple[int, int, int] | None) -> tuple[int, int, int]:
        s = x_t.shape[-1]
        p = self.cfg.model.patch_size
        if x_t.ndim != 5 or x_t.shape[-3:] != (s, s, s) or s % p:
            raise InputError(
                f"stage {self.cfg.stage} denoises cubes (B, 1, S, S, S) with S a multiple of {p}; "
                f"got shape {tuple(x_t.shape)}"
            )
        o = (0, 0, 0) if origin is None else tuple(int(v) for v in origin)
        if len(o) != 3 or any(v < 0 or v % p for v in o):
            raise InputError(f"patch origin {origin} must be three non-negative multiples of {p} voxels")
        return o  # type: ignore[return-value]

    def _token_output(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        ctx: StageCondition,
        origin: tuple[int, int, int],
        windowed: bool | None,
    ) -> torch.Tensor:
        """The token head's output (B, 1, S, S, S) for the cube of ``x_t`` whose corner lies at ``origin``.

        Positional embeddings and lifted features are read at the cube's place in the whole grid (token
        indices past the grid's end, in a padded grid, repeat the last one); ``ctx.prev`` must cover the cube.
        """
        b, s = x_t.shape[0], x_t.shape[-1]
        p = self.cfg.model.patch_size
        g = s // p
        idx = [torch.arange(o // p, o // p + g, device=x_t.device).clamp_(max=self.grid - 1) for o in origin]
        whole = g == self.grid and origin == (0, 0, 0)
        inp = torch.cat([x_t, *self._volumes(ctx, origin, x_t)], dim=1) if self.n_volumes else x_t
        h = self.patch_embed(inp)
        pz, py, px = (self.pos[k] if whole else self.pos[k][:, idx[k]] for k in range(3))
        h = h + pz[None, :, :, None, None] + py[None, :, None, :, None] + px[None, :, None, None, :]
        if ctx.lifted is not None:
            lifted = ctx.lifted
            if not whole:
                lifted = lifted.index_select(2, idx[0]).index_select(3, idx[1]).index_select(4, idx[2])
            h = h + lifted
        cond = self.time_mlp(timestep_embedding(t, h.shape[1])) + ctx.glob
        if ctx.prev_cond is not None:
            cond = cond + ctx.prev_cond
        seq = h.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                seq = checkpoint(blk, seq, cond, ctx.tokens, g, windowed, use_reentrant=False)
            else:
                seq = blk(seq, cond, ctx.tokens, g, windowed)
        shift, scale = self.final_adaln(cond).chunk(2, dim=-1)
        seq = modulate(self.final_norm(seq), shift, scale)
        if self.decoder is not None:
            h = seq.transpose(1, 2).reshape(b, -1, g, g, g)
            return self.decoder(h, self._decoder_context(x_t, ctx, origin))
        out = self.final(seq)  # (B, g^3, p^3)
        return out.view(b, g, g, g, p, p, p).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, 1, s, s, s)

    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        ctx: StageCondition,
        *,
        origin: tuple[int, int, int] | None = None,
        return_lifted: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """x0 for the whole grid, or for one cube patch of it (see :meth:`forward`), from a :meth:`condition`."""
        o = self._check_patch(x_t, origin)
        s = x_t.shape[-1]
        r = self.cfg.resolution
        if any(v + s > r for v in o):
            raise InputError(f"a {s}^3 patch at {o} does not fit in stage {self.cfg.stage}'s {r}^3 grid")
        whole = s == r
        out = self._token_output(x_t, t, ctx, o, None if whole else windowed_attention(self.cfg))
        base = self._base(ctx, o, out)
        if self.refine is not None:
            out = out + self.refine(self._refine_input(out, x_t, base, ctx, o))
        out = self._x0(out, x_t, t, base)
        if not return_lifted:
            return out
        return out, self._lifting_volume(ctx, o, s)

    def _lifting_volume(self, ctx: StageCondition, origin: tuple[int, int, int], side: int) -> torch.Tensor | None:
        """The lifting-only volume over the cube at ``origin``: cropped from the condition's whole-grid copy where it
        holds one (``model.lifting_residual``), else computed for the cube (:meth:`_lifted_part`)."""
        if ctx.base is not None:
            return _crop(ctx.base, origin, side)
        return self._lifted_part(ctx.lifted, ctx.profile, origin, side)

    def _base(self, ctx: StageCondition, origin: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
        """What the denoiser's output corrects over the cube of ``like`` at ``origin``: the previous stage's volume
        (stages 2-3; stage 1's atlas), the lifting-only volume (stage 1 with ``model.lifting_residual``), or zero."""
        for vol in (ctx.prev, ctx.base):
            if vol is not None:
                return _crop(vol, origin, like.shape[-1]).to(like.dtype)
        return torch.zeros_like(like)

    def _lifted_part(
        self, feats: torch.Tensor | None, profile: torch.Tensor | None, origin: tuple[int, int, int], side: int
    ) -> torch.Tensor | None:
        """The lifting-only volume (B, 1, S, S, S) over the cube at ``origin``: equal to that crop of the whole
        grid's, computed from the lifted features (``StageCondition.lifted``) of the cube's tokens plus one token
        around it (interpolation), plus the crop of the full-resolution lifting volume ``profile``
        (``model.lifting_profile``; None without it)."""
        if feats is None or self.lifting is None:
            return None
        r = self.cfg.resolution
        if side == r:
            vol = self.lifting.lifted_volume(feats, r)
        else:
            p = self.cfg.model.patch_size
            lo = [max(0, o // p - 1) for o in origin]
            hi = [min(self.grid, (o + side) // p + 1) for o in origin]
            part = feats[:, :, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            vol = self.lifting.lifted_volume(part, tuple((b - a) * p for a, b in zip(lo, hi)))
            vol = _crop(vol, tuple(o - a * p for o, a in zip(origin, lo)), side)
        return vol if profile is None else vol + _crop(profile, origin, side).to(vol.dtype)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        xray: torch.Tensor,
        prev: torch.Tensor | None = None,
        *,
        return_lifted: bool = False,
        origin: tuple[int, int, int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Predict the clean volume x0 (model units); v and eps follow from ``vdiffusion.predict_x0_eps``.

        The token head (plus the optional full-resolution refinement head) outputs a correction on a base:
        zero for stage 1 (its lifting-only volume with ``model.lifting_residual``, its atlas with
        ``model.atlas_prior``), the upsampled previous-stage volume for stages 2-3 (a residual cascade); with
        ``model.skip_sigma_data`` the correction is scaled by the noise level and x_t is passed through where
        little noise is left (:meth:`_x0`).

        A cube smaller than the grid is a patch whose corner lies at ``origin`` in the grid (training on
        random patches): it reads positional embeddings, lifted features and the previous volume at that
        place, attends in the grid's own windows where the grid's attention is windowed (patch origins and
        sides are then window-aligned), and sees the whole radiograph and the whole previous volume through
        cross-attention and AdaLN.

        Args:
            x_t: (B, 1, R, R, R) noisy volume, model units; or a (B, 1, S, S, S) patch of it.
            t: (B,) times in [0, 1].
            xray: (B, 1, H, W) radiograph, attenuation style [0, 1] (resized to xray_resolution).
            prev: (B, 1, r, r, r) whole previous-stage volume in model units (stages 2-3; required there).
            return_lifted: also return the lifting-only volume (B, 1, S, S, S) (None without lifting).
            origin: (z, y, x) voxel corner of a patch (multiples of ``model.patch_size``); None for (0, 0, 0).
        """
        return self.predict(x_t, t, self.condition(xray, prev), origin=origin, return_lifted=return_lifted)

    def predict_tiled(
        self, x_t: torch.Tensor, t: torch.Tensor, ctx: StageCondition, plan: PatchPlan
    ) -> torch.Tensor:
        """x0 (B, 1, R, R, R) for the whole grid, computed patch by patch.

        The token head runs on each patch of ``plan`` (in the padded grid) and its outputs are blended with
        the plan's weights, which sum to one at every voxel; the refinement head then runs over the blended
        grid in chunks with a halo of :attr:`refine_halo` voxels, which equals running it on the whole grid.

        Args:
            x_t: (B, 1, R, R, R) noisy volume, model units.
            t: (B,) times.
            ctx: the whole grid's :meth:`condition`, with ``prev`` padded to ``plan.padded`` (see
                :meth:`pad_condition`).
            plan: the patches (:func:`plan_patches`).
        """
        r, n = self.cfg.resolution, plan.padded
        xp = _pad_end(x_t, n)
        acc = torch.zeros_like(xp)
        for origin, weight in plan.tiles(x_t.device):
            sl = (slice(None), slice(None), *(slice(o, o + plan.patch) for o in origin))
            acc[sl] += self._token_output(xp[sl], t, ctx, origin, plan.windowed) * weight
        out = acc[..., :r, :r, :r]
        base = self._base(ctx, (0, 0, 0), out)
        if self.refine is not None:
            inp = self._refine_input(out, x_t, base, ctx, (0, 0, 0))
            out = out + _chunked(self.refine, inp, plan.patch, self.refine_halo)
        return self._x0(out, x_t, t, base)

    def _x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """x0 from the heads' output: ``base + out``, or with ``model.skip_sigma_data`` the noise-level skip
        ``base + c_skip (x_t - alpha base) + c_out out`` (:func:`.vdiffusion.skip_scales`): x_t itself where no noise
        is left, base + s * out from pure noise. With ``model.keep_coarse`` the whole change to the base then loses its
        2x2x2-block means (:func:`detail_only`), so x0 keeps the base's."""
        sd = float(self.cfg.model.skip_sigma_data)
        if sd <= 0:
            x0 = out + base
        else:
            c_skip, c_out, a = skip_scales(t, out, sd)
            x0 = base + c_skip * (x_t.to(out.dtype) - a * base) + c_out * out
        return base + detail_only(x0 - base) if self.cfg.model.keep_coarse else x0

    def pad_condition(self, ctx: StageCondition, plan: PatchPlan) -> StageCondition:
        """``ctx`` with the previous-stage volume, the full-resolution lifting volume (and the rays, edge-repeated
        across them) padded at its end to the plan's padded grid."""
        n = plan.padded
        prev, rays, profile = ctx.prev, ctx.rays, ctx.profile
        if prev is not None and prev.shape[-1] != n:
            prev = _pad_end(prev, n)
        if profile is not None and profile.shape[-1] != n:
            profile = _pad_end(profile, n)
        if rays is not None and max(rays.shape[2:]) != n:
            pad = n - max(rays.shape[2:])
            widths = [0 if rays.shape[axis] == 1 else pad for axis in (4, 4, 3, 3, 2, 2)]
            rays = F.pad(rays, [w if i % 2 else 0 for i, w in enumerate(widths)], mode="replicate")
        if prev is ctx.prev and rays is ctx.rays and profile is ctx.profile:
            return ctx
        return dataclasses.replace(ctx, prev=prev, rays=rays, profile=profile)

    def memory_estimate(self, batch: int = 1, patch: int | None = None) -> int:
        """Rough peak bytes of one sampling run of this stage (float32, no gradients).

        Counts the whole-grid arrays the sampler keeps (DDIM state, noise, previous volume, lifted features,
        blend accumulator), the activations of one ViT block on one patch (or the whole grid) including the
        attention score matrices of the SDPA math path, and the refinement head's activations (on the whole
        grid, or on one chunk of the patch-wise pass). Checked against the peak RSS on CPU of the stage-3
        network at 128^3 (windowed): whole grid 499-505 MiB measured, 674 MiB estimated; 8 patches of 64^3
        263-281 MiB measured, 241 MiB estimated (the sampler's safety fraction covers the difference).

        Args:
            batch: volumes generated together.
            patch: patch side in voxels; None for the whole grid.
        """
        m = self.cfg.model
        r, c, p = self.cfg.resolution, m.voxel_channels, m.patch_size
        if patch is None:
            side, n_pad, windowed = r, r, m.use_memory_efficient and self.grid**3 > m.max_full_tokens
        else:
            plan = plan_patches(self.cfg, patch)
            side, n_pad, windowed = plan.patch, plan.padded, plan.windowed
        g = side // p
        tokens = g**3
        per_block = tokens * c * (8 + 2 * m.mlp_ratio)
        if windowed and g % m.window_size == 0:
            scores = m.vit_heads * tokens * m.window_size**3
        else:
            scores = m.vit_heads * tokens * tokens
        # sampler state and its temporaries, padded copies, accumulator, refinement input; lifted features
        fixed = 16 * n_pad**3 + c * self.grid**3
        k = m.refine_channels
        chunk = r if patch is None else min(r, side + 2 * self.refine_halo)
        refine = ((5 if m.refine_xray else 3) + int(self.profile is not None) + 2 * k) * chunk**3 if k else 0
        fixed += 2 * n_pad**3 if self.profile is not None else 0  # the full-resolution lifting volume, padded
        # decoder: per level its upsampled features, their activation, the context and the convolution's output
        ctx_ch = 1 + self.n_volumes + (2 if m.refine_xray else 0)
        levels = len(m.decoder_channels)
        decoder = sum(
            (3 * ch + 2 * ctx_ch) * (side // 2 ** (levels - 1 - i)) ** 3 for i, ch in enumerate(m.decoder_channels)
        )
        return int(1.25 * 4 * batch * (fixed + per_block + scores + 4 * side**3 + refine + decoder))

    def sampling_plan(
        self,
        batch: int = 1,
        device: torch.device | str = "cpu",
        patch: int | None = None,
        memory_limit: int | None = None,
    ) -> PatchPlan | None:
        """The patches generation runs on, or None for one whole-grid pass.

        ``patch`` (or ``model.inference_patch``) asks for patches of that side; without one the whole grid is
        used when its :meth:`memory_estimate` fits ``memory_limit`` (default: the free memory of ``device``,
        plus what this process holds cached there, times ``tiling.MEMORY_SAFETY_FRACTION``). Where the
        whole grid or the asked patch does not fit, the patch side is halved (keeping the alignment) until
        it does.

        Raises:
            ResourceError: not even the smallest patch fits.
        """
        requested = patch if patch is not None else self.cfg.model.inference_patch
        r = self.cfg.resolution
        limit = memory_limit if memory_limit is not None else _usable_memory(device)
        align = patch_alignment(self.cfg)
        if requested:
            side = plan_patches(self.cfg, requested).patch
            first, need = side, self.memory_estimate(batch, side)
        else:
            first, need = r, self.memory_estimate(batch)
            if need <= limit:
                return None
            side = max(align, (r // 2) // align * align)
        while True:
            est = self.memory_estimate(batch, side)
            if est <= limit:
                break
            if side <= align:
                raise ResourceError(
                    f"not enough memory for stage {self.cfg.stage} ({r}^3 voxels): even {side}^3 patches "
                    f"need ~{format_bytes(est)} of {format_bytes(limit)} usable. Free memory, run fewer "
                    "stages, or use a device with more memory."
                )
            side = max(align, (side // 2) // align * align)
        plan = plan_patches(self.cfg, side)
        if side != first:
            logger.info("stage %d: %d^3 voxels at once need ~%s of %s usable; running %d patches of %d^3",
                        self.cfg.stage, first, format_bytes(need), format_bytes(limit), plan.n_tiles,
                        plan.patch)  # fmt: skip
        return None if plan.n_tiles == 1 and plan.padded == r else plan

    @torch.no_grad()
    def lifted_only(self, xray: torch.Tensor) -> torch.Tensor:
        """The lifting-only estimate (B, 1, R, R, R) in model units (zeros = -1 HU-window mid without lifting)."""
        if self.lifting is None:
            r = self.cfg.resolution
            return torch.zeros(xray.shape[0], 1, r, r, r, device=xray.device, dtype=self.dtype)
        prepared = self.prepare_xray(xray)
        feats, _, _ = self.encoder(prepared)
        profile = self._ray_profile(feats, prepared)
        r = self.cfg.resolution
        return self._lifted_part(self.lifting(feats, self.grid, self.cfg.data.view), profile, (0, 0, 0), r).clamp(-1.0, 1.0)

    def _lifting_start(self, override: float | None) -> float:
        """Stage 1's start time: ``override`` (a run's choice) or ``diffusion.lifting_start_t`` (the weights')."""
        t = float(self.cfg.diffusion.lifting_start_t if override is None else override)
        if not 0.0 < t <= 1.0:
            raise InputError(f"the lifting start time must be in (0, 1] (1: start from noise); got {t}")
        return t

    def _start(
        self, ctx: StageCondition, noise: torch.Tensor, lifting_start_t: float | None
    ) -> tuple[float, torch.Tensor]:
        """Where sampling starts: (t0, x at t0): the noised previous volume (stages 2-3; stage 1's registered atlas
        with ``model.atlas_prior``), the noised lifting-only
        volume (stage 1 with a start below 1; :meth:`lifted_only`, from ``ctx`` instead of encoding the radiograph
        again) or pure noise."""
        if self.has_prev:
            t0, x0 = float(self.cfg.diffusion.prev_stage_t), ctx.prev
        elif self.lifting is not None and (t0 := self._lifting_start(lifting_start_t)) < 1.0:
            x0 = self._lifting_volume(ctx, (0, 0, 0), self.cfg.resolution).clamp(-1.0, 1.0)  # type: ignore[union-attr]
        else:
            return 1.0, noise
        return t0, q_sample(x0, torch.tensor(t0, dtype=noise.dtype), noise)

    @torch.no_grad()
    def quick_estimate(
        self,
        xray: torch.Tensor,
        prev: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        lifting_start_t: float | None = None,
    ) -> torch.Tensor:
        """A one-pass stand-in for :meth:`sample` (B, 1, R, R, R), model units: x0 predicted once at the
        sampling start. Training conditions the next stage on it, so that stage learns to refine volumes with
        this stage's own kind of errors (depth misplacement, blur) and not only noised ground truth.
        ``lifting_start_t`` is stage 1's start time, as in :meth:`sample` (default: the weights')."""
        r = self.cfg.resolution
        noise = _noise((xray.shape[0], 1, r, r, r), generator, xray.device, self.dtype)
        ctx = self.condition(xray, prev)
        t0, x_start = self._start(ctx, noise, lifting_start_t)
        out = self.predict(x_start, torch.full((xray.shape[0],), t0, device=xray.device, dtype=self.dtype), ctx)
        return out.clamp(-1.0, 1.0)  # type: ignore[union-attr]

    @torch.no_grad()
    def sample(
        self,
        xray: torch.Tensor,
        prev: torch.Tensor | None = None,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        cancel: threading.Event | None = None,
        step_callback: Callable[[int, int], None] | None = None,
        patch: int | None = None,
        memory_limit: int | None = None,
        lifting_start_t: float | None = None,
    ) -> torch.Tensor:
        """Generate this stage's volume (B, 1, R, R, R) in model units with DDIM.

        Stage 1 starts from pure noise at t = 1, or from its lifting-only volume noised to
        ``diffusion.lifting_start_t`` when that is below 1; stages 2-3 start from the upsampled previous volume
        noised to ``diffusion.prev_stage_t`` (consistent with the coarse anatomy), and so does stage 1 from its
        registered atlas with ``model.atlas_prior`` (``prev``; default: :meth:`registered_atlas`). Each step's x0 comes
        from one whole-grid pass or from blended patches (:meth:`sampling_plan`; ``patch`` and
        ``memory_limit`` are passed to it); the plan used is kept in :attr:`last_plan`.
        """
        r = self.cfg.resolution
        b = xray.shape[0]
        steps = steps or self.cfg.diffusion.sampling_steps
        noise = _noise((b, 1, r, r, r), generator, xray.device, self.dtype)
        ctx = self.condition(xray, prev)
        diffusion = VDiffusion(prediction="x0")
        t0, x_start = self._start(ctx, noise, lifting_start_t)
        plan = self.sampling_plan(b, xray.device, patch, memory_limit)
        self.last_plan = plan
        if plan is None:

            def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self.predict(x, t, ctx)

        else:
            padded = self.pad_condition(ctx, plan)

            def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self.predict_tiled(x, t, padded, plan)

        return diffusion.sample(
            fn, x_start, steps=steps, t_start=t0, cancel=cancel, step_callback=step_callback
        )


class UnifiedHybridViTCascade(nn.Module):
    """The cascade of stages (seed API).

    Args:
        configs: one :class:`XrayStageConfig` per stage, in order (stage 1 first).
    """

    def __init__(self, configs: list[XrayStageConfig]):
        super().__init__()
        if not configs:
            raise ConfigError("the cascade needs at least one stage configuration")
        for i, c in enumerate(configs):
            if c.stage != i + 1:
                raise ConfigError(
                    f"stage configs must be in order 1, 2, 3; position {i + 1} has stage {c.stage}"
                )
        self.configs = list(configs)
        self.stages = nn.ModuleList(build_checked(lambda c=c: StageModel(c), f"stage {c.stage} of the cascade")
                                    for c in configs)  # fmt: skip
        r1 = configs[0].resolution
        #: Mean training CT at stage-1 resolution, model units (the prior-only baseline); air until trained.
        self.register_buffer("mean_ct", torch.full((1, 1, r1, r1, r1), -1.0))
        self.float()  # float32 (what weights files hold) whatever torch's default type; a no-op under its usual one
        self.weights_sha256 = ""
        #: the sample CTs the weights record that they were trained on (their metadata's ``data``), for caveats
        self.training_data: list[str] = []
        self.derive_priors()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.derive_priors())

    def set_mean_ct(self, mean_ct: torch.Tensor) -> None:
        """Store the mean training CT (1, 1, R1, R1, R1), model units, and what stage 1 derives from it (the one way to
        change it: a direct write to :attr:`mean_ct` would leave the derived priors behind)."""
        with torch.no_grad():
            self.mean_ct.copy_(mean_ct.to(self.mean_ct))
        self.derive_priors()

    def derive_priors(self) -> None:
        """Stage 1's atlas and lifting prior from :attr:`mean_ct` (after construction, loading and training)."""
        self.stages[0].derive_priors(self.mean_ct)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0, resolutions: tuple[int, ...] = TINY_RESOLUTIONS) -> UnifiedHybridViTCascade:
        """A tiny random-weight cascade for tests and self-tests (CPU, seconds): its weights are drawn from torch's
        generator seeded with ``seed``, whose state (the caller's) is put back afterwards."""
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: the networks are built on the CPU
            torch.random.default_generator.manual_seed(seed)
            return cls([tiny_stage_config(i + 1, r) for i, r in enumerate(resolutions)])

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], source: str = "the weights"
    ) -> UnifiedHybridViTCascade:
        """The cascade a weights file describes, with its tensors; torch's global random state is left as it was.

        Raises:
            WeightsError: another family, configurations that cannot be built, or tensors that do not fit them
                (one line, before the networks are allocated).
        """
        if metadata.get("family") not in (None, FAMILY):
            raise WeightsError(
                f"these weights are for the {metadata.get('family')!r} family, not X-ray to CT"
            )
        configs = _weights_configs(metadata, source)
        # the layers' default initialisation draws from torch's CPU generator before the tensors overwrite it: the
        # caller's generator is put back (networks are built on the CPU, so no CUDA generator is drawn from)
        with torch.random.fork_rng(devices=[]):
            return build_from_weights(lambda: cls(configs), tensors, source, "the X-ray to CT cascade")

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, allow_unregistered: bool = True
    ) -> UnifiedHybridViTCascade:
        """Load from a registered name or a safetensors file (seed API); torch's global random state is left as it
        was (:meth:`from_tensors`), so a caller's seeded draws do not depend on whether a model was loaded first.

        Args:
            path: weights name or ``.safetensors`` file written by :meth:`save_pretrained` / ``train xray``.
            allow_unregistered: accept files whose sha256 is not in the registry (default True at this
                model level; the user-facing :class:`XrayToCTGenerator` refuses them unless asked).
        """
        from ..weights.registry import load_safetensors, resolve_weights

        resolved = resolve_weights(str(path), family=FAMILY, allow_unregistered=allow_unregistered)
        tensors, meta = load_safetensors(resolved.path, expected_sha256=resolved.sha256)
        model = cls.from_tensors(tensors, meta, str(resolved.path))
        model.weights_sha256 = resolved.sha256
        model.training_data = _recorded_names(meta.get("data"))
        model.eval()
        return model

    def export_metadata(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"family": FAMILY, "configs": [config_to_dict(c) for c in self.configs], **(extra or {})}

    def save_pretrained(self, path: str | os.PathLike, extra_metadata: dict[str, Any] | None = None) -> str:
        """Write weights + configs to one safetensors file (atomic); returns its sha256."""
        from ..weights.registry import save_safetensors

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        return save_safetensors(path, tensors, self.export_metadata(extra_metadata))

    # -- generation -----------------------------------------------------------------------------------
    @staticmethod
    def _as_xray(xray: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(xray, dtype=torch.float32)
        if x.ndim == 2:
            x = x[None, None]
        elif x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != 1:
            raise InputError(f"xray must be (H, W), (B, H, W) or (B, 1, H, W); got shape {tuple(x.shape)}")
        return x

    def generate_stages(
        self,
        xray: torch.Tensor,
        num_stages: int | None = None,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        cancel: threading.Event | None = None,
        on_stage: Callable[[int, torch.Tensor], None] | None = None,
        step_callback: Callable[[int, int, int], None] | None = None,
        memory_limit: int | None = None,
        post_stage: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        num_samples: int | None = None,
        lifting_start_t: float | None = None,
    ) -> list[torch.Tensor]:
        """Run stages 1..num_stages; returns every stage's volume (B, 1, R_i, R_i, R_i), model units.

        Each stage draws ``num_samples`` samples (default: its config's ``diffusion.num_samples``) from the
        same generator and returns their mean, an estimate of the most likely volume: a single sample of a
        model trained on few CTs carries texture noise that the mean removes. ``step_callback`` then counts
        ``samples x steps`` per stage.

        ``post_stage(stage, volume)``, when given, replaces each stage's volume before it is reported and
        passed to the next stage (e.g. the re-projection consistency step of :mod:`.consistency`).

        A stage runs over patches where its config asks for them (``model.inference_patch``) or where its
        whole grid would not fit ``memory_limit`` bytes (default: the device's free memory); see
        :meth:`StageModel.sampling_plan`.
        """
        n = num_stages or self.num_stages
        if not 1 <= n <= self.num_stages:
            raise InputError(f"num_stages must be between 1 and {self.num_stages} for these weights; got {n}")
        x = self._as_xray(xray).to(next(self.parameters()).device)
        outs: list[torch.Tensor] = []
        prev = self.stages[0].registered_atlas(x) if self.stages[0].uses_atlas else None  # once for all samples
        for i in range(n):
            k = int(num_samples or self.configs[i].diffusion.num_samples)
            if k < 1:
                raise InputError(f"num_samples must be at least 1; got {k}")
            total = None
            for j in range(k):
                cb = ((lambda d, t, i=i, j=j, k=k: step_callback(i + 1, j * t + d, k * t)) if step_callback
                      else None)  # fmt: skip
                one = self.stages[i].sample(x, prev, steps=steps, generator=generator, cancel=cancel,
                                            lifting_start_t=lifting_start_t,
                                            step_callback=cb, memory_limit=memory_limit)  # fmt: skip
                total = one if total is None else total + one
            prev = total / k
            if post_stage is not None:
                prev = post_stage(i + 1, prev)
            outs.append(prev)
            if on_stage is not None:
                on_stage(i + 1, prev)
        return outs

    def generate(self, xray: torch.Tensor, num_stages: int = 3, **kwargs: Any) -> torch.Tensor:
        """Final volume (B, 1, R, R, R) in model units after ``num_stages`` stages (seed API)."""
        return self.generate_stages(xray, min(num_stages, self.num_stages), **kwargs)[-1]

    def generate_stage1(self, xray: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Stage 1 alone (64^3 with the shipped configs)."""
        return self.stages[0].sample(self._as_xray(xray), None, **kwargs)

    def generate_stage2(
        self, xray: torch.Tensor, stage1_output: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Stage 2 from a stage-1 volume (generated first when not given)."""
        x = self._as_xray(xray)
        prev = stage1_output if stage1_output is not None else self.generate_stage1(x, **kwargs)
        return self.stages[1].sample(x, prev, **kwargs)

    def generate_stage3(
        self, xray: torch.Tensor, stage2_output: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Stage 3 from a stage-2 volume (generated first when not given)."""
        x = self._as_xray(xray)
        prev = stage2_output if stage2_output is not None else self.generate_stage2(x, **kwargs)
        return self.stages[2].sample(x, prev, **kwargs)


def _recorded_names(value: Any) -> list[str]:
    """The names a weights file records (its metadata's ``data``: a list, or the list written out as text, as
    ``train xray`` records it: ``"['chest-lidc', 'chest-dx']"``); read as a literal, never evaluated."""
    import ast

    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value] if value else []
    return [str(v) for v in value] if isinstance(value, list | tuple) else []


def _weights_configs(metadata: dict[str, Any], source: str) -> list[XrayStageConfig]:
    """The stage configurations a weights file's metadata records, checked (architecture and generation sizes,
    ``trained_stages`` among the stages present).

    Raises:
        WeightsError: naming ``source`` and the key.
    """
    cfgs = metadata.get("configs")
    if not cfgs or not isinstance(cfgs, list):
        raise WeightsError(f"{source} have no stage configurations in their metadata; export them again")
    with weights_architecture(source):
        configs = [load_config(c, XrayStageConfig) for c in cfgs]
    present = [c.stage for c in configs]
    trained = metadata.get("trained_stages", present)
    if not isinstance(trained, list) or any(isinstance(t, bool) or t not in present for t in trained):
        raise WeightsError(
            f"{source} record trained_stages {trained!r}, which are not among their stages {present}: the file is "
            "damaged or was edited; use other weights, or export them again"
        )
    warn_untrained_stages(metadata, source)
    problem = stages_geometry_problem(configs)
    if problem and (source, problem) not in _warned_weights:  # once per file; train xray now refuses such stages
        _warned_weights.add((source, problem))
        logger.warning("%s: %s; generation uses stage 1's view and field of view for every stage, so a later stage "
                       "runs on radiographs unlike those it was trained on: retrain it with stage 1's settings",
                       source, problem)  # fmt: skip
    return configs


_warned_weights: set[tuple[str, Any]] = set()  # (file, what was said): each said once


def warn_untrained_stages(metadata: dict[str, Any], source: str) -> None:
    """Warn (once per file) that a cascade's earlier stages were never trained (``untrained_stages``, recorded by
    ``train xray`` when a stage was trained on top of random earlier stages): what it generates is not a CT estimate."""
    untrained = metadata.get("untrained_stages")
    if not isinstance(untrained, list) or not untrained or any(not isinstance(s, int) for s in untrained):
        return
    key = (source, tuple(untrained))
    if key in _warned_weights:
        return
    _warned_weights.add(key)
    stages = ", ".join(str(s) for s in untrained)
    logger.warning(
        "%s: stage(s) %s of these weights were never trained (random weights: a later stage was trained on top of "
        "them without --stage1-checkpoint), so what they generate is not a CT estimate; train stage 1 first, then the "
        "next stage with train xray --stage1-checkpoint <stage-1 weights>",
        source,
        stages,
    )


def check_weights_architecture(path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Check that the tensors of an ``xray`` family file fit the cascade its metadata records, as
    :meth:`UnifiedHybridViTCascade.from_tensors` does, on the meta device (nothing network-sized is allocated).

    Raises:
        WeightsError: another family, invalid configurations, or tensors that do not fit them.
    """
    from ..nn.architecture import build_on_meta, check_state_fits

    source = str(path)
    if metadata.get("family") not in (None, FAMILY):
        raise WeightsError(f"{source} are for the {metadata.get('family')!r} family, not X-ray to CT")
    configs = _weights_configs(metadata, source)
    with weights_architecture(source):
        probe = build_on_meta(lambda: UnifiedHybridViTCascade(configs), "the X-ray to CT cascade")
    check_state_fits(probe.state_dict(), tensors, source)


register_architecture_check("xray", check_weights_architecture)  # weights import and verify compare with it
