"""Evaluate reconstruction methods against a thin-slice reference.

The reference is cut to a whole number of slabs, degraded (slab average or decimation) by ``factor``
along ``axis``, and every method reconstructs the reference's own thin grid from the thick input. Methods are looked up
in a registry: the interpolation baselines are built in; model-based methods (``sr``) register
themselves from their own module, loaded on first use.
"""

from __future__ import annotations

import logging
import math
import platform
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .degrade import (
    DEGRADATIONS,
    THIN_SLICE_MM,
    Degradation,
    crop_to_slabs,
    degrade,
    slab_crop,
    slab_thickness_note,
)
from .errors import Cancelled, ConfigError, DiffusionCoreError, InputError, NumericalError
from .geometry import storage_flips
from .interpolation import INTERPOLATION_METHODS, interpolate
from .metrics import (
    BODY_MASK_DEFINITION,
    BODY_THRESHOLD_HU,
    HU_RANGE,
    ReferenceStats,
    check_hu_range,
    quality_report,
    ssim_window,
)
from .volume import Grid, Volume, axis_index

logger = logging.getLogger(__name__)

#: A reconstruction method: (thick volume, target thin grid, options) -> volume on that grid. ``options["report"]``
#: is a dict the method may fill with what a reader of its figures needs (weights, settings, adaptation record).
Reconstructor = Callable[[Volume, Grid, dict], Volume]

#: The scores of a result row, in the order of the table.
SCORE_KEYS = ("psnr", "psnr_body", "ssim", "hu_mae_body", "consistency_psnr")

#: What ``null`` in a report's scores stands for (JSON has no infinity; NaN scores are refused, never written).
NULL_SCORE_MEANING = (
    "null in a score means +infinity: an exact result (zero error, e.g. nearest's consistency); infinite_scores "
    "lists each one"
)

#: Slab-only methods: name -> why they do not fit another degradation.
_SLAB_ONLY: dict[str, str] = {}

_METHODS: dict[str, Reconstructor] = {}

#: The keys of :func:`evaluate`'s ``method_options``: one flat dict, shared by every method of the run. The model
#: methods (``sr``, ``sr+adapt``; ``cubic+dc`` and the interpolations read none) read these; a method of your own
#: declares its keys with ``register_method(..., options=...)``. Key -> what it sets.
METHOD_OPTIONS: dict[str, str] = {
    "weights": "SR weights: a registered name or a .safetensors file (default: the default SR weights)",
    "allow_unregistered": "True to use a weights file that is not in the registry (a fine-tuned export of your own)",
    "resolver": "a ready SuperResolver (instead of weights; loaded once, shared by several evaluate calls)",
    "estimate": "'mean' or 'sample' (default: from num_steps and the weights)",
    "num_steps": "sampling steps of the 'sample' estimate (default: the weights' own)",
    "device": "torch device the network runs on: 'auto' (default), 'cpu', 'cuda', ...",
    "seed": "random seed of the network's run (default 0)",
    "adapt": "AdaptSettings of the sr+adapt method's test-time adaptation (default: AdaptSettings()); sr ignores it",
}

#: Progress units each method of :func:`evaluate` takes of its ``progress(done, total, message)``'s ``total`` (the
#: model methods report their own progress within their share).
PROGRESS_PER_METHOD = 1000

#: The option keys each method of your own declared (``register_method(..., options=...)``); ``None``: undeclared.
_OWN_OPTIONS: dict[str, frozenset[str] | None] = {}


#: The settings a model method's record (``method_details``) holds, as ``sr`` records them of the same run: what a
#: figure, or a saved volume of ``evaluate --save-volumes``, depends on besides the weights.
MODEL_SETTINGS = ("estimate", "steps", "seed", "device", "torch_threads", "data_consistency", "adapt")


