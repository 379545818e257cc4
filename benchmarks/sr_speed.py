"""Speed of the whole super-resolution pipeline: read, interpolate, encode, sample, decode, blend, write.

Data: the ``chest-dx`` sample (a real 512x512x64 chest CT at 0.842x0.842x5.0 mm, a DICOM series), or any
volume passed with ``--input``, or ``--input synthetic`` (a CT-like phantom of ``--shape``, 5 mm slices).
Factor 4 along the thick axis (64 -> 256 slices by default). For each step count: wall time, time per stage
(``adapt`` the adaptation to the input, ``predictor`` the through-plane predictor, ``encode`` /
``decode`` the VAE calls inside a diffusion model, ``sample`` its diffusion steps), peak RSS and,
on CUDA, ``torch.cuda.max_memory_allocated``. CPU runs use ``--threads`` torch threads
(default: ``OMP_NUM_THREADS`` when set, else 2).
Adaptation as ``sr`` does it: on by default (the default step count), ``--no-adapt``, ``--adapt SECONDS`` or
``--adapt-steps N``.
Prints a table and writes JSON (with the weights' sha256, device and thread count).

Usage::

    python benchmarks/sr_speed.py results/sr_speed.json [--weights NAME_OR_FILE] [--no-adapt | --adapt-steps N] [--estimate mean | --steps 4 15] [--device cpu]
    python benchmarks/sr_speed.py /tmp/check.json --tiny-test-model --input synthetic --shape 8 64 64

``--tiny-test-model`` uses random weights (meaningless images, smaller networks): only for checking the
script, never for reporting speed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from DiffusionCore.cli.common import adapt_settings, add_adapt_arguments
from DiffusionCore.devices import resolve_device
from DiffusionCore.files import keep_freed_memory, peak_rss_bytes, write_json_atomic
from DiffusionCore.sampledata import load_reference
from DiffusionCore.sr.pipeline import SuperResolver, default_weights_name
from DiffusionCore.volume import Volume, read_volume, write_volume

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_threads_argument  # noqa: E402


def synthetic_ct(shape: tuple[int, int, int], spacing=(0.842, 0.842, 5.0), seed: int = 0) -> Volume:
    """A CT-like phantom ``(z, y, x)``: air, an elliptic body with lungs and a spine, mild noise."""
    nz, ny, nx = shape
    # open grids: the same values as full ones, without three volume-sized float64 arrays that would set the peak
    # memory this benchmark reports before the run has begun
    z, y, x = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij",
                          sparse=True)  # fmt: skip
    arr = np.full(shape, -1000.0, dtype=np.float32)
    arr[np.broadcast_to((x / 0.85) ** 2 + (y / 0.65) ** 2 < 1, shape)] = 40.0
    for cx in (-0.4, 0.4):
        arr[np.broadcast_to(((x - cx) / 0.3) ** 2 + (y / 0.45) ** 2 + (z / 1.4) ** 2 < 1, shape)] = -850.0
    arr[np.broadcast_to((x / 0.12) ** 2 + ((y - 0.45) / 0.12) ** 2 < 1, shape)] = 700.0
    arr += np.random.default_rng(seed).normal(0, 10, shape).astype(np.float32)
    return Volume(arr, spacing)


class StageTimer:
    """Wraps the model's ``encode`` and ``decode`` (instance attributes shadow the methods) to time them."""

    def __init__(self, model: torch.nn.Module | None, device: torch.device):
        self.seconds = {"encode": 0.0, "decode": 0.0}
        self.device = device
        for name in self.seconds:
            if model is not None:  # weights without a diffusion stage have nothing to encode or decode
                setattr(model, name, self._timed(name, getattr(model, name)))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, name, fn):
        def wrapper(*args, **kwargs):
            self._sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            self.seconds[name] += time.perf_counter() - t0
            return out

        return wrapper

    def reset(self) -> None:
        for k in self.seconds:
            self.seconds[k] = 0.0


def run_once(resolver: SuperResolver, src: Path, out: Path, args, steps: int | None, device, timer: StageTimer) -> dict:
    timer.reset()
    if device.type == "cuda":
        torch.cuda.init()  # the allocator refuses a peak-stats reset before CUDA's lazy initialisation
        torch.cuda.reset_peak_memory_stats(device)
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    vol = read_volume(src)
    t_read = time.perf_counter() - t0
    shown: list[tuple[float, float]] = []  # (seconds since the run started, the progress bar's fraction)
    t_run = time.perf_counter()
    result, report = resolver.run(
        vol, factor=args.factor, steps=steps, estimate=args.estimate, device=device, seed=0,
        patch_size=args.patch_size, overlap=args.overlap, data_consistency=not args.no_data_consistency,
        tile_batch=args.tile_batch, adapt=adapt_settings(args),
        progress=lambda done, total, _msg: shown.append((time.perf_counter() - t_run, done / max(total, 1))),
    )
    run_seconds = time.perf_counter() - t_run
    t0 = time.perf_counter()
    write_volume(result, out, overwrite=True, dtype="int16")
    t_write = time.perf_counter() - t0
    wall = time.perf_counter() - t_all
    tm = report["timings"]
    stages = {
        "read": t_read,
        "adapt": tm.get("adapt", 0.0),
        "interpolate": tm["interpolate"],
        "predictor": tm.get("predictor", 0.0),
        "encode": timer.seconds["encode"],
        "sample": max(0.0, tm.get("model", 0.0) - timer.seconds["encode"] - timer.seconds["decode"]),
        "decode": timer.seconds["decode"],
        "blend": tm.get("blend", 0.0),
        "consistency": tm["consistency"],
        "write": t_write,
    }
    adaptation = (report.get("predictor") or {}).get("adaptation")
    return {
        "adaptation": adaptation,
        "estimate": report["settings"]["estimate"],
        "steps": report["settings"]["steps"],
        "wall_seconds": wall,
        "stages_seconds": stages,
        "input_shape": list(vol.shape),
        "output_size_xyz": list(result.shape)[::-1],
        "tiles": report["tiles"]["count"],
        "tile_overhead": report["tiles"]["overhead"],
        "patch_size": report["settings"]["patch_size"],
        "tile_batch": report["settings"]["tile_batch"],
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_max_allocated_bytes": report["memory"]["cuda_max_allocated_bytes"],
        "consistency_psnr": report.get("consistency_psnr"),
        "progress_at_time_quarters": progress_at_quarters(shown, run_seconds),
    }


