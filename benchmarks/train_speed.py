"""Training cost of the two trainable SR families, per step and per patch, and where the time goes.

Families (``--family``, default both):

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
  (zero_grad, AdamW, EMA update). As in ``train throughplane``, glibc's allocator is tuned first
  (``keep_freed_memory``); it is process-wide, so the latent family runs first, untuned as in ``train sr``.

Each step reproduces one step of the real training loop (same sampling, same loss, same optimizer) with a
timer around each part. Data: the ``chest-lidc`` and ``chest-dx`` samples, or ``--data``; volumes are read
once before timing (reading is not part of a step). ``--warmup`` (default 2) untimed steps, then
``--steps-latent`` / ``--steps-throughplane`` timed ones, on ``--threads`` (default 2) torch threads, CPU.
Reports seconds per step by part and percentages, steps/s, patches/s, and thin-grid voxels/s (3D patch
voxels for the latent stack, thin-plane pixels for the predictor), so the two families compare.
Prints a table and writes JSON.

Usage::

    python benchmarks/train_speed.py results/train_speed.json [--family latent|throughplane|both] [--threads 2]
    python benchmarks/train_speed.py /tmp/train_speed.json --steps-latent 3 --steps-throughplane 20
    python benchmarks/train_speed.py /tmp/ts.json --family latent --latent-config DiffusionCore/sr/configs/default_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from DiffusionCore.cli.evaluate import write_json_atomic
from DiffusionCore.config import config_to_dict, load_config, read_config_file

CONFIG_DIR = Path(__file__).resolve().parents[1] / "DiffusionCore" / "sr" / "configs"
DEFAULT_LATENT_CONFIG = CONFIG_DIR / "default_cpu_gpu_training.json"
DEFAULT_THROUGHPLANE_CONFIG = CONFIG_DIR / "throughplane" / "default.json"
DEFAULT_SAMPLES = ("chest-lidc", "chest-dx")


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
    from DiffusionCore.files import keep_freed_memory
    from DiffusionCore.sr.planes import sample_pairs
    from DiffusionCore.sr.throughplane import ThroughPlaneNet, cubic_planes
    from DiffusionCore.sr.throughplane_train import ThroughPlaneTrainConfig, load_sources
    from DiffusionCore.train.data import collect_volumes
    from DiffusionCore.train.ema import ParameterEMA

    keep_freed_memory()  # as train throughplane does
    cfg = load_config(read_config_file(args.throughplane_config), ThroughPlaneTrainConfig)
    batch = int(args.throughplane_batch or cfg.batch_size)
    train_src, _ = load_sources(collect_volumes(data), cfg)  # read once, outside the timing
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = ThroughPlaneNet(cfg.model)
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


def _allocator_tuned() -> bool:
    from DiffusionCore import files

    return bool(getattr(files, "_ALLOCATOR_TUNED", False))


# ---------------------------------------------------------------------------------------------- report
def format_family(r: dict) -> str:
    if r["family"] == "latent":
        patch = "x".join(map(str, r["patch_size"]))
        head = (f"latent stack ({r['config']}, stage {r['stage']}, random-init VAE): batch {r['batch_size']} x "
                f"{patch} patches, {r['trainable_parameters'] / 1e6:.2f} M trained parameters")
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_out", help="where to write the results (JSON)")
    parser.add_argument("--family", choices=("latent", "throughplane", "both"), default="both")
    parser.add_argument("--data", nargs="+", default=None,
                        help="thin-slice CT volumes (files, folders or list files; default: the chest-lidc and "
                             "chest-dx samples)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
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
    args = parser.parse_args(argv)
    if args.steps_latent < 1 or args.steps_throughplane < 1 or args.warmup < 0:
        parser.error("--steps-* must be >= 1 and --warmup >= 0")

    torch.set_num_threads(args.threads)
    if args.data:
        data, data_names = list(args.data), list(args.data)
    else:
        from DiffusionCore import sampledata

        data, data_names = [str(sampledata.fetch(name)) for name in DEFAULT_SAMPLES], list(DEFAULT_SAMPLES)

    rows = []
    if args.family in ("latent", "both"):  # first: the predictor's allocator tuning is process-wide
        rows.append(time_latent(args, data))
    if args.family in ("throughplane", "both"):
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
                "weights (the VAE included) cost the same time as trained ones",
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
