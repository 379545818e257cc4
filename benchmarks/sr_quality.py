"""Super-resolution quality against interpolation on thin-slice CT the model was not trained on.

For each factor (slab average of k slices along z, one thick slice per slab) this scores nearest, linear and
cubic B-spline interpolation, ``cubic+dc`` (cubic followed by the pipeline's data-consistency step alone, no
network), ``sr-no-dc`` (the model without the data-consistency step) and ``sr`` (the full pipeline, what
users get). Separating the three shows how much of any gain comes from the network and how much from the
consistency projection. Metrics as in ``benchmarks/interpolation.py`` (PSNR full and body, 3D SSIM, body
HU-MAE, consistency PSNR; HU clipped to [-1024, 2048]).

Usage::

    python benchmarks/sr_quality.py results/sr_quality.json --reference CT_NOT_TRAINED_ON --weights NAME_OR_FILE
        [--factors 2 4] [--num-steps 4] [--allow-unregistered-weights] [--threads 2] [--device cpu]

The README's table uses the top 40 slices (index 93..132) of ``chest-lidc``, a region no default-weights
training or validation patch came from: ``--reference chest-lidc --z-range 93 133``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from DiffusionCore.cli.evaluate import write_json_atomic
from DiffusionCore.evaluate import evaluate, format_table, register_method
from DiffusionCore.interpolation import interpolate
from DiffusionCore.sr.pipeline import SuperResolver, enforce_consistency
from DiffusionCore.volume import Grid, Volume, load_reference


def crop_z(vol: Volume, z0: int, z1: int) -> Volume:
    """Slices ``z0:z1`` (array axis 0) with the origin moved so every kept voxel keeps its position."""
    direction = np.asarray(vol.direction, dtype=np.float64).reshape(3, 3)
    origin = np.asarray(vol.origin) + direction[:, 2] * vol.spacing[2] * z0
    return Volume(
        np.ascontiguousarray(vol.array[z0:z1]), vol.spacing, tuple(origin), direction, dict(vol.metadata)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json_out", help="where to write the results (JSON)")
    p.add_argument("--reference", default="chest-lidc", help="sample name or path of a thin-slice CT")
    p.add_argument("--z-range", type=int, nargs=2, default=None, metavar=("Z0", "Z1"), help="slices to keep")
    p.add_argument("--weights", required=True, help="SR weights name or file")
    p.add_argument("--allow-unregistered-weights", action="store_true")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps (default: the weights')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    ref = load_reference(args.reference)
    if args.z_range:
        ref = crop_z(ref, *args.z_range)
    resolver = SuperResolver.from_pretrained(
        Path(args.weights) if Path(args.weights).exists() else args.weights,
        allow_unregistered=args.allow_unregistered_weights,
    )

    def axis_of(thick: Volume, grid: Grid) -> int:
        return next(a for a in range(3) if grid.shape[a] != thick.shape[a])

    def sr(thick: Volume, grid: Grid, options: dict, dc: bool) -> Volume:
        out, _ = resolver.run_to_grid(
            thick,
            grid,
            axis=axis_of(thick, grid),
            steps=args.num_steps,
            device=args.device,
            seed=args.seed,
            data_consistency=dc,
        )
        return out

    def cubic_dc(thick: Volume, grid: Grid, options: dict) -> Volume:
        return enforce_consistency(interpolate(thick, grid, "cubic"), thick, axis_of(thick, grid))

    register_method("cubic+dc", cubic_dc)
    register_method("sr-no-dc", lambda th, g, o: sr(th, g, o, False))
    register_method("sr-full", lambda th, g, o: sr(th, g, o, True))
    methods = ["nearest", "linear", "cubic", "cubic+dc", "sr-no-dc", "sr-full"]
    setup = {
        "reference": args.reference,
        "z_range": args.z_range,
        "shape_zyx": list(ref.shape),
        "spacing_xyz_mm": list(ref.spacing),
        "weights_sha256": resolver.model.weights_sha256,
        "num_steps": args.num_steps or resolver.model.config.diffusion.num_inference_steps,
        "seed": args.seed,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }
    print(json.dumps(setup))
    reports = []
    t0 = time.perf_counter()
    for k in args.factors:
        report = evaluate(
            ref, k, axis="z", degradation="slab", methods=methods, reference_name=args.reference
        )
        print()
        print(format_table(report))
        reports.append(report)
    out = {
        "benchmark": "sr_quality",
        "setup": setup,
        "reports": reports,
        "total_seconds": time.perf_counter() - t0,
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, args.json_out)
    print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
