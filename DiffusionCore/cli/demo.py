"""``demo``: sample data in, thin slices and pictures out, measured against cubic interpolation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..degrade import MAX_FACTOR
from ..demo import run_demo
from ..files import write_json_atomic
from .common import bounded_int, device_name


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="fetch sample CT, super-resolve it, compare with cubic, write pictures",
        description="Runs the whole product on the sample data: SR of a real 5 mm chest CT, the x4 evaluation "
        "against interpolation on a 2.5 mm chest CT, and X-ray to CT when weights are installed.",
    )
    p.add_argument("--output-dir", default="demo-output", help="folder for volumes, pictures, summary.json")
    p.add_argument("--factor", type=bounded_int(2, MAX_FACTOR), default=4,
                   help=f"up-sampling factor along z, 2..{MAX_FACTOR} (default 4)")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--steps", type=bounded_int(1), default=None,
                   help="sampling steps of the X-ray to CT part, and of the SR part when the SR weights have a "
                   "diffusion stage (the default sr-default, a through-plane predictor, takes none); default: the "
                   "weights' own")
    p.add_argument("--sr-weights", default=None, help="SR weights name or file (default: the registered default)")
    p.add_argument("--xray-weights", default=None, help="X-ray to CT weights (default: the registered default)")
    p.add_argument("--skip-xray", action="store_true", help="leave out the X-ray to CT part")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..files import keep_freed_memory

    keep_freed_memory()  # a one-shot process: the model's buffers are reused, not mapped afresh
    out = Path(args.output_dir)
    summary = run_demo(out, device=args.device, factor=args.factor, skip_xray=args.skip_xray,
                       sr_weights=args.sr_weights, xray_weights=args.xray_weights, steps=args.steps)
    write_json_atomic(json.loads(json.dumps(summary, default=str)), out / "summary.json")
    print(f"results in {out.resolve()}")
    return 0
