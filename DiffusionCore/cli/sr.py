"""``sr``: thick-slice CT in, thin-slice CT out (one volume, or a folder / list of volumes).

Every output path is checked before any work starts; outputs are written atomically at the end, so a
failed, cancelled or killed run leaves no partial file. Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set)
the volumes of a batch are shared out across the processes, each on its own GPU (``LOCAL_RANK``); the
volumes are independent, so no process group is joined.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..devices import DistInfo, process_info, shard_list
from ..dicom_out import check_dicom_geometry
from ..errors import ConfigError, GeometryError, InputError, OutputError
from ..files import (
    check_writable_file,
    current_rss_bytes,
    format_bytes,
    keep_freed_memory,
    refuse_overwriting_inputs,
    write_json_atomic,
)
from ..provenance import Provenance, sr_label, synthetic_input_warning
from ..results import (
    OUTPUT_FORMATS,
    check_result_output,
    dicom_source_for,
    planned_outputs,
    wants_dicom,
    write_result,
)
from ..sampledata import sample_or_path
from ..tiling import parse_memory_size
from ..volume import (
    WRITABLE_SUFFIXES,
    axis_index,
    check_ct,
    check_output_geometry,
    check_output_path,
    mark_ct_checked,
    read_volume,
    require_ct,
    split_volume_suffix,
)
from .common import (
    Progress,
    adapt_settings,
    add_adapt_arguments,
    add_progress_argument,
    check_result,
    device_name,
    finite_float,
    result_range,
    sigterm_cancels,
)

if TYPE_CHECKING:
    import torch

    from ..sr.settings import SRRunSettings

logger = logging.getLogger(__name__)

#: Suffixes kept for outputs; others map to a writable one (DICOM folders become NIfTI).
_OUTPUT_SUFFIX = {".mhd": ".mha", ".nhdr": ".nrrd"}
_DEFAULT_OUTPUT_SUFFIX = ".nii.gz"
#: --guidance-scale: 0 = unconditional, 1 = off; larger values exaggerate the condition (the Slicer module's
#: range too). Checked when the command line is parsed: a NaN or huge scale gives an all-NaN volume.
GUIDANCE_SCALE_RANGE = (0.0, 10.0)
#: The standard-deviation map (--uncertainty) is checked against this range (HU) before it is written.
UNCERTAINTY_HU_RANGE = (0.0, 32767.0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sr",
        help="super-resolve thick-slice CT to thin slices",
        description="Super-resolve a thick-slice CT along its thick axis: cubic interpolation plus a learned "
        "through-plane predictor (first adapted to this scan's own in-plane detail; --no-adapt skips that), "
        "refined by a latent diffusion "
        "model when the weights have one, then made consistent with the input. "
        "INPUT is a volume (NIfTI, NRRD, MHA, or a DICOM series folder), a folder of volumes, or a text file "
        "listing volumes (one per line); for several volumes OUTPUT is a folder and the names are kept. "
        "The result is synthetic: it is the model's estimate, not measured data.",
    )
    p.add_argument("input", metavar="INPUT", help="volume file, DICOM series folder, folder of volumes, or list file")
    p.add_argument("output", metavar="OUTPUT", help="output volume (.nii.gz, .nii, .nrrd, .mha), or a folder (batch)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--factor", type=int, default=None, help="slices per thick slice, 2..8 (default: from spacing)")
    size.add_argument("--target-spacing", type=finite_float(0.0, low_open=True), default=None, metavar="MM", help="output slice spacing in mm")
    p.add_argument("--axis", choices=("z", "y", "x"), default=None, help="thick axis (default: from the spacing)")
    p.add_argument("--weights", default=None, metavar="NAME_OR_FILE", help="registered SR weights name or .safetensors file (default: the installed default)")
    p.add_argument("--vae-checkpoint", default=None, metavar="FILE", help="VAE weights file (with --diffusion-checkpoint)")
    p.add_argument("--diffusion-checkpoint", default=None, metavar="FILE", help="diffusion weights file (with --vae-checkpoint)")
    p.add_argument("--allow-unregistered-weights", action="store_true", help="accept a weights file that is in no registry (only files you trust)")
    p.add_argument("--estimate", choices=("mean", "sample"), default=None, help="mean: the posterior mean, one network evaluation per patch, deterministic, the closest to the true thin slices on average (default for ResShift weights); sample: a draw from the posterior through --num-steps steps, with plausible fine texture but more squared error (up to twice)")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps of --estimate sample (giving it implies sample; default: the weights' own, e.g. 4)")
    p.add_argument("--guidance-scale", type=finite_float(*GUIDANCE_SCALE_RANGE), default=None, help="classifier-free guidance scale, 0..10, 1.0 = off (default: the weights' own)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--use-patches", action="store_true", help="use --patch-size/--overlap (patches are always used for volumes larger than one patch; default 32x256x256, overlap 8x64x64)")
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"), help="patch size on the thin grid (D along the thick axis); smaller when memory is short")
    p.add_argument("--overlap", type=int, nargs=3, default=None, metavar=("D", "H", "W"), help="overlap between patches")
    p.add_argument("--memory-limit", default=None, metavar="SIZE", help="cap on the working memory the run plans, e.g. 4GiB (default: $DIFFUSIONCORE_MEMORY_LIMIT, else the free memory): the volumes and patches, whose estimate must fit (patches shrink to fit, or the run stops with the estimate); the process itself (Python, PyTorch and the weights, about 0.3-0.5 GB on CPU) comes on top")
    p.add_argument("--allow-non-ct", action="store_true", help="run on a volume whose intensities do not look like CT in HU (e.g. a CT cropped inside the body); the model is trained on CT only")
    p.add_argument("--tile-batch", type=int, default=None, metavar="N", help="patches per model call (default: 1 on the CPU, as many as fit (up to 8) on a GPU)")
    p.add_argument("--num-samples", type=int, default=1, help="average N posterior samples (implies --estimate sample); with --uncertainty also write their per-voxel standard deviation")
    p.add_argument("--uncertainty", default=None, metavar="OUT", help="write the per-voxel standard deviation (HU) here (a folder for a batch); needs --num-samples 2 or more")
    p.add_argument("--no-data-consistency", action="store_true", help="skip the correction that makes the output, thickened again, reproduce the input")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same device: same output)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--output-dtype", choices=("float32", "int16"), default="float32", help="voxel type of the output file (default float32; a DICOM series is always int16 HU)")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="auto", help="dicom: write OUTPUT as a folder holding a DICOM series labelled synthetic (for a batch: one series folder per input); file: NIfTI, NRRD or MHA by OUTPUT's suffix; auto (default): a DICOM series when the input is DICOM and OUTPUT has no volume-file suffix, else a file")
    p.add_argument("--report", default=None, metavar="JSON", help="write settings, timings, memory and the weights' sha256 as JSON")
    p.add_argument("--tiny-test-model", action="store_true", help=argparse.SUPPRESS)  # random weights: meaningless images
    add_adapt_arguments(p)
    add_progress_argument(p)
    p.set_defaults(func=run)


@dataclass
class Job:
    """One volume of a run: where it comes from and where its results go."""

    source: Path
    output: Path
    uncertainty: Path | None
    as_dicom: bool = False


def _output_name(source: Path) -> str:
    name = source.name
    lower = name.lower()
    if source.is_dir():
        return name + _DEFAULT_OUTPUT_SUFFIX
    for suffix in WRITABLE_SUFFIXES:
        if lower.endswith(suffix):
            return name
    for old, new in _OUTPUT_SUFFIX.items():
        if lower.endswith(old):
            return name[: -len(old)] + new
    return Path(name).stem + _DEFAULT_OUTPUT_SUFFIX


def batch_output_names(sources: list[Path]) -> list[str]:
    """Output file names for a batch: the input names (DICOM folders -> ``<folder>.nii.gz``); names that
    occur twice get their folders relative to the common parent, joined with ``_``."""
    names = [_output_name(s) for s in sources]
    if len(set(names)) == len(names):
        return names
    root = Path(os.path.commonpath([str(s.resolve().parent) for s in sources]))
    out = []
    for s, n in zip(sources, names):
        rel = s.resolve().parent.relative_to(root).parts
        out.append("_".join((*rel, n)) if Counter(names)[n] > 1 else n)
    if len(set(out)) != len(out):
        dup = [n for n, c in Counter(out).items() if c > 1]
        raise InputError(f"several inputs would be written to the same output name ({', '.join(dup)}); rename them")
    return out


def batch_sources(path: Path) -> tuple[bool, list[Path]]:
    """(batch?, sources) for INPUT: a volume file, a DICOM file or a DICOM series folder is one volume; a
    folder of volumes or a list file (:data:`~DiffusionCore.inputs.LIST_SUFFIXES`: .txt, .lst, .list, .csv) is a
    batch. Other files are read as one volume (so that an unsupported file gets the reader's explanation)."""
    from ..inputs import LIST_SUFFIXES, collect_volumes, dicom_file_series, is_dicom_file

    if not path.exists():
        raise InputError(f"{path} does not exist. Check the path (and quote it if it contains spaces).")
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return True, collect_volumes(path)
        if is_dicom_file(path):
            return False, [dicom_file_series(path)]
        return False, [path]
    sources = collect_volumes(path)
    if sources == [path]:
        return False, [path]  # the folder is itself a DICOM series
    return True, sources


def _check_uncertainty_args(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be 1 or more; got {args.num_samples}")
    if args.uncertainty and args.num_samples < 2:
        raise ConfigError("--uncertainty needs --num-samples 2 or more (the spread of several samples)")
    if (args.vae_checkpoint is None) != (args.diffusion_checkpoint is None):
        raise ConfigError("give both --vae-checkpoint and --diffusion-checkpoint, or neither")
    if args.tiny_test_model and (args.weights or args.vae_checkpoint):
        raise ConfigError("--tiny-test-model cannot be combined with --weights or checkpoints")


def _check_folder(folder: Path, what: str) -> bool:
    """Make sure a batch's output folder exists and is writable; True when this call created it."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file; for several volumes the {what} must be a folder.")
    created = not folder.exists()
    if created:
        if not folder.parent.is_dir():
            raise OutputError(f"the folder {folder.parent} does not exist; create it first.")
        try:
            folder.mkdir(exist_ok=True)  # under torchrun every process checks it
        except OSError as exc:
            raise OutputError(f"cannot create the {what} folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK):
        raise OutputError(f"the {what} folder {folder} is not writable; choose another.")
    return created


def _refuse_file_name_for_batch(folder: Path | None, what: str, count: int) -> None:
    """A batch writes into folders: a name such as ``out.nii.gz`` would become a folder of that name, into
    which a later single-volume run would then write without a word."""
    if folder is not None and not folder.is_dir() and split_volume_suffix(folder.name)[1]:
        raise OutputError(
            f"the input is a batch (a folder or list of volumes: {count} found), so the {what} must be a folder, and "
            f"{folder.name} is a volume file's name: give a folder (it is created), or one volume file as INPUT"
        )


def _input_files(args: argparse.Namespace) -> list[str | None]:
    """Files the command reads besides the volumes: INPUT itself (a list file) and weights files."""
    return [args.input, args.weights, args.vae_checkpoint, args.diffusion_checkpoint]


def plan_jobs(args: argparse.Namespace, info: DistInfo) -> tuple[bool, list[Job], list[Path]]:
    """The volumes this process handles (its share under torchrun) and their output paths, all checked
    before any work: no output, uncertainty map or report may be an input (every planned output against
    every input, whatever --overwrite says), and each must be writable. Also returns the batch folders it
    created (removed again if no volume is written).

    Raises:
        InputError: INPUT missing or holding no volumes. OutputError: an output cannot be written.
    """
    given = sample_or_path(args.input, "ct")  # a path, or a CT sample's name (chest-dx)
    batch, sources = batch_sources(given)
    out = Path(args.output)
    if batch and len(sources) == 1 and given.is_dir() and not out.is_dir() and split_volume_suffix(out.name)[1]:
        # a patient's folder that holds one CT series (beside a scout or a structure set) and a volume file as
        # OUTPUT: that one volume, as evaluate --reference takes the same folder
        logger.info("%s holds one CT volume, %s: super-resolving it into %s", given, sources[0], out)
        batch = False
    if not batch:
        as_dicom = wants_dicom(args.output_format, sources[0], out)
        if out.is_dir() and not as_dicom:
            out = out / _output_name(sources[0])
        unc = Path(args.uncertainty) if args.uncertainty else None
        if unc is not None and unc.is_dir():
            unc = unc / _output_name(sources[0])
        jobs = [Job(sources[0], out, unc, as_dicom)]
    else:
        names = batch_output_names(sources)
        unc_dir = Path(args.uncertainty) if args.uncertainty else None
        _refuse_file_name_for_batch(out, "output", len(sources))
        _refuse_file_name_for_batch(unc_dir, "--uncertainty", len(sources))
        as_dicom = args.output_format == "dicom"
        jobs = [Job(s, out / (_series_folder_name(n) if as_dicom else n), unc_dir / n if unc_dir else None, as_dicom)
                for s, n in zip(sources, names)]  # fmt: skip
    planned = [item for job in jobs for item in planned_outputs(job.output, job.as_dicom)]
    planned += [("--uncertainty", job.uncertainty) for job in jobs]
    refuse_overwriting_inputs([*_input_files(args), *sources], [*planned, ("--report", _report_file(args, info))])
    created = []
    if batch:  # the folders are created only once no output can hit an input
        created = [f for f, what in ((out, "output"), (unc_dir, "uncertainty")) if f is not None and _check_folder(f, what)]
    jobs = shard_list(jobs, info)
    for job in jobs:
        check_result_output(job.output, job.as_dicom, overwrite=args.overwrite)
        if job.uncertainty is not None:
            check_output_path(job.uncertainty, overwrite=args.overwrite)
    return batch, jobs, created


def _series_folder_name(file_name: str) -> str:
    """A batch's DICOM series folder for an input: its output file name without the volume suffix."""
    return split_volume_suffix(file_name)[0]


def sr_provenance(job_source: str | Path, volume_metadata: dict[str, Any], report: dict[str, Any]) -> Provenance:
    """The provenance of one ``sr`` result, from its report."""
    settings = report["settings"]
    spacing_xyz = settings.get("output_spacing_xyz_mm") or []
    axis = settings.get("axis")  # the thick axis: its output spacing is the new slice spacing
    thin = spacing_xyz[2 - axis_index(axis)] if axis is not None and len(spacing_xyz) == 3 else None
    title = f"{sr_label(settings.get('factor'), thin)} (synthetic)"
    return Provenance(
        task="sr", title=title, weights=str(settings.get("weights", "")),
        weights_sha256=str(report.get("weights_sha256", "")), settings=settings, input=str(job_source),
        input_uid=str(volume_metadata.get("series_uid", "")),
    )  # fmt: skip


def uncertainty_provenance(provenance: Provenance) -> Provenance:
    """The provenance of the uncertainty map that goes with an ``sr`` result (its title says what it is)."""
    return dataclasses.replace(provenance, title=provenance.title.replace(" (synthetic)", " uncertainty (synthetic)"))


def _report_file(args: argparse.Namespace, info: DistInfo) -> Path | None:
    """This process's --report path (one per process under torchrun), unchecked."""
    if not args.report:
        return None
    p = Path(args.report)
    if info.world_size > 1:
        p = p.with_name(f"{p.stem}.rank{info.rank}{p.suffix or '.json'}")
    return p


def _report_path(args: argparse.Namespace, info: DistInfo) -> Path | None:
    p = _report_file(args, info)
    if p is None:
        return None
    return check_writable_file(p, overwrite=args.overwrite)


def run_settings(args: argparse.Namespace, device: str | torch.device | None = None) -> SRRunSettings:
    """The :class:`~DiffusionCore.sr.settings.SRRunSettings` of the command line, checked (before any volume is
    read). ``device``: this process's device (its GPU under torchrun); default ``--device``.

    Raises:
        ConfigError: options that are out of range or contradict each other (a bad --memory-limit or --adapt too).
        GeometryError: both --factor and --target-spacing.
    """
    from ..sr.settings import SRRunSettings

    return SRRunSettings(
        factor=args.factor,
        target_spacing=args.target_spacing,
        axis=args.axis,
        steps=args.num_steps,
        guidance=args.guidance_scale,
        estimate=args.estimate,
        seed=args.seed,
        device=args.device if device is None else device,
        patch_size=args.patch_size,
        overlap=args.overlap,
        num_samples=args.num_samples,
        data_consistency=not args.no_data_consistency,
        memory_limit=parse_memory_size(args.memory_limit) if args.memory_limit else None,
        tile_batch=args.tile_batch,
        allow_non_ct=args.allow_non_ct,
        adapt=adapt_settings(args),
    )


def load_resolver(args: argparse.Namespace):
    """The SuperResolver chosen by --tiny-test-model, --vae/--diffusion-checkpoint, --weights or the default."""
    from ..sr.pipeline import SuperResolver, default_weights_name

    if args.tiny_test_model:
        logger.warning("--tiny-test-model: random weights for testing only; the output images are meaningless")
        return SuperResolver.tiny(seed=0)
    if args.vae_checkpoint:
        return SuperResolver.from_files(
            args.vae_checkpoint, args.diffusion_checkpoint, allow_unregistered=args.allow_unregistered_weights
        )
    name = args.weights or default_weights_name()
    return SuperResolver.from_pretrained(name, allow_unregistered=args.allow_unregistered_weights)


#: How this command names the options of :data:`~DiffusionCore.sr.pipeline.DIFFUSION_STAGE_SETTINGS`.
DIFFUSION_STAGE_FLAGS = {"guidance": "--guidance-scale", "patch_size": "--patch-size", "overlap": "--overlap",
                         "tile_batch": "--tile-batch"}  # fmt: skip


def tell_unused_options(args: argparse.Namespace, settings: SRRunSettings, resolver) -> None:
    """Say once, in one line, which options given on the command line the loaded weights leave unused (those of the
    diffusion stage, with weights that have none: :func:`~DiffusionCore.sr.pipeline.no_diffusion_stage_note`); else
    that --patch-size / --overlap without --use-patches use patches as asked."""
    from ..sr.pipeline import no_diffusion_stage_note

    unused = [DIFFUSION_STAGE_FLAGS[name] for name in resolver.unused_settings(settings)]
    if args.use_patches and not resolver.has_diffusion_stage:
        unused.insert(int(args.guidance_scale is not None), "--use-patches")  # in the order of --help
    if unused:
        logger.warning("%s", no_diffusion_stage_note(unused, str(resolver.weights_name or "")))
    elif (args.patch_size or args.overlap) and not args.use_patches:
        logger.info("--patch-size/--overlap given: using patches as requested")


class BatchProgress:
    """Maps each volume's ``progress(done, total)`` onto one bar over the whole batch (per mille units).

    The volume's reading (one call) shows as "reading NAME" where its part starts. The last ``write_share`` (by
    default :attr:`WRITE_SHARE`) of its part is the writing: a thin-slice volume of a few hundred MB takes seconds
    to tens of seconds to compress and write (a DICOM series longer), which the bar shows as "writing NAME" rather
    than sitting at "done".
    """

    SCALE = 1000
    #: The writing's share of each volume's part of the bar: chest-dx at x4 (256x512x512), one torch thread, with
    #: adaptation: the compressed .nii.gz took 14 s of 244 s (6%), the run 228 s. An uncompressed hand-off file (the
    #: Slicer batch CLI's) takes far less: give ``write_share``.
    WRITE_SHARE = 0.06

    def __init__(self, sink: Progress, n_volumes: int, write_share: float = WRITE_SHARE):
        self.sink = sink
        self.n = n_volumes
        self.index = 0
        self.write_share = float(write_share)

    def _tell(self, frac: float, message: str) -> None:
        prefix = f"volume {self.index + 1}/{self.n}: " if self.n > 1 else ""
        self.sink(int(round((self.index + frac) * self.SCALE)), self.n * self.SCALE, prefix + message)

    def __call__(self, done: int, total: int, message: str = "") -> None:
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        self._tell(frac * (1.0 - self.write_share), message)

    def before_run(self, message: str) -> None:
        """Say what happens before the volume's run (reading it, loading the weights): the start of its part."""
        self._tell(0.0, message)

    def after_run(self, message: str) -> None:
        """Say what happens between the run and the writing (checks of the result): the run's end."""
        self._tell(1.0 - self.write_share, message)

    def writing(self, path: Path) -> None:
        """Say that the volume's result is being written to ``path``."""
        self._tell(1.0 - self.write_share, f"writing {path.name}")

    def written(self) -> None:
        self._tell(1.0, "written")


def _json_report(job: Job, report: dict[str, Any], extra: dict[str, float]) -> dict[str, Any]:
    clean = {k: v for k, v in report.items() if k != "uncertainty"}
    clean["timings"] = {**report["timings"], **extra}
    return {"input": str(job.source), "output": str(job.output),
            "uncertainty": str(job.uncertainty) if job.uncertainty else None, **clean}


def _tell_memory_limit(report: dict[str, Any], limit: int, rss_before: int | None) -> None:
    """Say what ``--memory-limit`` covered when the process used more (the limit is a planning budget for the
    volumes and patches; the interpreter, PyTorch and the weights were there before), and record it."""
    memory = report.setdefault("memory", {})
    memory["limit_bytes"] = int(limit)
    memory["limit_covers"] = "the volumes and patches the run plans; not the Python process, PyTorch or the weights"
    memory["rss_before_bytes"] = rss_before
    peak = memory.get("peak_rss_bytes")
    if peak and peak > limit:
        before = f", of which {format_bytes(rss_before)} were in use before the work" if rss_before else ""
        logger.info("--memory-limit %s caps the working memory the run plans (volumes and patches); the process "
                    "peaked at %s%s (Python, PyTorch and the weights come on top of the limit)",
                    format_bytes(limit), format_bytes(peak), before)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    _check_uncertainty_args(args)
    info = process_info(args.device)  # its place in a torchrun launch; no group is joined
    settings = run_settings(args, info.device)  # option errors before any volume is read
    keep_freed_memory()  # a one-shot process: the network's buffers are reused, not mapped afresh
    batch, jobs, created = plan_jobs(args, info)
    report_path = _report_path(args, info)
    if info.world_size > 1:
        logger.info("process %d of %d: %d volume(s) on %s", info.rank, info.world_size, len(jobs), info.device)
    resolver = None  # loaded after the first volume is read: input problems are reported first
    memory_limit = settings.memory_limit

    cancel = threading.Event()

    # a terminate request (Slicer's Cancel, kill) stops between steps and writes nothing
    with sigterm_cancels(cancel, "sr"):
        sink = Progress(args.progress, desc="sr")
        progress = BatchProgress(sink, len(jobs))
        reports: list[dict[str, Any]] = []
        failures: list[str] = []
        try:
            for i, job in enumerate(jobs):
                progress.index = i
                t0 = time.perf_counter()
                progress.before_run(f"reading {job.source.name}")
                try:
                    volume = read_volume(job.source, check=False)  # checked here, naming the file, once
                    (check_ct if args.allow_non_ct else require_ct)(volume, str(job.source))
                    mark_ct_checked(volume)
                    warning = synthetic_input_warning(job.source)
                    if warning:
                        logger.warning("%s", warning)
                    if job.as_dicom:  # the input's headers and a grid DICOM can hold, checked before any work
                        check_dicom_geometry(volume)
                        dicom_source = dicom_source_for(job.source, volume.metadata.get("series_uid"))
                    else:
                        dicom_source = None
                        check_output_geometry(volume, job.output)  # a grid the format cannot hold: no work
                except (InputError, OutputError) as exc:
                    if not batch:
                        raise
                    failures.append(f"{job.source}: {exc}")
                    logger.warning("skipping %s: %s", job.source, exc)
                    continue
                t_read = time.perf_counter() - t0
                if resolver is None:
                    progress.before_run("loading the weights")
                    resolver = load_resolver(args)
                    tell_unused_options(args, settings, resolver)  # once, for the whole batch
                rss_before = current_rss_bytes()
                try:
                    output, report = resolver.run(volume, settings, progress=progress, cancel=cancel)
                except (GeometryError, InputError) as exc:
                    if not batch:
                        raise
                    failures.append(f"{job.source}: {exc}")
                    logger.warning("skipping %s: %s", job.source, exc)
                    continue
                if memory_limit is not None:
                    _tell_memory_limit(report, memory_limit, rss_before)
                t0 = time.perf_counter()
                progress.after_run("checking the result")
                std = report["uncertainty"] if job.uncertainty is not None else None
                check_result(output, f"the sr result for {job.source}",  # before any integer cast
                             hu_range=result_range(volume, args.allow_non_ct))
                if std is not None:  # a spread of 0 everywhere is an answer, not an empty result
                    check_result(std, f"the uncertainty map for {job.source}", hu_range=UNCERTAINTY_HU_RANGE,
                                 allow_constant=True)  # fmt: skip
                provenance = sr_provenance(job.source, volume.metadata, report)
                report["provenance"] = provenance.as_dict()
                progress.writing(job.output)
                write_result(output, job.output, provenance, as_dicom=job.as_dicom, dicom_source=dicom_source,
                             overwrite=args.overwrite, dtype=args.output_dtype)  # fmt: skip
                if std is not None:
                    write_result(std, job.uncertainty, uncertainty_provenance(provenance), overwrite=args.overwrite,
                                 dtype="float32")
                progress.written()
                t_write = time.perf_counter() - t0
                reports.append(_json_report(job, report, {"read": t_read, "write": t_write}))
                logger.info(
                    "%s -> %s (%s, %.1f s)", job.source, job.output,
                    "x".join(map(str, output.shape)), report["timings"]["total"] + t_read + t_write,
                )
        finally:
            sink.close()
    if report_path is not None:
        data = reports[0] if not batch and reports else {"volumes": reports, "failed": failures}
        write_json_atomic(data, report_path, overwrite=True)
    if failures and not reports and info.world_size == 1:  # nothing written: the folders this run made go again
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        every = "the batch's one volume" if len(jobs) == 1 else f"all {len(jobs)} volumes"
        raise InputError(f"{every} failed, nothing was written: " + "; ".join(failures))
    if failures:
        raise InputError(f"{len(failures)} of {len(jobs)} volumes failed (the others were written): " + "; ".join(failures))
    return 0
