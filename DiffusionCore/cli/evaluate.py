"""``evaluate``: score reconstruction methods on simulated thick slices of thin-slice references."""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..dicom_in import series_choice_arg
from ..errors import ConfigError, InputError, NumericalError, OutputError, OutputExistsError
from ..evaluate import (
    MODEL_SETTINGS,
    aggregate,
    check_method_fits,
    evaluate,
    format_aggregate,
    format_table,
    get_method,
)
from ..files import check_writable_file, format_bytes, refuse_overwriting_inputs, write_json_atomic
from ..provenance import Provenance, environment, sidecar_path, sidecar_record, synthetic_input_warning
from ..volume import Volume, crop_slices, read_volume, split_volume_suffix
from .batch import remove_if_empty
from .common import (
    NameList,
    Progress,
    adapt_settings,
    add_adapt_arguments,
    add_progress_argument,
    bounded_int,
    device_name,
    seed_number,
    set_torch_threads,
)

logger = logging.getLogger(__name__)

#: The model methods: their weights, device and adaptation are stated in the report.
MODEL_METHODS = ("sr", "sr+adapt")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare methods (nearest, linear, cubic, sr) on simulated thick slices",
        description="Simulate thick slices from thin-slice CTs, reconstruct with each method, print a table per "
        "volume (and the mean and SD over several) and optionally write JSON. Each reference is cut to whole slabs "
        "of --factor slices along --axis: the slices left over are dropped at the same physical end of the scan "
        "whatever its storage order, and the table and JSON say which. Every method reconstructs onto the cropped "
        "reference's own grid. A gantry-tilted DICOM reference is first resampled onto a regular grid (linear "
        "in-plane, air beyond each slice's field of view), so part of what is scored is then interpolated; the "
        "warning is recorded in the JSON.",
    )
    p.add_argument(
        "--reference", required=True, nargs="+", metavar="REFERENCE",
        help="thin-slice CT(s): files (NIfTI, NRRD, MHA), DICOM series folders, sample names, a folder holding any "
        "of these (searched recursively), or a text file listing one per line; one volume gives today's JSON, "
        "several give {\"volumes\": [...], \"aggregate\": {...}} with the mean and SD over them",
    )  # fmt: skip
    p.add_argument(
        "--reference-series", type=series_choice_arg, default=None, metavar="N|UID",
        help="the series to score from a DICOM folder --reference that holds several (a study exported from a "
        "PACS: e.g. a 1 mm and a 5 mm series of one scan): its SeriesNumber N or its SeriesInstanceUID (or the "
        "UID's last components, unique in the folder); default: the largest CT series, an acquired one before a "
        "derived or synthetic one. With several references it applies to every DICOM folder; a volume file is "
        "refused with it",
    )  # fmt: skip
    p.add_argument("--factor", type=int, required=True, help="slices per thick slab (2..8)")
    p.add_argument("--axis", default="z", choices=("z", "y", "x"), help="array axis to degrade (default z)")
    p.add_argument(
        "--degradation", default="slab", choices=("slab", "decimate"),
        help="slab (default): each thick slice is the mean of its k thin slices, the slice profile of a thick "
        "reconstruction; decimate: each keeps one thin slice, index (k-1)//2 of its slab. cubic+dc, sr and "
        "sr+adapt assume slab averaging (the network was trained on it, and their data-consistency step "
        "enforces it), so they are refused with decimate",
    )  # fmt: skip
    p.add_argument(
        "--methods", action=NameList, default=("nearest", "linear", "cubic"),
        help="methods, comma- or space-separated: nearest, linear, cubic, cubic+dc (cubic then the data-consistency step "
        "that sr uses), sr (the weights as they are: sr --no-adapt), sr+adapt (adapted to the thick input "
        "first, what the sr command does by default; --adapt / --adapt-steps change how long)",
    )
    p.add_argument(
        "--slices", type=int, nargs=2, default=None, metavar=("START", "STOP"),
        help="evaluate only reference slices START..STOP-1 along --axis (e.g. a held-out test region); then cut "
        "to whole slabs",
    )
    p.add_argument("--weights", default=None, help="weights name or file for model methods (sr)")
    p.add_argument("--allow-unregistered-weights", action="store_true", help="accept a weights file that is in no registry (only files you trust)")
    p.add_argument("--estimate", choices=("mean", "sample"), default=None, help="sr: the posterior mean (one step; the weights' default) or a posterior sample")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps for model methods (sr: implies --estimate sample)")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N (model methods)")
    p.add_argument(
        "--seed", type=seed_number, default=0,
        help="random seed of the model methods: sr+adapt's adaptation pairs and order (its figures move a little "
        "with the seed) and sr's sampling with --estimate sample; sr's posterior mean (the default) does not use it",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=bounded_int(0), default=0,
        help="CPU threads of torch (0: torch's default, from OMP_NUM_THREADS or the cores); sr+adapt's figures "
        "are reproducible for the same seed, device and thread count; recorded in the JSON",
    )  # fmt: skip
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    p.add_argument(
        "--save-volumes", default=None, metavar="DIR",
        help="also write the cropped reference (reference.nii.gz), the simulated thick input (thick.nii.gz) and "
        "each method's reconstruction (METHOD.nii.gz, float32, with a provenance sidecar) into DIR (created; one "
        "subfolder per volume when there are several)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing JSON file and saved volumes")
    add_adapt_arguments(p)
    add_progress_argument(p)
    p.set_defaults(func=run)