def register_method(
    name: str, fn: Reconstructor, *, slab_only: str = "", replace: bool = False, options: Sequence[str] | None = None
) -> None:
    """Make ``name`` a method of :func:`evaluate`. The interpolations register here; the model methods
    (``sr``, ``sr+adapt``, ``cubic+dc``) register when :mod:`DiffusionCore.sr.pipeline` is imported, which the
    ``evaluate`` command, the demo and the benchmarks do. ``slab_only``: why the method only fits slab-averaged
    thick slices (it is then refused with ``degradation="decimate"``). ``replace``: replace a built-in method
    (one that DiffusionCore registers) for the rest of the process; a method of your own is replaced without it.
    ``options``: the keys of ``method_options`` a method of your own reads (besides :data:`METHOD_OPTIONS`); they
    are then accepted, and a misspelt one refused. Without it, ``evaluate`` cannot tell a key of yours from a typo,
    and passes every key on unchecked while this method is among the ``methods``.

    Raises:
        ConfigError: ``name`` is a built-in method, ``fn`` is another function and ``replace`` is not True;
            ``options`` is not a list of names.
    """
    if not callable(fn):
        raise ConfigError(f"register_method({name!r}, ...): the method must be a function fn(thick, grid, options) -> "
                          f"Volume; got {type(fn).__name__}")  # fmt: skip
    old = _METHODS.get(name)
    builtin = old is not None and str(getattr(old, "__module__", "")).startswith("DiffusionCore.")
    if builtin and not replace and getattr(fn, "__module__", None) != old.__module__:  # a module's re-import: its own
        raise ConfigError(f"{name!r} is a built-in method of evaluate: give your method another name, or pass "
                          f"replace=True to replace the built-in {name} for the rest of this process")  # fmt: skip
    if options is not None and (isinstance(options, str) or not all(isinstance(k, str) for k in options)):
        raise ConfigError(f"register_method({name!r}, ..., options=...): give the option keys the method reads as a "
                          f"list of names, e.g. options=['my_key']; got {options!r}")  # fmt: skip
    _METHODS[name] = fn
    if str(getattr(fn, "__module__", "")).startswith("DiffusionCore."):
        _OWN_OPTIONS.pop(name, None)  # a built-in: reads METHOD_OPTIONS or nothing
    else:
        _OWN_OPTIONS[name] = None if options is None else frozenset(options)
    if slab_only:
        _SLAB_ONLY[name] = slab_only
    else:
        _SLAB_ONLY.pop(name, None)


for _name in INTERPOLATION_METHODS:
    register_method(_name, lambda thick, grid, options, _m=_name: interpolate(thick, grid, _m))


def get_method(name: str) -> Reconstructor:
    if name not in _METHODS:
        hint = "" if "sr" in _METHODS else " (the model methods sr, sr+adapt and cubic+dc need `import DiffusionCore.sr.pipeline` first)"
        raise InputError(f"unknown method {name!r}: choose from {', '.join(sorted(_METHODS))}{hint}")
    return _METHODS[name]


def check_method_fits(name: str, degradation: str) -> None:
    """Refuse a method that assumes slab-averaged thick slices under another degradation.

    Raises:
        InputError: naming the method, why, and what to do.
    """
    if degradation != "slab" and name in _SLAB_ONLY:
        usable = ", ".join(m for m in sorted(_METHODS) if m not in _SLAB_ONLY)
        raise InputError(
            f"the method {name} cannot be scored with --degradation {degradation}: {_SLAB_ONLY[name]}, so its figures "
            f"would measure a mismatch, not the method. Use --degradation slab for {name}, or leave it out "
            f"({degradation} fits {usable})"
        )


