"""Training of the SR stack: ``train_vae`` (the 3D autoencoder) and ``train_sr`` (latent ResShift/DDIM).

Both loops share one shape: a config (:class:`SRConfig`), random patches drawn with a per-step seed
(``(seed, rank, step)``, so a resumed run draws exactly the batches it would have drawn), AdamW with a
linear warm-up, gradient clipping, bf16 autocast on GPU only, DDP under ``torchrun``, TensorBoard +
``metrics.jsonl``, atomic resumable checkpoints, a clean stop on SIGINT/SIGTERM or an ``out_dir/STOP`` file,
validation in HU on held-out patches with best-checkpoint selection, and an inference export at the end:

* ``train_vae`` -> ``out_dir/vae.safetensors`` (component ``"vae"``), validation: reconstruction PSNR;
* ``train_sr``  -> ``out_dir/sr_model.safetensors`` (VAE + denoiser in one file, component ``"sr"``),
  validation: PSNR of the super-resolved patches against the thin reference, next to cubic's.

SR stages (``train.stage``): ``base`` trains the UNet alone (the prior, conditioned only through
ResShift's ``y``), ``control`` freezes it and trains the IRControlNet (initialised as a copy of the UNet
encoder), ``joint`` trains both.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import config_to_dict, load_config
from ..errors import Cancelled, ConfigError, InputError, WeightsError
from ..intensity import unit_to_hu
from ..nn.architecture import build_checked
from ..train.numerics import check_training_numbers
from ..train.precision import autocast, resolve_amp
from .config import MEAN, SRConfig
from .data import VolumeRegion, load_regions, sample_batch, validation_set
from .model import VAE_EXPORT, SRModel, check_sr_architecture, load_vae_weights
from .resshift import ResShiftProcess
from .vae import CTAutoencoderKL

logger = logging.getLogger(__name__)

STAGES = ("base", "control", "joint")
SR_EXPORT = "sr_model.safetensors"


# ---------------------------------------------------------------------------------------------- helpers
def resolve_config(config: SRConfig | dict | str | os.PathLike | None) -> SRConfig:
    """An :class:`SRConfig` from a dataclass, dict, JSON/YAML file or ``None`` (defaults); validated."""
    cfg = load_config(config, SRConfig) if not isinstance(config, SRConfig) else config
    t = cfg.train
    if t.stage not in STAGES:
        raise ConfigError(f"train.stage {t.stage!r} is not one of {', '.join(STAGES)}")
    if t.degradation not in ("slab", "decimate"):
        raise ConfigError(f"train.degradation {t.degradation!r}: use 'slab' or 'decimate'")
    if any(k < 2 or k > 8 for k in t.factors) or not t.factors:
        raise ConfigError(f"train.factors {t.factors}: each factor must be between 2 and 8")
    if len(t.patch_size) != 3 or any(s < 1 for s in t.patch_size):
        raise ConfigError(f"train.patch_size {t.patch_size}: give three positive sizes D H W")
    check_training_numbers(t, "train.")  # NaN, infinities and out-of-range values of the loop's settings
    check_sr_architecture(cfg)  # empty channel lists, zero strides or heads, ... before any network is built
    return cfg


def psnr_hu(ref_units: np.ndarray, test_units: np.ndarray) -> float:
    """PSNR in dB of model-unit arrays converted to HU (window [-1024, 2048], peak 3072)."""
    from ..metrics import psnr

    return psnr(unit_to_hu(ref_units), unit_to_hu(test_units))


def planned_steps(cfg: SRConfig) -> int:
    """The steps a ``train vae`` / ``train sr`` run ends at: epochs x steps per epoch, at most ``max_steps`` (0: no
    limit)."""
    t = cfg.train
    total = t.epochs * t.steps_per_epoch
    return min(total, t.max_steps) if t.max_steps > 0 else total


#: The settings of a train sr / train vae run that name files or folders: what each is, and the option that gives it.
RECORDED_PATHS = {
    "train.data": ("its training data", "--data"),
    "train.val_data": ("its validation data", "--val-data"),
    "train.vae_weights": ("its VAE", "--vae"),
    "train.latent_dir": ("its latents folder", "--latent-dir"),
}


def _refuse_finished_run(cfg: SRConfig, out_dir: str | os.PathLike, resume: bool) -> None:
    """``--resume`` of a run already at its last step trains nothing, and one whose recorded files cannot be found
    from here (paths relative to the folder it was started from) cannot train: both refused before any data is
    read, the second naming the record and the option that gives each file again."""
    from ..train.checkpoint import refuse_nothing_to_train, refuse_unreachable_recorded_paths

    if resume:
        refuse_nothing_to_train(out_dir, planned_steps(cfg), f"its last step {planned_steps(cfg)} (epochs x "
                                "steps_per_epoch, at most max_steps)")  # fmt: skip
        refuse_unreachable_recorded_paths(out_dir, config_to_dict(cfg), RECORDED_PATHS)


def _step_generators(seed: int, rank: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    np_rng = np.random.default_rng([seed, rank, step])
    torch_gen = torch.Generator().manual_seed(int(np_rng.integers(0, 2**62)))
    return np_rng, torch_gen


def _check_patch(cfg: SRConfig, multiple: tuple[int, int, int]) -> None:
    bad = [s for s, m in zip(cfg.train.patch_size, multiple) if s % m]
    if bad:
        raise ConfigError(
            f"--patch-size {tuple(cfg.train.patch_size)} must be a multiple of {multiple} per axis (D H W) "
            "for this network layout"
        )


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


class _Run:
    """Shared state of a training run: distributed info, logger, stop flag, checkpoint bookkeeping."""

    def __init__(self, cfg: SRConfig, out_dir: str | os.PathLike, cancel: threading.Event | None) -> None:
        from ..train.distributed import init_distributed
        from ..train.logger import TrainLogger
        from ..train.outdir import STOP_FILE, remove_stale_stop
        from ..train.stop import StopFlag

        self.cfg = cfg
        self.out = Path(out_dir)
        self.info = init_distributed(cfg.train.device)
        self.device = self.info.device
        self.amp = resolve_amp(bool(cfg.train.use_amp), self.device)  # bfloat16 on a capable GPU, else None
        self.log = TrainLogger(self.out, enabled=self.info.is_main)
        self.stop = StopFlag(self.out / STOP_FILE)
        if self.info.is_main:
            remove_stale_stop(self.out)  # one created after this process started is a Stop pressed during start-up
        self.cancel = cancel
        self.completed = False

    def total_steps(self) -> int:
        return planned_steps(self.cfg)

    def should_stop(self) -> bool:
        from ..train.distributed import any_rank

        return any_rank(self.stop.requested or (self.cancel is not None and self.cancel.is_set()), self.info)

    def close(self) -> None:
        """The end of the run: ``completed`` is set by the trainers just before a normal return (every rank then
        waits for the others before leaving the process group: :func:`~DiffusionCore.train.distributed.cleanup`)."""
        from ..train.distributed import cleanup

        self.log.close()
        cleanup(self.info, completed=self.completed)


def _fit(
    run: _Run,
    *,
    models: dict[str, nn.Module],
    trainable: nn.Module,
    objective: Callable[[nn.Module, int, np.random.Generator, torch.Generator], torch.Tensor],
    validate: Callable[[int], dict[str, float]],
    score_key: str,
    resume: bool,
    extra_state: Callable[[], dict[str, Any]],
    restore_extra: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """The optimisation loop shared by both families (see the module docstring)."""
    from ..train.checkpoint import (
        load_training_state,
        mark_best,
        nothing_to_resume,
        read_checkpoint_info,
        resumable_checkpoint,
        save_training_state,
        warn_resumed_config,
    )
    from ..train.distributed import all_reduce_mean, barrier, wrap_model
    from ..train.ema import EMA_MODEL, ParameterEMA
    from ..train.numerics import LossWatch

    cfg, t, info = run.cfg, run.cfg.train, run.info
    params = [p for p in trainable.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen for this stage")
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t.warmup_steps))
    ema = ParameterEMA(models, t.ema_decay) if t.ema_decay > 0 else None
    saved_models = {**models, EMA_MODEL: ema} if ema is not None else dict(models)
    step, best = 0, -math.inf
    if resume:
        latest = resumable_checkpoint(run.out, warn=info.is_main)  # the newest intact one (a damaged one is named)
        if latest is None:
            raise nothing_to_resume(run.out)
        has_ema = f"{EMA_MODEL}.safetensors" in read_checkpoint_info(latest).get("files", {})
        state = load_training_state(
            latest,
            models=saved_models if has_ema else models,
            optimizers={"opt": opt},
            schedulers={"lr": sched},
            map_location="cpu",
        )
        if ema is not None and not has_ema:  # a checkpoint from a run without EMA: average from here on
            ema = ParameterEMA(models, t.ema_decay)
            saved_models[EMA_MODEL] = ema
            logger.info("%s holds no EMA weights; the average starts from the resumed weights", latest)
        step = state["step"]
        extra = state["extra"] or {}
        best = float(extra.get("best_score", -math.inf))
        restore_extra(extra)
        if info.is_main:
            warn_resumed_config(state, cfg, latest)  # after what training measured is restored into cfg
        logger.info("resumed at step %d from %s", step, latest)
    for m in saved_models.values():
        m.to(run.device)
    for group in opt.state.values():
        for k, v in group.items():
            if isinstance(v, torch.Tensor) and k != "step":
                group[k] = v.to(run.device)
    wrapped = wrap_model(trainable, info)
    total = run.total_steps()
    result: dict[str, Any] = {"stopped": False, "steps": step, "best_score": best, "out_dir": str(run.out)}

    def checkpoint(step: int, score: float | None) -> None:
        nonlocal best
        if not info.is_main:
            return
        improved = score is not None and score > best
        if improved:
            best = score
        save_training_state(
            run.out,
            step=step,
            epoch=step // max(1, t.steps_per_epoch),
            models=saved_models,
            optimizers={"opt": opt},
            schedulers={"lr": sched},
            config=cfg,
            extra={**extra_state(), "best_score": best},
            keep=t.keep_checkpoints,
        )
        if improved:
            mark_best(run.out, step, score)

    def run_validation(step: int) -> float | None:
        if not info.is_main:
            return None
        trainable.eval()
        with ema.applied() if ema is not None else contextlib.nullcontext():
            metrics = validate(step)
        trainable.train()
        run.log.scalars({f"val/{k}": v for k, v in metrics.items()}, step)
        if metrics:
            logger.info("step %d validation: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics.get(score_key)

    if step == 0 and info.is_main and t.val_every > 0:
        run_validation(0)
    trainable.train()
    t0 = time.perf_counter()
    watch = LossWatch(t.learning_rate)
    with run.stop:
        while step < total:
            if run.should_stop():
                checkpoint(step, None)
                barrier(info)
                result["stopped"] = run.stop.reason or "cancelled"
                logger.info("stopped at step %d; a checkpoint was written (resume with --resume)", step)
                break
            np_rng, gen = _step_generators(t.seed, info.rank, step)
            with autocast(run.device, run.amp):
                loss = objective(wrapped, step, np_rng, gen)
            watch(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update()
            step += 1
            if step % t.log_every == 0 or step == total:
                value = float(all_reduce_mean(loss.detach().float(), info))
                run.log.scalar("loss/train", value, step)
                run.log.scalar("lr", opt.param_groups[0]["lr"], step)
                rate = step / max(1e-9, time.perf_counter() - t0)
                logger.info("step %d/%d loss %.5f (%.2f steps/s)", step, total, value, rate)
            validate_now = t.val_every > 0 and (step % t.val_every == 0 or step == total)
            if validate_now:
                score = run_validation(step)
                checkpoint(step, score)
            elif step % t.checkpoint_every == 0:
                checkpoint(step, None)
            barrier(info)
        else:
            if not (t.val_every > 0) and info.is_main:
                checkpoint(step, None)
    result.update(steps=step, best_score=best)
    if run.cancel is not None and run.cancel.is_set():
        raise Cancelled(f"training cancelled at step {step}; the last checkpoint in {run.out} can be resumed")
    return result


def _regions(cfg: SRConfig, data: Any, passed_over: list[tuple[Path, str]] | None = None
             ) -> tuple[list[VolumeRegion], list[VolumeRegion]]:  # fmt: skip
    t = cfg.train
    train_data = t.data if data is None else ([data] if isinstance(data, str | os.PathLike) else list(data))
    return load_regions([str(d) for d in train_data], [str(v) for v in t.val_data], t.val_fraction,
                        passed_over=passed_over)  # fmt: skip


def _summarise(result: dict[str, Any], out: Path, regions: list[VolumeRegion],
               passed_over: list[tuple[Path, str]]) -> None:  # fmt: skip
    """Write ``out/summary.json``: ``result``, the volumes trained on (``data``: their names, as the log gives them)
    and those found but passed over, and why (``passed_over``: ``{"volume", "why"}`` each, as train throughplane
    lists them). ``result`` gets ``passed_over`` too (the command prints it); the exported weights say only how many
    (:func:`export_sr`'s ``training``)."""
    from ..files import write_json_atomic
    from ..train.checkpoint import passed_over_record

    result["passed_over"] = passed_over_record(passed_over)
    write_json_atomic({**result, "data": [r.name for r in regions]}, out / "summary.json")


def _training_record(regions: list[VolumeRegion], passed_over: list[tuple[Path, str]]) -> dict[str, int]:
    """What exported weights say of a run's data: how many volumes it trained on and passed over, never their names
    (a user's file and folder names often hold a patient's name; ``summary.json`` keeps them)."""
    return {"volumes": len(regions), "passed_over": len(passed_over)}


def _to_tensor(arr: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


# ---------------------------------------------------------------------------------------------- VAE
def vae_loss(
    vae: nn.Module, x: torch.Tensor, kl_weight: float, grad_weight: float, generator: torch.Generator | None
) -> torch.Tensor:
    """L1 reconstruction + ``grad_weight`` x L1 of finite differences + ``kl_weight`` x KL.

    Args:
        x: ``(B, 1, D, H, W)`` model units.
    """
    recon, mean, logvar = vae(x, generator)
    loss = F.l1_loss(recon, x)
    if grad_weight > 0:
        for dim in (2, 3, 4):
            loss = loss + grad_weight * F.l1_loss(torch.diff(recon, dim=dim), torch.diff(x, dim=dim))
    return loss + kl_weight * CTAutoencoderKL.kl_loss(mean, logvar) / x[0].numel()


class _VAEObjective(nn.Module):
    def __init__(self, vae: CTAutoencoderKL, kl_weight: float, grad_weight: float) -> None:
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.grad_weight = grad_weight

    def forward(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return vae_loss(self.vae, x, self.kl_weight, self.grad_weight, gen)


def train_vae(
    config: SRConfig | dict | str | os.PathLike | None,
    data: Any = None,
    out_dir: str | os.PathLike = "vae-run",
    resume: bool = False,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Train the 3D VAE on random thin-slice patches; export ``out_dir/vae.safetensors``.

    Args:
        config: :class:`SRConfig` (the ``vae`` and ``train`` sections are used), dict or file.
        data: training volumes (overrides ``train.data``): folder, list file, file or list of them.
        out_dir: checkpoints, logs and the exported weights.
        resume: continue from the latest checkpoint in ``out_dir``.
        cancel: an event that stops training after the current step (then raises Cancelled).

    Returns:
        ``{"steps", "best_score" (validation PSNR dB), "stopped", "out_dir", "weights", "weights_sha256"}``.
    """
    cfg = resolve_config(config)
    _refuse_finished_run(cfg, out_dir, resume)
    t = cfg.train
    torch.manual_seed(t.seed)
    vae = build_checked(lambda: CTAutoencoderKL(cfg.vae), "the SR autoencoder")
    _check_patch(cfg, vae.downsample)
    passed_over: list[tuple[Path, str]] = []
    train_r, val_r = _regions(cfg, data, passed_over)
    run = _Run(cfg, out_dir, cancel)
    try:
        if t.channels_last:
            vae.to(memory_format=torch.channels_last_3d)
        objective_module = _VAEObjective(vae, t.kl_weight, t.gradient_loss_weight)
        patch = tuple(t.patch_size)
        val = validation_set(val_r, t.val_patches, patch, t.factors, t.degradation, multiple=vae.downsample[0])

        def objective(
            wrapped: nn.Module, step: int, rng: np.random.Generator, gen: torch.Generator
        ) -> torch.Tensor:
            thin, _, _ = sample_batch(
                train_r,
                t.batch_size,
                patch,
                (2,),
                rng,
                t.degradation,
                t.inplane_probability,
                t.augment,
                t.affine_probability,
            )
            return wrapped(_to_tensor(thin, run.device, t.channels_last), gen)

        @torch.no_grad()
        def validate(step: int) -> dict[str, float]:
            if not val:
                return {}
            refs, recs = [], []
            for thin, _, _ in val:
                x = _to_tensor(thin[None, None], run.device, t.channels_last)
                mean, _ = vae.encode(x)
                recs.append(vae.decode(mean).float().cpu().numpy()[0, 0])
                refs.append(thin)
            ref, rec = np.stack(refs), np.stack(recs)
            mid = ref.shape[2] // 2
            run.log.image("val/ref_recon", np.concatenate([ref[0, :, mid], rec[0, :, mid]], axis=1), step)
            return {"psnr_recon": psnr_hu(ref, rec)}

        result = _fit(
            run,
            models={"vae": vae},
            trainable=objective_module,
            objective=objective,
            validate=validate,
            score_key="psnr_recon",
            resume=resume,
            extra_state=dict,
            restore_extra=lambda extra: None,
        )
        if run.info.is_main:  # also after a stop (STOP file, SIGTERM, Ctrl-C): the checkpoint just written
            result.update(_export_best(run.out, Path(run.out) / VAE_EXPORT, component="vae",
                                       training=_training_record(train_r, passed_over)))  # fmt: skip
            _summarise(result, run.out, train_r, passed_over)
        run.completed = True
        return result
    finally:
        run.close()


# ---------------------------------------------------------------------------------------------- SR
class SRObjective(nn.Module):
    """The SR training loss as a module (so DDP can wrap it).

    ``forward(x0, y, t, noise, keep, thin=None, cond=None)``: latents ``x0`` (thin) and ``y`` (cubic input)
    ``(B, C, d, h, w)``, step indices ``t`` ``(B,)``, noise like ``x0`` and a per-sample condition keep mask
    ``keep`` ``(B,)``; returns the MSE between the network's prediction (``x0`` for ResShift, ``eps`` for
    DDIM) and its target. With ``pixel_weight > 0`` (ResShift only) and the image patches ``thin`` / ``cond``
    ``(B, 1, D, H, W)`` in model units, adds ``pixel_weight`` x the L1 error of the image the user gets,
    ``cond + decode(x0_hat) - decode(y)`` (or ``decode(x0_hat)`` without ``decode_residual``).
    """

    def __init__(self, model: SRModel, stage: str = "joint", pixel_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.use_control = stage != "base" and model.denoiser.controlnet is not None
        self.pixel_weight = float(pixel_weight) if isinstance(model.diffusion, ResShiftProcess) else 0.0

    def forward(
        self,
        x0: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        keep: torch.Tensor,
        thin: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        proc = self.model.diffusion
        x_t = proc.add_noise(x0, noise, t, y=y)
        target = x0 if isinstance(proc, ResShiftProcess) else noise
        x_in = proc.scale_input(x_t, t)
        out = self.model.denoiser(x_in, proc.timestep_value(t).to(x0.device), y, keep, self.use_control)
        pred = self.model.residual_to_x0(y, out) if isinstance(proc, ResShiftProcess) else out
        loss = F.mse_loss(pred.float(), target.float())
        if self.pixel_weight > 0 and thin is not None and cond is not None:
            image = self.model.decode(pred)
            if self.model.config.diffusion.decode_residual:
                image = cond + image - self.model.decode(y)
            loss = loss + self.pixel_weight * F.l1_loss(image.float(), thin.float())
        return loss


def set_stage(model: SRModel, stage: str, finetune_decoder: bool = False) -> None:
    """Freeze what a stage does not train: the VAE (but its decoder with ``finetune_decoder``); the UNet in
    ``control``; the ControlNet in ``base``."""
    model.vae.requires_grad_(False)
    if finetune_decoder:
        model.vae.decoder.requires_grad_(True)
    model.denoiser.unet.requires_grad_(stage != "control")
    if model.denoiser.controlnet is not None:
        model.denoiser.controlnet.requires_grad_(stage != "base")


def _load_denoiser_init(model: SRModel, source: str | os.PathLike) -> None:
    from ..train.checkpoint import find_best, find_latest, load_training_state
    from ..weights import load_safetensors

    p = Path(source)
    if p.is_dir():
        ckpt = find_best(p) or find_latest(p) or p
        load_training_state(ckpt, models={"denoiser": model.denoiser}, restore_rng=False)
        return
    tensors, _ = load_safetensors(p)
    den = {k[len("denoiser.") :]: v for k, v in tensors.items() if k.startswith("denoiser.")}
    try:
        model.denoiser.load_state_dict(den, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{p} does not fit this SR configuration ({exc})") from exc


def train_sr(
    config: SRConfig | dict | str | os.PathLike | None,
    data: Any = None,
    out_dir: str | os.PathLike = "sr-run",
    resume: bool = False,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Train the latent denoiser (a stage of it) on thick/thin patch pairs; export ``out_dir/sr_model.safetensors``.

    Args:
        config: :class:`SRConfig` (``train.vae_weights`` must name a trained VAE), dict or file.
        data: training volumes (overrides ``train.data``).
        out_dir: checkpoints, logs and the exported weights.
        resume: continue from the latest checkpoint in ``out_dir``.
        cancel: an event that stops training after the current step (then raises Cancelled).

    Returns:
        ``{"steps", "best_score" (validation PSNR dB), "cubic_psnr", "stopped", "out_dir", "weights", ...}``.
    """
    from ..train.starting_weights import SR_DENOISER, SR_VAE, check_starting_weights

    cfg = resolve_config(config)
    _refuse_finished_run(cfg, out_dir, resume)
    t = cfg.train
    if not t.vae_weights:
        raise ConfigError("train sr needs a trained VAE: pass --vae FILE_OR_DIR (the output of `train vae`)")
    check_starting_weights(t.vae_weights, option="train sr --vae", accepts=SR_VAE,
                           needs="SR VAE weights (a `train vae` output folder or its vae.safetensors)")  # fmt: skip
    if t.init_from and not resume:
        check_starting_weights(t.init_from, option="train sr --init-from", accepts=SR_DENOISER,
                               needs="SR latent diffusion weights (a `train sr` output folder or its "
                                     "sr_model.safetensors)")  # fmt: skip
    vae_cfg, vae_tensors = load_vae_weights(t.vae_weights)
    if vae_cfg:
        cfg = replace(cfg, vae=load_config(vae_cfg, type(cfg.vae)))
    torch.manual_seed(t.seed)
    model = SRModel(cfg)
    try:
        model.load_state_dict(vae_tensors, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"{t.vae_weights} does not fit the VAE configuration ({exc})") from exc
    _check_patch(cfg, model.latent_downsample)
    if t.init_from and not resume:
        _load_denoiser_init(model, t.init_from)
        if t.stage == "control" and model.denoiser.controlnet is not None:
            model.denoiser.controlnet.copy_from_unet(model.denoiser.unet)
    elif t.stage == "control" and not resume and model.denoiser.controlnet is not None:
        logger.warning("stage 'control' without --init-from: the UNet prior is untrained")
        model.denoiser.controlnet.copy_from_unet(model.denoiser.unet)
    pixel = t.pixel_loss_weight > 0 and not t.latent_dir
    if t.pixel_loss_weight > 0 and t.latent_dir:
        logger.warning("pixel_loss_weight needs image patches: ignored with --latent-dir")
    if t.finetune_decoder and not pixel:
        raise ConfigError("finetune_decoder needs pixel_loss_weight > 0 and image data (not --latent-dir)")
    set_stage(model, t.stage, t.finetune_decoder)
    latent_pairs = None
    if t.latent_dir:
        from .latents import load_latent_dir

        latent_pairs = load_latent_dir(t.latent_dir, t.val_fraction, hold_out=not t.val_data)
    train_r: list[VolumeRegion] = []
    val_r: list[VolumeRegion] = []
    passed_over: list[tuple[Path, str]] = []
    if latent_pairs is None or data is not None or t.data:
        train_r, val_r = _regions(cfg, data, passed_over)
    elif t.val_data:
        val_r, _ = load_regions([str(v) for v in t.val_data], [], 0.0, passed_over=passed_over)
    else:
        logger.warning("no image data for validation: best-checkpoint selection falls back to the latest")
    run = _Run(cfg, out_dir, cancel)
    try:
        device = run.device
        model.to(device)
        if t.channels_last:
            model.to(memory_format=torch.channels_last_3d)
        patch = tuple(t.patch_size)
        lat_patch = tuple(s // f for s, f in zip(patch, model.vae_downsample))
        if not resume:
            if latent_pairs is not None:
                std = float(torch.cat([p.x0.flatten() for p in latent_pairs]).std())
                res = float(torch.cat([(p.x0 - p.y).flatten() for p in latent_pairs]).std())
                model.set_latent_statistics(1.0 / max(std, 1e-3), res / max(std, 1e-3))
            else:
                model.set_latent_statistics(*_latent_statistics(model, train_r, patch, t, device))
            logger.info(
                "latent scale %.4f, residual std %.4f (ResShift noise kappa x residual std = %.4f)",
                model.config.diffusion.latent_scale,
                model.config.diffusion.residual_std,
                model.diffusion.kappa if isinstance(model.diffusion, ResShiftProcess) else 0.0,
            )
        objective_module = SRObjective(model, t.stage, t.pixel_loss_weight if pixel else 0.0)
        p_drop = cfg.unet.cond_dropout if objective_module.use_control else 0.0
        val = validation_set(val_r, t.val_patches, patch, t.factors, t.degradation,
                             multiple=model.latent_downsample[0])  # fmt: skip
        val_estimate = model.default_estimate  # validation scores what inference returns by default
        val_steps = None if val_estimate == MEAN else (t.val_steps or cfg.diffusion.num_inference_steps)

        def objective(
            wrapped: nn.Module, step: int, rng: np.random.Generator, gen: torch.Generator
        ) -> torch.Tensor:
            if latent_pairs is not None:
                from .latents import sample_latent_batch

                x0, y = sample_latent_batch(latent_pairs, t.batch_size, lat_patch, rng)
                scale = model.config.diffusion.latent_scale
                x0, y = (x0 * scale).to(device), (y * scale).to(device)
            else:
                thin, cond, _ = sample_batch(
                    train_r,
                    t.batch_size,
                    patch,
                    t.factors,
                    rng,
                    t.degradation,
                    t.inplane_probability,
                    t.augment,
                    t.affine_probability,
                )
                thin_t = _to_tensor(thin, device, t.channels_last)
                cond_t = _to_tensor(cond, device, t.channels_last)
                with torch.no_grad():
                    x0 = model.encode(thin_t)
                    y = model.encode(cond_t)
            b = x0.shape[0]
            steps_t = torch.randint(0, model.diffusion.num_steps, (b,), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
            keep = (torch.rand(b, generator=gen) >= p_drop).float().to(device)
            if pixel:  # image patches are at hand (pixel excludes --latent-dir)
                return wrapped(x0, y, steps_t, noise, keep, thin_t, cond_t)
            return wrapped(x0, y, steps_t, noise, keep)

        @torch.no_grad()
        def validate(step: int) -> dict[str, float]:
            if not val:
                return {}
            was_training = model.training
            model.eval()
            refs, conds, outs, base_outs = [], [], [], []
            compare_base = objective_module.use_control
            for i, (thin, cond, _) in enumerate(val):
                c = _to_tensor(cond[None, None], device, t.channels_last)
                gen = torch.Generator().manual_seed(1000 + i)
                out = model.super_resolve_patch(
                    c, steps=val_steps, guidance=1.0, generator=gen, estimate=val_estimate
                )
                outs.append(out.float().cpu().numpy()[0, 0])
                if compare_base:
                    gen = torch.Generator().manual_seed(1000 + i)
                    base = model.super_resolve_patch(
                        c, steps=val_steps, generator=gen, control=False, estimate=val_estimate
                    )
                    base_outs.append(base.float().cpu().numpy()[0, 0])
                refs.append(thin)
                conds.append(cond)
            model.train(was_training)
            ref, cnd, out = np.stack(refs), np.stack(conds), np.stack(outs)
            mid = ref.shape[2] // 2
            run.log.image(
                "val/cubic_sr_ref", np.concatenate([cnd[0, :, mid], out[0, :, mid], ref[0, :, mid]], 1), step
            )
            metrics = {"psnr_sr": psnr_hu(ref, out), "psnr_cubic": psnr_hu(ref, cnd)}
            metrics["gain_db"] = metrics["psnr_sr"] - metrics["psnr_cubic"]
            if base_outs:
                metrics["psnr_without_control"] = psnr_hu(ref, np.stack(base_outs))
            return metrics

        def extra_state() -> dict[str, Any]:
            d = model.config.diffusion
            return {"latent_scale": float(d.latent_scale), "residual_std": float(d.residual_std)}

        def restore_extra(extra: dict[str, Any]) -> None:
            _restore_latent_statistics(model, extra)

        result = _fit(
            run,
            models={"vae": model.vae, "denoiser": model.denoiser},
            trainable=objective_module,
            objective=objective,
            validate=validate,
            score_key="psnr_sr",
            resume=resume,
            extra_state=extra_state,
            restore_extra=restore_extra,
        )
        if val and run.info.is_main:
            result["cubic_psnr"] = psnr_hu(np.stack([v[0] for v in val]), np.stack([v[1] for v in val]))
        if run.info.is_main:  # also after a stop (STOP file, SIGTERM, Ctrl-C): the checkpoint just written
            result.update(_export_best(run.out, Path(run.out) / SR_EXPORT, component="sr",
                                       training=_training_record(train_r, passed_over)))  # fmt: skip
            _summarise(result, run.out, train_r, passed_over)
        run.completed = True
        return result
    finally:
        run.close()


def _restore_latent_statistics(model: SRModel, extra: dict[str, Any]) -> None:
    d = model.config.diffusion
    if "latent_scale" in extra or "residual_std" in extra:
        model.set_latent_statistics(
            float(extra.get("latent_scale", d.latent_scale)), float(extra.get("residual_std", d.residual_std))
        )


@torch.no_grad()
def _latent_statistics(
    model: SRModel, regions: list[VolumeRegion], patch: tuple, t: Any, device: torch.device
) -> tuple[float, float]:
    """``(1 / std of thin latents, std of x0 - y in those units)`` from a few random training pairs.

    The first makes the latents unit-variance; the second sizes ResShift's noise and the network's output
    to the thick/thin difference, which in a latent that keeps the through-plane axis is a few percent of
    the latent's own spread.
    """
    rng = np.random.default_rng([t.seed, 99])
    n = max(4, t.batch_size)
    thin, cond, _ = sample_batch(regions, n, patch, t.factors, rng, t.degradation, 0.0, False)
    x0, _ = model.vae.encode(torch.from_numpy(thin).to(device))
    y, _ = model.vae.encode(torch.from_numpy(cond).to(device))
    std = max(float(x0.float().std()), 1e-3)
    res = max(float((x0 - y).float().std()) / std, 1e-4)
    return 1.0 / std, res


# ---------------------------------------------------------------------------------------------- export
def export_sr(
    ckpt_dir: str | os.PathLike, out_file: str | os.PathLike, component: str = "sr",
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write inference weights from a training checkpoint (or a training folder: its best, else latest).

    The file's config names none of the run's files or folders (:data:`RECORDED_PATHS`, ``init_from``: emptied, as
    :func:`~DiffusionCore.train.checkpoint.public_config` does); the checkpoint and ``summary.json`` keep them.

    Args:
        ckpt_dir: ``checkpoint-XXXXXXXX`` folder or a ``train vae`` / ``train sr`` output folder.
        out_file: the ``.safetensors`` file to write (atomically).
        component: ``"sr"`` (VAE + denoiser), ``"vae"`` or ``"diffusion"``.
        training: what the file says of the run's data (its metadata's ``training``: counts, never names).

    Returns:
        ``{"weights": path, "weights_sha256": sha, "checkpoint": folder}``.
    """
    from ..train.checkpoint import (
        find_best,
        find_latest,
        load_training_state,
        public_config,
        read_checkpoint_info,
    )
    from ..train.ema import load_checkpoint_averages

    p = Path(ckpt_dir)
    ckpt = p if (p / "state.json").is_file() else (find_best(p) or find_latest(p))
    if ckpt is None:
        raise InputError(f"no checkpoint in {ckpt_dir}: train first (train vae / train sr)")
    info = read_checkpoint_info(ckpt)
    _refuse_throughplane_run(Path(ckpt), info)
    cfg = load_config(public_config(info.get("config", {}), [*RECORDED_PATHS, "train.init_from"]), SRConfig)
    model = SRModel(cfg)
    names = info.get("models", [])
    models = {"vae": model.vae}
    if "denoiser" in names:
        models["denoiser"] = model.denoiser
    elif component != "vae":
        raise WeightsError(f"{ckpt} holds only a VAE: export it with component 'vae'")
    state = load_training_state(ckpt, models=models, restore_rng=False)
    if load_checkpoint_averages(ckpt, models):
        logger.info("exporting the EMA weights of %s", ckpt)
    _restore_latent_statistics(model, state.get("extra") or {})
    sha = model.save(
        out_file,
        component=component,
        extra_metadata={
            "step": state["step"], "source_checkpoint": Path(ckpt).name,
            "description": ("CT super-resolution VAE" if component == "vae" else "CT super-resolution, latent diffusion")
            + f", trained with train {'vae' if component == 'vae' else 'sr'} for {state['step']} steps",
            **({"training": training} if training is not None else {}),
        },
    )
    logger.info("exported %s (%s) from %s", out_file, sha[:12], ckpt)
    return {"weights": str(out_file), "weights_sha256": sha, "checkpoint": str(ckpt)}


def _refuse_throughplane_run(ckpt: Path, info: dict[str, Any]) -> None:
    """``export-sr`` exports ``train vae`` / ``train sr`` checkpoints; a ``train throughplane`` run exports its own
    weights when it ends (every way it ends but a crash): name that file, or how to get it."""
    from ..weights.registry import shell_word
    from .throughplane_train import EXPORT_FILE, MODEL_NAME

    if MODEL_NAME not in (info.get("models") or []):
        return
    run = ckpt.parent
    exported = run / EXPORT_FILE
    if exported.is_file():
        where = f"whose weights are already exported at {exported}: use that file (sr --weights, weights import)"
    else:
        where = (f"which exports its weights to {exported} when it ends; that file is missing (the run is still "
                 "training, or was killed): continue it with `python -m DiffusionCore train throughplane --resume "
                 f"--out-dir {shell_word(run)} --data ...` to export them")  # fmt: skip
    raise InputError(f"{run} holds a train throughplane run (the through-plane predictor), {where}. export-sr "
                     "exports train sr / train vae checkpoints")  # fmt: skip


def _export_best(out_dir: Path, out_file: Path, component: str, training: dict[str, Any] | None = None
                 ) -> dict[str, Any]:  # fmt: skip
    return export_sr(out_dir, out_file, component, training)


def describe(cfg: SRConfig) -> dict[str, Any]:
    """The config as a JSON-ready dict (for reports)."""
    return config_to_dict(cfg)
