"""Diffusion processes for latent super-resolution: ResShift (residual shifting) and DDIM.

ResShift (Yue et al., 2023) moves from the high-resolution latent ``x0`` to the low-resolution latent
``y`` in ``T`` steps while adding noise::

    q(x_t | x0, y) = N(x0 + eta_t (y - x0), kappa^2 eta_t I),    0 < eta_1 < ... < eta_T ~ 1

so sampling starts from ``y + kappa sqrt(eta_T) eps`` (not from pure noise) and a handful of steps
suffice. The posterior, with ``alpha_t = eta_t - eta_{t-1}`` (``eta_0 = 0``)::

    q(x_{t-1} | x_t, x0) = N((eta_{t-1}/eta_t) x_t + (alpha_t/eta_t) x0, kappa^2 (eta_{t-1}/eta_t) alpha_t I)

The network predicts ``x0`` (here as a residual on top of ``y``). Sampling with fewer steps than
training uses the same posterior between non-adjacent steps ``s < t`` (``alpha = eta_t - eta_s``), which
is exact for this Markov chain.

:class:`DDIMProcess` is the plain alternative (``--no-predict-residual``): Gaussian diffusion of ``x0``
from pure noise with noise (eps) prediction and deterministic DDIM sampling.

Both speak :class:`DiffusionCore.schedulers.Scheduler` (``set_timesteps``, ``add_noise``, ``step``) and
sample with its :func:`~DiffusionCore.schedulers.denoise` loop. Timesteps are 0-based indices ``0..T-1``
(index ``i`` is the paper's ``t = i + 1``); index ``-1`` is the clean end (``eta_0 = 0``, ``abar = 1``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..schedulers import ModelFn, StepCallback, StepOutput, Timestep, ddim_step, denoise


def default_eta_1(kappa: float) -> float:
    """ResShift's smallest shift: ``min((0.04 / kappa)^2, 0.001)``."""
    return min((0.04 / kappa) ** 2, 0.001)