def check_method_options(method_options: Any, methods: Sequence[str] = ()) -> dict[str, Any]:
    """``method_options`` as a dict, once every key is one that a method reads.

    The options are one flat dict shared by all ``methods`` (``{"weights": "mine.safetensors", "seed": 1}``): the
    model methods read :data:`METHOD_OPTIONS`, a method of your own the keys it declared
    (``register_method(..., options=...)``). A key no method reads is refused rather than ignored, since a typo
    (``"weigths"``) or the per-method form ``{"sr": {"weights": ...}}`` would otherwise score the default weights
    under your weights' name. When one of ``methods`` is a method of your own registered without ``options``, the
    keys it may read are unknown and the check is left out.

    Raises:
        ConfigError: not a dict; a key that names a method (the per-method form: the message shows the flat form);
            a key that no method reads (the message names it and lists the valid keys).
    """
    if method_options is None:
        return {}
    if not isinstance(method_options, dict):
        raise ConfigError(f"method_options must be a dict of option keys, e.g. {{'weights': 'mine.safetensors', "
                          f"'seed': 0}}; got {type(method_options).__name__}")  # fmt: skip
    if any(_OWN_OPTIONS.get(m, ()) is None for m in methods if m in _METHODS):
        return dict(method_options)  # a method of your own that did not declare its keys: any key may be its own
    valid = set(METHOD_OPTIONS).union(*(k for k in _OWN_OPTIONS.values() if k))
    unknown = [k for k in method_options if k not in valid]
    if not unknown:
        return dict(method_options)
    listed = ", ".join(sorted(valid))
    nested = [k for k in unknown if k in _METHODS or k in ("sr", "sr+adapt", "cubic+dc")]
    if nested:
        inner = {k: v for m in nested if isinstance(method_options[m], dict) for k, v in method_options[m].items()}
        flat = ", ".join(f"{k!r}: {v!r}" for k, v in inner.items()) or "'weights': ..."
        raise ConfigError(
            f"method_options has a key {nested[0]!r}, the name of a method: method_options is one flat dict shared by "
            f"every method (the model methods sr, sr+adapt and cubic+dc must score the same weights and settings), so "
            f"write method_options={{{flat}}} instead of {{{nested[0]!r}: {{...}}}}. Valid keys: {listed}"
        )
    import difflib

    said = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), sorted(valid), n=1)
        said.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(
        f"method_options has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(said)}: no method reads "
        f"{'them, so they' if len(unknown) > 1 else 'it, so it'} would be ignored (a misspelt weights would score "
        f"the default weights). Valid keys: {listed}. A method of your own declares its keys with "
        "register_method(name, fn, options=[...])."
    )


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


class MethodResultError(DiffusionCoreError, RuntimeError):
    """A reconstruction method of :func:`evaluate` returned something other than a Volume on the grid it was
    given (a bug in the method: a custom one from :func:`register_method`, most often). Also a RuntimeError."""


#: What a method must return, for the messages of :func:`check_on_grid`.
METHOD_CONTRACT = ("a method must return a Volume on the grid it is given: fn(thick, grid, options) -> "
                   "Volume.from_grid(grid, array) with array of shape grid.shape (z, y, x)")  # fmt: skip


def check_on_grid(out: Volume, grid: Grid, name: str) -> None:
    """Refuse a reconstruction that is not a Volume on the reference's grid: scoring it voxel by voxel would
    compare different places (a method's thin slices half a slice off, for instance); and one holding NaN or
    infinite voxels, which no score describes.

    Raises:
        MethodResultError: naming the method, what it returned (not a Volume, another shape, how far off
            the grid, non-finite voxels) and what a method must return.
    """
    if not isinstance(out, Volume):
        raise MethodResultError(
            f"method {name} returned {type(out).__module__}.{type(out).__qualname__}, not a Volume: "
            f"{METHOD_CONTRACT}."
        )
    if out.shape != grid.shape:
        raise MethodResultError(f"method {name} returned shape {out.shape}, expected the reference's {grid.shape}: "
                                f"{METHOD_CONTRACT}.")  # fmt: skip
    got, want = out.grid, grid
    tol = 1e-4 * min(want.spacing)  # mm: far below any real offset, far above the rounding of grid arithmetic
    off = np.abs(np.asarray(got.origin) - np.asarray(want.origin)).max()
    if (
        off > tol
        or not np.allclose(got.spacing, want.spacing, rtol=0, atol=tol)
        or not np.allclose(got.direction, want.direction, rtol=0, atol=1e-6)
    ):
        raise MethodResultError(
            f"method {name} returned a volume off the reference's grid (origin {np.round(got.origin, 4).tolist()} "
            f"against {np.round(want.origin, 4).tolist()} mm, {off:.4g} mm apart; spacing "
            f"{np.round(got.spacing, 5).tolist()} against {np.round(want.spacing, 5).tolist()} mm): its figures would "
            "compare different places. This is a bug in the method: " + METHOD_CONTRACT + "."
        )
    bad = int(np.size(out.array) - np.count_nonzero(np.isfinite(out.array)))
    if bad:
        raise MethodResultError(
            f"method {name} returned {bad} NaN or infinite voxel(s) of {out.array.size}: no score means anything "
            f"then. This is a bug in the method (a division by zero, a log of a negative value, ...): "
            f"{METHOD_CONTRACT}, every voxel a finite HU value."
        )