def check_scores(results: list[dict], what: str) -> None:
    """Refuse an evaluation in which a method scored NaN (its reconstruction held NaN voxels): such a row would
    be written as ``null`` and read as a result. An infinite PSNR (an exact reconstruction) is kept.

    Raises:
        NumericalError: exit code 1; nothing is printed or written.
    """
    for row in results:
        bad = [k for k, v in row.items() if isinstance(v, float) and math.isnan(v)]
        if bad:
            label = row.get("method", "?") + (f" (stage {row['stage']})" if "stage" in row else "")
            raise NumericalError(
                f"{what}: method {label} scored NaN ({', '.join(bad)}): its result failed numerically; nothing "
                "was written. Check the weights and options; if they are right, report it (on the command line, --debug shows the traceback)."
            )


def reference_sources(items: list[str]) -> tuple[bool, list[Path]]:
    """``(several?, the volumes)`` named by ``--reference``: one volume file, DICOM series or sample name is one
    reference; several items, a folder of volumes or a list file are several (as ``sr`` and ``train --data``
    take them: :func:`~DiffusionCore.inputs.collect_volumes`)."""
    from ..inputs import collect_volumes
    from ..sampledata import sample_or_path
    from .sr import batch_sources

    if len(items) > 1:
        return True, collect_volumes(items)
    return batch_sources(sample_or_path(items[0], "ct").expanduser())


@contextmanager
def logged_warnings() -> Iterator[list[str]]:
    """The warnings DiffusionCore logs inside the block (a gantry tilt resampled, a thick reference, ...), for the
    report; they are printed as usual."""
    said: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    handler = _Keep(logging.WARNING)
    root = logging.getLogger("DiffusionCore")
    root.addHandler(handler)
    try:
        yield said
    finally:
        root.removeHandler(handler)


def saved_volume_files(folder: Path, methods: list[str]) -> dict[str, Path]:
    """What ``--save-volumes`` writes for one volume into ``folder``: name -> file."""
    return {name: folder / f"{name}.nii.gz" for name in ("reference", "thick", *methods)}


def check_save_folder(folder: Path, files: list[Path], overwrite: bool) -> None:
    """Refuse, before any work, a ``--save-volumes`` folder that cannot be made or holds the files already.

    Raises:
        OutputError / OutputExistsError: exit code 4.
    """
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--save-volumes {folder} is a file: give a folder to write the volumes into")
    if not folder.exists() and not folder.parent.is_dir():
        raise OutputError(f"--save-volumes: the folder {folder.parent} does not exist; create it first")
    for f in files:
        for p in (f, sidecar_path(f)):
            if p.exists() and not overwrite:
                raise OutputExistsError(p)