def progress_at_quarters(shown: list[tuple[float, float]], seconds: float) -> list[float]:
    """The progress bar's fraction when a quarter, a half and three quarters of the run's time had passed: a bar that
    moves with the time reads about 0.25, 0.5 and 0.75."""
    return [max([f for t, f in shown if t <= q * seconds], default=0.0) for q in (0.25, 0.5, 0.75)]


def format_table(rows: list[dict]) -> str:
    stages = list(rows[0]["stages_seconds"]) if rows else []
    head = ["estimate", "steps", "wall s", *[f"{s} s" for s in stages], "tiles", "peak RSS GiB", "GPU max GiB",
            "bar @1/4,1/2,3/4"]
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for r in rows:
        gpu = r["cuda_max_allocated_bytes"]
        vals = [f"{r['estimate']:>12}", f"{r['steps']:>12d}", f"{r['wall_seconds']:12.2f}", *[f"{r['stages_seconds'][s]:12.2f}" for s in stages],
                f"{r['tiles']:>12d}", f"{r['peak_rss_bytes'] / 2**30:12.2f}", f"{gpu / 2**30:12.2f}" if gpu else f"{'-':>12}",
                "/".join(f"{v:.2f}" for v in r["progress_at_time_quarters"])]
        lines.append("  ".join(vals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_out", help="where to write the results (JSON)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="SR weights name or .safetensors file (default: the installed default)")
    weights.add_argument("--tiny-test-model", action="store_true", help="random tiny model: checks the script only")
    parser.add_argument("--allow-unregistered-weights", action="store_true")
    parser.add_argument("--input", default="chest-dx", help="sample name, volume path, or 'synthetic' (default chest-dx)")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 512, 512), metavar=("Z", "Y", "X"),
                        help="shape of the synthetic input (default 64 512 512)")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--estimate", choices=("mean", "sample"), default=None,
                        help="mean (one step) or sample (default: the weights' own, or sample with --steps)")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="sampling step counts, one run each (default: one run of the weights' default estimate)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    add_threads_argument(parser)
    parser.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"))
    parser.add_argument("--overlap", type=int, nargs=3, default=None, metavar=("D", "H", "W"))
    parser.add_argument("--tile-batch", type=int, default=None, help="patches per model call (default: auto)")
    parser.add_argument("--no-data-consistency", action="store_true")
    parser.add_argument("--warmup", action="store_true", help="run once untimed first (CUDA kernel selection)")
    add_adapt_arguments(parser)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    device = resolve_device(args.device)
    if args.tiny_test_model:
        resolver = SuperResolver.tiny()
        print("warning: --tiny-test-model has random weights: figures only check the script", file=sys.stderr)
    else:
        args.weights = args.weights or default_weights_name()
        resolver = SuperResolver.from_pretrained(args.weights, allow_unregistered=args.allow_unregistered_weights)
    timer = StageTimer(resolver.model, device)
    steps_list = args.steps or [None]

    with tempfile.TemporaryDirectory(prefix="sr_speed_") as tmp:
        tmpdir = Path(tmp)
        src = tmpdir / "input.nii.gz"
        vol = synthetic_ct(tuple(args.shape)) if args.input == "synthetic" else load_reference(args.input)
        write_volume(vol, src, dtype="int16")
        if args.warmup:
            run_once(resolver, src, tmpdir / "warmup.nii.gz", args, steps_list[0], device, timer)
        rows = [run_once(resolver, src, tmpdir / f"out{s}.nii.gz", args, s, device, timer) for s in steps_list]

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = {
        "benchmark": "sr_speed",
        "data": args.input if args.input != "synthetic" else f"synthetic phantom {tuple(args.shape)} at 5 mm",
        "input_spacing_xyz_mm": list(vol.spacing),
        "factor": args.factor,
        "device": str(device),
        "gpu": gpu_name,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "weights": "tiny-test-model (random)" if args.tiny_test_model else args.weights,
        "weights_sha256": resolver.weights_sha256,
        "results": rows,
    }
    header = (f"SR speed: {result['data']} x{args.factor}, device {device}{' (' + gpu_name + ')' if gpu_name else ''}, "
              f"{result['threads']} threads, weights {result['weights']} ({resolver.weights_sha256[:12]})")
    print(header)
    print(format_table(rows))
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
