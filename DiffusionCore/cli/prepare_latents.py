"""``prepare-latents``: encode thin volumes and their simulated thick versions once, for fast SR training."""

from __future__ import annotations

import argparse
import json

from .common import Progress, add_progress_argument, device_name


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-latents",
        help="precompute VAE latents of thin volumes and their thick versions (train sr --latent-dir)",
        description="Encode every volume and, per factor, its slab-averaged thick version cubic-interpolated "
        "back to the thin grid; one safetensors file per volume and factor.",
    )
    p.add_argument(
        "--data", nargs="+", required=True, help="thin-slice volumes: folders, files, list files or CT sample names"
    )
    p.add_argument("--vae", required=True, help="trained VAE: vae.safetensors or a `train vae` output folder")
    p.add_argument("--output-dir", required=True, help="folder for the latent files")
    p.add_argument(
        "--factors", type=int, nargs="+", default=[2, 3, 4], help="thick/thin factors (default 2 3 4)"
    )
    p.add_argument("--degradation", choices=("slab", "decimate"), default="slab", help="default slab")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace existing latent files")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..sr.latents import prepare_latents

    files = prepare_latents(
        args.data,
        args.vae,
        args.output_dir,
        factors=args.factors,
        degradation=args.degradation,
        device=args.device,
        overwrite=args.overwrite,
        progress=Progress(args.progress),
    )
    print(json.dumps({"files": [str(f) for f in files]}))
    return 0
