"""The hybrid-ViT cascade: one :class:`StageModel` per resolution (64^3 -> 128^3 -> 256^3).

A stage predicts v (or eps) for a noisy volume ``x_t`` (model units, HU window of
``DiffusionCore.sr.intensity``) conditioned on the radiograph (through depth lifting, a global embedding in
AdaLN-Zero, and cross-attention tokens) and, for stages 2-3, on the previous stage's volume upsampled to this
stage's grid. :class:`UnifiedHybridViTCascade` holds the stages and keeps the seed's API
(``from_pretrained``, ``generate``, ``generate_stage1/2/3``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import config_to_dict, load_config
from ..errors import ConfigError, InputError, WeightsError
from .config import XrayStageConfig, tiny_stage_config
from .encoder import XrayEncoder
from .lifting import DepthLifting
from .vdiffusion import alpha_sigma, ddim_sample
from .vit import HybridViTBlock, modulate, timestep_embedding

logger = logging.getLogger(__name__)

#: Weights family name in the registry.
FAMILY = "xray"


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
        self.has_prev = cfg.stage > 1
        self.patch_embed = nn.Conv3d(2 if self.has_prev else 1, c, p, stride=p)
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
        self.final = nn.Linear(c, p**3)
        for layer in (self.final_adaln[-1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.gradient_checkpointing = cfg.training.gradient_checkpointing
        self.refine = None
        if m.refine_channels > 0:  # sees the token output, x_t and the base: removes patch seams, adds detail
            k = m.refine_channels
            self.refine = nn.Sequential(
                nn.Conv3d(3, k, 3, padding=1), nn.SiLU(), nn.Conv3d(k, k, 3, padding=1), nn.SiLU(),
                nn.Conv3d(k, 1, 3, padding=1),
            )  # fmt: skip
            nn.init.zeros_(self.refine[-1].weight)
            nn.init.zeros_(self.refine[-1].bias)

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

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        xray: torch.Tensor,
        prev: torch.Tensor | None = None,
        *,
        return_lifted: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Predict the clean volume x0 (model units); v and eps follow from ``vdiffusion.predict_x0_eps``.

        The token head (plus the optional full-resolution refinement head) outputs a correction on a base:
        zero for stage 1, the upsampled previous-stage volume for stages 2-3 (a residual cascade).

        Args:
            x_t: (B, 1, R, R, R) noisy volume, model units.
            t: (B,) times in [0, 1].
            xray: (B, 1, H, W) radiograph, attenuation style [0, 1] (resized to xray_resolution).
            prev: (B, 1, r, r, r) previous-stage volume in model units (stages 2-3; required there).
            return_lifted: also return the lifting-only volume (B, 1, R, R, R) (None without lifting).
        """
        b = x_t.shape[0]
        if self.has_prev and prev is None:
            raise InputError(f"stage {self.cfg.stage} needs the previous stage's volume")
        feats, glob, tokens = self.encoder(self.prepare_xray(xray))
        inp = x_t if not self.has_prev else torch.cat([x_t, self.prepare_prev(prev)], dim=1)
        h = self.patch_embed(inp)
        g = self.grid
        h = (
            h
            + self.pos[0][None, :, :, None, None]
            + self.pos[1][None, :, None, :, None]
            + self.pos[2][None, :, None, None, :]
        )
        lifted_feats = None
        if self.lifting is not None:
            lifted_feats = self.lifting(feats, g, self.cfg.data.view)
            h = h + lifted_feats
        cond = self.time_mlp(timestep_embedding(t, h.shape[1])) + glob
        if self.prev_embed is not None:
            cond = cond + self.prev_embed(self.prepare_prev(prev))
        seq = h.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                seq = checkpoint(blk, seq, cond, tokens, g, use_reentrant=False)
            else:
                seq = blk(seq, cond, tokens, g)
        shift, scale = self.final_adaln(cond).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(seq), shift, scale))  # (B, G^3, p^3)
        p = self.cfg.model.patch_size
        out = out.view(b, g, g, g, p, p, p).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, 1, g * p, g * p, g * p)
        base = self.prepare_prev(prev) if self.has_prev else torch.zeros_like(out)
        if self.refine is not None:
            out = out + self.refine(torch.cat([out, x_t, base], dim=1))
        out = out + base
        if not return_lifted:
            return out
        lifted = (
            self.lifting.lifted_volume(lifted_feats, self.cfg.resolution)
            if lifted_feats is not None
            else None
        )
        return out, lifted

    @torch.no_grad()
    def lifted_only(self, xray: torch.Tensor) -> torch.Tensor:
        """The lifting-only estimate (B, 1, R, R, R) in model units (zeros = -1 HU-window mid without lifting)."""
        if self.lifting is None:
            r = self.cfg.resolution
            return torch.zeros(xray.shape[0], 1, r, r, r, device=xray.device)
        feats, _, _ = self.encoder(self.prepare_xray(xray))
        return self.lifting.lifted_volume(
            self.lifting(feats, self.grid, self.cfg.data.view), self.cfg.resolution
        )

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
    ) -> torch.Tensor:
        """Generate this stage's volume (B, 1, R, R, R) in model units with DDIM.

        Stage 1 starts from pure noise at t = 1; stages 2-3 start from the upsampled previous volume noised to
        ``diffusion.prev_stage_t`` (fewer steps, consistent with the coarse anatomy).
        """
        r = self.cfg.resolution
        b = xray.shape[0]
        steps = steps or self.cfg.diffusion.sampling_steps
        noise = torch.randn(b, 1, r, r, r, generator=generator, device=xray.device)
        if self.has_prev:
            if prev is None:
                raise InputError(f"stage {self.cfg.stage} needs the previous stage's volume")
            prev = self.prepare_prev(prev)
            t0 = float(self.cfg.diffusion.prev_stage_t)
            a, s = alpha_sigma(torch.tensor(t0))
            x_start = a * prev + s * noise
        else:
            t0 = 1.0
            x_start = noise

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self(x, t, xray, prev)

        return ddim_sample(fn, x_start, steps=steps, prediction="x0",
                           t_start=t0, cancel=cancel, step_callback=step_callback)  # fmt: skip


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
        self.stages = nn.ModuleList(StageModel(c) for c in configs)
        r1 = configs[0].resolution
        #: Mean training CT at stage-1 resolution, model units (the prior-only baseline); air until trained.
        self.register_buffer("mean_ct", torch.full((1, 1, r1, r1, r1), -1.0))
        self.weights_sha256 = ""

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0, resolutions: tuple[int, ...] = (16, 32)) -> UnifiedHybridViTCascade:
        """A tiny random-weight cascade for tests and self-tests (CPU, seconds)."""
        torch.manual_seed(seed)
        return cls([tiny_stage_config(i + 1, r) for i, r in enumerate(resolutions)])

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
    ) -> UnifiedHybridViTCascade:
        if metadata.get("family") not in (None, FAMILY):
            raise WeightsError(
                f"these weights are for the {metadata.get('family')!r} family, not X-ray to CT"
            )
        cfgs = metadata.get("configs")
        if not cfgs:
            raise WeightsError("the weights file has no stage configurations in its metadata; re-export it")
        model = cls([load_config(c, XrayStageConfig) for c in cfgs])
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise WeightsError(
                f"the weights do not match the architecture in their own metadata (missing {len(missing)} "
                f"tensors, e.g. {missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]})"
            )
        return model

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, allow_unregistered: bool = True
    ) -> UnifiedHybridViTCascade:
        """Load from a registered name or a safetensors file (seed API).

        Args:
            path: weights name or ``.safetensors`` file written by :meth:`save_pretrained` / ``train xray``.
            allow_unregistered: accept files whose sha256 is not in the registry (default True at this
                model level; the user-facing :class:`XrayToCTGenerator` refuses them unless asked).
        """
        from ..weights.registry import load_safetensors, resolve_weights

        resolved = resolve_weights(str(path), family=FAMILY, allow_unregistered=allow_unregistered)
        tensors, meta = load_safetensors(resolved.path, expected_sha256=resolved.sha256)
        model = cls.from_tensors(tensors, meta)
        model.weights_sha256 = resolved.sha256
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
    ) -> list[torch.Tensor]:
        """Run stages 1..num_stages; returns every stage's volume (B, 1, R_i, R_i, R_i), model units."""
        n = num_stages or self.num_stages
        if not 1 <= n <= self.num_stages:
            raise InputError(f"num_stages must be between 1 and {self.num_stages} for these weights; got {n}")
        x = self._as_xray(xray).to(next(self.parameters()).device)
        outs: list[torch.Tensor] = []
        prev = None
        for i in range(n):
            cb = (lambda d, t, i=i: step_callback(i + 1, d, t)) if step_callback else None
            prev = self.stages[i].sample(
                x, prev, steps=steps, generator=generator, cancel=cancel, step_callback=cb
            )
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
