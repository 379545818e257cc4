"""``sr``: thick-slice CT in, thin-slice CT out (one volume, or a folder / list of volumes).

Every output path is checked before any work starts; outputs are written atomically at the end, so a
failed, cancelled or killed run leaves no partial file. Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set)
the volumes of a batch are shared out across the processes, each on its own GPU (``LOCAL_RANK``); the
volumes are independent, and the processes join a Gloo group only to agree, once all have finished their shares,
on the batch's outcome and exit code.

A batch goes on past a volume that fails (unreadable, refused, over the memory budget, not writable), names it in
the closing lines and the ``--report``, and exits 7 when others were written; an input that is not for it (isotropic,
2D, not CT, an interspaced series) is passed over (listed apart, not a failure); an output the disk cannot take fails
alone, and a disk too full for any more stops it. One batch at a time writes into an output folder (a lock). The report is
written whatever happens (also on SIGTERM / Ctrl-C), and ``--skip-existing`` continues a batch: the names are a
function of the batch's inputs alone (:func:`~.batch.batch_output_names`). What a batch does beyond running one volume
is shared with ``xray2ct`` (:mod:`.batch`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..degrade import check_interspaced, plan_thin_grid
from ..devices import DistInfo, process_info, shard_list
from ..dicom_in import series_choice_arg
from ..dicom_out import check_dicom_geometry
from ..errors import (
    ConfigError,
    DiffusionCoreError,
    InputError,
    OutputError,
)
from ..files import (
    current_rss_bytes,
    format_bytes,
    keep_freed_memory,
    peak_rss_bytes,
    refuse_overwriting_inputs,
)
from ..provenance import Provenance, synthetic_input_warning
from ..results import (
    OUTPUT_FORMATS,
    check_room_for_result,
    dicom_source_for,
    named_patient_source,
    planned_files,
    planned_outputs,
    sr_provenance,
    write_result,
)
from ..sampledata import sample_or_path
from ..tiling import parse_memory_size
from ..volume import (
    Grid,
    Volume,
    check_ct,
    check_output_geometry,
    header_grid,
    mark_ct_checked,
    read_volume,
    require_ct,
)
from .batch import (
    BatchProgress,
    Job,
    KeptCheck,
    Plan,
    ProcessGroup,
    all_or_none,
    batch_jobs,
    check_batch_folder,
    check_outputs,
    named_twice_jobs,
    one_in_a_folder,
    plan_or_refuse,
    remove_if_empty,
    report_file,
    run_batch,
    run_one,
    single_job,
)
from .common import (
    MAX_SEED,
    SERIES_NUMBER_HELP,
    THREADS_HELP,
    adapt_settings,
    add_adapt_arguments,
    add_patient_arguments,
    add_progress_argument,
    bounded_int,
    check_dicom_patient,
    check_result,
    device_name,
    finite_float,
    result_range,
    seed_number,
    series_number_type,
    set_torch_threads,
    warn_taken_series_number,
)

if TYPE_CHECKING:
    import torch

    from ..sr.pipeline import SuperResolver
    from ..sr.settings import SRRunSettings

logger = logging.getLogger(__name__)

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
        "The result is synthetic: it is the model's estimate, not measured data. "
        "Batch names: each output is named after its input (a DICOM series folder S becomes S.nii.gz, a .mhd file "
        "a .mha, a .nhdr a .nrrd); inputs of the same name in different folders get their folders (from the folder they share) "
        "as a prefix joined with _ (sub1_case.nii.gz), inputs that differ only in their suffix keep it "
        "(x_nii.nii, x_nii_gz.nii.gz), and a name over 200 bytes is cut and ends in ~ and a hash of the full name; a later input whose name "
        "would clash with an output already made gets such a ~hash name, and the earlier output keeps its own. "
        "The same INPUT gives the same names, so the same command with --skip-existing continues a batch. One file "
        "named twice (a link, a path through ..) is done once. A volume that fails is named and the batch goes on; "
        "an input not for this command (isotropic, 2D, not CT, an interspaced series) is passed over; an output the disk cannot take fails "
        "alone, and a disk too full for any more stops the batch; a closing line counts what was written. One batch "
        "at a time writes into an OUTPUT folder. Exit codes: 0 every volume written (or skipped or passed over), 7 "
        "some failed and the others were written, 2 (or the failures' own code) none written, or every input passed "
        "over, 4 an output that cannot be written (refused before any work), a folder another batch is writing into, "
        "or a full disk (the batch stops), 130 cancelled (the outputs finished before are kept).",
    )
    p.add_argument("input", metavar="INPUT", help="volume file, DICOM series folder, folder of volumes, list file, or a CT sample name (chest-dx)")
    p.add_argument("output", metavar="OUTPUT", help="output volume (.nii.gz, .nii, .nrrd, .mha), or a folder (batch)")
    p.add_argument("extra_paths", nargs="*", help=argparse.SUPPRESS)  # refused with advice: several INPUTs
    p.add_argument("--input-series", type=series_choice_arg, default=None, metavar="N|UID", help="the series to read from a DICOM folder INPUT that holds several (a study exported from a PACS: e.g. a 5 mm and a 1 mm series of one scan): its SeriesNumber N or its SeriesInstanceUID (or the UID's last components, unique in the folder); the warning about a folder of several series names them (default: the largest CT series, an acquired one before a derived or synthetic one). In a batch it applies to every DICOM folder; a volume file INPUT is refused with it. Not --series-number, which numbers the output series")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--factor", type=int, default=None, help="slices per thick slice, 2..8 (default: from spacing)")
    size.add_argument("--target-spacing", type=finite_float(0.0, low_open=True), default=None, metavar="MM", help="output slice spacing in mm")
    p.add_argument("--axis", choices=("z", "y", "x"), default=None, help="thick axis (default: from the spacing), as an array axis of the file: z, y, x are its axes from slowest to fastest in storage, not the patient's S-I, A-P, R-L axes, which differ for reformatted or permuted volumes (a coronal stack's thick axis is y)")
    p.add_argument("--weights", default=None, metavar="NAME_OR_FILE", help="registered SR weights name or .safetensors file (default: the installed default)")
    p.add_argument("--vae-checkpoint", default=None, metavar="FILE", help="VAE weights file (with --diffusion-checkpoint)")
    p.add_argument("--diffusion-checkpoint", default=None, metavar="FILE", help="diffusion weights file (with --vae-checkpoint)")
    p.add_argument("--allow-unregistered-weights", action="store_true", help="accept a weights file that is in no registry (only files you trust)")
    p.add_argument("--estimate", choices=("mean", "sample"), default=None, help="mean: the posterior mean, one network evaluation per patch, deterministic, the closest to the true thin slices on average (default for ResShift weights); sample: a draw from the posterior through --num-steps steps, with plausible fine texture but more squared error (up to twice)")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps of --estimate sample (giving it implies sample; default: the weights' own, e.g. 4)")
    p.add_argument("--guidance-scale", type=finite_float(*GUIDANCE_SCALE_RANGE), default=None, help="classifier-free guidance scale, 0..10, 1.0 = off (default: the weights' own)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (a CUDA GPU this PyTorch build supports, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--use-patches", action="store_true", help="use --patch-size/--overlap (patches are always used for volumes larger than one patch; default 32x256x256, overlap 8x64x64)")
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"), help="patch size on the thin grid (D along the thick axis); smaller when memory is short")
    p.add_argument("--overlap", type=int, nargs=3, default=None, metavar=("D", "H", "W"), help="overlap between patches")
    p.add_argument("--memory-limit", default=None, metavar="SIZE", help="cap on the working memory the run plans, e.g. 4GiB (default: $DIFFUSIONCORE_MEMORY_LIMIT, else the free memory): the volumes and patches, whose estimate must fit (with a diffusion stage patches shrink to fit; the shipped predictor holds the whole volume; else the run stops with the estimate before any work); the process itself (Python, PyTorch and the weights, about 0.3-0.5 GB on CPU) comes on top")
    p.add_argument("--allow-non-ct", action="store_true", help="run on a volume whose intensities do not look like CT in HU (e.g. a CT cropped inside the body); the model is trained on CT only")
    p.add_argument("--allow-interspaced", action="store_true", help="run on an interspaced series (a DICOM SliceThickness at most half the slice spacing, with gaps between the slices, as HRCT makes), which is refused otherwise: the model restores slabs that cover the whole spacing, and on such gaps it paints bright rims at edges and measured no better than interpolation")
    p.add_argument("--tile-batch", type=int, default=None, metavar="N", help="patches per model call (default: 1 on the CPU, as many as fit (up to 8) on a GPU)")
    p.add_argument("--num-samples", type=int, default=1, help="average N posterior samples (implies --estimate sample); with --uncertainty also write their per-voxel standard deviation")
    p.add_argument("--uncertainty", default=None, metavar="OUT", help="write the per-voxel standard deviation (HU) here (a folder for a batch); needs --num-samples 2 or more")
    p.add_argument("--no-data-consistency", action="store_true", help="skip the correction that makes the output, thickened again, reproduce the input")
    p.add_argument("--seed", type=seed_number, default=0, help=f"random seed, 0 to {MAX_SEED} (the same seed, "
                   "device and thread count give the same output on the CPU; --threads pins the thread count; on a GPU "
                   "the adaptation is not bit for bit)")
    p.add_argument("--threads", type=bounded_int(0), default=0, metavar="N", help=THREADS_HELP)
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing output files")
    existing.add_argument("--skip-existing", action="store_true", help="leave a volume whose output (with its "
                          "provenance sidecar and --uncertainty map) exists, made from that volume, and do the "
                          "others: rerun a stopped or partly failed batch with this to continue it; the report lists "
                          "them as skipped and keeps the entries of the run it continues. An output made with other "
                          "weights or settings (--factor, --seed, adaptation, --threads, --output-dtype, ...) or cut short since "
                          "it was written is refused before any work")
    p.add_argument("--output-dtype", choices=("float32", "int16"), default="float32", help="voxel type of the output file (default float32; a DICOM series is always int16 HU). float32 keeps the result's fractional HU; int16 rounds them to whole HU (at most 0.5 HU off, far below CT noise) and gives a .nii.gz file about 2.5 times smaller, written faster (a 1200x512x512 result on one core: about 940 MB and 32 s as float32, about 370 MB and 19 s as int16): give --output-dtype int16 for smaller files")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="auto", help="dicom: write OUTPUT as a folder holding a DICOM series labelled synthetic (for a batch: one series folder per input), in the input's patient and study; an input that is no DICOM (NIfTI, NRRD, MHA) holds none, and is refused without --patient-id; file: NIfTI, NRRD or MHA by OUTPUT's suffix; auto (default): a DICOM series when the input is DICOM and OUTPUT has no volume-file suffix, else a file. In a batch auto writes a .nii.gz file for every input, DICOM ones too: give dicom for series")
    p.add_argument("--series-number", type=series_number_type, default=None, metavar="N", help=SERIES_NUMBER_HELP)
    add_patient_arguments(p, "a NIfTI, NRRD or MetaImage CT")
    p.add_argument("--report", default=None, metavar="JSON", help="write settings, timings, memory, the weights' sha256 and the provenance as JSON (a local record of the run: it names each input by its full path, which the result files do not: they name only the input's file or folder); for a batch: each volume's (with --skip-existing, those of the run it continues too), and the volumes failed, skipped and not tried (as {volume, why}), written whatever happens once the work has begun, also when stopped (one file per process under torchrun: JSON.rankN.json)")
    p.add_argument("--tiny-test-model", action="store_true", help=argparse.SUPPRESS)  # random weights: meaningless images
    add_adapt_arguments(p)
    add_progress_argument(p)
    p.set_defaults(func=run)


def batch_sources(path: Path, searched: dict[str, Path] | None = None,
                  left_out: list[dict[str, Any]] | None = None) -> tuple[bool, list[Path]]:
    """(batch?, sources) for INPUT: a volume file, a DICOM file or a DICOM series folder is one volume; a
    folder of volumes or a list file (:data:`~DiffusionCore.files.LIST_SUFFIXES`: .txt, .lst, .list, .csv) is a
    batch. Other files are read as one volume (so that an unsupported file gets the reader's explanation).
    ``searched``: filled with the folders searched, and ``left_out`` with what their search did not take for a volume,
    as :func:`~DiffusionCore.inputs.collect_volumes` fills them."""
    from ..dicom_in import is_dicomdir
    from ..files import LIST_SUFFIXES, text_file_error
    from ..inputs import collect_volumes, dicom_file_series, is_dicom_file

    if not path.exists():
        raise InputError(f"{path} does not exist. Check the path (and quote it if it contains spaces).")
    if path.is_file() and is_dicom_file(path) and is_dicomdir(path):  # as xray2ct takes one
        logger.info("%s is a DICOMDIR, the index of a DICOM disc or export: reading the series of its folder %s",
                    path, path.parent)  # fmt: skip
        path = path.parent
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return True, collect_volumes(path, searched, left_out=left_out)
        if is_dicom_file(path):
            return False, [dicom_file_series(path)]
        text = text_file_error(path)  # a list of volumes saved without a list suffix: named as such, not as an image
        if text is not None:
            raise text
        return False, [path]
    sources = [s for s in collect_volumes(path, searched, left_out=left_out) if not _holds_only_a_dicomdir(s)]
    if not sources:
        raise InputError(f"{path} holds a DICOMDIR (the index of a DICOM disc or export) but no CT series in the "
                         "folders below it: copy the whole disc or export, with the series folders it lists.")
    if sources == [path]:
        return False, [path]  # the folder is itself a DICOM series
    return True, sources


def _holds_only_a_dicomdir(source: Path) -> bool:
    """Whether a folder found as a DICOM series holds no DICOM file of its own but a DICOMDIR (the index of the series
    in the folders below, found themselves): not a second input."""
    from ..dicom_in import is_dicomdir
    from ..inputs import is_dicom_file

    if not source.is_dir():
        return False
    try:
        dicom = [f for f in source.iterdir() if f.is_file() and not f.name.startswith(".") and is_dicom_file(f)]
    except OSError:
        return False
    return bool(dicom) and all(is_dicomdir(f) for f in dicom)


def _check_uncertainty_args(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be 1 or more; got {args.num_samples}")
    if args.uncertainty and args.num_samples < 2:
        raise ConfigError("--uncertainty needs --num-samples 2 or more (the spread of several samples)")
    if (args.vae_checkpoint is None) != (args.diffusion_checkpoint is None):
        raise ConfigError("give both --vae-checkpoint and --diffusion-checkpoint, or neither")
    if args.tiny_test_model and (args.weights or args.vae_checkpoint):
        raise ConfigError("--tiny-test-model cannot be combined with --weights or checkpoints")


def _input_files(args: argparse.Namespace) -> list[str | None]:
    """Files the command reads besides the volumes: INPUT itself (a list file) and weights files."""
    return [args.input, args.weights, args.vae_checkpoint, args.diffusion_checkpoint]


def _refuse_uncertainty_in_output_folder(out: Path, unc_dir: Path | None) -> None:
    """In a batch the maps take the results' names: the same folder would give each map its result's name."""
    if unc_dir is None:
        return
    same = os.path.abspath(out) == os.path.abspath(unc_dir)
    if not same and out.exists() and unc_dir.exists():
        with contextlib.suppress(OSError):
            same = os.path.samefile(out, unc_dir)
    if same:
        raise OutputError(f"--uncertainty {unc_dir} is the output folder: in a batch each map takes its result's name, "
                          "so the two would be one file; give --uncertainty another folder")  # fmt: skip


def plan_jobs(args: argparse.Namespace, info: DistInfo) -> Plan:
    """The volumes this process handles (its share under torchrun) and their output paths, all checked
    before any work: no output, uncertainty map or report may be an input (every planned output against
    every input, whatever --overwrite says), and each must be writable (or, with --skip-existing, done already: such
    jobs are marked to skip). A file the batch names twice is done once. Also returns the batch folders it created
    (removed again if no volume is written, or when a check fails).

    Raises:
        InputError: INPUT missing or holding no volumes. OutputError: an output cannot be written.
    """
    given = sample_or_path(args.input, "ct")  # a path, or a CT sample's name (chest-dx)
    searched: dict[str, Path] = {}  # the folders searched, those a list file names too: no output goes inside them
    left_out: list[dict[str, Any]] = []  # what the search did not take for a volume: the report's left_out
    batch, sources = batch_sources(given, searched, left_out)
    out = Path(args.output)
    if one_in_a_folder(batch, sources, given if given.is_dir() else None, out):
        logger.info("%s holds one CT volume, %s: super-resolving it into %s", given, sources[0], out)
        batch = False
    unc_dir = Path(args.uncertainty) if args.uncertainty else None
    twice: list[tuple[Path, Path]] = []
    if not batch:
        jobs = [single_job(sources[0], out, args.output_format, unc_dir)]
        as_dicom = jobs[0].as_dicom
        unc_dir = None
    else:
        _refuse_uncertainty_in_output_folder(out, unc_dir)
        as_dicom = args.output_format == "dicom"
        jobs, twice = batch_jobs(sources, out, as_dicom, uncertainty=unc_dir)
        sources = [job.source for job in jobs]
    planned = [item for job in jobs for item in planned_outputs(job.output, job.as_dicom)]
    planned += [("--uncertainty", job.uncertainty) for job in jobs]
    refuse_overwriting_inputs([*_input_files(args), *searched.values(), *sources],
                              [*planned, ("--report", report_file(args, info))])  # fmt: skip
    check_dicom_patient(jobs, args, what="series")  # a DICOM series of no patient: refused before any folder is made
    jobs += named_twice_jobs(twice, jobs, as_dicom)
    created: list[Path] = []
    if batch:  # the folders are created only once no output can hit an input
        created = [f for f, what in ((out, "output"), (unc_dir, "uncertainty")) if f is not None and check_batch_folder(f, what)]
    try:
        jobs = shard_list(jobs, info)
        check_outputs(jobs, args, batch, kept_check(args) if args.skip_existing else None)
    except BaseException:
        remove_if_empty(created)
        raise
    warn_taken_series_number(jobs, args.series_number)  # said before the work, not only once it is written
    return Plan(batch, jobs, created, out if batch else None, left_out=left_out if batch else [])


def kept_check(args: argparse.Namespace) -> KeptCheck:
    """What an output kept by --skip-existing must have been made with: the weights, and the settings the command
    line fixes before any volume is read (a factor or axis chosen from a volume's spacing is compared only when
    given)."""
    from ..weights.registry import expected_sha256

    adapt = adapt_settings(args)
    settings: dict[str, tuple[str, Any]] = {
        "seed": ("--seed", args.seed), "num_samples": ("--num-samples", args.num_samples),
        "data_consistency": ("data consistency (--no-data-consistency)", not args.no_data_consistency),
        "adapt": ("adaptation (--adapt, --adapt-steps, --no-adapt)",
                  None if adapt is None else {"seconds": adapt.seconds, "steps": adapt.steps}),
    }  # fmt: skip
    settings.update({key: (f"--{key}", value) for key, value in (("factor", args.factor), ("axis", args.axis))
                     if value is not None})  # fmt: skip
    own = args.tiny_test_model or args.vae_checkpoint
    return KeptCheck(None if own else expected_sha256(args.weights, "sr"), settings)


def uncertainty_provenance(provenance: Provenance) -> Provenance:
    """The provenance of the uncertainty map that goes with an ``sr`` result (its title says what it is)."""
    return dataclasses.replace(provenance, title=provenance.title.replace(" (synthetic)", " uncertainty (synthetic)"))


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
        allow_interspaced=args.allow_interspaced,
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


def planned_grid(volume: Volume | Grid, settings: SRRunSettings) -> tuple[Grid, int]:
    """The grid the run will write and its thick axis (:func:`~DiffusionCore.degrade.plan_thin_grid`, as the run
    decides it), without the notes the run itself logs about that decision."""
    log = logging.getLogger("DiffusionCore.degrade")
    was = log.disabled
    log.disabled = True
    try:
        grid, axis, _ = plan_thin_grid(volume, factor=settings.factor, target_spacing=settings.target_spacing,
                                       axis=settings.axis)  # fmt: skip
    finally:
        log.disabled = was
    return grid, axis


def planned_shape(volume: Volume | Grid, settings: SRRunSettings) -> tuple[int, int, int]:
    """The shape of the grid the run will write (:func:`planned_grid`)."""
    return planned_grid(volume, settings)[0].shape


def check_memory_from_header(path: str | os.PathLike, settings: SRRunSettings,
                             resolver: Callable[[], SuperResolver]) -> None:  # fmt: skip
    """Refuse, before the volume file ``path`` is read, a run whose result cannot fit in memory: the check (and
    the message) that :meth:`~DiffusionCore.sr.pipeline.SuperResolver.run` makes for weights without a diffusion
    stage once the volume is read, here on the grid planned from the file's header (:func:`header_grid`,
    :func:`planned_grid`) with :func:`~DiffusionCore.sr.pipeline.predictor_bytes`. Reading a 512x512x1200 volume
    to be refused took 18 s and 2.8 GB.

    ``resolver`` gives the run's loaded weights; it is called only when the estimate does not fit (the weights decide
    whether the run is refused: with a diffusion stage the patches shrink to fit, and the advice names their factors),
    so a run that fits still reads its input before loading them. Nothing is checked where the header does not tell
    the grid (a DICOM series: :func:`header_grid`), or the grid cannot be planned (reading the volume then says
    why): the run's own check covers those.

    Raises:
        ResourceError: the run's estimate exceeds ``settings.memory_limit``, ``$DIFFUSIONCORE_MEMORY_LIMIT`` or
            the free memory; the message is the run's own.
    """
    from ..files import host_available_memory, memory_limit_from_env
    from ..sr.pipeline import check_predictor_memory, predictor_bytes

    thick = header_grid(path)
    if thick is None:
        return
    try:
        grid, axis = planned_grid(thick, settings)
    except DiffusionCoreError:
        return
    memory_limit = settings.memory_limit
    available = memory_limit if memory_limit is not None else (memory_limit_from_env() or host_available_memory())
    if predictor_bytes(math.prod(grid.shape)) <= available:
        return
    loaded = resolver()
    predictor_factor = None if loaded.has_diffusion_stage else loaded.predictor_factor(thick, grid, axis)
    if predictor_factor is None:  # a diffusion stage (patches that fit), or no predictor run: the run decides
        return
    check_predictor_memory(grid.shape, memory_limit, predictor_factor, loaded.predictor.factors)  # the run's own check


class _VolumeRun:
    """Runs one volume of a run, from its file to its written result (the weights loaded with the first)."""

    def __init__(self, args: argparse.Namespace, settings: SRRunSettings, progress: BatchProgress,
                 cancel: threading.Event):  # fmt: skip
        self.args, self.settings, self.progress, self.cancel = args, settings, progress, cancel
        # loaded after the first volume is read (input problems are reported first), or before it when the header's
        # memory estimate does not fit (check_memory_from_header)
        self.resolver = None

    def _loaded_resolver(self) -> SuperResolver:
        """The run's weights, loaded on the first call (once for the whole batch)."""
        if self.resolver is None:
            self.progress.before_run("loading the weights")
            self.resolver = load_resolver(self.args)
            tell_unused_options(self.args, self.settings, self.resolver)  # once, for the whole batch
        return self.resolver

    def __call__(self, job: Job) -> dict[str, Any]:
        args, progress = self.args, self.progress
        t0 = time.perf_counter()
        # a result too large for the memory is refused from the header, before the volume is read
        check_memory_from_header(job.source, self.settings, self._loaded_resolver)
        progress.before_run(f"reading {job.source.name}")
        given = Path(args.input)  # --input-series: the series of each DICOM folder; refused for a file INPUT itself
        series = args.input_series if job.source.is_dir() or job.source == given or not given.exists() else None
        volume = read_volume(job.source, check=False, series=series,  # checked here, naming the file, once
                             how_to_choose="pass --input-series N (its SeriesNumber) or its SeriesInstanceUID")
        (check_ct if args.allow_non_ct else require_ct)(volume, str(job.source))
        mark_ct_checked(volume)
        # an interspaced series is refused before the weights are loaded (the run itself checks it again)
        check_interspaced(
            volume, self.settings.axis, allow=self.settings.allow_interspaced, what=str(job.source)
        )
        warning = synthetic_input_warning(job.source, volume.metadata.get("series_uid"))  # the series read
        if warning:
            logger.warning("%s", warning)
        if job.as_dicom:  # the input's headers and a grid DICOM can hold, checked before any work
            check_dicom_geometry(volume)
            dicom_source = dicom_source_for(job.source, volume.metadata.get("series_uid"))
        else:
            dicom_source = None
            check_output_geometry(volume, job.output)  # a grid the format cannot hold: no work
        t_read = time.perf_counter() - t0
        self._loaded_resolver()
        # the output's size is known from the grid: a disk without room for it is said before the work, not after
        shape = planned_shape(volume, self.settings)
        extra = math.prod(shape) * 4 if job.uncertainty is not None else 0  # float32
        check_room_for_result(job.output, shape, dtype=args.output_dtype, as_dicom=job.as_dicom, extra_bytes=extra)
        rss_before = current_rss_bytes()
        output, report = self.resolver.run(volume, self.settings, progress=progress, cancel=self.cancel)
        if self.settings.memory_limit is not None:
            _tell_memory_limit(report, self.settings.memory_limit, rss_before)
        t0 = time.perf_counter()
        progress.after_run("checking the result")
        std = report["uncertainty"] if job.uncertainty is not None else None
        check_result(output, f"the sr result for {job.source}",  # before any integer cast
                     hu_range=result_range(volume, args.allow_non_ct))
        if std is not None:  # a spread of 0 everywhere is an answer, not an empty result
            check_result(std, f"the uncertainty map for {job.source}", hu_range=UNCERTAINTY_HU_RANGE,
                         allow_constant=True)  # fmt: skip
        # the input's absolute path, for --report (the local record of the run); the files beside the result record
        # only its name (provenance.input_name): a folder's name may be a patient's
        provenance = sr_provenance(Path(os.path.abspath(job.source)), volume.metadata, report)
        report["provenance"] = provenance.as_dict()
        if job.as_dicom and dicom_source is None and args.patient_id:  # an input of no patient: the one named
            dicom_source = named_patient_source(args.patient_id, args.patient_name or "", provenance.date)
        progress.writing(job.output)
        files = [] if job.as_dicom else planned_files(job.output, False)
        files += planned_files(job.uncertainty, False) if std is not None else []
        with all_or_none(files):
            write_result(output, job.output, provenance, as_dicom=job.as_dicom, dicom_source=dicom_source,
                         overwrite=args.overwrite, dtype=args.output_dtype,
                         series_number=args.series_number)  # fmt: skip
            if std is not None:
                write_result(std, job.uncertainty, uncertainty_provenance(provenance), overwrite=args.overwrite,
                             dtype="float32")
        progress.written()
        t_write = time.perf_counter() - t0
        # the peak the engine saw, raised by what writing took (an integer cast, DICOM slices): the process's peak
        memory = report.setdefault("memory", {})
        memory["peak_rss_bytes"] = max(int(memory.get("peak_rss_bytes") or 0), peak_rss_bytes())
        logger.info(
            "%s -> %s (%s, %.1f s)", job.source, job.output,
            "x".join(map(str, output.shape)), report["timings"]["total"] + t_read + t_write,
        )
        return _json_report(job, report, {"read": t_read, "write": t_write})


