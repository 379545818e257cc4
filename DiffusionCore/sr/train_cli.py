"""``train vae``, ``train sr`` and ``train export-sr``: the SR family's training commands.

Options override the ``--config`` file, which overrides the defaults (see ``--show-config``). The same
command runs on CPU, one GPU, or several under ``torchrun --nproc_per_node=N`` (DDP).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ..cli.common import device_name
from ..config import config_help, config_to_dict, load_config, read_config_file
from ..errors import ConfigError, InputError
from ..train.checkpoint import resumed_settings
from .config import SRConfig

logger = logging.getLogger(__name__)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="JSON or YAML config file (SRConfig); options override it")
    p.add_argument("--show-config", action="store_true", help="print every config field with help and exit")
    p.add_argument("--data", nargs="+", default=None, help="training volumes: folders, files, list files or CT sample names (chest-lidc chest-dx)")
    p.add_argument("--data-dir", default=None, help="root folder for --train-split / --val-split entries")
    p.add_argument("--train-split", default=None, help="text file, one training volume per line")
    p.add_argument("--val-split", default=None, help="text file, one validation volume per line")
    p.add_argument("--val-data", nargs="+", default=None, help="held-out volumes (default: top z-range)")
    p.add_argument(
        "--out-dir",
        "--output-dir",
        dest="out_dir",
        default=None,
        help="output folder: checkpoints, logs, exported weights",
    )
    p.add_argument("--epochs", type=int, default=None, help="passes of --steps-per-epoch steps (default 20)")
    p.add_argument(
        "--steps-per-epoch", type=int, default=None, help="optimizer steps per epoch (default 200)"
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (short runs)")
    p.add_argument("--batch-size", type=int, default=None, help="patches per step and process (default 2)")
    p.add_argument("--learning-rate", type=float, default=None, help="AdamW learning rate (default 1e-4)")
    p.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="decay of the weight average that validation scores and export writes (default 0.999; 0: off)",
    )
    p.add_argument(
        "--patch-size",
        type=int,
        nargs=3,
        metavar=("D", "H", "W"),
        default=None,
        help="training patch on the thin grid (default 32 128 128)",
    )
    p.add_argument("--device", type=device_name, default=None, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--use-amp", action="store_true", default=None, help="bf16 autocast (GPU only)")
    p.add_argument(
        "--channels-last", action="store_true", default=None, help="channels_last_3d memory format"
    )
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")


def register(fam: argparse._SubParsersAction) -> None:
    v = fam.add_parser(
        "vae",
        help="train the SR 3D autoencoder (VAE)",
        description="Train the 3D VAE of the SR model; writes OUT_DIR/vae.safetensors.",
    )
    _add_common(v)
    v.add_argument("--kl-weight", type=float, default=None, help="KL weight (default 1e-6)")
    v.set_defaults(func=run_vae)

    s = fam.add_parser(
        "sr",
        help="train the SR latent diffusion model (ResShift + IRControlNet)",
        description="Train the latent denoiser on thick/thin pairs simulated from thin-slice "
        "CT; writes OUT_DIR/sr_model.safetensors (VAE + denoiser).",
    )
    _add_common(s)
    s.add_argument(
        "--vae",
        "--vae-checkpoint",
        dest="vae",
        default=None,
        help="trained VAE: vae.safetensors or a `train vae` output folder",
    )
    s.add_argument("--latent-dir", default=None, help="precomputed latents from prepare-latents")
    s.add_argument(
        "--predict-residual",
        dest="predict_residual",
        action="store_true",
        default=None,
        help="ResShift residual shifting with x0 prediction (default)",
    )
    s.add_argument(
        "--no-predict-residual",
        dest="predict_residual",
        action="store_false",
        help="plain latent diffusion: eps prediction, DDIM sampling",
    )
    s.add_argument(
        "--use-cfg",
        dest="use_cfg",
        action="store_true",
        default=None,
        help="condition dropout in training so guidance can be used (default)",
    )
    s.add_argument("--no-cfg", dest="use_cfg", action="store_false", help="no condition dropout")
    s.add_argument("--num-train-timesteps", type=int, default=None, help="T (ResShift 15; DDIM e.g. 1000)")
    s.add_argument("--num-inference-steps", type=int, default=None, help="default sampling steps")
    s.add_argument("--gradient-checkpointing", action="store_true", default=None, help="save memory")
    s.add_argument("--model-channels", type=int, default=None, help="UNet base channels (default 64)")
    s.add_argument(
        "--stage",
        choices=("base", "control", "joint"),
        default=None,
        help="base: UNet prior; control: ControlNet on a frozen base (--init-from); joint: both",
    )
    s.add_argument("--init-from", default=None, help="start from this SR run folder or sr_model.safetensors")
    s.add_argument("--factors", type=int, nargs="+", default=None, help="simulated factors (default 2 3 4)")
    s.add_argument(
        "--pixel-loss-weight",
        type=float,
        default=None,
        help="weight of the L1 loss on the decoded output image (default 0: latent loss only)",
    )
    s.add_argument(
        "--finetune-decoder",
        action="store_true",
        default=None,
        help="also train the VAE decoder through the pixel loss (encoder stays frozen)",
    )
    s.set_defaults(func=run_sr)

    e = fam.add_parser(
        "export-sr",
        help="write inference weights from an SR/VAE training folder",
        description="Export the best (else latest) checkpoint of a train sr / train vae run as safetensors (family "
        "'sr'). A train throughplane run needs no export: it writes RUN/throughplane.safetensors when it ends.",
    )
    e.add_argument("checkpoint", help="train sr / train vae output folder or checkpoint-XXXXXXXX folder")
    e.add_argument("output", help="the .safetensors file to write")
    e.add_argument(
        "--component",
        choices=("sr", "vae", "diffusion"),
        default="sr",
        help="sr = VAE + denoiser in one file (default); vae; diffusion",
    )
    e.set_defaults(func=run_export)


def _split_lines(path: str, root: str | None) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"split file {p} does not exist: give a text file with one volume per line")
    base = Path(root) if root else p.parent
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    out = [str(base / ln) for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise InputError(f"split file {p} lists no volumes")
    return out


def build_config(args: argparse.Namespace, family: str) -> SRConfig:
    """Defaults <- ``--config`` file <- command-line options."""
    base: dict[str, Any] = (read_config_file(args.config) if args.config
                            else resumed_settings(args.resume, args.out_dir) or {})
    cfg = load_config(base, SRConfig, where=str(args.config) if args.config else None)
    d: dict[str, Any] = config_to_dict(cfg)
    t, u, df = d["train"], d["unet"], d["diffusion"]
    if args.train_split:
        t["data"] = _split_lines(args.train_split, args.data_dir)
    elif args.data:
        t["data"] = list(args.data)
    elif args.data_dir:
        t["data"] = [args.data_dir]
    if args.val_split:
        t["val_data"] = _split_lines(args.val_split, args.data_dir)
    elif args.val_data:
        t["val_data"] = list(args.val_data)
    simple = {
        "epochs": "epochs",
        "steps_per_epoch": "steps_per_epoch",
        "max_steps": "max_steps",
        "batch_size": "batch_size",
        "learning_rate": "learning_rate",
        "ema_decay": "ema_decay",
        "device": "device",
        "use_amp": "use_amp",
        "channels_last": "channels_last",
        "val_every": "val_every",
        "checkpoint_every": "checkpoint_every",
        "seed": "seed",
    }
    for arg, key in simple.items():
        value = getattr(args, arg, None)
        if value is not None:
            t[key] = value
    if args.patch_size is not None:
        t["patch_size"] = list(args.patch_size)
    if family == "vae":
        if args.kl_weight is not None:
            t["kl_weight"] = args.kl_weight
    else:
        if args.vae:
            t["vae_weights"] = args.vae
        if args.latent_dir:
            t["latent_dir"] = args.latent_dir
        if args.stage:
            t["stage"] = args.stage
        if args.init_from:
            t["init_from"] = args.init_from
        if args.factors:
            t["factors"] = list(args.factors)
        if args.pixel_loss_weight is not None:
            t["pixel_loss_weight"] = args.pixel_loss_weight
        if args.finetune_decoder:
            t["finetune_decoder"] = True
        if args.predict_residual is not None:
            df["predict_residual"] = args.predict_residual
            if (
                not args.predict_residual
                and args.num_train_timesteps is None
                and df["num_train_timesteps"] < 100
            ):
                df["num_train_timesteps"] = 1000
                if args.num_inference_steps is None:
                    df["num_inference_steps"] = 50
        if args.num_train_timesteps is not None:
            df["num_train_timesteps"] = args.num_train_timesteps
        if args.num_inference_steps is not None:
            df["num_inference_steps"] = args.num_inference_steps
        if args.use_cfg is not None:
            u["cond_dropout"] = 0.1 if args.use_cfg else 0.0
        if args.gradient_checkpointing:
            u["gradient_checkpointing"] = True
        if args.model_channels is not None:
            u["model_channels"] = args.model_channels
    return load_config(d, SRConfig)


def _prepare(args: argparse.Namespace, family: str) -> SRConfig | None:
    if args.show_config:
        print(config_help(SRConfig))
        return None
    if not args.out_dir:
        raise ConfigError("--out-dir is required: the folder for checkpoints, logs and exported weights")
    return build_config(args, family)


def _run_training(args: argparse.Namespace, family: str) -> int:
    from .training import train_sr, train_vae

    cfg = _prepare(args, family)
    if cfg is None:
        return 0
    train = train_vae if family == "vae" else train_sr
    print(json.dumps(train(cfg, None, args.out_dir, resume=args.resume), default=str))
    return 0


def run_vae(args: argparse.Namespace) -> int:
    return _run_training(args, "vae")


def run_sr(args: argparse.Namespace) -> int:
    return _run_training(args, "sr")


def run_export(args: argparse.Namespace) -> int:
    from .training import export_sr

    print(json.dumps(export_sr(args.checkpoint, args.output, args.component), default=str))
    return 0
