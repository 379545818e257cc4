"""Super-resolution quality against interpolation on thin-slice CT regions the weights were not trained on.

For each reference region and factor (slab average of k slices along z, one thick slice per slab) this
scores cubic B-spline interpolation, ``cubic+dc`` (cubic followed by the pipeline's data-consistency step
alone, no network), ``sr`` (the weights as they are: ``sr --no-adapt``) and ``sr+adapt`` (the same after
adapting a copy of the predictor to the thick input: what users get with the defaults, 400 steps;
``--adapt-steps N`` or ``--adapt SECONDS`` change it, ``--no-adapt`` leaves the row out). ``sr`` minus
``cubic+dc`` is the network's own share. Metrics as in ``benchmarks/interpolation.py`` (PSNR full and
body, 3D SSIM, body HU-MAE, consistency PSNR; HU clipped to [-1024, 2048]).

Usage::

    python benchmarks/sr_quality.py results/sr_quality.json [--weights NAME_OR_FILE] \\
        --reference chest-lidc:93:133 chest-dx:45:64 [--factors 2 4] [--adapt-steps N | --adapt SECONDS | --no-adapt] [--threads N]

A reference is a sample name or a path, optionally with ``:START:STOP`` (the slices kept along z). The
model card's figures use the test regions that the default weights' recipe never reads: ``chest-lidc``
slices 93..132 and ``chest-dx`` slices 45..63 (``train throughplane --test-fraction 0.3``), at 2 torch threads:
``--threads`` defaults to ``OMP_NUM_THREADS`` when that is set, else 2 (benchmarks/bench_common.py), and the
``sr+adapt`` figures reproduce only at the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from DiffusionCore.evaluate import evaluate, format_table
from DiffusionCore.files import keep_freed_memory, write_json_atomic
from DiffusionCore.sampledata import load_reference
from DiffusionCore.sr.adapt import DEFAULT_ADAPT_STEPS, AdaptSettings
from DiffusionCore.sr.pipeline import SuperResolver, default_weights_name
from DiffusionCore.volume import crop_slices

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_threads_argument  # noqa: E402


def parse_reference(text: str):
    """``name`` or ``name:START:STOP`` -> (label, Volume)."""
    parts = text.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        vol = crop_slices(load_reference(parts[0]), "z", int(parts[1]), int(parts[2]))
        return f"{parts[0]} z {parts[1]}-{int(parts[2]) - 1}", vol
    return text, load_reference(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json_out", help="where to write the results (JSON)")
    p.add_argument("--reference", nargs="+", default=["chest-lidc:93:133", "chest-dx:45:64"],
                   help="sample names or paths, each optionally NAME:START:STOP (the slices kept along z; "
                        "default %(default)s: the test regions the default weights were not trained on)")
    p.add_argument("--weights", default=None,
                   help="SR weights name or file (default: the installed default weights)")
    p.add_argument("--allow-unregistered-weights", action="store_true",
                   help="accept a weights file that is not in the weights registry, e.g. your own training run's "
                        "(default: refuse it)")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 4],
                   help="slab factors k: each thick slice is the mean of k thin ones along z (default %(default)s)")
    p.add_argument("--adapt", type=float, default=None, metavar="SECONDS",
                   help="sr+adapt with a time budget instead of the default step count (default: "
                        f"{DEFAULT_ADAPT_STEPS} steps, no time budget)")
    p.add_argument("--adapt-steps", type=int, default=None,
                   help=f"sr+adapt with N steps (wins over --adapt; default: {DEFAULT_ADAPT_STEPS})")
    p.add_argument("--no-adapt", action="store_true", help="leave sr+adapt out (default: score it)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the sr and sr+adapt rows (default %(default)s)")
    p.add_argument("--device", default="cpu",
                   help="torch device the network runs on, e.g. cpu or cuda (default %(default)s)")
    add_threads_argument(p)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    name = args.weights or default_weights_name()
    resolver = SuperResolver.from_pretrained(name, allow_unregistered=args.allow_unregistered_weights)
    methods = ["cubic", "cubic+dc", "sr"]
    options = {"resolver": resolver, "device": args.device, "seed": args.seed}
    if not args.no_adapt:
        methods.append("sr+adapt")
        options["adapt"] = AdaptSettings(seconds=args.adapt or 0.0, steps=args.adapt_steps)  # neither: the default
    setup = {
        "weights": str(name),
        "weights_sha256": resolver.weights_sha256,
        "adapt_seconds": args.adapt, "adapt_steps": args.adapt_steps,
        "seed": args.seed, "device": args.device, "threads": torch.get_num_threads(),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "degradation": "slab", "hu_range": [-1024, 2048],
    }
    print(json.dumps(setup))
    reports = []
    t0 = time.perf_counter()
    for text in args.reference:
        label, ref = parse_reference(text)
        for k in args.factors:
            report = evaluate(ref, k, axis="z", degradation="slab", methods=methods, method_options=options,
                              reference_name=label)
            rows = {r["method"]: r for r in report["results"]}
            report["gain_body_db"] = {
                m: rows[m]["psnr_body"] - rows["cubic"]["psnr_body"] for m in rows if m != "cubic"
            }
            report["network_share_body_db"] = rows["sr"]["psnr_body"] - rows["cubic+dc"]["psnr_body"]
            print()
            print(format_table(report))
            print("body PSNR over cubic: " + ", ".join(f"{m} {g:+.2f} dB" for m, g in report["gain_body_db"].items())
                  + f"; network share (sr - cubic+dc) {report['network_share_body_db']:+.2f} dB")
            reports.append(report)
    out = {"benchmark": "sr_quality", "setup": setup, "reports": reports, "total_seconds": time.perf_counter() - t0}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, args.json_out)
    print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
