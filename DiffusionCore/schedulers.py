"""The interface every diffusion process speaks, the one DDIM update rule, and the reverse loop they share.

In the spirit of diffusers' schedulers, a process (:class:`Scheduler`) says which timesteps a sampler visits
(:meth:`~Scheduler.set_timesteps`), how data is noised to a timestep (:meth:`~Scheduler.add_noise`) and how
one network output moves a sample one timestep back (:meth:`~Scheduler.step`). :func:`denoise` runs the
reverse chain over any of them and reports progress through one callback, ``step_callback(done, total)``.

The processes (pure torch, each in its own package):

* ``sr.resshift.ResShiftProcess`` - residual shifting from the low-resolution latent ``y`` (x0 prediction);
* ``sr.resshift.DDIMProcess`` - discrete Gaussian diffusion from pure noise (eps prediction, DDIM);
* ``xray.vdiffusion.VDiffusion`` - continuous cosine diffusion (v, eps or x0 prediction, DDIM).

Both DDIM samplers move with :func:`ddim_step`. Unlike diffusers, a process keeps no sampling state:
:meth:`~Scheduler.set_timesteps` returns the sequence and :meth:`~Scheduler.step` is told both ends of the
step, so one process object can serve several samplers at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch

#: A timestep as :meth:`Scheduler.set_timesteps` gives it: an integer index of a discrete schedule or a
#: 0-d tensor time of a continuous one.
Timestep = int | torch.Tensor

#: ``step_callback(done, total)`` after every network evaluation of a sampler; it may raise to cancel.
StepCallback = Callable[[int, int], None]

#: ``model_fn(x_t, t) -> output``: the network at the noisy sample ``x_t`` ``(B, ...)`` and the batched
#: timesteps ``t`` ``(B,)``; the process says what the output means (:attr:`Scheduler.predicts`).
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StepOutput(NamedTuple):
    """What :meth:`Scheduler.step` returns."""

    #: the sample at the earlier timestep (the clean estimate at the end of the chain)
    prev: torch.Tensor
    #: the clean estimate ``x0`` the step moved towards
    x0: torch.Tensor


@runtime_checkable
class Scheduler(Protocol):
    """A diffusion process as a sampler sees it (forward noising, timesteps and the reverse step)."""

    #: what the network output is taken as: ``"x0"``, ``"eps"`` or ``"v"``
    predicts: str

    def set_timesteps(self, steps: int | None) -> Sequence[Timestep]:
        """The timesteps a sampler with ``steps`` network evaluations visits, from the noisiest down.

        ``steps=None`` means the process's default; the length is the number of evaluations (a process
        may run fewer than asked, never more than it has timesteps). The sequence is returned, not kept.
        """
        ...

    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, *, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draw ``x_t`` from the forward process at timesteps ``t`` ((B,) or a scalar) with the given noise.

        ``y`` is the condition a residual-shifting process moves towards (ResShift's ``x0 + eta (y - x0)``);
        processes that diffuse towards pure noise ignore it.
        """
        ...

    def step(
        self,
        output: torch.Tensor,
        t: torch.Tensor,
        t_prev: Timestep | None,
        x_t: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """Move ``x_t`` from ``t`` back to ``t_prev`` given the network's ``output`` at ``(x_t, t)``.

        Args:
            output: the network output (what :attr:`predicts` says), shape of ``x_t``.
            t: the timesteps the network saw, ``(B,)``.
            t_prev: the next timestep of :meth:`set_timesteps`'s sequence; None for the clean end.
            x_t: ``(B, ...)`` the current sample.
            generator: CPU generator for a stochastic step's noise (deterministic steps ignore it).
        """
        ...


def ddim_step(
    x0: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor, sigma_prev: torch.Tensor
) -> torch.Tensor:
    """The deterministic (eta = 0) DDIM update: ``x_prev = alpha_prev x0 + sigma_prev eps``.

    ``alpha_prev`` and ``sigma_prev`` are the signal and noise scales of the earlier timestep, ``sqrt(abar)``
    and ``sqrt(1 - abar)`` of a discrete schedule, ``cos`` and ``sin`` of the cosine one; ``x0`` and ``eps``
    are the clean and noise estimates at the current one. Scales broadcast against ``x0``.
    """
    return alpha_prev * x0 + sigma_prev * eps


def denoise(
    scheduler: Scheduler,
    model_fn: ModelFn,
    x: torch.Tensor,
    timesteps: Sequence[Timestep],
    *,
    generator: torch.Generator | None = None,
    step_callback: StepCallback | None = None,
) -> StepOutput:
    """Run the reverse chain from ``x`` (the sample at ``timesteps[0]``) through every timestep to the end.

    Each timestep is batched for the network: an integer index as a long ``(B,)`` tensor, a tensor time
    expanded to ``(B,)``. ``step_callback(done, len(timesteps))`` follows every step.

    Returns:
        The last :class:`StepOutput`: ``prev`` is the final sample, ``x0`` the last clean estimate.
    """
    if len(timesteps) == 0:
        raise ValueError("denoise needs at least one timestep")
    b = x.shape[0]
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        if isinstance(t, torch.Tensor):
            tt = t.expand(b)
        else:
            tt = torch.full((b,), t, dtype=torch.long, device=x.device)
        t_prev = timesteps[i + 1] if i + 1 < n else None
        out = scheduler.step(model_fn(x, tt), tt, t_prev, x, generator=generator)
        x = out.prev
        if step_callback is not None:
            step_callback(i + 1, n)
    return out
