"""Test-time adaptation: fine-tune a copy of the through-plane predictor on the input scan itself.

A thick-slice scan is sharp in-plane (0.5-1 mm) and coarse through-plane (2.5-5 mm). Its axial slices,
one fine axis resampled to the thin spacing ``S / k`` and slab-averaged by ``k`` (the way the thick axis
was acquired), give training pairs of the very anatomy, scanner, reconstruction kernel and noise being
up-sampled (:func:`DiffusionCore.sr.planes.in_plane_pair` with ``S`` the scan's own slice spacing). A
copy of the predictor is trained on them for a bounded time (or a fixed number of steps) before it runs
on the volume; the shipped weights are never changed.

Adaptation is on by default: ``sr``, the CT Diffusion SR module, its batch CLI and ``evaluate``'s
``sr+adapt`` method take :data:`DEFAULT_ADAPT_STEPS` steps unless told otherwise (``sr --no-adapt``). On
the two scans measured that the weights never saw, it adds +0.3 to +0.7 dB at x4 and +0.7 to +0.8 dB at x2
over the predictor alone, for about 40 s on 2 idle CPU cores (35-41 s for the default 400 steps in the speed
runs of ``docs/model_cards/sr-default.md``, "Speed").

Determinism: with a step count (the default, or ``sr --adapt-steps N``) the adapted network is the same
for the same seed, weights, device and thread count on the CPU; on a GPU the backward pass of the replicate padding
adds with atomic operations, so it may differ in the last bits from run to run (docs/reliability.md). With a time budget (``sr --adapt SECONDS``) the
number of steps depends on the machine's speed; the report records it.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import Cancelled, ConfigError
from ..seeds import check_seed
from .planes import PairSettings, PlaneSource, sample_pairs
from .throughplane import ThroughPlaneNet, channels_last, cubic_planes

logger = logging.getLogger(__name__)

#: Steps of the default adaptation (about 40 s on 2 idle CPU cores; on the CPU the same output for the same seed and
#: thread count).
DEFAULT_ADAPT_STEPS = 400
#: Steps between the checks of the training loss for a divergence (a NaN or infinite loss stops training).
DIVERGENCE_CHECK_STEPS = 8
#: Time budget of ``sr --adapt`` given without a value, in seconds.
DEFAULT_ADAPT_SECONDS = 120.0


@dataclass
class AdaptSettings:
    """Adaptation to one scan.

    Attributes:
        seconds: wall-time budget, used when ``steps`` is None (0: no time budget; then ``steps`` defaults
            to :data:`DEFAULT_ADAPT_STEPS`).
        steps: a fixed number of optimizer steps (deterministic; it takes precedence over ``seconds``);
            ``None``: as many as ``seconds`` allow.
        batch_size: planes per step.
        learning_rate: Adam learning rate (smaller than training's: it starts from trained weights).
        thick_rows: thick rows per plane.
        width: in-plane width of a plane.
        check_pairs: pairs of the fixed check batch on which the loss before and after is measured.
        match_noise: give the pairs' thick planes the scan's own noise. An in-plane pair's thick row averages
            S / pitch pixels of a slice, so it holds a fraction of the noise of the scan's real thick slices that
            the adapted network will read; white noise of the missing level (:func:`scan_noise_hu`) is added to
            each pair's thick plane, the thin target staying as it is.
        optional: when the weights have no through-plane predictor, go on without adaptation (the report
            says so) instead of stopping; the default adaptation is optional, one asked for is not.
        slice_thickness_mm: the scan's recorded slice thickness where it is not its spacing (an overlapping or
            interspaced series; :meth:`SuperResolver.run <DiffusionCore.sr.pipeline.SuperResolver.run>` sets it when
            :func:`~DiffusionCore.degrade.slab_thickness_note` applies). The pairs still take slices as thick as the
            spacing, so the check-batch gain measures another task than the scan's: the gain line and the report's
            ``caveat`` say so (:func:`pairs_caveat`). It changes nothing that is computed.
    """

    seconds: float = 0.0
    steps: int | None = None
    batch_size: int = 16
    learning_rate: float = 3e-4
    thick_rows: int = 16
    width: int = 96
    check_pairs: int = 32
    match_noise: bool = False
    optional: bool = field(default=False, compare=False)  # how a missing predictor is met, not what is done
    slice_thickness_mm: float | None = field(default=None, compare=False)  # what the gain is said to mean

    def __post_init__(self) -> None:
        self.seconds = _number("seconds", "the adaptation time in seconds", self.seconds)
        if not math.isfinite(self.seconds) or self.seconds < 0:
            raise ConfigError(f"the adaptation time must be a finite number of seconds >= 0; got {self.seconds}")
        if self.steps is not None:
            self.steps = _count("steps", "the adaptation steps", self.steps)
        if self.steps is None and self.seconds == 0:
            self.steps = DEFAULT_ADAPT_STEPS
        self.learning_rate = _number("learning_rate", "the adaptation learning rate", self.learning_rate)
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError(f"the adaptation learning rate must be > 0; got {self.learning_rate}")
        for name in ("batch_size", "thick_rows", "width", "check_pairs"):
            setattr(self, name, _count(name, f"the adaptation's {name.replace('_', ' ')}", getattr(self, name)))


def pairs_caveat(spacing_mm: float, thickness_mm: float | None) -> str:
    """What the check-batch gain means for a scan whose slices are ``thickness_mm`` thick but ``spacing_mm`` apart
    (``""`` without a thickness): the pairs are slab-averaged over the spacing, so the gain is measured on another
    task than restoring the scan's own slices (probe 33: +0.7 dB on the check batch of 10 mm slices every 5 mm, whose
    result got 0.1 dB worse against the truth)."""
    if not thickness_mm:
        return ""
    return (
        f"its pairs assume slices as thick as their {spacing_mm:g} mm spacing, not the series' {thickness_mm:g} "
        "mm, so the gain measures another task"
    )


def _number(name: str, what: str, value: Any) -> Any:
    """``value`` when it is a real number (not a bool or a string), else :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} (AdaptSettings.{name}) must be a number; got {value!r}")
    return value


