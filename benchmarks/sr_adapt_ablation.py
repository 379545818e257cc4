"""Adaptation variants on one reference: body PSNR gain over cubic of ``sr`` and of ``sr+adapt`` per variant.

Most of the model card's "tried, not adopted" figures for test-time adaptation come from here. Each variant is a JSON
object of :class:`~DiffusionCore.sr.adapt.AdaptSettings` fields (``seconds``, ``steps``, ``batch_size``,
``learning_rate``, ...) plus four knobs on the pairs that adaptation makes from the scan, which exist only
in this script (they wrap the pair maker of :mod:`DiffusionCore.sr.planes` for the variant's run):

- ``pair_blur_rows``: a Gaussian of this sigma (thin rows) along the thick axis of each in-plane thin plane
  (a thin-slice profile);
- ``pair_noise_hu``: white noise of this std (HU) on each in-plane thin plane, before its slab mean;
- ``zoom_probability``: this share of the pairs cut along the scan's own slice axis, its thick slices
  taken as the thin plane (pairs one factor coarser than the task, but in the task's orientation;
  where ``thick_rows * k`` slices do not fit, the pair is an in-plane one as usual);
- ``rehearsal_probability``: each pair of a step is, with this probability, a real through-plane pair (coronal or
  sagittal planes of real thin slices) cut from the thin-slice CTs of ``--rehearsal-data`` (the training scans)
  instead of an in-plane pair of the scan: rehearsal, so that adapting to the scan's axial anatomy does not forget
  what real slices along z look like.

Usage::

    python benchmarks/sr_adapt_ablation.py results/ablation.json --weights runs/tp-X/throughplane.safetensors \\
        --allow-unregistered-weights --reference chest-lidc --factors 4 2 \\
        --variants '[{"steps": 800}, {"steps": 800, "pair_noise_hu": 16}]'
    python benchmarks/sr_adapt_ablation.py r.json --weights runs/tp-L/throughplane.safetensors \
        --allow-unregistered-weights --reference chest-dx --rehearsal-data chest-lidc:0:80 \
        --variants '[{"steps": 400}, {"steps": 400, "rehearsal_probability": 0.25}]'

A reference is a sample name or a path, optionally ``NAME:START:STOP`` (the slices kept along z). Runs with a
``seconds`` budget and no ``steps`` depend on the machine's speed: run them on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from DiffusionCore.evaluate import evaluate
from DiffusionCore.files import keep_freed_memory, write_json_atomic
from DiffusionCore.sr import adapt as adapt_module
from DiffusionCore.sr import planes
from DiffusionCore.sr.adapt import AdaptSettings
from DiffusionCore.sr.pipeline import SuperResolver, default_weights_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_threads_argument  # noqa: E402
from sr_quality import parse_reference  # noqa: E402

PAIR_KNOBS = ("pair_blur_rows", "pair_noise_hu", "zoom_probability", "rehearsal_probability")


def rehearsal_sources(references: list[str]) -> list[planes.PlaneSource]:
    """Thin-slice plane sources (slice axis first) of ``NAME[:START:STOP]`` references."""
    out = []
    for text in references:
        label, vol = parse_reference(text)
        out.append(planes.PlaneSource(label, np.ascontiguousarray(vol.array, dtype=np.float32), vol.spacing_zyx))
    return out


@contextlib.contextmanager
def pair_variant(blur_rows: float, noise_hu: float, zoom: float, seed: int, rehearsal: float = 0.0,
                 rehearsal_from: list[planes.PlaneSource] | None = None):
    """Within the block, adaptation's pairs carry the variant's thin-slice profile, noise, zoom-out pairs and
    rehearsal pairs."""
    in_plane, settings_cls, source_cls, sample = (
        planes.in_plane_pair,
        adapt_module.PairSettings,
        adapt_module.PlaneSource,
        adapt_module.sample_pairs,
    )
    rng = np.random.default_rng(123 + seed)
    if rehearsal > 0 and not rehearsal_from:
        raise SystemExit("rehearsal_probability needs --rehearsal-data")

    def pair(*args, **kwargs):
        thin = in_plane(*args, **kwargs)
        if thin is None:
            return None
        if blur_rows > 0:
            thin = gaussian_filter1d(thin, blur_rows, axis=0, mode="nearest")
        if noise_hu > 0:
            thin = thin + rng.normal(0.0, noise_hu, size=thin.shape)
        return thin

    def settings(*args, **kwargs):
        return dataclasses.replace(settings_cls(*args, **kwargs), through_plane_probability=zoom)

    def source(*args, **kwargs):
        return source_cls(*args, **{**kwargs, "thin_reference": zoom > 0})

    calls = [0]

    def batch(sources, k, size, pair_settings, pair_rng):
        """A step's batch with about ``rehearsal`` of it real through-plane pairs of the rehearsal CTs (the fixed
        check batch, which adaptation draws first, stays the scan's own)."""
        calls[0] += 1
        if rehearsal <= 0 or calls[0] == 1:
            return sample(sources, k, size, pair_settings, pair_rng)
        n = int(pair_rng.binomial(size, rehearsal))
        real = dataclasses.replace(pair_settings, through_plane_probability=1.0, input_noise_hu=0.0)
        parts = [sample(src, k, m, s, pair_rng)
                 for src, m, s in ((sources, size - n, pair_settings), (rehearsal_from, n, real)) if m > 0]
        return tuple(np.concatenate([part[i] for part in parts]) for i in (0, 1))

    planes.in_plane_pair, adapt_module.PairSettings, adapt_module.PlaneSource, adapt_module.sample_pairs = (
        pair, settings, source, batch)
    try:
        yield
    finally:
        planes.in_plane_pair, adapt_module.PairSettings, adapt_module.PlaneSource, adapt_module.sample_pairs = (
            in_plane,
            settings_cls,
            source_cls,
            sample,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json_out", help="where to write the results (JSON)")
    p.add_argument(
        "--reference", default="chest-lidc", help="sample name or path, optionally NAME:START:STOP"
    )
    p.add_argument("--weights", default=None, help="SR weights name or file (default: the installed default)")
    p.add_argument("--allow-unregistered-weights", action="store_true")
    p.add_argument("--factors", type=int, nargs="+", default=[4, 2])
    p.add_argument(
        "--variants", default='[{"steps": 800}]', help="JSON list of variants (see the module help)"
    )
    p.add_argument("--rehearsal-data", nargs="+", default=[], metavar="CT",
                   help="thin-slice CTs (sample names or paths, optionally NAME:START:STOP) whose real through-plane "
                   "pairs the variants' rehearsal_probability mixes in")
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)
    args = p.parse_args(argv)
    variants = json.loads(args.variants)
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        p.error("--variants must be a JSON list of objects")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger(adapt_module.__name__).setLevel(logging.INFO)  # its line gives the steps taken
    keep_freed_memory()
    label, ref = parse_reference(args.reference)
    rehearse = rehearsal_sources(args.rehearsal_data)
    weights = args.weights or default_weights_name()
    resolver = SuperResolver.from_pretrained(weights, allow_unregistered=args.allow_unregistered_weights)
    rows = []
    for k in args.factors:
        options = {"resolver": resolver, "seed": args.seed}
        base = {
            r["method"]: r
            for r in evaluate(ref, k, methods=["cubic", "sr"], method_options=options)["results"]
        }
        cubic = base["cubic"]["psnr_body"]
        print(f"{label} x{k}: cubic {cubic:.2f} dB, sr {base['sr']['psnr_body'] - cubic:+.2f}", flush=True)
        for v in variants:
            knobs = {name: float(v.get(name, 0.0)) for name in PAIR_KNOBS}
            fields = {key: val for key, val in v.items() if key not in PAIR_KNOBS}
            settings = AdaptSettings(**fields)  # with "steps" the time budget is not used
            t0 = time.perf_counter()
            with pair_variant(
                knobs["pair_blur_rows"], knobs["pair_noise_hu"], knobs["zoom_probability"], args.seed,
                knobs["rehearsal_probability"], rehearse,
            ):
                r = evaluate(ref, k, methods=["sr+adapt"], method_options={**options, "adapt": settings})[
                    "results"
                ][0]
            seconds = time.perf_counter() - t0
            gain = r["psnr_body"] - cubic
            print(f"  {json.dumps(v)}: {gain:+.2f} dB, SSIM {r['ssim']:.4f} ({seconds:.0f} s)", flush=True)
            rows.append(
                {
                    "reference": label,
                    "factor": k,
                    "variant": v,
                    "cubic_psnr_body": cubic,
                    "sr_gain_db": base["sr"]["psnr_body"] - cubic,
                    "adapted_gain_db": gain,
                    "ssim": r["ssim"],
                    "seconds": round(seconds, 1),
                }
            )
    write_json_atomic(
        {"weights": str(weights), "seed": args.seed, "threads": args.threads, "rows": rows}, args.json_out
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