class VolumeSaver:
    """``keep`` for :func:`~DiffusionCore.evaluate.evaluate`: writes each volume as soon as it exists (atomic
    float32 NIfTI; the simulated input and the reconstructions with a provenance sidecar, the reference crop as it
    is). A model method's sidecar is completed by :meth:`record_details` once the evaluation has its record (the
    device it ran on, its threads, the adaptation steps it ran), as ``sr`` records them.

    Args:
        files: what to write, name -> path (:func:`saved_volume_files`).
        source: the reference's file (recorded as an absolute path).
        settings: the evaluation's settings (factor, axis, degradation, slices, seed).
        weights: the model methods' weights (name or file), as their provenance names them.
    """

    def __init__(self, files: dict[str, Path], source: str | Path, settings: dict[str, Any], overwrite: bool,
                 weights: str = "") -> None:  # fmt: skip
        self.files, self.settings, self.overwrite, self.weights = files, settings, overwrite, weights
        self.source = os.path.abspath(source)
        self.written: list[str] = []
        self.provenance: dict[str, Provenance] = {}

    def __call__(self, name: str, vol: Volume) -> None:
        from ..results import write_result
        from ..volume import write_volume

        path = self.files[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "reference":  # measured data, cropped: no provenance (it is not synthetic)
            write_volume(vol, path, overwrite=self.overwrite, dtype="float32")
        else:
            what = (f"thick input x{self.settings['factor']} {self.settings['degradation']} (simulated)" if name == "thick"
                    else f"{name} x{self.settings['factor']} from simulated thick slices (synthetic)")  # fmt: skip
            prov = Provenance(
                task="evaluate", title=what, weights=self.weights if name in MODEL_METHODS else "",
                weights_sha256=str(vol.metadata.get("weights_sha256", "")), settings={**self.settings, "method": name},
                input=self.source,
            )  # fmt: skip
            write_result(vol, path, prov, overwrite=self.overwrite, dtype="float32")
            self.provenance[name] = prov
        self.written.append(str(path))

    def record_details(self, method_details: dict[str, dict[str, Any]]) -> None:
        """Complete the sidecars written: a model volume's with what its method reported (the evaluation's
        ``method_details``: the weights as named, and :data:`~DiffusionCore.evaluate.MODEL_SETTINGS`), each with the name of its volume
        (:func:`~DiffusionCore.provenance.sidecar_record`)."""
        for name, prov in self.provenance.items():
            details = method_details.get(name)
            if details:
                prov.weights = str(details.get("weights") or prov.weights)
                prov.weights_sha256 = str(details.get("weights_sha256") or prov.weights_sha256)
                prov.settings = {**prov.settings, **{k: details.get(k) for k in MODEL_SETTINGS if k in details}}
                prov.environment = environment(str(prov.settings.get("device") or ""))  # its GPU, where it ran on one
            write_json_atomic(sidecar_record(prov, self.files[name]), sidecar_path(self.files[name]), overwrite=True)


def _model_summary(report: dict) -> dict[str, Any]:
    """The device the methods ran on and, when a model method ran (``method_details``), its weights, their sha256
    and the adaptation's record (``requested``: the budget asked for; ``steps``, ``seconds``, the check batch's
    ``loss_before`` / ``loss_after`` and ``gain_before_db`` / ``gain_after_db`` over cubic)."""
    details = report.get("method_details", {})
    ran = [details[m] for m in MODEL_METHODS if m in details]
    if not ran:
        return {"device": "cpu"}  # interpolation and the consistency step run in numpy
    out: dict[str, Any] = {"weights": ran[0].get("weights"), "weights_sha256": ran[0].get("weights_sha256"),
                           "device": ran[0].get("device")}  # fmt: skip
    if "sr+adapt" in details:
        out["adaptation"] = {"requested": details["sr+adapt"].get("adapt"), **(details["sr+adapt"].get("adaptation") or {})}
    return out


#: How a user of ``evaluate`` chooses the series of a DICOM folder that holds several (said with the folder's series).
REFERENCE_SERIES_HOW = "pass --reference-series N (its SeriesNumber) or its SeriesInstanceUID"


def _series_for(path: Path, series: int | str | None) -> int | str | None:
    """``--reference-series`` for one of several references: it names a series of each DICOM folder, and is not
    passed to a volume file among them (one reference that is a file is refused with it by :func:`read_volume`)."""
    return series if path.is_dir() else None


def _read_reference(path: Path, series: int | str | None = None) -> tuple[Volume, list[str]]:
    """One reference and the warnings said while reading it (a synthetic input, a gantry tilt resampled, ...);
    ``series``: ``--reference-series``, the series of a DICOM folder to read (:func:`~DiffusionCore.read_volume`)."""
    with logged_warnings() as said:
        vol = read_volume(path, series=series, how_to_choose=REFERENCE_SERIES_HOW)
        warning = synthetic_input_warning(path, vol.metadata.get("series_uid"))  # of the series read
        if warning:
            logger.warning("%s", warning)
    return vol, said


#: ``evaluate``'s peak memory per scored voxel (the reference cut to --slices and to whole slabs): the reference, its
#: SSIM moments and body mask, the thick input, one method's reconstruction and the scores' scratch; with a model
#: method (sr, sr+adapt) its run's working memory too. Measured (2026-12-07, probe 46 follow-up) as the whole
#: process's peak RSS (``/usr/bin/time -v``) on 512x512 slices of a 1.25 mm chest CT, --factor 4, 1 thread, at 64 and
#: 192 slices (16.8 and 50.3 million voxels): 767 MB and 1.60 GB with cubic (25.4 bytes per voxel between the two),
#: 965 MB and 1.87 GB with cubic and sr (27.5). The figures here are those plus about 12 %.
EVALUATE_BYTES_PER_VOXEL = 28
EVALUATE_MODEL_BYTES_PER_VOXEL = 31
#: What an evaluation needs whatever the reference's size, the process itself included (the same runs: 340 MB with
#: cubic, 527 MB with cubic and sr, where the two lines above meet zero voxels), so that the estimate is never below
#: the whole process's measured peak.
EVALUATE_FIXED_BYTES = 640 * 2**20


#: What ``--save-volumes`` adds per voxel: the float32 copy a volume is written from.
SAVE_BYTES_PER_VOXEL = 4


def evaluate_bytes(voxels: int, methods: list[str], saving: bool = False) -> int:
    """Peak memory of an ``evaluate`` process scoring ``methods`` on ``voxels`` reference voxels (after the crop),
    ``saving`` them (``--save-volumes``) or not."""
    per_voxel = EVALUATE_MODEL_BYTES_PER_VOXEL if any(m in MODEL_METHODS for m in methods) else EVALUATE_BYTES_PER_VOXEL
    return int(voxels) * (per_voxel + (SAVE_BYTES_PER_VOXEL if saving else 0)) + EVALUATE_FIXED_BYTES


def check_evaluate_memory(path: Path, name: str, args: argparse.Namespace, methods: list[str]) -> None:
    """Refuse, before the reference ``path`` is read, an evaluation whose peak memory (:func:`evaluate_bytes`, from
    the file's header and ``--slices``) exceeds ``$DIFFUSIONCORE_MEMORY_LIMIT`` or the free memory, saying what
    fits. Nothing is checked where the header does not tell the grid (a DICOM series:
    :func:`~DiffusionCore.volume.header_grid`) or ``--slices`` leaves the volume (the crop then says so); reading
    the file checks its own size.

    Raises:
        ResourceError: the estimate does not fit; the message names it, the limit, the slices that fit and what the
            methods without a model need.
    """
    from ..files import check_memory_for, host_available_memory, memory_limit_from_env
    from ..volume import axis_index, header_grid

    grid = header_grid(path)
    if grid is None or args.factor < 1:
        return
    ax = axis_index(args.axis)
    shape = list(grid.shape)
    start, stop = args.slices if args.slices is not None else (0, shape[ax])
    if not 0 <= start < stop <= shape[ax]:
        return
    shape[ax] = (stop - start) // args.factor * args.factor  # cut to whole slabs
    if shape[ax] < 1:  # not one slab: evaluate says so
        return
    plane = math.prod(shape) // shape[ax]
    saving = bool(args.save_volumes)
    needed = evaluate_bytes(math.prod(shape), methods, saving)
    available = memory_limit_from_env() or host_available_memory()
    if needed <= available:
        return
    per_slice = evaluate_bytes(plane, methods, saving) - EVALUATE_FIXED_BYTES
    fit = (available - EVALUATE_FIXED_BYTES) // per_slice // args.factor * args.factor if per_slice else 0
    ways = []
    if fit >= args.factor:
        ways.append(f"score fewer slices (--slices {start} {start + fit}: {fit} of them along {'zyx'[ax]} need about "
                    f"{format_bytes(evaluate_bytes(fit * plane, methods, saving))})")
    else:
        ways.append("score a smaller reference (crop it in-plane, or fewer --slices)")
    model = [m for m in methods if m in MODEL_METHODS]
    rest = [m for m in methods if m not in MODEL_METHODS]
    if model and rest:  # the model methods need the most: the others alone, on these slices
        ways.append(f"fewer methods (without {', '.join(model)}: about "
                    f"{format_bytes(evaluate_bytes(math.prod(shape), rest, saving))})")
    check_memory_for(
        needed,
        f"evaluating {name} ({'x'.join(map(str, shape))} voxels scored, methods {', '.join(methods)})",
        ", or ".join(ways),
    )


def _evaluate_one(path: Path, series: int | str | None, name: str, args: argparse.Namespace, methods: list[str],
                  options: dict, saver: VolumeSaver | None, progress) -> dict:  # fmt: skip
    """One reference read, cropped and scored: its report, with the slice indices of the file and its warnings.
    Its memory is checked from its header first (:func:`check_evaluate_memory`); the volume read is let go once
    cropped to ``--slices`` (the crop is a copy: a view would keep the whole volume in memory while it is scored)."""
    check_evaluate_memory(path, name, args, methods)
    ref, read_warnings = _read_reference(path, series)
    start = 0
    if args.slices is not None:
        try:
            ref = crop_slices(ref, args.axis, *args.slices)
        except InputError as exc:
            raise InputError(f"{name}: {exc}") from None
        start = args.slices[0]
    with logged_warnings() as said:
        report = evaluate(
            ref, args.factor, axis=args.axis, degradation=args.degradation, methods=methods, method_options=options,
            reference_name=name, progress=progress, keep=saver,
        )  # fmt: skip
    if ref.metadata.get("series_uid"):  # a DICOM reference: the series scored (--reference-series, or the default)
        report["reference_series_uid"] = ref.metadata["series_uid"]
    report["slices_requested"] = list(args.slices) if args.slices is not None else None
    report["slices_scored"] = [s + start for s in report["slices_scored"]]  # indices of the file, not of the crop
    report["slices_dropped"] = [s + start for s in report["slices_dropped"]]
    report["warnings"] = list(dict.fromkeys([*read_warnings, *report["warnings"], *said]))
    report.update(_model_summary(report))
    if saver is not None:
        saver.record_details(report["method_details"])
        report["saved_volumes"] = list(saver.written)
    check_scores(report["results"], f"evaluate {name}")
    return report


def run(args: argparse.Namespace) -> int:
    from ..files import keep_freed_memory

    keep_freed_memory()  # a one-shot process: the model's buffers are reused, not mapped afresh

    from ..sr import pipeline  # noqa: F401  (registers the model methods: sr, sr+adapt, cubic+dc)

    methods = list(args.methods)
    adapt = adapt_settings(args)
    if "sr+adapt" in methods and adapt is None:
        raise ConfigError(
            "the method sr+adapt adapts the model, but --no-adapt (or --adapt 0) turns adaptation off: drop one "
            "of them (the method sr is the weights without adaptation)"
        )
    for m in methods:  # before any volume is read
        get_method(m)
        check_method_fits(m, args.degradation)
    set_torch_threads(args.threads)
    several, sources = reference_sources(list(args.reference))
    names = [str(p) for p in sources] if several else [str(args.reference[0])]
    save_root = Path(args.save_volumes) if args.save_volumes else None
    save_files: list[dict[str, Path]] = []
    if save_root is not None:
        from .batch import batch_output_names  # the names sr gives a batch's outputs: one folder each here

        stems = [split_volume_suffix(n)[0] for n in batch_output_names(sources)] if several else [""]
        folders = [save_root / stem for stem in stems]
        save_files = [saved_volume_files(f, methods) for f in folders]
    planned = [("--save-volumes", p) for files in save_files for p in files.values()]
    refuse_overwriting_inputs([*args.reference, *sources, args.weights], [("--json", args.json_out), *planned])
    if args.json_out:
        check_writable_file(args.json_out, overwrite=args.overwrite)
    if save_root is not None:
        check_save_folder(save_root, [p for _, p in planned], args.overwrite)
    weights = ""
    if any(m in MODEL_METHODS for m in methods):  # the weights before any volume is read or degraded
        from ..sr.pipeline import default_weights_name
        from ..weights.registry import check_weights

        weights = args.weights or default_weights_name()
        check_weights(weights, family="sr", allow_unregistered=args.allow_unregistered_weights)
    options = {
        "weights": args.weights, "estimate": args.estimate, "num_steps": args.num_steps, "device": args.device,
        "seed": args.seed, "allow_unregistered": args.allow_unregistered_weights, "adapt": adapt,
    }
    shared = {"seed": args.seed, "device_requested": args.device, "threads_requested": args.threads}
    progress = Progress(args.progress, desc="evaluate")
    reports: list[dict] = []
    said_all: list[str] = []
    passed_over: list[dict[str, str]] = []  # several references: the volumes that could not be scored, and why
    # the --save-volumes folders this run makes (on its first write): removed again if the run fails before
    # writing into them (a full disk, a reference that cannot be read), subfolders first
    folders_used = [p.parent for files in save_files for p in files.values()] + ([save_root] if save_root else [])
    created = [f for f in dict.fromkeys(folders_used) if not f.exists()]
    try:
        if not several:
            saver = (VolumeSaver(save_files[0], sources[0], _save_settings(args), args.overwrite, weights)
                     if save_files else None)  # fmt: skip
            reports.append(_evaluate_one(sources[0], args.reference_series, names[0], args, methods, options, saver,
                                         progress))  # fmt: skip
        else:
            n = len(sources)
            for i, path in enumerate(sources):

                def overall(done: int, total: int, message: str, _i: int = i, _p: Path = path) -> None:
                    progress(_i * total + done, n * total, f"{_p.name}: {message}")

                saver = (VolumeSaver(save_files[i], path, _save_settings(args), args.overwrite, weights)
                         if save_files else None)  # fmt: skip
                try:
                    reports.append(_evaluate_one(path, _series_for(path, args.reference_series), str(path), args,
                                                 methods, options, saver, overall))  # fmt: skip
                except InputError as exc:  # this volume's own problem (unreadable, too small, --slices beyond it)
                    why = str(exc).removeprefix(f"{path}: ")
                    logger.warning("passed over %s: %s", path, why)
                    passed_over.append({"volume": str(path), "why": why})
                    said_all.append(f"passed over {path}: {why}")
                    continue
                said_all.extend(reports[-1]["warnings"])
            if not reports:
                raise InputError(
                    f"none of the {n} references could be scored: "
                    + "; ".join(f"{p['volume']}: {p['why']}" for p in passed_over)
                )
    except BaseException:
        remove_if_empty(created)
        raise
    finally:
        progress.close()
    if not several:
        out = {**reports[0], **shared}
    else:
        agg = aggregate(reports)
        common = {k: reports[0][k] for k in ("factor", "axis", "degradation", "hu_range", "null_scores", "body_mask")}
        common["body_mask"] = {"definition": common["body_mask"]["definition"]}
        env = {k: reports[0][k] for k in ("date", "diffusioncore_version", "torch_version", "python_version",
                                            "torch_threads")}  # fmt: skip
        models = {k: reports[0][k] for k in ("weights", "weights_sha256", "device") if k in reports[0]}
        out = {**common, **env, **shared, **models, "slices_requested": reports[0]["slices_requested"],
               "warnings": list(dict.fromkeys(said_all)), "volumes": reports, "passed_over": passed_over,
               "aggregate": agg}  # fmt: skip
    if args.json_out:  # written before the tables: the scores are kept whatever happens to the printing
        write_json_atomic(out, args.json_out)
    for report in reports:
        print(format_table(report))
    if several:
        print(format_aggregate(out["aggregate"]))
        for p in passed_over:
            print(f"passed over {p['volume']}: {p['why']}")
    return 0


def _save_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"factor": args.factor, "axis": args.axis, "degradation": args.degradation, "slices": args.slices,
            "seed": args.seed}  # fmt: skip