def resshift_eta_schedule(
    num_steps: int, kappa: float, power: float, eta_1: float, eta_T: float
) -> np.ndarray:
    """The exponential sqrt-eta schedule.

    ``sqrt(eta_t) = sqrt(eta_1) * b^(beta_t)`` with ``beta_t = ((t-1)/(T-1))^p (T-1)`` and
    ``b = (eta_T/eta_1)^(1/(2(T-1)))``, so ``eta`` runs exactly from ``eta_1`` to ``eta_T``; ``p < 1``
    spends more steps at large shifts. ``kappa`` does not enter (it scales the noise, not the shift).

    Args:
        num_steps: ``T >= 1``.
        power: ``p > 0``.
        eta_1, eta_T: first and last shift, ``0 < eta_1 <= eta_T < 1``.

    Returns:
        ``(T,)`` float64 array of ``eta_t`` for ``t = 1..T``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not (0.0 < eta_1 <= eta_T < 1.0):
        raise ValueError(f"need 0 < eta_1 <= eta_T < 1, got eta_1={eta_1}, eta_T={eta_T}")
    if power <= 0:
        raise ValueError(f"power must be positive, got {power}")
    del kappa
    if num_steps == 1:
        return np.array([eta_T], dtype=np.float64)
    sqrt_1, sqrt_T = math.sqrt(eta_1), math.sqrt(eta_T)
    log_b = math.log(sqrt_T / sqrt_1) / (num_steps - 1)
    beta = np.linspace(0.0, 1.0, num_steps) ** power * (num_steps - 1)
    sqrt_eta = sqrt_1 * np.exp(beta * log_b)
    return sqrt_eta**2


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class ResShiftProcess:
    """ResShift forward process, posterior and sampler (network-independent).

    Args:
        num_steps: ``T`` (default 15; 4 for the fast configuration).
        kappa: noise scale (default 2).
        power: schedule exponent ``p`` (default 0.3).
        eta_1: first shift; ``None`` -> ``min((0.04/kappa)^2, 0.001)``.
        eta_T: last shift (default 0.99).
    """

    predicts = "x0"

    def __init__(
        self,
        num_steps: int = 15,
        kappa: float = 2.0,
        power: float = 0.3,
        eta_1: float | None = None,
        eta_T: float = 0.99,
    ) -> None:
        self.num_steps = int(num_steps)
        self.kappa = float(kappa)
        self.power = float(power)
        self.eta_1 = float(eta_1) if eta_1 is not None else default_eta_1(kappa)
        self.eta_T = float(eta_T)
        self.etas = torch.from_numpy(
            resshift_eta_schedule(self.num_steps, self.kappa, self.power, self.eta_1, self.eta_T)
        )

    # --- the math ---------------------------------------------------------------------------------
    def eta(self, t: torch.Tensor) -> torch.Tensor:
        """``eta`` at 0-based indices ``t`` (``-1`` gives ``eta_0 = 0``), float64 ``(B,)``."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        padded = torch.cat([torch.zeros(1, dtype=torch.float64), self.etas])
        return padded[t + 1]

    def q_mean_var(
        self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Marginal ``q(x_t | x0, y)``: mean ``x0 + eta_t (y - x0)`` and variance ``kappa^2 eta_t`` ``(B,1,...)``."""
        eta = _bcast(self.eta(t), x0)
        return x0 + eta * (y - x0), self.kappa**2 * eta

    def q_sample(
        self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x0, y)``. Args: ``x0, y, noise`` ``(B, C, ...)``; ``t`` ``(B,)`` indices."""
        mean, var = self.q_mean_var(x0, y, t)
        return mean + torch.sqrt(var) * noise

    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, *, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`q_sample` in the scheduler interface's argument order; ``y`` is required."""
        if y is None:
            raise ValueError("ResShift noises towards the condition: add_noise needs y")
        return self.q_sample(x0, y, t, noise)

    def posterior_mean_var(
        self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(x_s | x_t, x0)`` for ``s < t`` (default ``s = t - 1``).

        Mean ``(eta_s/eta_t) x_t + (alpha/eta_t) x0`` and variance ``kappa^2 (eta_s/eta_t) alpha`` with
        ``alpha = eta_t - eta_s``; at ``s = -1`` (``eta_0 = 0``) the mean is ``x0`` and the variance 0.
        """
        t = torch.as_tensor(t, dtype=torch.long)
        s = t - 1 if s is None else torch.as_tensor(s, dtype=torch.long)
        eta_t, eta_s = self.eta(t), self.eta(s)
        alpha = eta_t - eta_s
        mean = _bcast(eta_s / eta_t, x_t) * x_t + _bcast(alpha / eta_t, x_t) * x0
        var = _bcast(self.kappa**2 * eta_s / eta_t * alpha, x_t)
        return mean, var

    def scale_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Network input ``x_t / sqrt(kappa^2 eta_t + 1)`` (keeps the input variance near 1)."""
        return x_t / torch.sqrt(_bcast(self.kappa**2 * self.eta(t) + 1.0, x_t))

    def timestep_value(self, t: torch.Tensor) -> torch.Tensor:
        """Timestep value fed to the network's embedding: indices spread over ``0..1000``."""
        return torch.as_tensor(t, dtype=torch.float32) * (1000.0 / self.num_steps)

    def prior_sample(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Start of sampling: ``x_T = y + kappa sqrt(eta_T) eps``."""
        return y + self.kappa * math.sqrt(self.eta_T) * noise

    # --- training ---------------------------------------------------------------------------------
    def training_pair(
        self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random timesteps and noisy inputs for one training step.

        Returns:
            ``(x_t, t, target)``: ``x_t`` ``(B, C, ...)``, ``t`` ``(B,)`` indices and the regression
            target (``x0``).
        """
        b = x0.shape[0]
        t = torch.randint(0, self.num_steps, (b,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        return self.q_sample(x0, y, t.to(x0.device), noise), t.to(x0.device), x0

    # --- sampling ---------------------------------------------------------------------------------
    def set_timesteps(self, steps: int | None) -> list[int]:
        """Descending 0-based indices to visit: all ``T`` or ``steps`` of them evenly spread (always ``T-1``)."""
        T = self.num_steps
        if steps is None or steps >= T:
            return list(range(T - 1, -1, -1))
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        idx = np.unique(np.round(np.linspace(T - 1, 0, steps)).astype(int))[::-1]
        return [int(i) for i in idx]

    def step(
        self,
        output: torch.Tensor,
        t: torch.Tensor,
        t_prev: Timestep | None,
        x_t: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """Draw ``x_s ~ q(x_s | x_t, x0 = output)`` for ``s = t_prev`` (the posterior mean at the clean end).

        Args:
            output: ``x0_hat``, shape of ``x_t``; ``t``: ``(B,)`` indices; ``t_prev``: an index or None (-1).
            generator: CPU generator for the posterior noise.
        """
        b = x_t.shape[0]
        s = -1 if t_prev is None else int(t_prev)
        mean, var = self.posterior_mean_var(x_t, output, t, torch.full((b,), s, dtype=torch.long))
        if s < 0:
            return StepOutput(mean, output)
        z = torch.randn(x_t.shape, generator=generator, dtype=torch.float32).to(x_t.device, x_t.dtype)
        return StepOutput(mean + torch.sqrt(var) * z, output)

    def estimate_mean(
        self, predict_x0: ModelFn, y: torch.Tensor, *, step_callback: StepCallback | None = None
    ) -> torch.Tensor:
        """Posterior-mean estimate of ``x0`` given ``y``: one network evaluation, no noise.

        The network is trained with a squared error to predict ``x0`` from ``x_t``; at the last step
        ``x_T = y + kappa sqrt(eta_T) eps`` carries almost nothing of ``x0`` but ``y``, so its prediction
        there estimates ``E[x0 | y]``. It is evaluated at the prior's mean ``x_T = y``. A full reverse chain
        (:meth:`sample`) instead draws from the posterior: an exact draw has twice the mean's squared error
        (a few-step chain somewhat less, as it under-disperses). For a fidelity metric such as PSNR the mean
        is the better estimate; the sample shows plausible texture.

        Args:
            predict_x0: ``f(x_t, t (B,) indices) -> x0_hat``.
            y: ``(B, C, ...)`` low-resolution latent.
            step_callback: ``step_callback(1, 1)`` after the evaluation; may raise to cancel.
        """
        t = torch.full((y.shape[0],), self.num_steps - 1, dtype=torch.long, device=y.device)
        x0_hat = predict_x0(y, t)
        if step_callback is not None:
            step_callback(1, 1)
        return x0_hat

    def sample(
        self,
        predict_x0: ModelFn,
        y: torch.Tensor,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        step_callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Reverse process from ``y + kappa sqrt(eta_T) eps`` to ``x0``.

        Args:
            predict_x0: ``f(x_t, t (B,) indices) -> x0_hat``, same shape as ``y``.
            y: ``(B, C, ...)`` low-resolution latent.
            steps: number of network evaluations (default ``T``).
            generator: CPU generator for the noise (reproducible on any device).
            step_callback: ``step_callback(done, total)`` after each step; may raise to cancel.

        Returns:
            ``(B, C, ...)`` the final ``x0`` estimate.
        """
        ts = self.set_timesteps(steps)
        noise = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device, y.dtype)
        x = self.prior_sample(y, noise)
        return denoise(self, predict_x0, x, ts, generator=generator, step_callback=step_callback).prev


class DDIMProcess:
    """Gaussian diffusion of ``x0`` with eps prediction and deterministic DDIM sampling.

    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with a scaled-linear beta schedule.

    Args:
        num_steps: training timesteps (default 1000).
        beta_start, beta_end: schedule ends (scaled linear, as in latent diffusion).
    """

    predicts = "eps"

    def __init__(self, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> None:
        self.num_steps = int(num_steps)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, self.num_steps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """``abar_t`` at indices ``t`` (``-1`` gives 1), float64 ``(B,)``."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        return padded[t + 1]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``."""
        a = _bcast(self.abar(t), x0)
        return torch.sqrt(a) * x0 + torch.sqrt(1 - a) * noise

    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, *, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`q_sample` in the scheduler interface's argument order (``y`` conditions the network only)."""
        return self.q_sample(x0, t, noise)

    def scale_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """DDIM inputs already have unit variance: identity."""
        return x_t

    def timestep_value(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float32) * (1000.0 / self.num_steps)

    def training_pair(
        self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, t, target=eps)`` for one training step (``y`` conditions the network only)."""
        b = x0.shape[0]
        t = torch.randint(0, self.num_steps, (b,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        return self.q_sample(x0, t.to(x0.device), noise), t.to(x0.device), noise

    def set_timesteps(self, steps: int | None) -> list[int]:
        """Descending indices from ``T-1`` to 0: ``steps`` (default 50, at most ``T``) evenly spread."""
        steps = 50 if steps is None else int(steps)
        steps = max(1, min(steps, self.num_steps))
        idx = np.unique(np.round(np.linspace(self.num_steps - 1, 0, steps)).astype(int))[::-1]
        return [int(i) for i in idx]

    def step(
        self,
        output: torch.Tensor,
        t: torch.Tensor,
        t_prev: Timestep | None,
        x_t: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """DDIM (eta = 0) from ``t`` to ``t_prev`` (None: -1, the clean end) given the eps prediction ``output``."""
        b = x_t.shape[0]
        s = -1 if t_prev is None else int(t_prev)
        a_t = _bcast(self.abar(t), x_t)
        a_s = _bcast(self.abar(torch.full((b,), s)), x_t)
        x0 = (x_t - torch.sqrt(1 - a_t) * output) / torch.sqrt(a_t)
        return StepOutput(ddim_step(x0, output, torch.sqrt(a_s), torch.sqrt(1 - a_s)), x0)

    def sample(
        self,
        predict_eps: ModelFn,
        y: torch.Tensor,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        step_callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from pure noise; ``y`` only sets the shape and device.

        ``step_callback(done, total)`` follows every step; it may raise to cancel.
        """
        ts = self.set_timesteps(steps)
        x = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device, y.dtype)
        return denoise(self, predict_eps, x, ts, generator=generator, step_callback=step_callback).prev