def _refuse_extra_paths(args: argparse.Namespace) -> None:
    if args.extra_paths:
        paths = [args.input, args.output, *args.extra_paths]
        raise ConfigError(
            f"sr takes one INPUT and one OUTPUT, and got {len(paths)} paths ({', '.join(paths)}): for several "
            "volumes give a folder of them, or a list file (.txt, one path per line), as INPUT and a folder as OUTPUT"
        )


def run(args: argparse.Namespace) -> int:
    set_torch_threads(args.threads)  # before any work: the adapted output depends on the thread count
    _refuse_extra_paths(args)
    _check_uncertainty_args(args)
    info = process_info(args.device)  # its place in a torchrun launch
    settings = run_settings(args, info.device)  # option errors before any volume is read
    keep_freed_memory()  # a one-shot process: the network's buffers are reused, not mapped afresh
    group = ProcessGroup(info)
    try:
        plan, report_path = plan_or_refuse(plan_jobs, args, info, group)

        def make_one(progress: BatchProgress, cancel: threading.Event) -> _VolumeRun:
            return _VolumeRun(args, settings, progress, cancel)

        if not plan.batch:
            return run_one("sr", make_one, plan, report_path, progress_style=args.progress)
        return run_batch("sr", make_one, plan, report_path, info, group, progress_style=args.progress)
    finally:
        group.leave()



