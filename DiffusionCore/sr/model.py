"""SRModel: VAE + latent denoiser (UNet + IRControlNet) + diffusion process, one patch at a time.

Formulation (why it can beat cubic interpolation with a small latent model):

* the condition is the thick input cubic-interpolated onto the thin grid (model units), encoded by the VAE
  to ``y``; the target is the thin volume's latent ``x0``;
* ResShift diffuses between ``x0`` and ``y`` (``y`` *is* the starting point), and the UNet predicts the
  residual ``x0 - y`` (``x0_hat = y + residual_std * net(...)``; the output layer starts at zero, i.e.
  "keep the input"). ``residual_std``, measured from data when training starts, is the typical size of
  ``x0 - y`` in the latent: a small fraction of the latent's spread (2-20% measured on chest CT),
  because the thick input already carries most of each thin slice. ResShift's noise is
  ``kappa * residual_std``, so the noise is sized to the residual it hides (as in ResShift on images)
  rather than to the latent, which would bury the residual at every step but the last;
* with ``decode_residual`` (default) the output is ``cond + decode(x0_hat) - decode(y)``: only the
  *difference* passes through the decoder, so the VAE's reconstruction error, which is nearly the same for
  the input and the output, cancels. A fresh model returns the cubic input exactly.

Weights files (safetensors, metadata family ``"sr"``): either one file with both parts (tensor names
``vae.*`` and ``denoiser.*``, metadata ``component="sr"``) for :meth:`SRModel.from_pretrained`, or two files
(``component="vae"`` and ``component="diffusion"``) for :meth:`SRModel.from_files`. The metadata holds the
full :class:`SRConfig` so the networks are rebuilt from the file alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import config_to_dict, load_config
from ..errors import Cancelled, ConfigError, InputError, WeightsError
from ..nn.architecture import (
    build_checked,
    build_from_weights,
    require_heads,
    require_positive,
    require_sizes,
    weights_architecture,
)
from .config import ESTIMATES, MEAN, SAMPLE, SRConfig, tiny_config
from .controlnet import IRControlNet
from .resshift import DDIMProcess, ResShiftProcess
from .unet import LatentUNet
from .vae import CTAutoencoderKL

logger = logging.getLogger(__name__)

FAMILY = "sr"


def build_process(cfg: SRConfig) -> ResShiftProcess | DDIMProcess:
    """The diffusion process a config asks for (ResShift with x0 prediction, or DDIM with eps)."""
    d = cfg.diffusion
    if d.predict_residual:
        return ResShiftProcess(d.num_train_timesteps, d.kappa * d.residual_std, d.power, d.eta_1, d.eta_T)
    return DDIMProcess(d.num_train_timesteps)


def check_estimate(estimate: str | None) -> None:
    """Refuse an estimate other than None (the weights' default), 'mean' or 'sample'.

    Raises:
        ConfigError: naming the estimates there are.
    """
    if estimate is not None and estimate not in ESTIMATES:
        raise ConfigError(f"estimate {estimate!r}: use one of {', '.join(ESTIMATES)}")


def requested_estimate(estimate: str | None, steps: int | None, num_samples: int) -> str | None:
    """The estimate that the options ask for, before the weights are known: ``estimate`` itself, 'sample'
    when only a step count or several samples are given, else None (the weights' default).

    Raises:
        ConfigError: an estimate other than 'mean' or 'sample', 'mean' with several samples or with a step count
            other than 1.
    """
    check_estimate(estimate)
    if estimate == MEAN and num_samples > 1:
        raise ConfigError(
            "the mean estimate is deterministic, so several samples of it would be identical: use "
            "estimate 'sample' with several samples (--estimate sample --num-samples N)"
        )
    if estimate == MEAN and steps is not None and int(steps) != 1:
        raise ConfigError(
            f"the mean estimate is one network evaluation; a step count ({steps}) applies to estimate "
            "'sample' (--estimate sample --num-steps N)"
        )
    if estimate is None and (steps is not None or num_samples > 1):
        return SAMPLE
    return estimate


def check_sr_architecture(cfg: SRConfig) -> None:
    """The rules an SR configuration's networks must follow, checked before they are built (from a config file
    or from a weights file's metadata): non-empty channel lists, positive sizes and strides, one stride per
    level change, attention heads dividing the widths they split.

    Raises:
        ConfigError: naming the key (``from_state`` reports it as the weights' fault).
    """
    v, u = cfg.vae, cfg.unet
    channels = require_sizes("vae.channels", v.channels)
    require_sizes("vae.downsample", v.downsample, length=len(channels) - 1, allow_empty=len(channels) == 1)
    for i, stride in enumerate(v.downsample):
        require_sizes(f"vae.downsample[{i}]", stride, length=3)
    require_positive("vae.latent_channels", v.latent_channels)
    require_positive("vae.num_res_blocks", v.num_res_blocks, minimum=0)
    width = require_positive("unet.model_channels", u.model_channels)
    mult = require_sizes("unet.channel_mult", u.channel_mult)
    require_sizes("unet.downsample", u.downsample, length=len(mult) - 1, allow_empty=len(mult) == 1)
    for i, stride in enumerate(u.downsample):
        require_sizes(f"unet.downsample[{i}]", stride, length=3)
    if len(u.attention_levels) != len(mult):
        raise ConfigError(f"unet.attention_levels must list one entry per level ({len(mult)}); got "
                          f"{list(u.attention_levels)}")  # fmt: skip
    require_positive("unet.num_res_blocks", u.num_res_blocks, minimum=0)
    for level, m in enumerate(mult):  # attention runs at the attention levels and in the middle block
        if u.attention_levels[level] or level == len(mult) - 1:
            require_heads(f"unet.model_channels x unet.channel_mult[{level}]", width * m, "unet.num_heads",
                          u.num_heads)  # fmt: skip
    if u.attention_window is not None:
        require_sizes("unet.attention_window", u.attention_window, length=3)
    require_positive("diffusion.num_train_timesteps", cfg.diffusion.num_train_timesteps)
    require_positive("diffusion.num_inference_steps", cfg.diffusion.num_inference_steps)


class SRDenoiser(nn.Module):
    """The latent UNet and (optionally) its IRControlNet.

    ``forward(x_in, t_value, y, cond_scale=None, use_control=True) -> (B, C, d, h, w)`` raw network output
    (a residual to add to ``y`` for ResShift, noise for DDIM). With ``concat_condition`` the UNet's input
    is ``concat(x_in, y * cond_scale)``.
    """

    def __init__(self, cfg: SRConfig, latent_channels: int) -> None:
        super().__init__()
        self.concat_condition = bool(cfg.unet.concat_condition)
        in_ch = 2 * latent_channels if self.concat_condition else latent_channels
        self.unet = LatentUNet(cfg.unet, in_ch, latent_channels)
        self.controlnet = IRControlNet(cfg.unet, latent_channels) if cfg.unet.use_controlnet else None

    def forward(
        self,
        x_in: torch.Tensor,
        t_value: torch.Tensor,
        y: torch.Tensor,
        cond_scale: torch.Tensor | None = None,
        use_control: bool = True,
    ) -> torch.Tensor:
        control = None
        if use_control and self.controlnet is not None:
            control = self.controlnet(x_in, y, t_value, cond_scale)
        if self.concat_condition:
            y_in = y if cond_scale is None else y * cond_scale.to(y.dtype).reshape(-1, 1, 1, 1, 1)
            x_in = torch.cat([x_in, y_in], dim=1)
        return self.unet(x_in, t_value, control)


def _state_sha256(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class SRModel(nn.Module):
    """Latent ResShift super-resolution of one patch (see the module docstring for the formulation).

    Args:
        config: :class:`SRConfig` (networks and diffusion).
        vae: an existing VAE to use (default: a fresh one from ``config.vae``).

    Attributes:
        vae, denoiser, diffusion, config, weights_sha256.
        latent_downsample: ``(fz, fy, fx)``: patch sizes must be multiples of this (VAE x UNet strides).
        min_patch: smallest patch ``(D, H, W)`` the networks accept.
    """

    def __init__(self, config: SRConfig | None = None, vae: CTAutoencoderKL | None = None) -> None:
        super().__init__()
        self.config = config or SRConfig()
        check_sr_architecture(self.config)
        self.vae = vae if vae is not None else build_checked(lambda: CTAutoencoderKL(self.config.vae),
                                                             "the SR autoencoder")  # fmt: skip
        self.denoiser = build_checked(
            lambda: SRDenoiser(self.config, self.vae.latent_channels), "the SR denoiser"
        )
        self.diffusion = build_process(self.config)
        self.weights_sha256: str = ""
        unet_ds = self.denoiser.unet.downsample
        self.vae_downsample: tuple[int, int, int] = self.vae.downsample
        self.latent_downsample: tuple[int, int, int] = tuple(  # type: ignore[assignment]
            a * b for a, b in zip(self.vae.downsample, unet_ds)
        )
        self.min_patch: tuple[int, int, int] = tuple(max(2 * f, 8) for f in self.latent_downsample)  # type: ignore[assignment]

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0) -> SRModel:
        """A tiny random-weight model for tests and self-tests (CPU, well under 1 s per 16x32x32 patch).

        The zero-initialised output layers get small random weights so the output differs from the input.
        """
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = cls(tiny_config())
            with torch.no_grad():
                convs = [model.denoiser.unet.conv_out]
                if model.denoiser.controlnet is not None:
                    convs += list(model.denoiser.controlnet.zero_convs)
                for conv in convs:
                    conv.weight.normal_(0.0, 0.005)
        finally:
            torch.random.set_rng_state(gen_state)
        model.eval()
        model.weights_sha256 = _state_sha256(model)
        return model

    @classmethod
    def from_state(
        cls,
        config: SRConfig | dict,
        tensors: dict[str, torch.Tensor],
        sha256: str = "",
        source: str = "weights",
    ) -> SRModel:
        """Build from a config and ``vae.*`` / ``denoiser.*`` tensors.

        Raises:
            WeightsError: a config that cannot be built, or tensors that do not fit it (one line, checked before
                the networks are allocated).
        """
        with weights_architecture(source):
            cfg = load_config(config, SRConfig) if isinstance(config, dict) else config
        model = build_from_weights(lambda: cls(cfg), tensors, source, "the SR model")
        model.weights_sha256 = sha256
        model.eval()
        return model

    @classmethod
    def from_pretrained(cls, name_or_file: str | os.PathLike, allow_unregistered: bool = False) -> SRModel:
        """Load a combined SR weights file (``component="sr"``) by registry name or path.

        Raises:
            WeightsError: unknown name, unregistered file (unless allowed), wrong family, or a file holding
                only one part (use :meth:`from_files` with the VAE and diffusion files).
        """
        from ..weights import resolve_weights

        return cls.from_resolved(resolve_weights(name_or_file, family=FAMILY, allow_unregistered=allow_unregistered))

    @classmethod
    def from_resolved(cls, rw) -> SRModel:
        """Build from weights already found and checked (:class:`~DiffusionCore.weights.ResolvedWeights`)."""
        comp = rw.metadata.get("component", "sr")
        if comp != "sr":
            raise WeightsError(
                f"{rw.path} holds only the {comp!r} part of an SR model: pass both files with "
                "--vae-checkpoint and --diffusion-checkpoint (SRModel.from_files)"
            )
        if "config" not in rw.metadata:
            raise WeightsError(f"{rw.path} has no 'config' in its metadata; re-export it with DiffusionCore")
        return cls.from_state(rw.metadata["config"], rw.load(), rw.sha256, str(rw.path))

    @classmethod
    def from_files(
        cls, vae_path: str | os.PathLike, diffusion_path: str | os.PathLike, allow_unregistered: bool = False
    ) -> SRModel:
        """Load from a VAE file and a diffusion (denoiser) file, as ``train vae`` / ``train sr`` export them.

        The diffusion file's config decides the architecture; the VAE file must match its ``vae`` section.
        ``weights_sha256`` is the sha256 of the two files' hashes joined by ``+``. Both files go through the
        registry's sha256 check like any other weights (``allow_unregistered`` accepts files in no registry).
        """
        from ..weights import resolve_weights

        rv = resolve_weights(vae_path, family=FAMILY, allow_unregistered=allow_unregistered)
        rd = resolve_weights(diffusion_path, family=FAMILY, allow_unregistered=allow_unregistered)
        if rd.metadata.get("component") not in ("diffusion", "sr") or "config" not in rd.metadata:
            raise WeightsError(
                f"{rd.path} is not an SR diffusion weights file (component 'diffusion' expected)"
            )
        if rv.metadata.get("component") not in ("vae", "sr"):
            raise WeightsError(f"{rv.path} is not an SR VAE weights file (component 'vae' expected)")
        vae_t = {k: v for k, v in rv.load().items() if k.startswith("vae.")}
        den_t = {k: v for k, v in rd.load().items() if k.startswith("denoiser.")}
        sha = hashlib.sha256(f"{rv.sha256}+{rd.sha256}".encode()).hexdigest()
        return cls.from_state(rd.metadata["config"], {**vae_t, **den_t}, sha, f"{rv.path} + {rd.path}")

    def save(self, path: str | os.PathLike, component: str = "sr", extra_metadata: dict | None = None) -> str:
        """Write inference weights (``component`` ``"sr"`` = both parts, ``"vae"``, or ``"diffusion"``).

        Returns:
            The file's sha256.
        """
        from ..weights import save_safetensors

        prefixes = {"sr": ("vae.", "denoiser."), "vae": ("vae.",), "diffusion": ("denoiser.",)}[component]
        tensors = {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}
        meta: dict[str, Any] = {
            "family": FAMILY,
            "component": component,
            "config": config_to_dict(self.config),
        }
        meta.update(extra_metadata or {})
        return save_safetensors(path, tensors, meta)

    # --- latent space -----------------------------------------------------------------------------
    def set_latent_statistics(self, latent_scale: float, residual_std: float) -> None:
        """Store the data-derived latent scale and residual std in the config and rebuild the process."""
        self.config.diffusion.latent_scale = float(latent_scale)
        self.config.diffusion.residual_std = float(residual_std)
        self.diffusion = build_process(self.config)

    def residual_to_x0(self, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """ResShift network output (the residual in ``residual_std`` units) -> ``x0`` estimate."""
        return y + self.config.diffusion.residual_std * out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Model units ``(B, 1, D, H, W)`` -> scaled latent mean ``(B, C, D/fz, H/fy, W/fx)``."""
        mean, _ = self.vae.encode(x)
        return mean * self.config.diffusion.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> model units ``(B, 1, D, H, W)``."""
        z = z / self.config.diffusion.latent_scale
        if self.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d):
            z = z.contiguous(memory_format=torch.channels_last_3d)
        return self.vae.decode(z)

    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        guidance: float = 1.0,
        cond_scale: torch.Tensor | None = None,
        control: bool = True,
    ) -> torch.Tensor:
        """The process's target (``x0`` for ResShift, ``eps`` for DDIM) at ``x_t``, with guidance.

        Args:
            x_t: ``(B, C, d, h, w)`` noisy latent; ``t``: ``(B,)`` step indices; ``y``: condition latent.
            guidance: classifier-free guidance scale; 1.0 is exactly the conditional prediction, 0.0
                exactly the unconditional one (no ControlNet and, with ``concat_condition``, a zero
                condition input).
            cond_scale: ``(B,)`` 0/1 per-sample condition keep mask (training's condition dropout).
            control: False runs the base network alone (the condition input kept, the ControlNet off):
                what the ControlNet adds is the difference.
        """
        proc = self.diffusion
        x_in = proc.scale_input(x_t, t)
        tv = proc.timestep_value(t).to(x_t.device)
        residual = isinstance(proc, ResShiftProcess)

        def run(use_control: bool, scale: torch.Tensor | None) -> torch.Tensor:
            out = self.denoiser(x_in, tv, y, scale, use_control)
            return self.residual_to_x0(y, out) if residual else out

        if not control:
            return run(False, cond_scale)
        if guidance == 1.0 or (self.denoiser.controlnet is None and not self.denoiser.concat_condition):
            return run(True, cond_scale)
        drop = torch.zeros(x_t.shape[0], device=x_t.device, dtype=x_t.dtype)
        if guidance == 0.0:  # the unconditional path (no ControlNet, no condition input), one pass
            return run(False, drop)
        cond = run(True, None)
        uncond = run(False, drop)
        return uncond + guidance * (cond - uncond)

    # --- inference --------------------------------------------------------------------------------
    @property
    def default_estimate(self) -> str:
        """``config.diffusion.estimate`` ('mean' or 'sample'); always 'sample' for DDIM weights."""
        return self.resolve_estimate(None)

    def resolve_estimate(self, estimate: str | None) -> str:
        """The estimate to run: ``estimate`` checked, or the config's (DDIM weights can only sample)."""
        resshift = isinstance(self.diffusion, ResShiftProcess)
        if estimate is None:
            estimate = self.config.diffusion.estimate if resshift else SAMPLE
            if estimate not in ESTIMATES:
                raise WeightsError(
                    f"the weights' config has estimate {estimate!r}; expected one of {', '.join(ESTIMATES)}"
                )
            return estimate
        check_estimate(estimate)
        if estimate == MEAN and not resshift:
            raise ConfigError(
                "these weights use plain latent diffusion (DDIM, trained with --no-predict-residual), which has "
                "no one-step mean estimate: use estimate 'sample'"
            )
        return estimate

    def check_patch(self, shape: tuple[int, ...]) -> None:
        """Raise InputError unless a ``(B, 1, D, H, W)`` shape fits the networks."""
        if len(shape) != 5 or shape[1] != 1:
            raise InputError(f"SR patches must be (B, 1, D, H, W) tensors, got shape {tuple(shape)}")
        spatial = tuple(shape[2:])
        if any(n % f for n, f in zip(spatial, self.latent_downsample)) or any(
            n < m for n, m in zip(spatial, self.min_patch)
        ):
            raise InputError(
                f"patch {spatial} does not fit the model: each size must be a multiple of "
                f"{self.latent_downsample} and at least {self.min_patch}; choose another --patch-size"
            )

    @torch.no_grad()
    def super_resolve_patch(
        self,
        cond: torch.Tensor,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        cancel: threading.Event | None = None,
        step_callback: Callable[[int, int], None] | None = None,
        control: bool = True,
        estimate: str | None = None,
    ) -> torch.Tensor:
        """Super-resolve a patch.

        Args:
            cond: ``(B, 1, D, H, W)`` model units on the THIN grid: the cubic-interpolated thick input.
            steps: sampling steps for the 'sample' estimate (default ``config.diffusion.num_inference_steps``).
            guidance: classifier-free guidance scale (default from config; 1.0 = off).
            generator: CPU generator for the sampling noise (the same noise on any device; the result also depends on the
                device and the thread count).
            cancel: checked before every network evaluation; when set, raises Cancelled.
            step_callback: ``step_callback(done, total)`` after every step.
            control: False skips the ControlNet (see :meth:`predict`).
            estimate: 'mean' (one evaluation, deterministic) or 'sample' (the reverse chain). Default:
                'sample' when ``steps`` is given, else the config's (see :func:`requested_estimate`).

        Returns:
            ``(B, 1, D, H, W)`` model units (the thin volume estimate; not clipped).
        """
        self.check_patch(tuple(cond.shape))
        d = self.config.diffusion
        mean = self.resolve_estimate(requested_estimate(estimate, steps, 1)) == MEAN
        steps = d.num_inference_steps if steps is None else int(steps)
        guidance = d.guidance_scale if guidance is None else float(guidance)
        dtype = next(self.parameters()).dtype
        cond = cond.to(dtype)
        y = self.encode(cond)

        def net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if cancel is not None and cancel.is_set():
                raise Cancelled("super-resolution cancelled by the user; nothing was written")
            return self.predict(x_t, t, y, guidance, control=control)

        if mean:
            z0 = self.diffusion.estimate_mean(net, y, step_callback=step_callback)
        else:
            z0 = self.diffusion.sample(net, y, steps=steps, generator=generator, step_callback=step_callback)
        out = self.decode(z0)
        if d.decode_residual:
            out = cond + out - self.decode(y)
        return out

    def estimate_patch_memory(
        self, patch_shape: tuple[int, int, int], batch: int = 1, device: str | torch.device = "cpu"
    ) -> int:
        """Rough peak activation memory (bytes) of :meth:`super_resolve_patch` for one patch size.

        Counts the largest VAE feature maps (a handful live at once), the UNet + ControlNet features at
        latent resolution (kept skips) and the attention matrices; ignores the weights themselves.
        """
        del device
        bytes_per = 4
        D, H, W = patch_shape
        voxels = D * H * W
        vcfg = self.config.vae
        vae_peak = 0
        f = [1, 1, 1]
        for lvl, ch in enumerate(vcfg.channels):
            vae_peak = max(vae_peak, ch * voxels // (f[0] * f[1] * f[2]))
            if lvl < len(vcfg.downsample):
                f = [a * b for a, b in zip(f, vcfg.downsample[lvl])]
        vae_bytes = 6 * vae_peak * bytes_per
        ucfg = self.config.unet
        lat_vox = voxels // (self.vae_downsample[0] * self.vae_downsample[1] * self.vae_downsample[2])
        unet_elems, g, attn = 0, [1, 1, 1], 0
        for lvl, mult in enumerate(ucfg.channel_mult):
            n = lat_vox // (g[0] * g[1] * g[2])
            unet_elems += (ucfg.num_res_blocks + 2) * ucfg.model_channels * mult * n
            if ucfg.attention_levels[lvl] or lvl == len(ucfg.channel_mult) - 1:
                win = ucfg.attention_window
                per_query = n if win is None else min(n, win[0] * win[1] * win[2])
                attn = max(attn, ucfg.num_heads * n * per_query)
            if lvl < len(ucfg.downsample):
                g = [a * b for a, b in zip(g, ucfg.downsample[lvl])]
        copies = 2 if self.denoiser.controlnet is not None else 1
        unet_bytes = (3 * unet_elems * copies + attn) * bytes_per * 2  # guidance runs two passes
        return int(batch * (max(vae_bytes, unet_bytes) + 4 * voxels * bytes_per))


def load_sr_model(
    weights: str | os.PathLike | None = None,
    *,
    vae_checkpoint: str | os.PathLike | None = None,
    diffusion_checkpoint: str | os.PathLike | None = None,
    allow_unregistered: bool = False,
) -> SRModel:
    """One entry point for the pipeline/CLI: a combined file or name, or a VAE + diffusion file pair."""
    if vae_checkpoint or diffusion_checkpoint:
        if not (vae_checkpoint and diffusion_checkpoint):
            raise InputError("give both --vae-checkpoint and --diffusion-checkpoint, or neither")
        return SRModel.from_files(vae_checkpoint, diffusion_checkpoint, allow_unregistered=allow_unregistered)
    if weights is None:
        raise InputError("no SR weights given: pass --weights NAME_OR_FILE")
    return SRModel.from_pretrained(
        Path(weights) if Path(str(weights)).exists() else str(weights), allow_unregistered
    )


#: File name of the VAE weights that ``train vae`` exports into its output folder.
VAE_EXPORT = "vae.safetensors"


def load_vae_weights(source: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """VAE config dict and ``vae.*`` tensors from an exported file or a ``train vae`` output folder."""
    from ..weights import load_safetensors

    p = Path(source)
    if p.is_dir():
        if (p / VAE_EXPORT).is_file():
            p = p / VAE_EXPORT
        else:
            raise WeightsError(f"{source} has no {VAE_EXPORT}: finish `train vae` there or give the file")
    tensors, meta = load_safetensors(p)
    if meta.get("family") != "sr" or meta.get("component") not in ("vae", "sr"):
        raise WeightsError(f"{p} is not an SR VAE weights file (exported by `train vae`)")
    vae_t = {k: v for k, v in tensors.items() if k.startswith("vae.")}
    return dict(meta.get("config", {}).get("vae", {})), vae_t
