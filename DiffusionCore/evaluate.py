"""Evaluate reconstruction methods against a thin-slice reference.

The reference is cut to a whole number of slabs, degraded (slab average or decimation) by ``factor``
along ``axis``, and every method reconstructs the thin grid from the thick input. Methods are looked up
in a registry: the interpolation baselines are built in; model-based methods (``sr``) register
themselves from their own module, loaded on first use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from .degrade import THIN_SLICE_MM, Degradation, crop_to_slabs, degrade, thin_grid
from .errors import InputError
from .interpolation import INTERPOLATION_METHODS, interpolate
from .metrics import HU_RANGE, ReferenceStats, quality_report, ssim_window
from .volume import Grid, Volume, axis_index

logger = logging.getLogger(__name__)

#: A reconstruction method: (thick volume, target thin grid, options) -> volume on that grid.
Reconstructor = Callable[[Volume, Grid, dict], Volume]

_METHODS: dict[str, Reconstructor] = {}


def register_method(name: str, fn: Reconstructor) -> None:
    """Make ``name`` a method of :func:`evaluate`. The interpolations register here; the model methods
    (``sr``, ``sr+adapt``, ``cubic+dc``) register when :mod:`DiffusionCore.sr.pipeline` is imported, which the
    ``evaluate`` command, the demo and the benchmarks do."""
    _METHODS[name] = fn


for _name in INTERPOLATION_METHODS:
    register_method(_name, lambda thick, grid, options, _m=_name: interpolate(thick, grid, _m))


def get_method(name: str) -> Reconstructor:
    if name not in _METHODS:
        hint = "" if "sr" in _METHODS else " (the model methods sr, sr+adapt and cubic+dc need `import DiffusionCore.sr.pipeline` first)"
        raise InputError(f"unknown method {name!r}: choose from {', '.join(sorted(_METHODS))}{hint}")
    return _METHODS[name]


def check_scorable(shape: tuple[int, ...], factor: int, axis: int, reference_name: str = "reference") -> None:
    """Refuse a reference of ``shape`` (z, y, x) that is too small to score once cut to whole slabs of ``factor``
    along ``axis``: the 3D SSIM window must fit along every axis.

    Raises:
        InputError: naming the size, the window and what to do.
    """
    cropped = list(shape)
    cropped[axis] -= cropped[axis] % max(1, int(factor))
    window = ssim_window()
    if min(cropped) < window:
        raise InputError(
            f"{reference_name}: a volume of {'x'.join(map(str, cropped))} voxels"
            f"{' (cropped to whole slabs of ' + str(factor) + ')' if tuple(cropped) != tuple(shape) else ''} is too "
            f"small to score: the 3D SSIM window is {window} voxels, so a reference needs at least {window} along "
            "each axis. Use a larger thin-slice volume (or a larger --slices range)."
        )


def evaluate(
    reference: Volume,
    factor: int,
    *,
    axis: str | int = "z",
    degradation: Degradation = "slab",
    methods: Sequence[str] = ("nearest", "linear", "cubic"),
    method_options: dict[str, Any] | None = None,
    reference_name: str = "reference",
    hu_range: tuple[float, float] = HU_RANGE,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Simulate thick slices from ``reference`` and score each method on the thin grid.

    Returns:
        ``{"reference", "factor", "axis", "degradation", "hu_range", "results": [{"method", "psnr",
        "psnr_body", "ssim", "hu_mae_body", "consistency_psnr", "seconds"}]}``; ``seconds`` is the time
        the method took to reconstruct (metrics not included).

    What depends on the reference alone (body mask, the SSIM's local mean and variance) is computed
    once and shared by all methods (:class:`~DiffusionCore.metrics.ReferenceStats`).
    """
    ax = axis_index(axis)
    fns = [(m, get_method(m)) for m in methods]  # fail on unknown names before any work
    check_scorable(reference.shape, factor, ax, reference_name)
    spacing = float(reference.spacing_zyx[ax])
    if spacing > THIN_SLICE_MM:  # the benchmarks score the 5 mm sample so on purpose; a user may not know
        logger.warning(
            "%s: its slices are %g mm apart, so x%d simulates %g mm slabs and scores against slices that are not "
            "thin themselves; for figures that say how a method restores thin slices, use a reference of %g mm or "
            "less", reference_name, spacing, factor, spacing * factor, THIN_SLICE_MM,
        )  # fmt: skip
    ref = crop_to_slabs(reference, factor, ax)
    thick = degrade(ref, factor, ax, degradation)
    grid = thin_grid(thick, factor, axis=ax)
    ref_stats = ReferenceStats(ref)
    mask = ref_stats.body_mask()
    if not mask.any():
        raise InputError(f"{reference_name}: no voxel above -500 HU, so there is no body to evaluate in.")
    results = []
    total = len(fns)
    for i, (name, fn) in enumerate(fns):
        if progress:
            progress(i, total, f"{name}: reconstructing")
        t0 = time.perf_counter()
        out = fn(thick, grid, dict(method_options or {}))
        seconds = time.perf_counter() - t0
        if out.shape != ref.shape:
            raise RuntimeError(f"method {name} returned shape {out.shape}, expected {ref.shape}")
        scores = quality_report(
            ref_stats, out, thick_input=thick, factor=factor, axis=ax, degradation=degradation, mask=mask,
            hu_range=hu_range,
        )
        results.append({"method": name, **{k: float(v) for k, v in scores.items()}, "seconds": seconds})
        logger.info("%s: body PSNR %.2f dB, 3D SSIM %.3f, body MAE %.1f HU (%.1f s)", name, scores["psnr_body"],
                    scores["ssim"], scores["hu_mae_body"], seconds)  # fmt: skip
    if progress:
        progress(total, total, "done")
    return {
        "reference": reference_name,
        "factor": int(factor),
        "axis": "zyx"[ax],
        "degradation": degradation,
        "hu_range": [int(hu_range[0]), int(hu_range[1])],
        "results": results,
    }


def format_table(report: dict) -> str:
    """The evaluation as a fixed-width text table."""
    head = (
        f"reference {report['reference']}  factor x{report['factor']} along {report['axis']}  "
        f"degradation {report['degradation']}  HU {report['hu_range']}"
    )
    cols = ("method", "PSNR dB", "PSNR body", "SSIM", "MAE body HU", "consist. dB", "seconds")
    lines = [head, "  ".join(f"{c:>11}" for c in cols)]
    for r in report["results"]:
        vals = (r["psnr"], r["psnr_body"], r["ssim"], r["hu_mae_body"], r["consistency_psnr"], r["seconds"])
        fmt = ("{:11.2f}", "{:11.2f}", "{:11.4f}", "{:11.2f}", "{:11.2f}", "{:11.2f}")
        lines.append(f"{r['method']:>11}  " + "  ".join(f.format(v) for f, v in zip(fmt, vals)))
    return "\n".join(lines)