def _count(name: str, what: str, value: Any) -> int:
    """``value`` as an int when it is a whole number of 1 or more (a float such as 2.0 too, as JSON gives it; not a
    bool, 2.5 or a string), else :class:`ConfigError` naming ``name``."""
    whole = isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and float(value).is_integer())
    if isinstance(value, bool) or not whole or int(value) < 1:
        raise ConfigError(f"{what} (AdaptSettings.{name}) must be a whole number of 1 or more; got {value!r}")
    return int(value)


def budget_fields(steps: int, seconds: float, *, optional: bool = False) -> dict[str, Any]:
    """:class:`AdaptSettings` fields (JSON) for the front ends that always hold a step count (the CT Diffusion SR
    module and its batch CLI): ``seconds`` other than 0 replaces the steps with a time budget (checked by
    :class:`AdaptSettings`: a negative or non-finite time is refused)."""
    if float(seconds) != 0:
        return {"seconds": float(seconds), "steps": None, "optional": bool(optional)}
    return {"seconds": 0.0, "steps": int(steps), "optional": bool(optional)}


#: HU range of the voxels whose neighbour differences measure a scan's noise (soft tissue: flat, away from edges).
NOISE_HU_RANGE = (-150.0, 150.0)
#: Fewest neighbour pairs for a noise estimate; with fewer there is no soft tissue to measure it on.
NOISE_MIN_PAIRS = 500


