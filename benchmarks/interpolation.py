"""Interpolation baselines on a real thin-slice CT: the figures every learned super-resolution must beat.

Data: the ``chest-lidc`` sample (LIDC-IDRI-0001, 512x512x133 at 0.703x0.703x2.5 mm), or any CT passed with
``--reference``. Degradation: slab average of ``k`` slices along z (one slice per slab), k = 2 and 4.
Methods: nearest, linear and cubic B-spline, reconstructing the thin grid. Metrics (DiffusionCore.metrics):
PSNR with HU clipped to [-1024, 2048] over the whole volume and inside the body mask, 3D SSIM, HU-MAE in
the body mask, and consistency PSNR. Prints a table and writes JSON.

Usage::

    python benchmarks/interpolation.py results/interpolation.json [--reference chest-lidc] [--factors 2 4] [--threads N]

``--threads`` defaults to ``OMP_NUM_THREADS`` when that is set, else 2 (benchmarks/bench_common.py).
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

from DiffusionCore import sampledata
from DiffusionCore.evaluate import evaluate, format_table
from DiffusionCore.files import write_json_atomic
from DiffusionCore.metrics import BODY_MASK_DEFINITION, HU_RANGE
from DiffusionCore.sampledata import load_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_threads_argument  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_out", help="where to write the results (JSON)")
    parser.add_argument("--reference", default="chest-lidc",
                        help="sample name or path of a thin-slice CT (default %(default)s)")
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 4],
                        help="slab factors k: each thick slice stands for k thin ones along z (default %(default)s)")
    parser.add_argument("--degradation", default="slab", choices=("slab", "decimate"),
                        help="how the thick input is made: slab (the mean of k slices) or decimate (every k-th "
                             "slice) (default %(default)s)")
    parser.add_argument("--methods", default="nearest,linear,cubic",
                        help="comma-separated interpolation methods to score (default %(default)s)")
    add_threads_argument(parser)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    ref = load_reference(args.reference)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    setup = {
        "data": args.reference,
        "attribution": sampledata.attribution(args.reference).strip()
        if args.reference in sampledata.SAMPLES
        else "",
        "reference_shape_zyx": list(ref.shape),
        "reference_spacing_xyz_mm": list(ref.spacing),
        "degradation": f"{args.degradation} along z ({'mean of k slices, one per slab' if args.degradation == 'slab' else 'one slice per slab'})",
        "hu_range": list(HU_RANGE),
        "mask": f"body: {BODY_MASK_DEFINITION}",
        "ssim": "3D, Gaussian window sigma 1.5, interior voxels",
        "threads": torch.get_num_threads(),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    print(
        f"data {setup['data']} {ref.shape} spacing {tuple(round(s, 3) for s in ref.spacing)} mm; "
        f"degradation {setup['degradation']}; HU {setup['hu_range']}; mask {setup['mask']}; "
        f"threads {setup['threads']}; {setup['device']}"
    )
    reports = []
    t0 = time.perf_counter()
    for k in args.factors:
        report = evaluate(
            ref, k, axis="z", degradation=args.degradation, methods=methods, reference_name=args.reference
        )
        print()
        print(format_table(report))
        reports.append(report)
    out = {
        "benchmark": "interpolation",
        "setup": setup,
        "reports": reports,
        "total_seconds": time.perf_counter() - t0,
    }
    path = Path(args.json_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, path)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
