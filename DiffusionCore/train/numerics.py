"""Numbers a training run must keep finite: its settings when read, the loss at every step, the weights at
every checkpoint.

* :func:`check_training_numbers` refuses a NaN, infinite or out-of-range training setting (learning rate,
  EMA decay, step counts, ...) of any family's config with a :class:`~DiffusionCore.errors.ConfigError`
  (exit code 2) before anything is built; the command-line options are checked earlier still, when parsed
  (``DiffusionCore.cli.train``).
* :class:`LossWatch` stops a run whose loss became NaN or infinite, or grew a millionfold (it diverged),
  with a :class:`~DiffusionCore.errors.NumericalError` (exit code 1), before the step that would spread it
  into the weights.
* :func:`nonfinite_tensors` finds NaN/Inf tensors; ``save_training_state`` refuses to write a checkpoint
  that holds any, so every checkpoint (and every export, which is made from the weights of one) is finite
  and ``--resume`` always works.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

import torch

from ..errors import ConfigError, NumericalError

#: The rule for every training setting the families share, by field name: ``(kind, low, high, low_open,
#: high_open)``; a config without the field is not checked for it. ``max_steps`` may be 0 in a config file,
#: where it means "no limit" (SR) or "epochs x steps_per_epoch" (X-ray); ``--max-steps`` must be 1 or more.
TRAINING_NUMBER_RULES: dict[str, tuple[str, float | None, float | None, bool, bool]] = {
    "learning_rate": ("float", 0.0, None, True, False),
    "weight_decay": ("float", 0.0, None, False, False),
    "grad_clip": ("float", 0.0, None, False, False),
    "gradient_clip": ("float", 0.0, None, False, False),
    "ema_decay": ("float", 0.0, 1.0, False, True),
    "kl_weight": ("float", 0.0, None, False, False),
    "gradient_loss_weight": ("float", 0.0, None, False, False),
    "pixel_loss_weight": ("float", 0.0, None, False, False),
    "max_minutes": ("float", 0.0, None, False, False),
    "max_steps": ("int", 0, None, False, False),
    "epochs": ("int", 1, None, False, False),
    "steps_per_epoch": ("int", 1, None, False, False),
    "batch_size": ("int", 1, None, False, False),
    "checkpoint_every": ("int", 1, None, False, False),
    "log_every": ("int", 1, None, False, False),
    "keep_checkpoints": ("int", 1, None, False, False),
    "warmup_steps": ("int", 0, None, False, False),
    "val_every": ("int", 0, None, False, False),
    "seed": ("int", 0, None, False, False),
}


def _rule_text(kind: str, low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    bounds = [f"{'>' if low_open else '>='} {low:g}"] if low is not None else []
    bounds += [f"{'<' if high_open else '<='} {high:g}"] if high is not None else []
    return " ".join(["a finite number" if kind == "float" else "an integer", " and ".join(bounds)]).strip()


def check_training_numbers(section: Any, prefix: str = "") -> None:
    """Refuse a NaN, infinite or out-of-range value of the shared training settings of ``section``.

    Args:
        section: the training section of a config (a dataclass, e.g. ``SRConfig.train``); fields named in
            :data:`TRAINING_NUMBER_RULES` are checked, others are left to their config's own checks.
        prefix: the section's name in messages, e.g. ``"train."``.

    Raises:
        ConfigError: e.g. ``train.learning_rate must be a finite number > 0; got nan`` (exit code 2).
    """
    if not is_dataclass(section):
        raise TypeError(f"check_training_numbers needs a config dataclass, got {type(section).__name__}")
    for f in fields(section):
        rule = TRAINING_NUMBER_RULES.get(f.name)
        if rule is None:
            continue
        kind, low, high, low_open, high_open = rule
        value = getattr(section, f.name)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{prefix}{f.name} must be {_rule_text(*rule)}; got {value!r}") from None
        bad = (
            not math.isfinite(number)
            or (kind == "int" and number != int(number))
            or (low is not None and (number < low or (low_open and number == low)))
            or (high is not None and (number > high or (high_open and number == high)))
        )
        if bad:
            raise ConfigError(f"{prefix}{f.name} must be {_rule_text(*rule)}; got {value}")


#: A loss this many times its level over a run's first steps means the run has diverged: a working run's loss
#: never grows a millionfold; a diverging one's (far too high a learning rate) passes 1e20 while still finite.
DIVERGED_GROWTH = 1e6
#: The loss's level is the largest loss of this many first steps (of this process: after --resume too).
LEVEL_STEPS = 10


class LossWatch:
    """Stops a diverged run: call it on every step's loss, before the backward pass.

    A NaN or infinite loss, or one :data:`DIVERGED_GROWTH` times its level (the largest of the first
    :data:`LEVEL_STEPS` losses), raises before the step spreads it into the weights: the checkpoints written
    so far stay finite, and nothing is exported. Under DDP each rank watches its own loss; a rank that stops
    ends the job (torchrun stops the others).

    Args:
        learning_rate: the run's learning rate, named in the message.
    """

    def __init__(self, learning_rate: float | None = None) -> None:
        self.learning_rate = learning_rate
        self.level = 0.0
        self.seen = 0

    def __call__(self, loss: torch.Tensor | float, step: int) -> None:
        """Check the loss of ``step``; raises :class:`NumericalError` (exit code 1) when the run diverged:
        ``training diverged at step 12: the loss is nan. Nothing was exported; ...``."""
        value = float(loss.detach().float()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            self._diverged(step, f"the loss is {value}")
        if self.seen and self.level > 0 and value > DIVERGED_GROWTH * self.level:
            self._diverged(step, f"the loss grew to {value:.3g}, {value / self.level:.1e} times its level over the "
                                 f"first steps ({self.level:.3g})")  # fmt: skip
        if self.seen < LEVEL_STEPS:
            self.level = max(self.level, value)
            self.seen += 1

    def _diverged(self, step: int, what: str) -> None:
        rate = f" ({self.learning_rate:g})" if self.learning_rate is not None else ""
        raise NumericalError(
            f"training diverged at step {step}: {what}. Nothing was exported; any checkpoint written so far "
            f"holds finite weights. Lower the learning rate{rate} and train again (--overwrite replaces this run)"
        )


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or Inf."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return [
        name
        for name, t in items
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