def scan_noise_hu(thick_hu: np.ndarray, max_slices: int = 16) -> float:
    """The per-pixel noise standard deviation (HU) of a scan's slices, 0 when it cannot be measured.

    Measured on up to ``max_slices`` slices spread over the scan: the differences of horizontally and vertically
    neighbouring pixels that both lie in soft tissue (:data:`NOISE_HU_RANGE`), 1.4826 times their median absolute
    value divided by sqrt 2 (robust to the few edges left). Written here rather than taken from scikit-image's
    ``estimate_sigma`` because that one reads the whole image, where a CT's clipped air outside the body has no noise,
    and it is not among the package's dependencies.
    """
    m = thick_hu.shape[0]
    idx = np.unique(np.linspace(0, m - 1, min(m, max_slices)).round().astype(int))
    diffs = []
    for i in idx:
        sl = np.asarray(thick_hu[i], dtype=np.float32)
        soft = (sl >= NOISE_HU_RANGE[0]) & (sl <= NOISE_HU_RANGE[1])
        for axis in (0, 1):
            d = np.diff(sl, axis=axis)
            both = soft[1:] & soft[:-1] if axis == 0 else soft[:, 1:] & soft[:, :-1]
            diffs.append(d[both])
    d = np.concatenate(diffs)
    if d.size < NOISE_MIN_PAIRS:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def _plane_size(shape_bc: tuple[int, int], pitch: float, thick_mm: float, k: int, s: AdaptSettings) -> tuple[int, int] | None:
    """``(thick_rows, width)`` that fit in-plane slices of ``shape_bc``, or None when none do."""
    ratio = max(thick_mm / k, pitch) / pitch
    shortest = min(shape_bc)
    rows = min(int(s.thick_rows), int(shortest / (k * ratio)) - 1)
    width = min(int(s.width), shortest)
    if rows < 4 or width < 16:
        return None
    return rows, width


#: How far (dB) the adapted network's gain over cubic interpolation on the check batch may fall below the unadapted
#: network's before the adaptation is discarded. The check batch is a fixed draw of the scan's own pairs, so a small dip
#: is noise; a learning rate that diverges loses several dB (or gives NaN). The default adaptation gains there on the
#: sample scans, far above that margin (over cubic, after the default 400 steps: a 16x128x128 crop of chest-lidc at x4
#: 1.22 -> 4.47 dB; chest-dx's own 5 mm slices, 16x192x192, at x4 3.16 -> 3.72 dB; chest-dx degraded x4 / x2
#: 3.05 -> 6.19 / 2.40 -> 4.90 dB).
DISCARD_BELOW_DB = 0.5


def _check_gain_db(mse_cubic: float, mse: float) -> float | None:
    """PSNR gain (dB) of a prediction over cubic interpolation from their mean squared errors; None when the
    prediction's error is not finite (a diverged network)."""
    if not (math.isfinite(mse) and math.isfinite(mse_cubic)):
        return None
    return 10.0 * math.log10(max(mse_cubic, 1e-12) / max(mse, 1e-12))


def discard_reason(report: dict[str, Any]) -> str:
    """Why an adaptation's network is not used (``""``: it is): a non-finite loss, or a check-batch gain over cubic
    interpolation more than :data:`DISCARD_BELOW_DB` below the unadapted network's."""
    before, after = report.get("gain_before_db"), report.get("gain_after_db")
    if report.get("diverged") or after is None or report.get("loss_after") is None:
        return "the adaptation diverged (its loss is not finite): lower the learning rate"
    if before is not None and after < before - DISCARD_BELOW_DB:
        return (f"the adapted network is worse on the scan's check batch than before ({after:.2f} dB over cubic "
                f"against {before:.2f} dB): lower the learning rate")
    return ""


