"""Training cost of the trainable families (SR, X-ray to CT), per step and per patch, and where time goes.

Families (``--family``: ``latent``, ``throughplane``, ``xray``, ``both`` = the two SR families (default), or
``all``):

* ``latent``: the latent diffusion stack of ``train sr`` (VAE + latent UNet + IRControlNet + ResShift), with
  the recipe of the run that beat cubic (``default_cpu_gpu_training.json``: batch 16, patch 16x64x64,
  latent loss only) run on the CPU. A patch is one 3D training patch. Parts of a step: ``data``
  (``sample_batch``: crop, degrade, cubic interpolation, augmentation, to tensor), ``encode`` (the frozen
  VAE encoder on the thin target and the cubic condition, no grad), ``denoiser fwd`` (ResShift's
  ``q_sample``, UNet + control branch, latent MSE), ``decode fwd`` / ``decode bwd`` (the pixel loss, only
  when the config has ``pixel_loss_weight > 0``), ``backward`` (through the denoiser), ``optimizer``
  (zero_grad, gradient clipping, AdamW, learning-rate schedule, EMA update). The model is freshly
  initialised, the VAE included (``train sr`` needs a trained VAE; a random one of the same architecture
  costs the same time), with the config's default latent statistics instead of ones measured on data.
* ``throughplane``: the through-plane predictor of ``train throughplane`` with its recipe
  (``throughplane/default.json``). A patch is one 2D thick/thin plane pair. Parts: ``data``
  (``sample_pairs``), ``forward`` (``cubic_planes`` + the network + L1), ``backward``, ``optimizer``
  (zero_grad, AdamW, EMA update).
* ``xray``: one stage of the X-ray to CT cascade as ``train xray`` trains it (``--xray-config``, default
  ``xray/configs/stage1_cpu.json`` where it exists, else the shipped ``stage1``). A patch is one sample: an
  augmented CT cube and the DRR rendered from it. For a stage above 1 the configs are completed as in
  ``train xray`` (``complete_configs``): the earlier stages are built and frozen but not run, since the
  previous resolution's ground-truth cube plus ``data.prev_noise`` is the stage's input, and the data part
  draws the cubes of every resolution. Parts: ``data`` (``XrayCubeDataset.sample``: CT flip, rotation, HU
  jitter, DRR rendering and radiograph augmentation), ``conditioning`` (``StageModel.condition``: the X-ray
  encoder and the depth lifting, plus the previous-stage input), ``denoiser fwd`` (noising, ViT blocks, token
  head, refinement head and the diffusion, depth-prior, gradient and structural losses), ``drr loss`` (line
  integrals of the prediction against the target's), ``backward`` (zero_grad and the backward pass; with
  ``gradient_checkpointing`` it recomputes the ViT blocks), ``optimizer`` (gradient clipping, AdamW,
  learning-rate schedule, EMA update where ``training.ema_decay`` > 0). The step is ``train_step`` of a
  ``CascadeObjective`` written out (:func:`xray_stage_loss`): the stage's forward is its ``condition`` then
  its ``predict``, and the loss terms of ``losses.stage_loss`` (``train.patch_stage_loss`` for a
  patch-trained stage) are computed from the same random draws and summed in the same order; only the
  DRR term is computed after the others, in its own timed block (it reads nothing but the prediction and
  the target, so no value changes). Float32 on the CPU, as ``train xray`` there (``training.amp`` applies
  to GPUs). Random weights.

Each step reproduces one step of the real training loop (same sampling, same loss, same optimizer) with a
timer around each part. Data: the ``chest-lidc`` and ``chest-dx`` samples, or ``--data``; volumes are read
once before timing (reading is not part of a step). ``--warmup`` (default 2) untimed steps, then
``--steps-latent`` / ``--steps-throughplane`` / ``--steps-xray`` timed ones, on ``--threads`` (default: ``OMP_NUM_THREADS`` when set, else 2)
torch threads, CPU. Reports seconds per step by part and percentages, steps/s, patches (samples)/s, and
thin-grid voxels/s (3D patch voxels for the latent stack, thin-plane pixels for the predictor, the predicted
cube's voxels for the x-ray stage), so the families compare, and the trained parameters. Prints a table and
writes JSON.

As every ``train`` command does, glibc's allocator is told to keep freed buffers (``keep_freed_memory``)
before anything is timed; ``DIFFUSIONCORE_KEEP_FREED_MEMORY=0`` leaves it untuned, which is how the commands
ran before 2026-12-03 (each family's entry records ``allocator_tuned``).

Usage::

    python benchmarks/train_speed.py results/train_speed.json [--family latent|throughplane|xray|both|all]
    python benchmarks/train_speed.py /tmp/train_speed.json --steps-latent 3 --steps-throughplane 20
    python benchmarks/train_speed.py /tmp/ts.json --family latent --latent-config DiffusionCore/sr/configs/default_cpu.json
    python benchmarks/train_speed.py /tmp/ts.json --family xray --steps-xray 5 [--xray-config stage2]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from DiffusionCore.config import config_to_dict, load_config, read_config_file
from DiffusionCore.files import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_threads_argument  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "DiffusionCore" / "sr" / "configs"
DEFAULT_LATENT_CONFIG = CONFIG_DIR / "default_cpu_gpu_training.json"
DEFAULT_THROUGHPLANE_CONFIG = CONFIG_DIR / "throughplane" / "default.json"
XRAY_CONFIG_DIR = CONFIG_DIR.parents[1] / "xray" / "configs"
XRAY_CPU_CONFIG = XRAY_CONFIG_DIR / "stage1_cpu.json"
DEFAULT_XRAY_CONFIG = str(XRAY_CPU_CONFIG) if XRAY_CPU_CONFIG.is_file() else "stage1"
DEFAULT_SAMPLES = ("chest-lidc", "chest-dx")
FAMILIES = {"latent": ("latent",), "throughplane": ("throughplane",), "xray": ("xray",),
            "both": ("latent", "throughplane"), "all": ("latent", "xray", "throughplane")}


def run_steps(step, timer, warmup: int, timed: int) -> tuple[float, float]:
    """``warmup`` untimed calls of ``step(i)``, then ``timed`` timed ones; returns their (wall, CPU) seconds."""
    for i in range(warmup):
        step(i)
    timer.enabled = True
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + timed):
        step(i)
    return time.perf_counter() - wall0, time.process_time() - cpu0


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class PartTimer:
    """Wall seconds per named part, summed over the timed steps; ``enabled=False`` during warm-up."""

    def __init__(self, parts: list[str]) -> None:
        self.seconds = dict.fromkeys(parts, 0.0)
        self.enabled = False
        self._t = 0.0

    def start(self) -> None:
        self._t = time.perf_counter()

    def lap(self, part: str) -> None:
        """Charge the time since the last ``start``/``lap`` to ``part``."""
        now = time.perf_counter()
        if self.enabled:
            self.seconds[part] += now - self._t
        self._t = now


def summarise(timer: PartTimer, steps: int, batch: int, thin_voxels: int, wall: float, cpu: float) -> dict:
    """Per-step seconds by part, percentages and rates from a timer after ``steps`` timed steps."""
    total = sum(timer.seconds.values())
    return {
        "timed_steps": steps,
        "seconds_per_step": total / steps,
        "parts_seconds_per_step": {k: v / steps for k, v in timer.seconds.items()},
        "parts_percent": {k: 100.0 * v / max(total, 1e-12) for k, v in timer.seconds.items()},
        "steps_per_s": steps / total,
        "patches_per_s": steps * batch / total,
        "thin_voxels_per_patch": thin_voxels / (steps * batch),
        "thin_voxels_per_s": thin_voxels / total,
        "wall_seconds": wall,
        "process_cpu_seconds": cpu,
        "cpu_per_wall": cpu / max(wall, 1e-12),
    }


# ---------------------------------------------------------------------------------------------- latent
def time_latent(args, data: list[str]) -> dict:
    """Time ``train sr`` steps (see the module docstring); returns the family's JSON entry."""
    from DiffusionCore.sr.data import load_regions, sample_batch
    from DiffusionCore.sr.model import SRModel
    from DiffusionCore.sr.resshift import ResShiftProcess
    from DiffusionCore.sr.training import (
        SRObjective,
        _check_patch,
        _lr_lambda,
        _step_generators,
        _to_tensor,
        resolve_config,
        set_stage,
    )
    from DiffusionCore.train.ema import ParameterEMA

    cfg = resolve_config(args.latent_config)
    t = cfg.train
    batch = int(args.latent_batch or t.batch_size)
    patch = tuple(int(s) for s in t.patch_size)
    device = torch.device("cpu")
    torch.manual_seed(t.seed)
    model = SRModel(cfg)  # random VAE and denoiser: the same architecture costs the same time
    _check_patch(cfg, model.latent_downsample)
    pixel = t.pixel_loss_weight > 0 and not t.latent_dir
    set_stage(model, t.stage, t.finetune_decoder and pixel)
    objective = SRObjective(model, t.stage, t.pixel_loss_weight if pixel else 0.0)
    proc = model.diffusion
    resshift = isinstance(proc, ResShiftProcess)
    pixel_weight = objective.pixel_weight  # 0 unless ResShift with a pixel loss
    p_drop = cfg.unet.cond_dropout if objective.use_control else 0.0

    train_r, _ = load_regions(data, [], t.val_fraction)  # read once, outside the timing
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t.warmup_steps))
    ema = ParameterEMA({"vae": model.vae, "denoiser": model.denoiser}, t.ema_decay) if t.ema_decay > 0 else None

    parts = ["data", "encode", "denoiser fwd"]
    if pixel_weight > 0:
        parts += ["decode fwd", "decode bwd"]
    parts += ["backward", "optimizer"]
    timer = PartTimer(parts)
    objective.train()

    def step(i: int) -> None:
        rng, gen = _step_generators(t.seed, 0, i)
        timer.start()
        thin, cond, _ = sample_batch(train_r, batch, patch, t.factors, rng, t.degradation,
                                     t.inplane_probability, t.augment, t.affine_probability)
        thin_t = _to_tensor(thin, device, t.channels_last)
        cond_t = _to_tensor(cond, device, t.channels_last)
        timer.lap("data")
        with torch.no_grad():
            x0 = model.encode(thin_t)
            y = model.encode(cond_t)
        timer.lap("encode")
        # SRObjective.forward, cut where the pixel loss starts
        b = x0.shape[0]
        steps_t = torch.randint(0, proc.num_steps, (b,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
        keep = (torch.rand(b, generator=gen) >= p_drop).float().to(device)
        if resshift:
            x_t, target = proc.q_sample(x0, y, steps_t, noise), x0
        else:
            x_t, target = proc.q_sample(x0, steps_t, noise), noise
        x_in = proc.scale_input(x_t, steps_t)
        out = model.denoiser(x_in, proc.timestep_value(steps_t).to(device), y, keep, objective.use_control)
        pred = model.residual_to_x0(y, out) if resshift else out
        loss = F.mse_loss(pred.float(), target.float())
        timer.lap("denoiser fwd")
        pred_grad = None
        if pixel_weight > 0:
            # the decoder's part of the graph starts at a detached copy of the prediction, so its forward
            # and backward are timed apart; the gradient it sends back to ``pred`` joins the latent loss's
            # below (the same gradients as one backward of the summed loss)
            pred_leaf = pred.detach().requires_grad_(True)
            image = model.decode(pred_leaf)
            if model.config.diffusion.decode_residual:
                image = cond_t + image - model.decode(y)
            pixel_loss = pixel_weight * F.l1_loss(image.float(), thin_t.float())
            timer.lap("decode fwd")
            opt.zero_grad(set_to_none=True)
            pixel_loss.backward()
            pred_grad = pred_leaf.grad
            timer.lap("decode bwd")
        else:
            opt.zero_grad(set_to_none=True)
        if pred_grad is not None:
            torch.autograd.backward([loss, pred], [torch.ones_like(loss), pred_grad])
        else:
            loss.backward()
        timer.lap("backward")
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        timer.lap("optimizer")

    wall, cpu = run_steps(step, timer, args.warmup, args.steps_latent)
    voxels = args.steps_latent * batch * int(np.prod(patch))
    return {
        "family": "latent",
        "config": Path(args.latent_config).name,
        "stage": t.stage,
        "batch_size": batch,
        "patch_size": list(patch),
        "patch": "3D thin-grid patch (D, H, W)",
        "factors": list(t.factors),
        "pixel_loss_weight": pixel_weight,
        "finetune_decoder": bool(t.finetune_decoder and pixel),
        "trainable_parameters": sum(p.numel() for p in params),
        "vae": "random initialisation (same architecture; the time does not depend on the weights)",
        "latent_statistics": "config defaults (not measured on data: no effect on the time)",
        "allocator_tuned": _allocator_tuned(),
        "warmup_steps": args.warmup,
        **summarise(timer, args.steps_latent, batch, voxels, wall, cpu),
        "config_values": config_to_dict(cfg),
    }


# ---------------------------------------------------------------------------------------------- predictor
def time_throughplane(args, data: list[str]) -> dict:
    """Time ``train throughplane`` steps (see the module docstring); returns the family's JSON entry."""
    from DiffusionCore.inputs import collect_volumes
    from DiffusionCore.sr.planes import sample_pairs
    from DiffusionCore.sr.throughplane import ThroughPlaneNet, cubic_planes
    from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig, load_sources
    from DiffusionCore.train.ema import ParameterEMA

    cfg = load_config(read_config_file(args.throughplane_config), ThroughPlaneTrainConfig)
    batch = int(args.throughplane_batch or cfg.batch_size)
    train_src, _ = load_sources(collect_volumes(data), cfg)  # read once, outside the timing
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = ThroughPlaneNet(cfg.model).to(memory_format=torch.channels_last)  # as train throughplane lays it out
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ema = ParameterEMA({"predictor": net}, cfg.ema_decay) if cfg.ema_decay > 0 else None
    ks, probs = cfg.factor_probabilities()
    m, width = int(cfg.pairs.thick_rows), int(cfg.pairs.width)
    timer = PartTimer(["data", "forward", "backward", "optimizer"])
    drawn: list[int] = []
    net.train()

    def step(i: int) -> None:
        timer.start()
        k = int(rng.choice(ks, p=probs))
        thick_np, thin_np = sample_pairs(train_src, k, batch, cfg.pairs, rng)
        thick, thin = torch.from_numpy(thick_np), torch.from_numpy(thin_np)
        timer.lap("data")
        lr = cfg.learning_rate * min(1.0, (i + 1) / max(1, cfg.warmup_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        pred = cubic_planes(thick, k) + net(thick, k)
        loss = F.l1_loss(pred, thin)
        timer.lap("forward")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        timer.lap("backward")
        opt.step()
        if ema is not None:
            ema.update()
        timer.lap("optimizer")
        if timer.enabled:
            drawn.append(k)

    wall, cpu = run_steps(step, timer, args.warmup, args.steps_throughplane)
    voxels = sum(batch * m * k * width for k in drawn)  # thin-plane pixels (the network works at 1/k of them)
    return {
        "family": "throughplane",
        "config": Path(args.throughplane_config).name,
        "batch_size": batch,
        "patch_size": [m, width],
        "patch": "2D plane pair: thick (m, W), thin (m*k, W)",
        "factors_drawn": {str(k): drawn.count(k) for k in sorted(set(drawn))},
        "trainable_parameters": sum(p.numel() for p in net.parameters()),
        "allocator_tuned": _allocator_tuned(),
        "warmup_steps": args.warmup,
        **summarise(timer, args.steps_throughplane, batch, voxels, wall, cpu),
        "config_values": config_to_dict(cfg),
    }


# ---------------------------------------------------------------------------------------------- x-ray cascade
def xray_stage_loss(
    cascade,
    s: int,
    vols: dict[int, torch.Tensor],
    xray: torch.Tensor,
    prev_noise: float,
    lap: Callable[[str], None] = lambda part: None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage ``s``'s loss as ``CascadeObjective.forward`` computes it, cut into timed parts.

    The same random draws in the same order (previous-stage noise, patch corner, t, noise) and the same terms
    as ``losses.stage_loss``, or ``train.patch_stage_loss`` for a patch-trained stage; ``stage(...)`` is
    called as ``stage.condition`` then ``stage.predict``, which is what its forward does. ``lap(part)`` is
    called after ``previous stage`` (stages 2-3: the volume they are conditioned on), ``conditioning``,
    ``denoiser fwd`` and ``drr loss``.
    """
    from DiffusionCore.xray.cascade import _crop
    from DiffusionCore.xray.losses import (
        diffusion_loss,
        drr_l1,
        gradient_l1,
        line_integrals,
        structural_loss,
        training_times,
    )
    from DiffusionCore.xray.train import patch_origin, previous_stage_volume, trains_on_patches
    from DiffusionCore.xray.vdiffusion import q_sample

    stage = cascade.stages[s - 1]
    cfg = stage.cfg
    w = cfg.loss_weights
    whole = vols[cfg.resolution]
    prev = None
    if s > 1:  # the earlier stages' estimate or the ground truth, plus noise, as in training
        prev = previous_stage_volume(cascade, s, vols, xray, prev_noise)
        lap("previous stage")
    ctx = stage.condition(xray, prev)
    lap("conditioning")
    patch = trains_on_patches(cfg)
    origin = patch_origin(cfg) if patch else None
    x0 = _crop(whole, origin, cfg.model.train_patch) if patch else whole
    t = training_times(cfg, x0.shape[0], prev is not None, device=x0.device)
    eps = torch.randn(x0.shape, device=x0.device)
    pred, lifted = stage.predict(q_sample(x0, t, eps), t, ctx, origin=origin, return_lifted=True)
    pred = pred.float()
    parts: dict[str, torch.Tensor] = {"v_loss": diffusion_loss(pred, x0, t, cfg.model.v_parameterization)}
    pred = pred.clamp(-1.5, 1.5)
    if w.depth_prior_loss > 0 and lifted is not None:
        parts["depth_prior_loss"] = F.l1_loss(lifted.float(), x0)
    if w.gradient_loss > 0:
        parts["gradient_loss"] = gradient_l1(pred, x0)
    if w.perceptual_loss > 0:
        parts["perceptual_loss"] = structural_loss(pred, x0)
    lap("denoiser fwd")
    spacing = cfg.data.fov_mm / cfg.resolution
    if w.drr_loss > 0 and patch:  # patch_stage_loss: the patch's share of the line integrals
        lp = line_integrals(pred, spacing, cfg.data.view)
        with torch.no_grad():
            ref = line_integrals(x0, spacing, cfg.data.view)
            scale = torch.quantile(line_integrals(whole, spacing, cfg.data.view).flatten(1), 0.99, dim=1)
            scale = scale.clamp_min(1e-3).view(-1, 1, 1, 1)
        drr = ((lp - ref) / scale).abs().mean()
        total = sum(getattr(w, k) * v for k, v in parts.items()) + w.drr_loss * drr
        parts["drr_loss"] = drr
    else:
        if w.drr_loss > 0:
            parts = {"v_loss": parts["v_loss"], "drr_loss": drr_l1(pred, x0, spacing, cfg.data.view),
                     **{k: v for k, v in parts.items() if k != "v_loss"}}  # stage_loss's order of the sum
        total = sum(getattr(w, k) * v for k, v in parts.items())
    lap("drr loss")
    return total, {k: float(v.detach()) for k, v in parts.items()}


def resolve_xray_configs(source: str) -> list:
    """Stage configs 1..S for ``--xray-config`` (a shipped name or a file), earlier stages as ``train xray``
    completes them (``train.complete_configs``)."""
    from DiffusionCore.xray.config import load_stage_config
    from DiffusionCore.xray.train import complete_configs

    return complete_configs([load_stage_config(source)])


def time_xray(args, data: list[str]) -> dict:
    """Time ``train xray`` steps of one stage (see the module docstring); returns the family's JSON entry."""
    from DiffusionCore.train.ema import ParameterEMA
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
    from DiffusionCore.xray.data import XrayCubeDataset
    from DiffusionCore.xray.train import load_training_cubes, trains_on_patches

    configs = resolve_xray_configs(args.xray_config)
    top = configs[-1]
    s, tc = top.stage, top.training
    batch = int(args.xray_batch or tc.batch_size)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    cascade = UnifiedHybridViTCascade(configs)  # random weights: the time does not depend on them
    for st, c in zip(cascade.stages, configs):
        st.gradient_checkpointing = c.training.gradient_checkpointing
    for k, st in enumerate(cascade.stages, start=1):  # earlier stages frozen (run without gradients for prev)
        st.requires_grad_(k == s)
    params = [p for p in cascade.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    warm = max(1, tc.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
    ema = ParameterEMA({"cascade": cascade}, tc.ema_decay) if tc.ema_decay > 0 else None
    resolutions = sorted({c.resolution for c in configs})
    xres = max(c.xray_resolution for c in configs)
    cubes = load_training_cubes(data, resolutions, top.data.fov_mm)  # read once, outside the timing
    dataset = XrayCubeDataset(cubes, top.data, top.data.fov_mm)
    timer = PartTimer(["data", *(["previous stage"] if s > 1 else []), "conditioning", "denoiser fwd", "drr loss",
                       "backward", "optimizer"])  # fmt: skip
    cascade.train()

    def step(i: int) -> None:
        timer.start()
        vols, xray = dataset.sample(rng, batch, resolutions, xres)
        timer.lap("data")
        loss, _ = xray_stage_loss(cascade, s, vols, xray, top.data.prev_noise, timer.lap)
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"x-ray stage {s}: the loss is not finite at step {i}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        timer.lap("backward")
        if tc.gradient_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.gradient_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        timer.lap("optimizer")

    wall, cpu = run_steps(step, timer, args.warmup, args.steps_xray)
    side = top.model.train_patch if trains_on_patches(top) else top.resolution
    voxels = args.steps_xray * batch * side**3
    return {
        "family": "xray",
        "config": Path(args.xray_config).name,
        "stage": s,
        "batch_size": batch,
        "patch_size": [side] * 3,
        "patch": "one (CT cube, DRR) sample; voxels: the cube the stage predicts (its training patch where "
                 "it trains on patches)",
        "resolution": top.resolution,
        "xray_resolution": xres,
        "train_patch": top.model.train_patch,
        "previous_stages": "frozen, not run (the previous resolution's ground-truth cube plus noise is the "
                           "input, as in training)" if s > 1 else "none",
        "gradient_checkpointing": bool(top.training.gradient_checkpointing),
        "ema": bool(ema is not None),
        "precision": "float32 (training.amp is used on GPUs only)",
        "trainable_parameters": sum(p.numel() for p in params),
        "cascade_parameters": sum(p.numel() for p in cascade.parameters()),
        "weights": "random initialisation (the time does not depend on the weights)",
        "allocator_tuned": _allocator_tuned(),
        "warmup_steps": args.warmup,
        **summarise(timer, args.steps_xray, batch, voxels, wall, cpu),
        "samples_per_s": args.steps_xray * batch / sum(timer.seconds.values()),
        "config_values": [config_to_dict(c) for c in configs],
    }


def _allocator_tuned() -> bool:
    from DiffusionCore import files

    return bool(getattr(files, "_ALLOCATOR_TUNED", False))


# ---------------------------------------------------------------------------------------------- report
def format_family(r: dict) -> str:
    if r["family"] == "latent":
        patch = "x".join(map(str, r["patch_size"]))
        head = (f"latent stack ({r['config']}, stage {r['stage']}, random-init VAE): batch {r['batch_size']} x "
                f"{patch} patches, {r['trainable_parameters'] / 1e6:.2f} M trained parameters")
    elif r["family"] == "xray":
        res, side = r["resolution"], r["patch_size"][0]
        where = f", random {side}^3 patches" if side != res else ""
        prev = ", earlier stages frozen (ground-truth previous cube)" if r["stage"] > 1 else ""
        head = (f"x-ray cascade stage {r['stage']} ({r['config']}, random init{prev}): batch "
                f"{r['batch_size']} x ({res}^3 CT cube, {r['xray_resolution']}^2 DRR){where}, "
                f"{r['trainable_parameters'] / 1e6:.2f} M trained parameters "
                f"({r['cascade_parameters'] / 1e6:.2f} M in the cascade)")
    else:
        m, w = r["patch_size"]
        ks = ", ".join(f"x{k}: {n}" for k, n in r["factors_drawn"].items())
        head = (f"through-plane predictor ({r['config']}): batch {r['batch_size']} x {m}x{w} thick planes "
                f"(thin {m}*k x {w}; factors drawn {ks}), {r['trainable_parameters'] / 1e3:.1f} k parameters")
    lines = [head, f"  {'part':<14}{'s/step':>10}{'%':>8}"]
    for part, sec in r["parts_seconds_per_step"].items():
        lines.append(f"  {part:<14}{sec:10.3f}{r['parts_percent'][part]:8.1f}")
    lines.append(f"  {'total':<14}{r['seconds_per_step']:10.3f}{100.0:8.1f}")
    lines.append(f"  {r['timed_steps']} timed steps after {r['warmup_steps']} untimed; "
                 f"process CPU / wall {r['cpu_per_wall']:.2f}")
    return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    head = f"{'family':<14}{'batch':>6}{'patch':>12}{'s/step':>9}{'steps/s':>9}{'patches/s':>11}{'thin vox/patch':>16}{'thin Mvox/s':>13}"
    lines = [head]
    for r in rows:
        patch = "x".join(map(str, r["patch_size"]))
        lines.append(f"{r['family']:<14}{r['batch_size']:>6}{patch:>12}{r['seconds_per_step']:9.3f}"
                     f"{r['steps_per_s']:9.3f}{r['patches_per_s']:11.2f}{r['thin_voxels_per_patch']:16.0f}"
                     f"{r['thin_voxels_per_s'] / 1e6:13.3f}")
    if any(r["family"] == "xray" for r in rows):
        lines.append("xray: a patch is one (CT cube, DRR) sample; its voxels are the cube's (the training "
                     "patch's for a patch-trained stage)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_out", help="where to write the results (JSON)")
    parser.add_argument("--family", choices=tuple(FAMILIES), default="both",
                        help="latent, throughplane, xray, both (the two SR families; default) or all")
    parser.add_argument("--data", nargs="+", default=None,
                        help="thin-slice CT volumes (files, folders or list files; default: the chest-lidc and "
                             "chest-dx samples)")
    add_threads_argument(parser)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--steps-latent", type=int, default=10, help="timed steps of the latent stack (default 10)")
    parser.add_argument("--steps-throughplane", type=int, default=50,
                        help="timed steps of the through-plane predictor (default 50)")
    parser.add_argument("--latent-config", default=str(DEFAULT_LATENT_CONFIG),
                        help="SR training config (default: default_cpu_gpu_training.json)")
    parser.add_argument("--latent-batch", type=int, default=None, help="patches per latent step (default: the config's)")
    parser.add_argument("--throughplane-config", default=str(DEFAULT_THROUGHPLANE_CONFIG),
                        help="through-plane training config (default: sr/configs/throughplane/default.json)")
    parser.add_argument("--throughplane-batch", type=int, default=None,
                        help="planes per predictor step (default: the config's)")
    parser.add_argument("--steps-xray", type=int, default=5,
                        help="timed steps of the x-ray stage (default 5)")
    parser.add_argument("--xray-config", default=DEFAULT_XRAY_CONFIG,
                        help="x-ray stage config: a shipped name (stage1, stage2, ...) or a file (default: "
                             "xray/configs/stage1_cpu.json where it exists, else stage1)")
    parser.add_argument("--xray-batch", type=int, default=None,
                        help="samples per x-ray step (default: the config's)")
    args = parser.parse_args(argv)
    if min(args.steps_latent, args.steps_throughplane, args.steps_xray) < 1 or args.warmup < 0:
        parser.error("--steps-* must be >= 1 and --warmup >= 0")

    torch.set_num_threads(args.threads)
    if args.data:
        data, data_names = list(args.data), list(args.data)
    else:
        from DiffusionCore import sampledata

        data, data_names = [str(sampledata.fetch(name)) for name in DEFAULT_SAMPLES], list(DEFAULT_SAMPLES)

    from DiffusionCore.files import keep_freed_memory

    keep_freed_memory()  # as every train command does (a no-op with DIFFUSIONCORE_KEEP_FREED_MEMORY=0)
    rows = []
    families = FAMILIES[args.family]
    if "latent" in families:
        rows.append(time_latent(args, data))
    if "xray" in families:
        rows.append(time_xray(args, data))
    if "throughplane" in families:
        rows.append(time_throughplane(args, data))

    result = {
        "benchmark": "train_speed",
        "data": data_names,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "note": "a step reproduces the training loop's step with timers around its parts; fresh random "
                "weights (the VAE included) cost the same time as trained ones; for xray a patch is one "
                "(CT cube, DRR) sample",
        "results": rows,
    }
    print(f"Training speed on {result['cpu']} ({result['cpu_count']} CPUs), {result['threads']} torch threads, "
          f"torch {result['torch']}; data: {', '.join(data_names)} (read before timing)")
    for r in rows:
        print()
        print(format_family(r))
    print()
    print(format_summary(rows))
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