def run_environment() -> dict[str, Any]:
    """What an evaluation's figures also depend on: versions (and the source's git commit when it runs from a
    checkout, ``""`` for an installed copy; ``source_modified`` names code files edited since that commit, ``""``
    when none were), torch's thread count and the date (UTC)."""
    import torch

    from .provenance import now_utc
    from .version import __version__, source_commit, source_modified

    return {
        "date": now_utc(),
        "diffusioncore_version": __version__,
        "source_commit": source_commit(),
        "source_modified": source_modified(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "torch_threads": int(torch.get_num_threads()),
    }


def _reference_warnings(reference: Volume, factor: int, ax: int, reference_name: str) -> list[str]:
    """Why the reference may not be thin truth: slices far apart, or thicker than their spacing."""
    warnings = []
    spacing = float(reference.spacing_zyx[ax])
    if spacing > THIN_SLICE_MM:  # the benchmarks score the 5 mm sample so on purpose; a user may not know
        warnings.append(
            f"{reference_name}: its slices are {spacing:g} mm apart, so x{factor} simulates {spacing * factor:g} mm "
            f"slabs and scores against slices that are not thin themselves; for figures that say how a method "
            f"restores thin slices, use a reference of {THIN_SLICE_MM:g} mm or less"
        )
    note = slab_thickness_note(reference, ax)  # what `sr` says of such a series, and what it means for a reference
    if note:
        warnings.append(
            f"{reference_name}: {note}. As an evaluation reference its slices are not the {spacing:g} mm slabs the "
            f"simulated thick input averages, so the figures score against slices blurred over "
            f"{reference.metadata.get('slice_thickness_mm'):g} mm (or with gaps); prefer a series reconstructed "
            "with slice thickness = spacing"
        )
    return warnings


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
    keep: Callable[[str, Volume], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict:
    """Simulate thick slices from ``reference`` and score each method on the reference's grid.

    The reference is cut to whole slabs of ``factor`` along ``axis`` (:func:`~DiffusionCore.degrade.slab_crop`:
    the slices left over go at the same physical end whatever the storage order) and degraded
    (:func:`~DiffusionCore.degrade.degrade`: slab average, or decimation keeping slice ``(factor - 1) // 2`` of
    each slab). Every method reconstructs onto the cropped reference's own grid, which is checked
    (:func:`check_on_grid`). Model methods that assume slab averaging are refused with another degradation
    (:func:`check_method_fits`).

    Args:
        reference: the thin-slice truth, ``(z, y, x)`` in HU.
        factor: thin slices per simulated thick slice.
        axis: the array axis the slices are thickened along (``"z"``, ``"y"``, ``"x"`` or 0, 1, 2).
        degradation: ``"slab"`` (average of ``factor`` slices) or ``"decimate"`` (keep one of ``factor``).
        methods: registered method names (:func:`get_method`); ``sr``, ``sr+adapt`` and ``cubic+dc`` need
            ``import DiffusionCore.sr.pipeline`` first.
        method_options: settings of the methods: **one flat dict** shared by every method of the run (not one per
            method: ``{"sr": {...}}`` is refused, with the flat form in the message). The model methods read
            (:data:`METHOD_OPTIONS`):

            * ``weights``: SR weights, a registered name or a ``.safetensors`` file (default: the default SR
              weights); with a file of your own (a fine-tuned export) add ``allow_unregistered=True``;
            * ``allow_unregistered``: accept a weights file that is not in the registry;
            * ``resolver``: a ready :class:`~DiffusionCore.sr.pipeline.SuperResolver` instead of ``weights``;
            * ``estimate`` (``"mean"`` or ``"sample"``), ``num_steps`` (sampling steps), ``device`` (``"auto"``,
              ``"cpu"``, ``"cuda"``, ...), ``seed`` (default 0);
            * ``adapt``: :class:`~DiffusionCore.sr.adapt.AdaptSettings` of ``sr+adapt`` (``sr`` never adapts).

            ``cubic+dc`` and the interpolations read none. A method of your own gets the same dict, plus
            ``"report"`` (a dict to fill), and declares the keys it reads with ``register_method(..., options=...)``.
            An unknown key is a ``ConfigError`` naming it and listing the valid keys, never ignored: which weights
            were scored is in ``method_details[method]["weights"]``. E.g. ``method_options={"weights":
            "runs/tp/throughplane.safetensors", "allow_unregistered": True, "device": "cpu", "seed": 1}``.
        reference_name: how the report and the messages name the reference.
        hu_range: ``(lo, hi)`` HU both volumes are clipped to before scoring, ``lo < hi``.
        progress: ``progress(done, total, message)``: each method has :data:`PROGRESS_PER_METHOD` of ``total``'s
            units, and a model method (``sr``, ``sr+adapt``) moves within its share as its run goes (adaptation,
            predicted planes), not only once it has finished.
        keep: called as ``keep(what, volume)`` with ``"reference"`` (the cropped reference), ``"thick"`` (the
            simulated input) and each method's name and reconstruction, as soon as each exists (to save them).
        cancel: set it (from another thread) to stop: checked between methods and, inside a model method, between
            its adaptation steps and plane batches; raises Cancelled.

    Returns:
        ``{"reference", "factor", "axis", "degradation", "hu_range", "results": [{"method", "psnr",
        "psnr_body", "ssim", "hu_mae_body", "consistency_psnr", "seconds"}], ...}``; ``seconds`` is the time
        the method took to reconstruct (metrics not included). Also: ``reference_size_xyz``,
        ``reference_spacing_xyz_mm`` (as scored, after the crop), ``thick_size_xyz``, ``thick_spacing_xyz_mm``,
        ``slices_scored`` ([start, stop) along the axis, in ``reference``'s indices), ``slices_dropped``,
        ``body_mask`` (``definition``, ``threshold_hu``, ``voxels``, ``fraction``), ``method_details`` (what
        each model method reported: weights, settings, adaptation), ``infinite_scores`` ({method: [score keys]}
        whose value is +inf) and ``null_scores``, ``warnings``, and :func:`run_environment`'s keys.

    What depends on the reference alone (body mask, the SSIM's local mean and variance) is computed
    once and shared by all methods (:class:`~DiffusionCore.metrics.ReferenceStats`).

    Raises:
        ConfigError: an unknown ``method_options`` key, or the per-method form; a ``hu_range`` not ``lo < hi``.
        Cancelled: ``cancel`` was set.
        InputError: an unknown method or degradation, a method that does not fit the degradation, a reference too
            small to score or without a body.
    """
    ax = axis_index(axis)
    if degradation not in DEGRADATIONS:
        raise InputError(f"unknown degradation {degradation!r}: use one of {', '.join(DEGRADATIONS)}")
    fns = [(m, get_method(m)) for m in methods]  # fail on unknown names before any work
    method_options = check_method_options(method_options, methods)
    hu_range = check_hu_range(hu_range)
    for m in methods:
        check_method_fits(m, degradation)
    check_scorable(reference.shape, factor, ax, reference_name)
    warnings = _reference_warnings(reference, factor, ax, reference_name)
    for w in warnings:
        logger.warning("%s", w)
    n = reference.shape[ax]
    kept = slab_crop(n, factor, reverse=ax in storage_flips(reference.direction))
    dropped = [i for i in range(n) if not kept.start <= i < kept.stop]
    if dropped:
        logger.info(
            "%s: %d of its %d slices along %s do not fill a whole slab of %d and are left out: %s", reference_name,
            len(dropped), n, "zyx"[ax], factor, ", ".join(map(str, dropped)),
        )  # fmt: skip
    ref = crop_to_slabs(reference, factor, ax)
    thick = degrade(ref, factor, ax, degradation)
    grid = ref.grid  # every method reconstructs onto the reference's own thin slices, whatever the degradation
    if keep:
        keep("reference", ref)
        keep("thick", thick)
    ref_stats = ReferenceStats(ref)
    mask = ref_stats.body_mask()
    if not mask.any():
        raise InputError(f"{reference_name}: no voxel above -500 HU, so there is no body to evaluate in.")
    results = []
    details: dict[str, dict] = {}
    infinite: dict[str, list[str]] = {}
    share = PROGRESS_PER_METHOD
    total = len(fns) * share
    for i, (name, fn) in enumerate(fns):
        if cancel is not None and cancel.is_set():
            raise Cancelled("evaluation cancelled")
        if progress:
            progress(i * share, total, f"{name}: reconstructing")
        method_report: dict[str, Any] = {}
        run_keys: dict[str, Any] = {"report": method_report}
        if name not in _OWN_OPTIONS:  # a built-in method: its progress within its share, and the cancel event
            run_keys.update(progress=_within_share(progress, i, share, total, name), cancel=cancel)
        t0 = time.perf_counter()
        # each method its own copy of the thick input: one that edits it in place changes no other method's score
        try:
            out = fn(thick.copy(), grid, {**method_options, **run_keys})
        except NumericalError as exc:  # e.g. a model whose result held NaN voxels: say which method
            raise NumericalError(f"method {name}: {exc}") from None
        seconds = time.perf_counter() - t0
        check_on_grid(out, grid, name)
        if keep:
            keep(name, out)
        scores = quality_report(
            ref_stats, out, thick_input=thick, factor=factor, axis=ax, degradation=degradation, mask=mask,
            hu_range=hu_range,
        )
        row = {"method": name, **{k: float(v) for k, v in scores.items()}, "seconds": seconds}
        results.append(row)
        if method_report:
            details[name] = method_report
        exact = [k for k in SCORE_KEYS if isinstance(row.get(k), float) and math.isinf(row[k])]
        if exact:
            infinite[name] = exact
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
        "reference_size_xyz": list(ref.shape)[::-1],
        "reference_spacing_xyz_mm": [float(s) for s in ref.spacing],
        "thick_size_xyz": list(thick.shape)[::-1],
        "thick_spacing_xyz_mm": [float(s) for s in thick.spacing],
        "slices_scored": [kept.start, kept.stop],
        "slices_dropped": dropped,
        "body_mask": {
            "definition": BODY_MASK_DEFINITION,
            "threshold_hu": float(BODY_THRESHOLD_HU),
            "voxels": int(np.count_nonzero(mask)),
            "fraction": float(np.count_nonzero(mask) / mask.size),
        },
        "method_details": details,
        "infinite_scores": infinite,
        "null_scores": NULL_SCORE_MEANING,
        "warnings": warnings,
        **run_environment(),
    }


def _within_share(
    progress: Callable[[int, int, str], None] | None, index: int, share: int, total: int, name: str
) -> Callable[[int, int, str], None] | None:
    """A method's own ``progress(done, of, message)`` as :func:`evaluate`'s: ``done / of`` of the ``index``-th
    method's ``share`` of ``total`` units, the message prefixed with the method's name."""
    if progress is None:
        return None

    def within(done: int, of: int, message: str = "") -> None:
        part = share * min(max(done, 0), of) // of if of > 0 else 0
        progress(index * share + part, total, f"{name}: {message or 'reconstructing'}")

    return within


def aggregate(reports: Sequence[dict], scores: Sequence[str] = SCORE_KEYS, by: Sequence[str] = ("method",)) -> dict:
    """Mean and sample standard deviation (N - 1) of every score of every method over several volumes' reports.

    Args:
        scores: the score keys of the reports' rows (``seconds`` is averaged too).
        by: the keys that make one row of the aggregate (``evaluate-xray``'s: the method and the stage).

    Returns:
        ``{"n", "sd", "results": [{"method", "n", "<score>_mean", "<score>_sd", ...}], "infinite_scores"}``:
        a method's ``n`` counts the volumes it was scored on; ``_sd`` is None for one volume; a mean over a
        volume with an infinite score is infinite (listed in ``infinite_scores``, by method), its SD None.
    """
    rows: dict[tuple, dict[str, list[float]]] = {}
    for report in reports:
        for r in report["results"]:
            per = rows.setdefault(tuple(r[k] for k in by), {})
            for key in (*scores, "seconds"):
                if r.get(key) is not None:
                    per.setdefault(key, []).append(float(r[key]))
    results, infinite = [], {}
    for group, per in rows.items():
        method = group[0]
        row: dict[str, Any] = {**dict(zip(by, group)), "n": max((len(v) for v in per.values()), default=0)}
        for key, values in per.items():
            a = np.asarray(values, dtype=np.float64)
            if np.isinf(a).any():
                row[f"{key}_mean"], row[f"{key}_sd"] = float(a.mean()), None  # +inf: PSNRs are never -inf
                infinite.setdefault(method, []).append(f"{key}_mean")
            else:
                row[f"{key}_mean"] = float(a.mean())
                row[f"{key}_sd"] = float(a.std(ddof=1)) if len(a) > 1 else None
        results.append(row)
    return {"n": len(reports), "sd": "sample standard deviation (N - 1) over the volumes", "results": results,
            "infinite_scores": infinite}  # fmt: skip


def format_table(report: dict) -> str:
    """The evaluation as a fixed-width text table."""
    head = (
        f"reference {report['reference']}  factor x{report['factor']} along {report['axis']}  "
        f"degradation {report['degradation']}  HU {report['hu_range']}"
    )
    lines = [head]
    if report.get("weights"):  # a model method ran: which weights (two runs with and without --weights differ here)
        sha = str(report.get("weights_sha256") or "")
        lines.append(f"weights {report['weights']}" + (f" (sha256 {sha[:12]}...)" if sha else ""))
    if "slices_scored" in report:
        start, stop = report["slices_scored"]
        dropped = report.get("slices_dropped") or []
        lines.append(
            f"slices {start}..{stop - 1} along {report['axis']} scored"
            + (f" ({len(dropped)} left out to make whole slabs: {', '.join(map(str, dropped))})" if dropped else "")
            + (f"; body mask {report['body_mask']['voxels']} voxels" if "body_mask" in report else "")
        )
    cols = ("method", "PSNR dB", "PSNR body", "SSIM", "MAE body HU", "consist. dB", "seconds")
    fmt = ("{:11.2f}", "{:11.2f}", "{:11.4f}", "{:11.2f}", "{:11.2f}", "{:11.2f}")
    lines.append("  ".join(f"{c:>11}" for c in cols))
    for r in report["results"]:
        vals = (r["psnr"], r["psnr_body"], r["ssim"], r["hu_mae_body"], r["consistency_psnr"], r["seconds"])
        lines.append(f"{r['method']:>11}  " + "  ".join(f.format(v) for f, v in zip(fmt, vals)))
    return "\n".join(lines)


def format_aggregate(agg: dict) -> str:
    """The aggregate over several volumes as a fixed-width table: mean +- SD per method and score."""
    lines = [f"mean +- SD over {agg['n']} volume(s)"]
    cols = (("psnr", "PSNR dB", 2), ("psnr_body", "PSNR body", 2), ("ssim", "SSIM", 4),
            ("hu_mae_body", "MAE body HU", 2), ("consistency_psnr", "consist. dB", 2))  # fmt: skip
    lines.append(f"{'method':>11}  {'N':>3}  " + "  ".join(f"{title:>17}" for _, title, _ in cols))
    for r in agg["results"]:
        cells = []
        for key, _, digits in cols:
            mean, sd = r.get(f"{key}_mean"), r.get(f"{key}_sd")
            text = "" if mean is None else f"{mean:.{digits}f}" + ("" if sd is None else f" +- {sd:.{digits}f}")
            cells.append(f"{text:>17}")
        lines.append(f"{r['method']:>11}  {r['n']:>3}  " + "  ".join(cells))
    return "\n".join(lines)