def adapt_predictor(
    net: ThroughPlaneNet,
    thick_hu: np.ndarray,
    spacing: tuple[float, float, float],
    factor: int,
    settings: AdaptSettings,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> tuple[ThroughPlaneNet, dict[str, Any]]:
    """Fine-tune a copy of ``net`` on pairs made from the scan's own in-plane axes.

    The adaptation trains whatever the caller's grad mode (a ``torch.no_grad()`` or ``torch.inference_mode()``
    block gives the same network as none). Its randomness is a numpy generator seeded with ``seed``: torch's global
    random state is neither read nor changed (other threads' draws are left alone).

    The adapted network is discarded, with a warning in the log, when its loss on the check batch (a fixed batch of
    the scan's pairs, drawn apart from the training's) is not finite, or its gain over cubic interpolation there falls
    more than :data:`DISCARD_BELOW_DB` below the unadapted network's: ``net`` itself is returned and the report says
    why under ``"discarded"`` (a learning rate that diverges). A smaller dip counts as noise and keeps the adapted
    network, so the default adaptation of a real scan is not discarded for it.

    Args:
        net: the trained predictor (not modified).
        thick_hu: the input scan in HU, ``(m, H, W)`` with the thick axis first (not modified).
        spacing: its spacing in mm along ``(m, H, W)``.
        factor: thin slices per thick slice.
        settings: time or step budget and optimiser settings.
        seed: random seed of the pairs and of the order they are drawn in, 0 to 2**32 - 1 (:data:`~DiffusionCore.seeds.MAX_SEED`).
        device: where to train.
        progress: ``progress(fraction_done, message)``, called after each step.
        cancel: checked after each step (raises :class:`~DiffusionCore.errors.Cancelled`).

    Raises:
        ConfigError: a seed outside 0 to 2**32 - 1.

    Returns:
        ``(adapted, report)``: the adapted copy (eval mode; ``net`` when discarded), and ``{"seconds", "steps",
        "loss_before", "loss_after", "gain_before_db", "gain_after_db", "pairs_per_step", "skipped",
        "discarded"}``; the losses are the L1 (model units) on a fixed check batch from the scan, the gains its PSNR
        over cubic interpolation (None when not finite), ``discarded`` None or why the adapted network is not used;
        and ``caveat`` (:func:`pairs_caveat`) when ``settings.slice_thickness_mm`` is given.
    """
    seed = check_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():  # training, whatever the caller's grad mode
        adapted, report = _adapt(net, thick_hu, spacing, factor, settings, seed, torch.device(device), progress, cancel)
    if report.get("skipped"):
        return adapted, report
    why = discard_reason(report)
    report.pop("diverged", None)
    report["discarded"] = why or None
    if why:
        logger.warning("adaptation discarded, the unadapted predictor is used: %s (learning rate %g, %d steps)",
                       why, settings.learning_rate, report["steps"])
        return net, report
    return adapted, report


def _adapt(
    net: ThroughPlaneNet,
    thick_hu: np.ndarray,
    spacing: tuple[float, float, float],
    factor: int,
    settings: AdaptSettings,
    seed: int,
    dev: torch.device,
    progress: Callable[[float, str], None] | None,
    cancel: threading.Event | None,
) -> tuple[ThroughPlaneNet, dict[str, Any]]:
    """The training of :func:`adapt_predictor` (in its grad mode), with the check batch's loss and gain before and
    after; ``"diverged"`` in the report when a training loss was not finite (training stops there)."""
    k = int(factor)
    t_start = time.perf_counter()
    pitch = float(min(spacing[1], spacing[2]))
    size = _plane_size(thick_hu.shape[1:], pitch, float(spacing[0]), k, settings)
    report: dict[str, Any] = {"factor": k, "seconds_budget": float(settings.seconds), "steps_budget": settings.steps}
    if size is None or not net.supports(k):
        why = (f"no factor-{k} head" if not net.supports(k)
               else f"in-plane slices of {thick_hu.shape[1]}x{thick_hu.shape[2]} are too small for x{k} pairs")
        logger.warning("adaptation skipped: %s", why)
        return net, {**report, "skipped": why, "steps": 0, "seconds": 0.0}
    rows, width = size
    noise = 0.0
    if settings.match_noise:  # what the pairs' box averages leave of the scan's noise, added back
        report["noise_hu"] = round(scan_noise_hu(thick_hu), 2)
        noise = report["noise_hu"] * math.sqrt(max(0.0, 1.0 - pitch / float(spacing[0])))
        report["input_noise_hu"] = round(noise, 2)
    pairs = PairSettings(thick_rows=rows, width=width, through_plane_probability=0.0,
                         thick_mm=float(spacing[0]), intensity_jitter=0.02, input_noise_hu=(noise, noise))
    source = PlaneSource("input", thick_hu, tuple(float(s) for s in spacing), thin_reference=False)
    rng = np.random.default_rng([seed, 7])
    check_thick, check_thin = (torch.from_numpy(a) for a in sample_pairs(
        [source], k, settings.check_pairs, PairSettings(**{**pairs.__dict__, "intensity_jitter": 0.0}),
        np.random.default_rng([seed, 8])))

    adapted = channels_last(net).to(dev)  # a copy, in the layout the CPU convolutions run fastest in
    check_thick, check_thin = check_thick.to(dev), check_thin.to(dev)
    cubic_check = cubic_planes(check_thick, k)

    def check() -> tuple[float, float | None]:
        adapted.eval()
        with torch.no_grad():
            pred = cubic_check + adapted(check_thick, k)
            loss = float(torch.mean(torch.abs(pred - check_thin)))
            mse, mse_cubic = float(torch.mean((pred - check_thin) ** 2)), float(torch.mean((cubic_check - check_thin) ** 2))
        adapted.train()
        return loss, _check_gain_db(mse_cubic, mse)

    report["loss_before"], report["gain_before_db"] = check()
    opt = torch.optim.Adam(adapted.parameters(), lr=settings.learning_rate)
    adapted.train()
    steps = 0
    t_train = time.perf_counter()
    while True:
        if settings.steps is not None and steps >= int(settings.steps):
            break
        elapsed = time.perf_counter() - t_train
        if settings.steps is None and elapsed >= settings.seconds:
            break
        thick_np, thin_np = sample_pairs([source], k, settings.batch_size, pairs, rng)
        thick, thin = torch.from_numpy(thick_np).to(dev), torch.from_numpy(thin_np).to(dev)
        loss = torch.nn.functional.l1_loss(cubic_planes(thick, k) + adapted(thick, k), thin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if steps % DIVERGENCE_CHECK_STEPS == 0 and not math.isfinite(float(loss.detach())):  # nothing left to learn
            report["diverged"] = True
            break
        if cancel is not None and cancel.is_set():
            raise Cancelled("super-resolution cancelled during adaptation; no output was written.")
        if progress is not None:
            frac = steps / int(settings.steps) if settings.steps is not None else (time.perf_counter() - t_train) / settings.seconds
            progress(min(1.0, frac), f"adapting to this scan, step {steps}")
    report["loss_after"], report["gain_after_db"] = check()
    adapted.eval()
    report.update(steps=steps, seconds=round(time.perf_counter() - t_start, 2), pairs_per_step=settings.batch_size,
                  plane=[rows * k, width], skipped=None)
    caveat = pairs_caveat(float(spacing[0]), settings.slice_thickness_mm)
    if caveat:
        report["caveat"] = caveat
    logger.info(
        "adapted to the scan in %.1f s (%d steps): check-batch gain over cubic %s -> %s dB%s",
        report["seconds"],
        steps,
        _db(report["gain_before_db"]),
        _db(report["gain_after_db"]),
        f" ({caveat})" if caveat else "",
    )
    for key in ("loss_before", "loss_after"):  # the report is JSON: no NaN
        if not math.isfinite(report[key]):
            report[key] = None
    return adapted, report


def _db(value: float | None) -> str:
    return "not finite" if value is None else f"{value:.2f}"
