"""v-parameterised diffusion with a cosine schedule and a few-step DDIM sampler.

Continuous time ``t`` in [0, 1]: ``alpha(t) = cos(pi t / 2)``, ``sigma(t) = sin(pi t / 2)`` (alpha^2 + sigma^2
= 1). Forward process ``x_t = alpha x0 + sigma eps``; velocity ``v = alpha eps - sigma x0``, so
``x0 = alpha x_t - sigma v`` and ``eps = sigma x_t + alpha v``.

A sampler or loss can take the network output as ``v``, ``eps`` or ``x0`` (``prediction``); the others follow
exactly from the identities above. The cascade's stages output a preconditioned ``x0`` estimate and are trained
on the v (or eps) error it implies (see ``losses.diffusion_loss``): a patch-token network cannot carry the
per-voxel noise that a direct v output must cancel in ``x0 = alpha x_t - sigma v``. Everything is in model
units (HU mapped to [-1, 1] by ``DiffusionCore.intensity.hu_to_unit``).

:class:`VDiffusion` is this process as a :class:`DiffusionCore.schedulers.Scheduler`; :func:`ddim_sample` is
its sampler as a function.
"""

from __future__ import annotations

import math
import threading

import torch

from ..errors import Cancelled
from ..schedulers import ModelFn, StepCallback, StepOutput, Timestep, ddim_step, denoise


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and noise scales at time ``t`` (any shape, values in [0, 1])."""
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def _bc(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *([1] * (like.ndim - 1))) if x.ndim == 1 else x


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Noised sample ``x_t = alpha x0 + sigma eps``. x0, eps (B, ...); t (B,)."""
    a, s = alpha_sigma(_bc(t, x0))
    return a * x0 + s * eps


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Velocity target ``v = alpha eps - sigma x0``."""
    a, s = alpha_sigma(_bc(t, x0))
    return a * eps - s * x0


def x0_from_v(xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean estimate ``x0 = alpha x_t - sigma v``."""
    a, s = alpha_sigma(_bc(t, xt))
    return a * xt - s * v


