"""Training of the through-plane predictor (``train throughplane``): cheap, resumable, time-bounded.

The recipe (every field of :class:`ThroughPlaneTrainConfig` has a default and a sentence of help):

* data: thin-slice CTs; the top ``test_fraction`` of each volume's slices is never read for training or
  validation (the test region that the published figures use), the ``val_fraction`` below it is the
  validation region, the rest trains;
* pairs (:mod:`DiffusionCore.sr.planes`): real thin slices along z slab-averaged by ``k``, and in-plane
  self-supervision (axial slices, one fine axis resampled to ``S / k``), flipped and intensity-jittered, and
  optionally given another kernel's look (``pairs.kernel_jitter``) and noise on the thick plane
  (``pairs.input_noise_hu``);
* L1 loss on the thin plane (cubic + predicted residual) in model units, AdamW, an exponential moving
  average of the weights (what validation scores and export writes);
* stops after ``max_steps`` or ``max_minutes`` (whichever first; ``max_minutes`` 0: no time limit), on SIGTERM or a
  ``STOP`` file, always with a checkpoint and a validation at the step it ends (unless it validated there already:
  ``summary.json`` and the exported weights' metadata hold it, and the console shows it beside the starting
  weights' score); a ``STOP`` file there as it starts ends it before anything is trained or exported; ``--resume``
  continues exactly; ``--init-from WEIGHTS`` starts from exported weights (training accumulates across sessions);
* volumes of a ``--data`` folder or list file that cannot be used (not readable, NaN voxels, too short or small)
  are passed over with a warning each and listed in ``summary.json``; a file named by itself stops the run;
* one process on the CPU's threads or a GPU (``--device``), or several under ``torchrun --nproc_per_node=N``
  (DDP: each draws ``batch_size`` planes per step, rank 0 validates, checkpoints and exports).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cli.common import device_name
from ..config import config_to_dict
from ..degrade import THIN_SLICE_MM
from ..errors import ConfigError, InputError, NumericalError
from ..train.numerics import LossWatch, check_training_numbers
from .planes import PairSettings, PlaneSource, sample_pairs
from .throughplane import COMPONENT, ThroughPlaneConfig, ThroughPlaneNet, cubic_planes, state_dict_for_file

logger = logging.getLogger(__name__)

MODEL_NAME = "predictor"
EXPORT_FILE = "throughplane.safetensors"
#: The recipe of the shipped ``sr-default`` weights: what ``train throughplane`` trains when no ``--config`` is named
#: (a new run; ``--resume`` continues with the settings its run recorded), so that ``--init-from sr-default`` fits.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "throughplane" / "default.json"


@dataclass
class ThroughPlaneTrainConfig:
    """Training of the through-plane predictor.

    Attributes:
        model: the architecture (channels, blocks, factors).
        pairs: how plane pairs are drawn (plane size, share of real thin slices, simulated thickness).
        factor_weights: how often each factor is trained, ``{"k": weight}`` (unlisted factors: weight 1).
        batch_size: planes per step.
        learning_rate: AdamW learning rate (constant after warm-up).
        warmup_steps: linear warm-up of the learning rate.
        weight_decay: AdamW weight decay.
        ema_decay: decay of the weight average that validation scores and export writes (0: off).
        max_steps: stop after this many optimizer steps in total.
        max_minutes: stop after this many minutes of this run (0: no limit).
        val_every: validate (and log the scores) every N steps.
        log_every: log the training loss every N steps (and at the last step), to ``metrics.jsonl`` and TensorBoard.
        checkpoint_every: checkpoint every N steps.
        val_pairs: pairs per validated factor.
        val_factors: factors validated.
        test_fraction: top share of each volume's slices never used (the test region).
        val_fraction: share of slices below the test region used for validation only.
        seed: random seed.
        threads: torch threads (0: torch's default).
    """

    model: ThroughPlaneConfig = field(default_factory=ThroughPlaneConfig)
    pairs: PairSettings = field(default_factory=PairSettings)
    factor_weights: dict[str, float] = field(default_factory=lambda: {"2": 2.5, "4": 2.5})
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    max_steps: int = 100000
    max_minutes: float = 0.0
    val_every: int = 250
    log_every: int = 20
    checkpoint_every: int = 500
    val_pairs: int = 48
    val_factors: list[int] = field(default_factory=lambda: [2, 4])
    test_fraction: float = 0.3
    val_fraction: float = 0.1
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ThroughPlaneConfig(**self.model)
        if isinstance(self.pairs, dict):
            p = dict(self.pairs)
            if "thick_mm" in p:
                p["thick_mm"] = tuple(p["thick_mm"])
            self.pairs = PairSettings(**p)
        check_training_numbers(self)  # learning rate, EMA decay, step counts, ... (shared by every family)
        for name in ("test_fraction", "val_fraction"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0; got {v}")
        for name in ("max_steps", "val_every", "val_pairs", "log_every"):  # here 0 has no meaning
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {getattr(self, name)}")
        if int(self.threads) < 0:
            raise ConfigError(f"threads must be an integer >= 0 (0: torch's default); got {self.threads}")
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ConfigError("test_fraction + val_fraction must leave at least 10% of the slices for training")

    @classmethod
    def recipe(cls, **overrides: Any) -> ThroughPlaneTrainConfig:
        """The recipe of the shipped ``sr-default`` weights (:data:`DEFAULT_CONFIG`, what ``train throughplane``
        trains without ``--config``), with ``overrides`` (fields by name, e.g. ``max_steps=200``) applied over it:
        the configuration to fine-tune ``sr-default`` with (``train(..., init_from="sr-default")``). The class's own
        defaults (``ThroughPlaneTrainConfig()``, and the fields a ``--config`` file leaves out) are a smaller model.

        Raises:
            ConfigError: an unknown field or a value the configuration rejects.
        """
        from ..config import load_config, read_config_file

        return load_config({**read_config_file(DEFAULT_CONFIG), **overrides}, cls, where=str(DEFAULT_CONFIG))

    def factor_probabilities(self) -> tuple[list[int], np.ndarray]:
        ks = list(self.model.factors)
        w = np.array([float(self.factor_weights.get(str(k), 1.0)) for k in ks])
        if (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"factor_weights must be >= 0 with a positive sum; got {self.factor_weights}")
        return ks, w / w.sum()


def split_regions(n: int, test_fraction: float, val_fraction: float) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``(train, val, test)`` slice ranges of a volume with ``n`` slices: test at the top, val below it."""
    test0 = int(round(n * (1.0 - test_fraction)))
    val0 = int(round(n * (1.0 - test_fraction - val_fraction)))
    if val0 < 4:
        raise InputError(f"a volume with {n} slices is too short to hold out test and validation regions")
    return (0, val0), (val0, test0), (test0, n)


def load_sources(paths: list[Path], cfg: ThroughPlaneTrainConfig) -> tuple[list[PlaneSource], list[PlaneSource]]:
    """Training and validation plane sources (HU, slice axis first) from thin-slice CT files."""
    train, val, _ = read_sources(paths, cfg, sizes=False)
    return train, val


def read_sources(paths: list[Path], cfg: ThroughPlaneTrainConfig, *, sizes: bool = True,
                 passed_over: list[tuple[Path, str]] | None = None
                 ) -> tuple[list[PlaneSource], list[PlaneSource], list[Path]]:  # fmt: skip
    """:func:`load_sources`, and the volumes of ``paths`` they come from: those read and used, not those passed over
    (an unreadable series or file of a folder or list, one too short to hold out test and validation slices, and with
    ``sizes`` one too small for any training plane: :func:`plane_size_problem`; :func:`load_sources` reads planes of
    any size). ``passed_over``, where given, gets ``(path, why)`` of each one passed over. The log and the sources
    name each volume by its file or folder name, with as many of its parent folders as tell it from the others
    (:func:`~DiffusionCore.train.checkpoint.volume_names`: ``a/ct.nii.gz``, ``b/ct.nii.gz``)."""
    from ..inputs import readable_volumes, stops_the_run
    from ..train.checkpoint import volume_names

    names = dict(zip((Path(p) for p in paths), volume_names(paths), strict=True))
    train, val, short, used = [], [], [], []
    too_small = (lambda _p, v: plane_size_problem(v.shape, cfg)) if sizes else None
    for p, vol in readable_volumes(paths, too_small, passed_over=passed_over):
        arr = np.ascontiguousarray(vol.array, dtype=np.float32)
        try:
            tr, va, te = split_regions(arr.shape[0], cfg.test_fraction, cfg.val_fraction)
        except InputError as exc:
            if stops_the_run(paths, p):  # a file named on the command line: the user's own choice, so it stops the run
                raise InputError(f"{names[p]}: {exc} (it needs a thin-slice CT; leave it out of --data)") from None
            short.append(f"{p}: {exc}")  # a series of a cohort (a scout, a few slices): passed over, as unreadable ones
            if passed_over is not None:
                passed_over.append((Path(p), str(exc)))
            logger.warning("passed over %s: %s", p, exc)
            continue
        validation = f"validation {va[0]}-{va[1] - 1}" if va[1] > va[0] else "no validation slices"
        logger.info("%s: train slices %d-%d, %s, test %d-%d (never read)", names[p], tr[0], tr[1] - 1, validation,
                    te[0], te[1] - 1)  # fmt: skip
        warn_slices_not_along_z(p, vol, names[p])
        train.append(PlaneSource(names[p], arr, vol.spacing_zyx, *tr))
        used.append(p)
        if va[1] > va[0]:
            val.append(PlaneSource(names[p] + "[val]", arr, vol.spacing_zyx, *va))
    if not train:
        raise InputError("none of the CT volumes is long enough to train on: " + "; ".join(short))
    if not val:
        warn_no_validation(train, cfg)
    warn_thick_slices(train)
    return train, val, used


def warn_slices_not_along_z(path: Path, vol: Any, name: str | None = None) -> None:
    """Warn when ``vol``'s slice axis is not its array axis 0, which training takes as the slices (its thin/thick
    pairs, and the train, validation and test regions, run along it): a volume stored sagittally or coronally, whose
    largest spacing lies along array axis 1 or 2 (:func:`~DiffusionCore.volume.thick_axis`). Training goes on: its
    in-plane pairs still teach, but its pairs "along z" are in-plane ones and its held-out regions are a side of the
    body, not a range of slices. ``name``: how the warning names the volume (default: its file or folder name)."""
    from ..volume import thick_axis

    axis = thick_axis(vol)
    if axis in (None, 0):
        return
    z, y, x = vol.spacing_zyx
    logger.warning(
        "%s: its voxels are %.3g x %.3g x %.3g mm (array axes z, y, x): the slices are along array axis %s (%.3g mm "
        "apart), not z, which training takes as the slice axis, so its pairs along z and its validation and test "
        "regions run across the body instead; store it with its slices along z (e.g. resample it in 3D Slicer) or "
        "leave it out", name or path.name, z, y, x, "zyx"[axis], vol.spacing_zyx[axis])  # fmt: skip


def plane_size_problem(shape: tuple[int, ...], cfg: ThroughPlaneTrainConfig) -> str:
    """Why a CT of ``shape`` (slices, rows, columns) gives no training plane at any factor (the smallest plane is
    ``thick_rows x smallest factor`` rows by ``width``: :func:`~DiffusionCore.sr.planes.in_plane_pair` cuts it from a
    slice, :func:`~DiffusionCore.sr.planes.through_plane_pair` across the training slices), else ``""``."""
    k = min(cfg.model.factors)
    rows, width = cfg.pairs.thick_rows * k, cfg.pairs.width
    n, h, w = (int(x) for x in shape[:3])
    try:
        train_slices = split_regions(n, cfg.test_fraction, cfg.val_fraction)[0][1]
    except InputError:
        train_slices = 0  # too short: said by read_sources
    if (h > rows and w >= width) or (w > rows and h >= width) or (train_slices >= rows and max(h, w) >= width):
        return ""
    return (f"{h}x{w} voxels in-plane ({n} slices), smaller than the {rows}x{width}-voxel training planes "
            f"(thick_rows {cfg.pairs.thick_rows} x factor {k} by width {width}); it needs at least {rows + 1}x{width} "
            "voxels in-plane")


def warn_no_validation(sources: list[PlaneSource], cfg: ThroughPlaneTrainConfig) -> None:
    """Warn (once) that no training CT leaves a slice for validation: the run trains, but nothing scores it."""
    lengths = ", ".join(f"{s.name} ({s.array.shape[0]} slices)" for s in sources[:3])
    if len(sources) > 3:
        lengths += ", ..."
    logger.warning(
        "validation is off: no training CT is long enough to leave a slice for validation below its held-out test "
        "region (%s; val_fraction %g, test_fraction %g), so the run is never scored and its exported weights are "
        "unscored; add longer thin-slice CTs (or raise val_fraction) to validate",
        lengths, cfg.val_fraction, cfg.test_fraction,
    )  # fmt: skip


def warn_thick_slices(sources: list[PlaneSource]) -> bool:
    """Warn (once, and return True) when every training CT has slices thicker than :data:`THIN_SLICE_MM`: its
    through-plane pairs (k slices averaged into one) then teach thick-to-thicker slices, so thin detail comes from
    the in-plane pairs alone. One thin-slice CT among them is enough to stay quiet (the shipped recipe pairs a 2.5 mm
    CT with a 5 mm one)."""
    if not sources or any(src.spacing[0] <= THIN_SLICE_MM for src in sources):
        return False
    listed = ", ".join(f"{src.name} at {src.spacing[0]:g} mm" for src in sources)
    logger.warning(
        "every training CT has slices thicker than %g mm (%s): its through-plane pairs then teach thick-to-thicker "
        "slices, and the predictor learns thin detail only from the in-plane pairs; add a thin-slice CT (slices of "
        "%g mm or less) to --data", THIN_SLICE_MM, listed, THIN_SLICE_MM,
    )
    return True


def validation_batches(
    sources: list[PlaneSource], cfg: ThroughPlaneTrainConfig
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation pairs per factor (the same every time): the ``val_factors`` the model has (all of its factors
    when it has none of them; the default ``[2, 4]`` with a model of factor 2 alone validates 2)."""
    out = {}
    factors = [int(k) for k in cfg.val_factors if int(k) in cfg.model.factors] or list(cfg.model.factors)
    plain = {"intensity_jitter": 0.0, "kernel_jitter": 0.0, "input_noise_hu": 0.0}  # the pairs as they are
    settings = PairSettings(**{**asdict(cfg.pairs), **plain,
                               "thick_rows": min(8, cfg.pairs.thick_rows), "width": cfg.pairs.width})
    for k in factors:
        rng = np.random.default_rng(12345 + int(k))
        thick, thin = sample_pairs(sources, int(k), int(cfg.val_pairs), settings, rng)
        out[int(k)] = (torch.from_numpy(thick), torch.from_numpy(thin))
    return out


def psnr_units(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB for model units (data range 2: the HU window)."""
    mse = float(torch.mean((pred - target) ** 2))
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def validate(net: ThroughPlaneNet, batches: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """``val/psnr_xK`` and ``val/gain_xK`` (dB over cubic) per factor, and their mean gain."""
    net.eval()
    res: dict[str, float] = {}
    gains = []
    for k, (thick, thin) in batches.items():
        cubic = cubic_planes(thick, k)
        pred = cubic + net(thick, k)
        p, c = psnr_units(pred, thin), psnr_units(cubic, thin)
        res[f"val/psnr_x{k}"] = p
        res[f"val/gain_x{k}"] = p - c
        gains.append(p - c)
    res["val/gain"] = float(np.mean(gains))
    net.train()
    return res


def load_predictor_weights(net: ThroughPlaneNet, path: str, allow_unregistered: bool = True) -> None:
    """Copy the predictor of an exported weights file into ``net`` (for ``--init-from``)."""
    from ..weights.registry import resolve_weights
    from .pipeline import load_predictor

    src = load_predictor(resolve_weights(path, family="sr", allow_unregistered=allow_unregistered))
    if src.config.channels != net.config.channels or src.config.blocks != net.config.blocks:
        raise ConfigError(
            f"--init-from {path}: its predictor ({src.config.channels} channels, {src.config.blocks} blocks) "
            f"differs from the configured one ({net.config.channels}, {net.config.blocks}): give a --config whose "
            f"model has {src.config.channels} channels and {src.config.blocks} blocks (sr-default's recipe is "
            f"{DEFAULT_CONFIG}, what train throughplane uses without --config; in Python: "
            "ThroughPlaneTrainConfig.recipe())"
        )
    own = net.state_dict()
    copied = 0
    for key, value in src.state_dict().items():
        if key in own and own[key].shape == value.shape:
            own[key].copy_(value)
            copied += 1
    logger.info("initialised %d of %d tensors from %s", copied, len(own), path)


def export_predictor(net: ThroughPlaneNet, path: Path, summary: dict[str, Any],
                     sources: list[str] | None = None) -> str:
    """Write the predictor as an inference weights file (family ``sr``, component ``throughplane``).

    ``summary["data"]`` (the volumes' names) goes into the file only as :func:`~DiffusionCore.train.checkpoint.public_data_record` tells it: how many,
    and the project's samples by name (``sources``: the volumes' paths, in the same order, tell them)."""
    from ..train.checkpoint import public_data_record, weights_label
    from ..train.numerics import nonfinite_tensors
    from ..weights.registry import save_safetensors

    bad = nonfinite_tensors(net.state_dict())
    if bad:  # never reached through train(): its last checkpoint refuses these weights first
        raise NumericalError(f"the predictor holds NaN/Inf in {len(bad)} tensor(s), e.g. {bad[0]}: training "
                             f"diverged; {path} was not written")  # fmt: skip
    factors = net.config.factors
    recorded = public_data_record(summary.get("data") or [], sources)
    trained_on = recorded["description"]
    if "data" in summary:
        summary = {**summary, "data": recorded["names"], "volumes": recorded["count"]}
    if "passed_over" in summary:  # the user's file names stay in summary.json: the weights say how many
        summary = {**summary, "passed_over": len(summary["passed_over"])}
    init_from = summary.get("init_from")
    how = (f"fine-tuned from {weights_label(init_from)}" if init_from else "trained with train throughplane")
    meta = {
        "family": "sr",
        "component": COMPONENT,
        "description": f"CT super-resolution, through-plane predictor (factors {min(factors)}-{max(factors)}), {how} "
                       f"for {summary.get('steps', 0)} steps on {trained_on}",
        "config": {"throughplane": config_to_dict(net.config)},
        "training": summary,
    }
    return save_safetensors(path, state_dict_for_file(net), meta)


def resume_with_init_from(out: str | Path, option: str = "--init-from") -> str:
    """The refusal of ``--resume`` with ``--init-from`` (``option``, as the user spelt it): a resumed run continues
    from its checkpoint's weights."""
    return f"{option} starts a new run; drop it to continue the run in {out} with --resume"


def _step_generators(cfg: ThroughPlaneTrainConfig, info: Any, step: int,
                     rng: np.random.Generator) -> tuple[np.random.Generator, np.random.Generator]:
    """The generators that draw step ``step``'s factor and pairs. One process draws both from the run's own
    stream (saved in each checkpoint). Under torchrun the factor comes from ``(seed, step)``, the same on every
    rank (a step trains one factor's head everywhere: DDP averages the same parameters' gradients), and the
    pairs from ``(seed, rank, step)``, so that the ranks draw different pairs and a resumed run draws exactly
    what it would have drawn (rank 0 alone writes the checkpoints)."""
    if not info.distributed:
        return rng, rng
    return (np.random.default_rng([int(cfg.seed), int(step)]),
            np.random.default_rng([int(cfg.seed), int(info.rank), int(step)]))


#: Seconds between two progress lines of a training run (on stderr, through the logger).
PROGRESS_SECONDS = 30.0


class _Progress:
    """A progress line every :data:`PROGRESS_SECONDS` of a training run: the step, the running mean of the loss since
    the last line, planes per second, and the time left when a limit is known (``max_steps``, ``max_minutes``)."""

    def __init__(self, cfg: ThroughPlaneTrainConfig, step: int, per_step: int, enabled: bool = True) -> None:
        self.cfg, self.per_step, self.enabled = cfg, per_step, enabled
        self.t0 = self.t_last = time.perf_counter()
        self.step0 = step
        self.loss_sum, self.losses = 0.0, 0  # since the last line

    def __call__(self, step: int, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        self.loss_sum += float(loss.detach())  # a number already (LossWatch read it)
        self.losses += 1
        now = time.perf_counter()
        if now - self.t_last < PROGRESS_SECONDS:
            return
        elapsed = now - self.t0
        rate = (step - self.step0) / max(elapsed, 1e-9)  # steps per second, this run
        lefts = [(self.cfg.max_steps - step) / max(rate, 1e-9)]
        if self.cfg.max_minutes:
            lefts.append(60.0 * self.cfg.max_minutes - elapsed)
        left = max(0.0, min(lefts))
        logger.info("step %d of %d  loss %.4f (mean of the last %d)  %.1f planes/s  %s left", step, self.cfg.max_steps,
                    self.loss_sum / self.losses, self.losses, rate * self.per_step, _duration(left))  # fmt: skip
        self.loss_sum, self.losses = 0.0, 0
        self.t_last = now


def _duration(seconds: float) -> str:
    """``seconds`` as ``1 h 05 min``, ``12 min 30 s`` or ``40 s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def train(cfg: ThroughPlaneTrainConfig, data: list[str], out_dir: str, *, resume: bool = False,
          init_from: str | None = None, device: str = "cpu", threads_from: str = "the config") -> dict[str, Any]:
    """Train (or continue training) the predictor; returns a summary and writes ``out_dir/throughplane.safetensors``.

    ``threads_from``: where ``cfg.threads`` came from, for the line that says how many threads the run uses. A
    ``STOP`` file in ``out_dir`` when the run starts ends it before it reads anything: nothing is trained, nothing is
    written, and the summary has no ``"exported"``.

    Runs as one process (on the CPU's threads, or on a GPU with ``device="cuda"``) or as several under
    ``torchrun --nproc_per_node=N`` (DDP: each process draws ``batch_size`` planes per step, the gradients
    are averaged, so a step learns from N x ``batch_size`` planes; rank 0 validates, checkpoints and exports).

    Called from Python, it leaves the caller's process as it found it: torch's thread count (the run uses
    ``cfg.threads``) and torch's global random state (the run seeds it with ``cfg.seed``: the CPU generator, and those
    of the CUDA devices already initialised when it is called) are put back when it returns or raises. To fine-tune
    the shipped weights, start from their recipe, e.g.
    ``train(ThroughPlaneTrainConfig.recipe(max_steps=200), ["ct.nii.gz"], "runs/tp", init_from="sr-default")``:
    ``ThroughPlaneTrainConfig()``'s own defaults are a smaller model that ``sr-default`` does not fit.
    """
    threads = torch.get_num_threads()
    # the CUDA generators only where the caller has used CUDA: forking them would start CUDA on every device
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):  # _train seeds torch's global generator with cfg.seed
            return _train_session(cfg, data, out_dir, resume=resume, init_from=init_from, device=device,
                                  threads_from=threads_from)  # fmt: skip
    finally:
        if torch.get_num_threads() != threads:  # cfg.threads was set for the run
            torch.set_num_threads(threads)


def _train_session(cfg: ThroughPlaneTrainConfig, data: list[str], out_dir: str, *, resume: bool,
                   init_from: str | None, device: str, threads_from: str) -> dict[str, Any]:
    """:func:`train`'s work, which sets torch's thread count and seeds its generator (:func:`train` puts both back)."""
    from ..inputs import collect_volumes
    from ..train.checkpoint import (
        log_volumes_used,
        nothing_to_resume,
        refuse_nothing_to_train,
        resumable_checkpoint,
    )
    from ..train.distributed import any_rank, cleanup, init_distributed
    from ..train.outdir import STOP_FILE
    from ..train.starting_weights import THROUGHPLANE, check_starting_weights

    out = Path(out_dir)
    if resume and init_from:
        raise ConfigError(resume_with_init_from(out))
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
        logger.info("training with %d torch thread(s): threads %d from %s", torch.get_num_threads(), cfg.threads,
                    threads_from)  # fmt: skip
    else:
        logger.info("training with %d torch thread(s): torch's default (threads 0 from %s)", torch.get_num_threads(),
                    threads_from)  # fmt: skip
    check_starting_weights(init_from, option="train throughplane --init-from", accepts=THROUGHPLANE,
                           needs="through-plane predictor weights (e.g. sr-default)")  # fmt: skip
    start = resumable_checkpoint(out) if resume else None  # the newest intact checkpoint (a damaged one is named)
    if resume and start is None:
        raise nothing_to_resume(out)
    if start is not None:
        refuse_nothing_to_train(out, cfg.max_steps)  # the checkpoint and the export are left as they are
    info = init_distributed(device)  # a device that is not there is refused before any data is read
    completed = False
    try:
        stop_file = out / STOP_FILE
        if any_rank(stop_file.exists(), info):  # left there, or a Stop pressed during start-up: train nothing
            logger.warning("%s is there as this run starts (left from before, or a Stop pressed while it started up): "
                           "the run ends before its first step; nothing was trained and no weights were exported. "
                           "It is removed now: run the command again to train", stop_file)  # fmt: skip
            completed = True
            return {"steps": 0, "stopped": f"{stop_file} was there as the run started"}
        paths = collect_volumes(data)
        passed_over: list[tuple[Path, str]] = []
        train_src, val_src, used = read_sources(paths, cfg, passed_over=passed_over)
        if info.is_main:
            log_volumes_used(paths, used)
        summary = _train(cfg, used, train_src, val_src, out, info, start=start, init_from=init_from,
                         passed_over=passed_over)
        completed = True
    finally:
        cleanup(info, completed=completed)
    return summary


def _train(cfg: ThroughPlaneTrainConfig, paths: list[Path], train_src: list[PlaneSource], val_src: list[PlaneSource],
           out: Path, info: Any, *, start: Path | None, init_from: str | None,
           passed_over: list[tuple[Path, str]] | None = None) -> dict[str, Any]:
    """The loop of :func:`train`; ``paths``: the volumes ``train_src`` and ``val_src`` come from; ``start``: the
    checkpoint a resumed run continues from (None: a new run); ``passed_over``: the volumes found but not used, and
    why (summary.json lists them)."""
    from ..train.checkpoint import (
        load_training_state,
        passed_over_record,
        save_training_state,
        volume_names,
        volume_record,
        warn_resumed_config,
        warn_resumed_data,
    )
    from ..train.distributed import all_reduce_mean, any_rank, barrier, wrap_model
    from ..train.ema import ParameterEMA
    from ..train.logger import TrainLogger
    from ..train.stop import StopFlag

    dev = info.device
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = ThroughPlaneNet(cfg.model)
    if init_from and start is None:  # a resumed run's weights come from its checkpoint
        load_predictor_weights(net, init_from)
    net.to(dev, memory_format=torch.channels_last)  # the CPU convolutions' fast layout (see throughplane.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ema = ParameterEMA({MODEL_NAME: net}, cfg.ema_decay) if cfg.ema_decay > 0 else None
    models: dict[str, torch.nn.Module] = {MODEL_NAME: net}
    if ema is not None:
        models["ema"] = ema
    step = 0
    patches_before = 0
    cpu_seconds_before = 0.0
    volumes = volume_record(paths)  # what this stretch trains on
    trained_on = list(volumes)  # what the run has trained on, over every stretch (summary.json's "data")
    if start is not None:
        state = load_training_state(start, models=models, optimizers={"opt": opt}, generators={"data": rng},
                                    map_location="cpu")  # moments moved to the parameters' device, step counts on the CPU
        extra = state["extra"]
        if info.is_main:
            warn_resumed_config(state, cfg, start)
            warn_resumed_data(extra.get("data"), volumes, start)
        trained_on = list(dict.fromkeys([*extra.get("trained_on", extra.get("data", [])), *volumes]))
        init_from = extra.get("init_from")  # what the run started from, kept across resumes
        step = int(state["step"])
        patches_before = int(extra.get("patches", 0))
        cpu_seconds_before = float(extra.get("cpu_seconds", 0.0))
    # after the weights are final (DDP copies rank 0's to the others); a step uses one factor's head only
    wrapped = wrap_model(net, info, find_unused_parameters=True) if info.distributed else net
    ks, probs = cfg.factor_probabilities()
    val = validation_batches(val_src, cfg) if (val_src and info.is_main) else {}
    val = {k: (a.to(dev), b.to(dev)) for k, (a, b) in val.items()}
    log = TrainLogger(out, resume_step=step if start is not None else None, enabled=info.is_main)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    history: list[dict[str, float]] = []
    timing = {"data": 0.0, "step": 0.0}
    patches = 0  # planes drawn by all processes
    per_step = cfg.batch_size * info.world_size
    last: dict[str, float] = {}

    saved_step = -1
    logged_step = step  # the last step whose loss is in metrics.jsonl / TensorBoard
    loss = lr = None

    def cpu_seconds() -> float:  # every process's CPU time: the CPU-hours a run costs
        return float(all_reduce_mean(time.process_time() - cpu_start, info)) * info.world_size

    def checkpoint() -> None:
        nonlocal saved_step
        if saved_step == step:  # the last step was checkpointed already
            return
        saved_step = step
        used = cpu_seconds()
        if info.is_main:
            save_training_state(
                out, step=step, epoch=0, models=models, optimizers={"opt": opt}, config=config_to_dict(cfg),
                extra={"patches": patches_before + patches, "cpu_seconds": cpu_seconds_before + used,
                       "data": volumes, "trained_on": trained_on, "init_from": init_from,
                       "validation_at_start": at_start},
                generators={"data": rng},
            )
        barrier(info)

    at_start: dict[str, float] = {}
    if val and init_from and start is None:  # a fine-tune: what its starting weights score, beside every later score
        with torch.no_grad():
            at_start = validate(net, val)
        log.scalars(at_start, step)
        history.append({"step": step, **at_start})
        logger.info("step %d (the starting weights, %s)  %s", step, init_from,
                    "  ".join(f"{k_}={v:.3f}" for k_, v in at_start.items()))  # fmt: skip
    elif start is not None:
        at_start = dict(extra.get("validation_at_start") or {})  # kept across resumes, as init_from is
    net.train()
    watch = LossWatch(cfg.learning_rate)
    progress = _Progress(cfg, step, per_step, enabled=info.is_main)
    first_step = step
    with StopFlag(out / "STOP") as stop:
        while step < cfg.max_steps:
            over_time = (bool(cfg.max_minutes) and step > first_step  # a time limit lets a run train one step
                         and time.perf_counter() - t_start > 60.0 * cfg.max_minutes)
            if any_rank(stop.requested or over_time, info):
                if over_time:
                    logger.info("time limit of %.1f min reached", cfg.max_minutes)
                break
            t0 = time.perf_counter()
            k_rng, pair_rng = _step_generators(cfg, info, step, rng)
            k = int(k_rng.choice(ks, p=probs))
            thick_np, thin_np = sample_pairs(train_src, k, cfg.batch_size, cfg.pairs, pair_rng)
            thick, thin = torch.from_numpy(thick_np).to(dev), torch.from_numpy(thin_np).to(dev)
            t1 = time.perf_counter()
            lr = cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            for g in opt.param_groups:
                g["lr"] = lr
            pred = cubic_planes(thick, k) + wrapped(thick, k)
            loss = torch.nn.functional.l1_loss(pred, thin)
            watch(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update()
            step += 1
            patches += per_step
            timing["data"] += t1 - t0
            timing["step"] += time.perf_counter() - t1
            progress(step, loss)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                log.scalars({"loss/train": float(all_reduce_mean(loss.detach(), info)), "lr": lr}, step)
                logged_step = step
            if val and step % cfg.val_every == 0:
                if ema is not None:
                    with ema.applied():
                        last = validate(net, val)
                else:
                    last = validate(net, val)
                elapsed = time.perf_counter() - t_start
                last["patches_per_s"] = patches / max(elapsed, 1e-9)
                log.scalars(last, step)
                history.append({"step": step, **last})
                logger.info("step %d  loss %.4f  %s", step, float(loss.detach()),
                            "  ".join(f"{k_}={v:.3f}" for k_, v in last.items()))
            if step % cfg.checkpoint_every == 0:
                checkpoint()
    if loss is not None and logged_step != step:  # a stop or the time limit between two log steps: its last loss
        log.scalars({"loss/train": float(all_reduce_mean(loss.detach(), info)), "lr": lr}, step)
    if step == first_step and start is None:  # a STOP (or a signal) during set-up: the weights are untrained
        log.close()
        logger.warning("the run stopped before its first step: nothing was trained, and no weights were exported")
        return {"steps": step, "stopped": "before the first step"}
    checkpoint()
    if val and (not history or history[-1]["step"] != step):  # the score of what is exported, at the step it ends
        if ema is not None:
            with ema.applied():
                last = validate(net, val)
        else:
            last = validate(net, val)
        last["patches_per_s"] = patches / max(time.perf_counter() - t_start, 1e-9)
        log.scalars(last, step)
        history.append({"step": step, **last})
    if last:
        gain = f"val/gain={last['val/gain']:.3f}"
        if at_start:
            gain += f" (at the start {at_start['val/gain']:.3f}: {last['val/gain'] - at_start['val/gain']:+.3f} dB)"
        logger.info("validation at the last step, %d: %s  %s", step, gain,
                    "  ".join(f"{k_}={v:.3f}" for k_, v in last.items() if k_ != "val/gain"))  # fmt: skip
    log.close()
    elapsed = time.perf_counter() - t_start
    summary = {
        "steps": step,
        "patches": patches_before + patches,
        "cpu_hours": round((cpu_seconds_before + cpu_seconds()) / 3600.0, 3),
        "this_run": {"steps": patches // per_step, "seconds": round(elapsed, 1),
                     "patches_per_s": round(patches / max(elapsed, 1e-9), 2),
                     "data_seconds": round(timing["data"], 1), "step_seconds": round(timing["step"], 1)},
        "validation": last,  # the last validation: at the last step ({} when nothing validates)
        "validation_step": history[-1]["step"] if history else None,
        "init_from": init_from,
        "validation_at_start": at_start,  # the --init-from weights' scores ({} for a run from scratch)
        "data": volume_names(trained_on),  # every stretch's volumes, this one's last
        "passed_over": passed_over_record(passed_over),  # found, not used: this stretch
    }
    if info.distributed:
        summary["this_run"]["processes"] = info.world_size
    if ema is not None:
        ema.copy_to_models()
    if info.is_main:
        net.to("cpu")
        digest = export_predictor(net, out / EXPORT_FILE, summary, [str(p) for p in trained_on])
        summary["exported"] = {"file": str(out / EXPORT_FILE), "sha256": digest}
        from ..files import write_json_atomic

        write_json_atomic(summary, out / "summary.json")
        logger.info("exported %s (sha256 %s)", out / EXPORT_FILE, digest)
    barrier(info)
    return summary


# -- command line -------------------------------------------------------------------------------------
def register(fam: argparse._SubParsersAction) -> None:
    p = fam.add_parser(
        "throughplane",
        help="train the through-plane predictor (the SR pipeline's fast first stage)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None,
                   help="JSON or YAML file (ThroughPlaneTrainConfig); options override it. Default: the recipe of "
                        "the shipped sr-default weights (sr/configs/throughplane/default.json, the one "
                        "--init-from sr-default needs); --resume without it continues with the run's own settings")
    p.add_argument("--data", nargs="+", required=True, help="thin-slice CT volumes: folders, files, list files or CT sample names (chest-lidc chest-dx)")
    p.add_argument("--out-dir", "--output-dir", dest="out_dir", required=True, help="checkpoints, logs, weights")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in total (default: the config's max_steps, 100000 in the shipped "
                        "recipe: hours on a CPU; give this or --max-minutes for a short run)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this many minutes of this run (default: the config's max_minutes, 0 in the "
                        "shipped recipe; 0: no time limit, the run goes on to max_steps)")
    p.add_argument("--batch-size", type=int, default=None, help="planes per step (default 16)")
    p.add_argument("--learning-rate", type=float, default=None, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--ema-decay", type=float, default=None, help="weight-average decay (default 0.999; 0: off)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the config's threads, 2 in the shipped recipe; 0: torch's default, "
                        "one per core); the run says at its start how many it uses")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--init-from", default=None, help="start from an exported weights file (e.g. the shipped one)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    p.add_argument("--device", type=device_name, default="auto",
                   help="where it trains: auto (a GPU when there is one, else the CPU's threads), cpu or cuda; "
                        "under torchrun --nproc_per_node=N each process takes its own GPU, or a share of the CPU")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from ..config import load_config, read_config_file
    from ..train.checkpoint import resumed_settings

    overrides = {
        k: getattr(args, k)
        for k in ("max_steps", "max_minutes", "batch_size", "learning_rate", "ema_decay", "threads", "seed")
        if getattr(args, k) is not None
    }
    if args.config:
        base = dict(read_config_file(args.config))
    else:
        base = resumed_settings(args.resume, args.out_dir)  # --resume: the settings the run recorded
        if base is None:  # a new run (a --resume with no checkpoint is refused by train())
            if not args.resume:
                logger.info("no --config: training with %s, the recipe of the shipped sr-default weights",
                            DEFAULT_CONFIG)  # fmt: skip
            base = dict(read_config_file(DEFAULT_CONFIG))
    source = str(args.config) if args.config else "the run's recorded config" if args.resume else str(DEFAULT_CONFIG)
    cfg = load_config({**base, **overrides}, ThroughPlaneTrainConfig, where=source)
    threads_from = "--threads" if args.threads is not None else source
    summary = train(cfg, args.data, args.out_dir, resume=args.resume, init_from=args.init_from,
                    device=args.device, threads_from=threads_from)
    if "exported" in summary:  # rank 0 (or the one process) exported; the other ranks print nothing
        keys = ("steps", "patches", "cpu_hours", "validation_at_start", "validation", "passed_over", "exported")
        optional = ("validation_at_start", "passed_over")  # shown when there is something to show
        shown = {k: summary[k] for k in keys if k in summary and (summary[k] or k not in optional)}
        print(json.dumps(shown, indent=1))
    return 0