def eps_from_v(xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise estimate ``eps = sigma x_t + alpha v``."""
    a, s = alpha_sigma(_bc(t, xt))
    return s * xt + a * v


def x0_from_eps(
    xt: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, min_alpha: float = 1e-3
) -> torch.Tensor:
    """Clean estimate from a noise prediction ``x0 = (x_t - sigma eps) / alpha``."""
    a, s = alpha_sigma(_bc(t, xt))
    return (xt - s * eps) / a.clamp_min(min_alpha)


def skip_scales(
    t: torch.Tensor, like: torch.Tensor, sigma_data: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, alpha) at ``t``, shaped to broadcast against ``like``, for an output preconditioned around a
    base: ``x0 = base + c_skip (x_t - alpha base) + c_out F``. With s = ``sigma_data`` (the spread of x0 around the
    base), c_skip = alpha s^2 / (alpha^2 s^2 + sigma^2) is the linear estimate of the residual from its noised copy
    and c_out = sigma s / sqrt(alpha^2 s^2 + sigma^2) that estimate's error scale: x_t itself at t = 0, base + s F at
    t = 1."""
    a, s = alpha_sigma(_bc(t, like).to(like.dtype))
    d = (a * sigma_data) ** 2 + s**2
    return a * sigma_data**2 / d, s * sigma_data / d.sqrt(), a


def predict_x0_eps(
    output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, prediction: str = "v", clip: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a network output that is ``v``, ``eps`` or ``x0``; x0 optionally clipped to [-1, 1]."""
    a, s = alpha_sigma(_bc(t, xt))
    if prediction == "v":
        x0, eps = x0_from_v(xt, output, t), eps_from_v(xt, output, t)
    elif prediction == "eps":
        eps = output
        x0 = x0_from_eps(xt, eps, t)
    elif prediction == "x0":
        x0 = output
        eps = (xt - a * x0) / s.clamp_min(1e-4)
    else:
        raise ValueError(f"prediction must be v, eps or x0; got {prediction!r}")
    if clip:
        x0c = x0.clamp(-1.0, 1.0)
        eps = torch.where(s > 1e-4, (xt - a * x0c) / s.clamp_min(1e-4), eps)
        x0 = x0c
    return x0, eps


class VDiffusion:
    """The cosine v-diffusion as a :class:`~DiffusionCore.schedulers.Scheduler`, sampled with DDIM (eta = 0).

    Args:
        prediction: what the network outputs: ``v``, ``eps`` or ``x0`` (``predicts``).
        clip: clip every step's x0 estimate to [-1, 1] (the eps estimate follows it).
    """

    def __init__(self, prediction: str = "v", clip: bool = True) -> None:
        if prediction not in ("v", "eps", "x0"):
            raise ValueError(f"prediction must be v, eps or x0; got {prediction!r}")
        self.predicts = prediction
        self.clip = clip

    def set_timesteps(
        self, steps: int | None, *, t_start: float = 1.0, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``steps`` (at least 1; no default) uniform times from ``t_start`` down to ``t_start / steps``.

        Returns:
            ``(steps,)`` float32 times on ``device``; the chain's end, t = 0, is the step after the last.
        """
        if steps is None:
            raise ValueError("VDiffusion has no default step count: pass steps")
        steps = max(1, int(steps))
        return torch.linspace(t_start, 0.0, steps + 1, device=device, dtype=torch.float32)[:-1]

    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, *, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:func:`q_sample` in the scheduler interface's argument order (``y`` is not used)."""
        return q_sample(x0, t, noise)

    def step(
        self,
        output: torch.Tensor,
        t: torch.Tensor,
        t_prev: Timestep | None,
        x_t: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """DDIM from ``t`` to ``t_prev`` (None: 0) with the (clipped) x0 and eps implied by ``output``."""
        x0, eps = predict_x0_eps(output.float(), x_t, t, self.predicts, self.clip)
        if t_prev is None:
            t_prev = torch.zeros((), device=x_t.device, dtype=t.dtype)
        a, s = alpha_sigma(t_prev)
        return StepOutput(ddim_step(x0, eps, a, s), x0)

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        x_start: torch.Tensor,
        *,
        steps: int,
        t_start: float = 1.0,
        cancel: threading.Event | None = None,
        step_callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from ``t_start`` to 0 in ``steps`` uniform steps.

        Args:
            model_fn: ``model_fn(x_t, t) -> output``, x_t (B, 1, D, H, W), t (B,).
            x_start: the sample at ``t_start`` (pure noise when 1.0, a noised previous-stage volume otherwise).
            steps: number of network evaluations (>= 1).
            t_start: starting time in (0, 1].
            cancel: checked before every step; raises :class:`Cancelled` when set.
            step_callback: ``(done, total)`` after every step.

        Returns:
            The last step's x0 estimate in model units (B, 1, D, H, W) (clipped to [-1, 1] with ``clip``).
        """

        def checked(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled; nothing was written.")
            return model_fn(x, t)

        times = self.set_timesteps(steps, t_start=t_start, device=x_start.device)
        return denoise(self, checked, x_start, times, step_callback=step_callback).x0


def ddim_sample(
    model_fn: ModelFn,
    x_start: torch.Tensor,
    *,
    steps: int,
    prediction: str = "v",
    t_start: float = 1.0,
    cancel: threading.Event | None = None,
    step_callback: StepCallback | None = None,
) -> torch.Tensor:
    """``VDiffusion(prediction).sample(...)``: deterministic DDIM from ``t_start`` to 0, x0 clipped to [-1, 1]."""
    return VDiffusion(prediction).sample(
        model_fn, x_start, steps=steps, t_start=t_start, cancel=cancel, step_callback=step_callback
    )
