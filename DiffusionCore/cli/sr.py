"""``sr``: thick-slice CT in, thin-slice CT out (one volume, or a folder / list of volumes).

Every output path is checked before any work starts; outputs are written atomically at the end, so a
failed, cancelled or killed run leaves no partial file. Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set)
the volumes of a batch are shared out across the processes, each on its own GPU (``LOCAL_RANK``); the
volumes are independent, and the processes join a Gloo group only to agree, once all have finished their shares,
on the batch's outcome and exit code.

A batch goes on past a volume that fails (unreadable, refused, over the memory budget, not writable), names it in
the closing lines and the ``--report``, and exits 7 when others were written; a full disk stops it. The report is
written whatever happens (also on SIGTERM / Ctrl-C), and ``--skip-existing`` continues a batch: the names are a
function of the batch's inputs alone (:func:`batch_output_names`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..devices import DistInfo, process_info, shard_list
from ..dicom_out import check_dicom_geometry
from ..errors import (
    Cancelled,
    ConfigError,
    DiffusionCoreError,
    InputError,
    NumericalError,
    OutputError,
    OutputExistsError,
    PartialBatchError,
    ResourceError,
)
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
    planned_files,
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
    is_out_of_memory,
    one_line,
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
        "The result is synthetic: it is the model's estimate, not measured data. "
        "Batch names: each output is named after its input (a DICOM series folder S becomes S.nii.gz, a .mhd file "
        "a .mha, a .nhdr a .nrrd); inputs of the same name in different folders get their folders (from the folder they share) "
        "as a prefix joined with _ (sub1_case.nii.gz), inputs that differ only in their suffix keep it "
        "(x_nii.nii, x_nii_gz.nii.gz), and a name over 200 bytes is cut and ends in ~ and a hash of the full name. "
        "The same INPUT gives the same names, so the same command with --skip-existing continues a batch. One file "
        "named twice (a link, a path through ..) is done once. A volume that fails is named and the batch goes on; "
        "a full disk stops it; a closing line counts what was written. Exit codes: 0 every volume written (or "
        "skipped), 7 some failed and the others were written, 2 (or the failures' own code) none written, 4 "
        "stopped by a full disk, 130 cancelled.",
    )
    p.add_argument("input", metavar="INPUT", help="volume file, DICOM series folder, folder of volumes, list file, or a CT sample name (chest-dx)")
    p.add_argument("output", metavar="OUTPUT", help="output volume (.nii.gz, .nii, .nrrd, .mha), or a folder (batch)")
    p.add_argument("extra_paths", nargs="*", help=argparse.SUPPRESS)  # refused with advice: several INPUTs
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
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing output files")
    existing.add_argument("--skip-existing", action="store_true", help="leave a volume whose output (with its "
                          "provenance sidecar and --uncertainty map) exists, and do the others: rerun a stopped or "
                          "partly failed batch with this to continue it; the report lists them as skipped")
    p.add_argument("--output-dtype", choices=("float32", "int16"), default="float32", help="voxel type of the output file (default float32; a DICOM series is always int16 HU)")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="auto", help="dicom: write OUTPUT as a folder holding a DICOM series labelled synthetic (for a batch: one series folder per input); file: NIfTI, NRRD or MHA by OUTPUT's suffix; auto (default): a DICOM series when the input is DICOM and OUTPUT has no volume-file suffix, else a file. In a batch auto writes a .nii.gz file for every input, DICOM ones too: give dicom for series")
    p.add_argument("--report", default=None, metavar="JSON", help="write settings, timings, memory and the weights' sha256 as JSON; for a batch: each volume's, and the volumes failed, skipped and not tried (as {volume, why}), written whatever happens, also when stopped (one file per process under torchrun: JSON.rankN.json)")
    p.add_argument("--tiny-test-model", action="store_true", help=argparse.SUPPRESS)  # random weights: meaningless images
    add_adapt_arguments(p)
    add_progress_argument(p)
    p.set_defaults(func=run)


@dataclass
class Job:
    """One volume of a run: where it comes from and where its results go. ``skip``: why it is not done (its output
    exists and --skip-existing was given, or it is a file the batch names twice), else None."""

    source: Path
    output: Path
    uncertainty: Path | None
    as_dicom: bool = False
    skip: str | None = None


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


#: The longest output name (UTF-8 bytes) a batch gives: file systems take 255, and the hidden temporary file of an
#: output (``.NAME.PID.XXXXXXXX.partial.nii.gz``) needs about 40 more. Longer names are cut (:func:`_short_name`).
MAX_NAME_BYTES = 200


def _short_name(name: str) -> str:
    """``name`` when it fits :data:`MAX_NAME_BYTES`, else its stem cut (on a character boundary) and ended with ``~``
    and 8 hex digits of the full name's sha1, with its volume suffix: the same name always gives the same result."""
    if len(os.fsencode(name)) <= MAX_NAME_BYTES:  # the bytes on disk (a name found there may not be UTF-8)
        return name
    stem, suffix = split_volume_suffix(name)
    tag = "~" + hashlib.sha1(os.fsencode(name)).hexdigest()[:8]
    while stem and len(os.fsencode(stem + tag + suffix)) > MAX_NAME_BYTES:
        stem = stem[:-1]
    return stem + tag + suffix


def _suffix_tag(source: Path, stem: str) -> str:
    """What tells an input from another of the same stem in a name: its suffix (``x.nii.gz`` -> ``nii_gz``, a
    DICOM series folder -> ``dicom``)."""
    if source.is_dir():
        return "dicom"
    rest = source.name[len(stem) :] if source.name.startswith(stem) else "".join(source.suffixes)
    return rest.lstrip(".").replace(".", "_").lower() or "file"


def _stem_key(name: str) -> str:
    """Names that clash: the same stem, whatever the case (a case-insensitive disk) or the suffix (a NIfTI's
    ``x.json`` sidecar, a batch's DICOM series folders)."""
    return split_volume_suffix(name)[0].casefold()


def batch_output_names(sources: list[Path]) -> list[str]:
    """Output file names for a batch, a function of the inputs alone (the same inputs give the same names).

    Each input's own name (a DICOM folder ``s`` -> ``s.nii.gz``, ``.mhd`` -> ``.mha``, ``.nhdr`` -> ``.nrrd``). Inputs
    whose names have one stem (any case) get, first, the folders they lie in relative to the folder those inputs
    share, joined with ``_`` (``sub1/case`` + ``sub2/case`` -> ``sub1_case``, ``sub2_case``); those of one folder then
    keep their suffix (``x.nii`` + ``x.nii.gz`` -> ``x_nii.nii``, ``x_nii_gz.nii.gz``; a DICOM folder ``s`` beside
    ``s.nii.gz`` -> ``s_dicom.nii.gz``, ``s_nii_gz.nii.gz``). Names longer than :data:`MAX_NAME_BYTES` are cut
    (:func:`_short_name`).

    Raises:
        InputError: two inputs would still get one name (the same file given twice); the message names them.
    """
    names = [_output_name(s) for s in sources]
    folders = [Path(os.path.abspath(s)).parent for s in sources]

    def clashing(current: list[str]) -> list[list[int]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(current):
            groups[_stem_key(n)].append(i)
        return [g for g in groups.values() if len(g) > 1]

    for group in clashing(names):  # the same name in different folders: their folders as a prefix
        root = Path(os.path.commonpath([str(folders[i]) for i in group]))
        for i in group:
            rel = folders[i].relative_to(root).parts
            names[i] = "_".join((*rel, names[i]))
    for group in clashing(names):  # the same folder too: the suffix tells them apart
        for i in group:
            stem, suffix = split_volume_suffix(names[i])
            own_stem = split_volume_suffix(_output_name(sources[i]))[0]
            names[i] = f"{stem}_{_suffix_tag(sources[i], own_stem)}{suffix}"
    names = [_short_name(n) for n in names]
    left = clashing(names)
    if left:
        pairs = "; ".join(" and ".join(str(sources[i]) for i in g) + f" (both {names[g[0]]})" for g in left)
        raise InputError(f"several inputs would be written to the same output name: {pairs}; rename one of them, "
                         "or give them in separate batches")  # fmt: skip
    return names


def _file_identity(path: Path) -> tuple[int, int] | str:
    """What tells one file (or DICOM folder) from another: device and inode, else the resolved path."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def distinct_sources(sources: list[Path]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """``sources`` with each file once (by identity: a link to a file of the batch, a path through ``..``), and the
    ``(left out, the same file as)`` pairs."""
    seen: dict[tuple[int, int] | str, Path] = {}
    kept, twice = [], []
    for s in sources:
        key = _file_identity(s)
        if key in seen:
            twice.append((s, seen[key]))
        else:
            seen[key] = s
            kept.append(s)
    return kept, twice


def batch_sources(path: Path) -> tuple[bool, list[Path]]:
    """(batch?, sources) for INPUT: a volume file, a DICOM file or a DICOM series folder is one volume; a
    folder of volumes or a list file (:data:`~DiffusionCore.files.LIST_SUFFIXES`: .txt, .lst, .list, .csv) is a
    batch. Other files are read as one volume (so that an unsupported file gets the reader's explanation)."""
    from ..files import LIST_SUFFIXES, text_file_error
    from ..inputs import collect_volumes, dicom_file_series, is_dicom_file

    if not path.exists():
        raise InputError(f"{path} does not exist. Check the path (and quote it if it contains spaces).")
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return True, collect_volumes(path)
        if is_dicom_file(path):
            return False, [dicom_file_series(path)]
        text = text_file_error(path)  # a list of volumes saved without a list suffix: named as such, not as an image
        if text is not None:
            raise text
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


@dataclass
class Plan:
    """What a run does: its jobs (this process's share under torchrun; those to skip marked), whether INPUT is a
    batch, the output folder of a batch, and the folders this run created (removed again if nothing is written)."""

    batch: bool
    jobs: list[Job]
    created: list[Path] = field(default_factory=list)
    folder: Path | None = None


#: How a skipped volume's reason ends when its outputs exist.
SKIP_EXISTING_NOTE = " (--skip-existing)"
#: What a batch's refusal of an existing output advises.
BATCH_EXISTS_ADVICE = ("pass --skip-existing to keep it and do the batch's other volumes (a stopped batch continues so), "
                       "or --overwrite to replace it")  # fmt: skip


def _existing_output(job: Job) -> str | None:
    """Why ``job``'s outputs count as done: every file it writes (with a NIfTI's provenance sidecar, and the
    --uncertainty map) exists. Outputs are written to hidden temporary files and renamed, so one that exists is whole.
    None when none exists.

    Raises:
        OutputExistsError: some of them exist and others not: not an output this command finished.
    """
    files = [job.output] if job.as_dicom else planned_files(job.output, False)
    if job.uncertainty is not None:
        files += planned_files(job.uncertainty, False)
    there = [f for f in files if os.path.lexists(f)]
    if not there:
        return None
    if job.as_dicom:
        try:
            check_result_output(job.output, True)
        except OutputExistsError:  # our series, whole (a series folder is renamed into place once written)
            there = [job.output]
        else:
            return None  # an empty folder: nothing done yet
    if len(there) < len(files):
        missing = ", ".join(str(f) for f in files if f not in there)
        raise OutputExistsError(there[0], f"exists without {missing}, so it is not an output this command finished",
                                "move it away, or pass --overwrite to replace it")  # fmt: skip
    return f"its output {job.output} exists{SKIP_EXISTING_NOTE}"


def _check_outputs(jobs: list[Job], args: argparse.Namespace, batch: bool) -> None:
    """Check before any work that each job's outputs can be written; with --skip-existing, mark the done ones."""
    for job in jobs:
        if job.skip is not None:
            continue
        if args.skip_existing:
            job.skip = _existing_output(job)
            if job.skip is not None:
                continue
        try:
            check_result_output(job.output, job.as_dicom, overwrite=args.overwrite)
            if job.uncertainty is not None:
                check_output_path(job.uncertainty, overwrite=args.overwrite)
        except OutputExistsError as exc:
            raise exc.advising(BATCH_EXISTS_ADVICE) if batch else exc from None


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
    batch, sources = batch_sources(given)
    out = Path(args.output)
    if batch and len(sources) == 1 and given.is_dir() and not out.is_dir() and split_volume_suffix(out.name)[1]:
        # a patient's folder that holds one CT series (beside a scout or a structure set) and a volume file as
        # OUTPUT: that one volume, as evaluate --reference takes the same folder
        logger.info("%s holds one CT volume, %s: super-resolving it into %s", given, sources[0], out)
        batch = False
    unc_dir = None
    twice: list[tuple[Path, Path]] = []
    if not batch:
        as_dicom = wants_dicom(args.output_format, sources[0], out)
        if out.is_dir() and not as_dicom:
            out = out / _output_name(sources[0])
        unc = Path(args.uncertainty) if args.uncertainty else None
        if unc is not None and unc.is_dir():
            unc = unc / _output_name(sources[0])
        jobs = [Job(sources[0], out, unc, as_dicom)]
    else:
        sources, twice = distinct_sources(sources)
        unc_dir = Path(args.uncertainty) if args.uncertainty else None
        _refuse_file_name_for_batch(out, "output", len(sources))
        _refuse_file_name_for_batch(unc_dir, "--uncertainty", len(sources))
        _refuse_uncertainty_in_output_folder(out, unc_dir)
        names = batch_output_names(sources)
        as_dicom = args.output_format == "dicom"
        jobs = [Job(s, out / (_series_folder_name(n) if as_dicom else n), unc_dir / n if unc_dir else None, as_dicom)
                for s, n in zip(sources, names)]  # fmt: skip
    planned = [item for job in jobs for item in planned_outputs(job.output, job.as_dicom)]
    planned += [("--uncertainty", job.uncertainty) for job in jobs]
    refuse_overwriting_inputs([*_input_files(args), *sources], [*planned, ("--report", _report_file(args, info))])
    by_source = {job.source: job for job in jobs}
    for dup, first in twice:  # reported as skipped (after the others: the shares stay those of the distinct files)
        jobs.append(Job(dup, by_source[first].output, None, as_dicom, skip=f"the same file as {first}: done once"))
    created: list[Path] = []
    if batch:  # the folders are created only once no output can hit an input
        created = [f for f, what in ((out, "output"), (unc_dir, "uncertainty")) if f is not None and _check_folder(f, what)]
    try:
        jobs = shard_list(jobs, info)
        _check_outputs(jobs, args, batch)
    except BaseException:
        _remove_if_empty(created)
        raise
    return Plan(batch, jobs, created, out if batch else None)


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders a run created, those that are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


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
    # a batch continued with --skip-existing writes the report of this run over the first run's
    return check_writable_file(p, overwrite=args.overwrite or getattr(args, "skip_existing", False))


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


#: How long (seconds) the processes of a torchrun batch wait for each other at its end: the slowest one's share.
BATCH_WAIT_SECONDS = 30 * 24 * 3600.0
#: What one volume of a batch can fail with while the batch goes on (a full disk stops it: :func:`_disk_full`).
VOLUME_FAILURES = (InputError, OutputError, ResourceError, NumericalError, MemoryError)
#: The exit codes a volume's failure can have (counted per code across torchrun's processes).
FAILURE_CODES = (1, 2, 4, 5)


def _volume_failure(exc: BaseException) -> bool:
    return isinstance(exc, VOLUME_FAILURES) or is_out_of_memory(exc)


def _failure_code(exc: BaseException) -> int:
    return exc.exit_code if isinstance(exc, DiffusionCoreError) else 5  # MemoryError, torch's out of memory


def _disk_full(exc: BaseException) -> bool:
    """Whether a write failed for want of space: "no space left" (or over quota) in the error or its causes, or the
    writer's own words for it (:func:`~DiffusionCore.files.no_room_reason`)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(exc, OutputError) and "is full (" in str(exc)


def format_seconds(seconds: float) -> str:
    """A duration as a person reads it: ``4.2 s``, ``2:38``, ``1:02:05``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"


class _NamedWarnings(logging.Filter):
    """Starts each warning logged while a batch's volume runs (the pipeline's, the reader's) with the volume's
    name, unless the message names it already: in a log of many volumes each warning says which it is about."""

    def __init__(self, source: Path):
        super().__init__()
        self.source = source

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and record.name != logger.name:  # this module's name the volume or all
            text = record.getMessage()
            if str(self.source) not in text and self.source.name not in text:
                record.msg, record.args = f"{self.source}: {text}", None
        return True


@contextlib.contextmanager
def _warnings_named(source: Path | None):
    handlers = logging.getLogger("DiffusionCore").handlers if source is not None else []
    named = _NamedWarnings(source) if source is not None else None
    for h in handlers:
        h.addFilter(named)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(named)


class ProcessGroup:
    """The processes of one torchrun batch, joined (Gloo, on the CPU) only to agree on the outcome: each does its
    share, then they sum their counts, so that every process ends with the same exit code and none is cut short by
    another's early exit (torchrun stops the others when one exits with an error). One process alone: no group."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.joined = False
        if info.world_size <= 1 or not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            return
        import datetime

        import torch.distributed as dist

        if not dist.is_available():
            return
        try:
            if not dist.is_initialized():
                dist.init_process_group("gloo", init_method="env://", rank=info.rank, world_size=info.world_size,
                                        timeout=datetime.timedelta(seconds=BATCH_WAIT_SECONDS))  # fmt: skip
            self.joined = True
        except (RuntimeError, ValueError) as exc:
            logger.warning("process %d: could not join the other processes (%s); its exit code is its own share's",
                           info.rank, one_line(str(exc), 200))  # fmt: skip

    def reduce(self, values: list[int], op: str = "sum") -> list[int]:
        """``values`` summed (``op="max"``: their maximum) over the processes; ``values`` alone without a group."""
        if not self.joined:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        except RuntimeError as exc:  # another process is gone: say so, and go on with this one's own outcome
            logger.warning("could not agree with the other processes (%s)", one_line(str(exc), 200))
            self.leave()
            return list(values)
        return [int(v) for v in t.tolist()]

    def leave(self) -> None:
        if self.joined:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self.joined = False


@dataclass
class BatchLog:
    """What a batch did: for the closing lines, the ``--report`` and the exit code."""

    jobs: list[Job]
    folder: Path | None
    reports: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    failed_codes: list[int] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    not_tried: list[dict[str, str]] = field(default_factory=list)
    stopped: str | None = None
    started: float = field(default_factory=time.perf_counter)

    def fail(self, job: Job, exc: BaseException) -> None:
        why = str(exc) if isinstance(exc, DiffusionCoreError) else f"out of memory ({one_line(str(exc), 200)})"
        self.failed.append({"volume": str(job.source), "why": why})
        self.failed_codes.append(_failure_code(exc))

    def stop(self, why: str, after: int) -> None:
        """The batch stops before job ``after``: the rest are not tried."""
        self.stopped = why
        self.not_tried = [{"volume": str(j.source), "why": f"not tried: {why}"} for j in self.jobs[after:]
                          if j.skip is None]  # fmt: skip

    def as_report(self) -> dict[str, Any]:
        return {"volumes": self.reports, "failed": self.failed, "skipped": self.skipped, "not_tried": self.not_tried,
                "stopped": self.stopped,
                "summary": {"volumes": len(self.jobs), "written": len(self.reports), "failed": len(self.failed),
                            "skipped": len(self.skipped), "not_tried": len(self.not_tried),
                            "output": str(self.folder) if self.folder else None,
                            "seconds": round(time.perf_counter() - self.started, 3)}}  # fmt: skip

    @property
    def kept(self) -> int:
        """The skipped volumes whose outputs exist (--skip-existing), not those of a file named twice."""
        return sum(item["why"].endswith(SKIP_EXISTING_NOTE) for item in self.skipped)

    def counts(self) -> list[int]:
        """written, failed, skipped, not tried, stopped, the share's volumes, kept, and the failures per
        FAILURE_CODES."""
        per_code = [sum(c == code for c in self.failed_codes) for code in FAILURE_CODES]
        per_code[FAILURE_CODES.index(2)] += sum(c not in FAILURE_CODES for c in self.failed_codes)
        return [len(self.reports), len(self.failed), len(self.skipped), len(self.not_tried), int(bool(self.stopped)),
                len(self.jobs), self.kept, *per_code]  # fmt: skip

    def tell(self, who: str) -> None:
        """The closing lines of this process's share: one line of counts, then each failure on its own line."""
        n = len(self.jobs)
        where = f" to {self.folder}" if self.folder else ""
        line = f"{who}{len(self.reports)} of {n} volume(s) written{where} in {format_seconds(time.perf_counter() - self.started)}"
        if self.skipped:
            kinds = [f"{n} {what}" for n, what in ((self.kept, "done before"),
                                                   (len(self.skipped) - self.kept, "named twice")) if n]  # fmt: skip
            line += f"; {len(self.skipped)} skipped ({', '.join(kinds)})"
        if self.not_tried:
            line += f"; {len(self.not_tried)} not tried"
        if self.failed:
            line += f"; {len(self.failed)} failed, listed below"
        logger.info("%s", line)
        for item in self.failed:
            logger.warning("failed: %s", _naming(item["volume"], item["why"]))


def _naming(volume: str | Path, why: str, limit: int = 400) -> str:
    """``VOLUME: WHY`` in one line (cut to ``limit``), the volume said once where the message starts with it."""
    why = one_line(why, limit)
    return why if why.startswith(str(volume)) else f"{volume}: {why}"


def _report_after(path: Path | None, data: dict[str, Any] | None) -> None:
    """Write the --report, saying so when that fails too (a full disk): the run's own outcome stays the message."""
    if path is None or data is None:
        return
    try:
        write_json_atomic(data, path, overwrite=True)
    except (OutputError, OSError) as exc:
        logger.warning("could not write the report %s: %s", path, one_line(str(exc), 300))


class _VolumeRun:
    """Runs one volume of a run, from its file to its written result (the weights loaded with the first)."""

    def __init__(self, args: argparse.Namespace, settings: SRRunSettings, progress: BatchProgress,
                 cancel: threading.Event):  # fmt: skip
        self.args, self.settings, self.progress, self.cancel = args, settings, progress, cancel
        self.resolver = None  # loaded after the first volume is read: input problems are reported first

    def __call__(self, job: Job) -> dict[str, Any]:
        args, progress = self.args, self.progress
        t0 = time.perf_counter()
        progress.before_run(f"reading {job.source.name}")
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
        t_read = time.perf_counter() - t0
        if self.resolver is None:
            progress.before_run("loading the weights")
            self.resolver = load_resolver(args)
            tell_unused_options(args, self.settings, self.resolver)  # once, for the whole batch
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
        # the input's absolute path: the provenance is read beside the output, from anywhere
        provenance = sr_provenance(Path(os.path.abspath(job.source)), volume.metadata, report)
        report["provenance"] = provenance.as_dict()
        progress.writing(job.output)
        files = [] if job.as_dicom else planned_files(job.output, False)
        files += planned_files(job.uncertainty, False) if std is not None else []
        before = {f: _identity_if_there(f) for f in files}
        try:
            write_result(output, job.output, provenance, as_dicom=job.as_dicom, dicom_source=dicom_source,
                         overwrite=args.overwrite, dtype=args.output_dtype)  # fmt: skip
            if std is not None:
                write_result(std, job.uncertainty, uncertainty_provenance(provenance), overwrite=args.overwrite,
                             dtype="float32")
        except BaseException:  # a result without its sidecar or map is no finished output (--skip-existing)
            for f, ident in before.items():
                if _identity_if_there(f) not in (None, ident):
                    with contextlib.suppress(OSError):
                        os.unlink(f)
            raise
        progress.written()
        t_write = time.perf_counter() - t0
        logger.info(
            "%s -> %s (%s, %.1f s)", job.source, job.output,
            "x".join(map(str, output.shape)), report["timings"]["total"] + t_read + t_write,
        )
        return _json_report(job, report, {"read": t_read, "write": t_write})


def _identity_if_there(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _refuse_extra_paths(args: argparse.Namespace) -> None:
    if args.extra_paths:
        paths = [args.input, args.output, *args.extra_paths]
        raise ConfigError(
            f"sr takes one INPUT and one OUTPUT, and got {len(paths)} paths ({', '.join(paths)}): for several "
            "volumes give a folder of them, or a list file (.txt, one path per line), as INPUT and a folder as OUTPUT"
        )


def _planned(args: argparse.Namespace, info: DistInfo, group: ProcessGroup) -> tuple[Plan, Path | None]:
    """:func:`plan_jobs` and the --report path; under torchrun every process learns when another refused the run
    (before any work), so that all end together."""
    error: Exception | None = None
    plan = None
    try:
        plan = plan_jobs(args, info)
        report_path = _report_path(args, info)
    except Exception as exc:
        error = exc
        if plan is not None:  # the report refused: no empty output folder stays behind
            _remove_if_empty(plan.created)
    code = 0 if error is None else error.exit_code if isinstance(error, DiffusionCoreError) else 1
    worst = group.reduce([code], "max")[0]
    if error is not None:
        group.leave()
        raise error
    if worst:
        group.leave()
        _remove_if_empty(plan.created)
        refused = DiffusionCoreError("another process of this torchrun launch refused the run before any work; "
                                     "its error says why")  # fmt: skip
        refused.exit_code = worst
        raise refused
    return plan, report_path


def run(args: argparse.Namespace) -> int:
    _refuse_extra_paths(args)
    _check_uncertainty_args(args)
    info = process_info(args.device)  # its place in a torchrun launch
    settings = run_settings(args, info.device)  # option errors before any volume is read
    keep_freed_memory()  # a one-shot process: the network's buffers are reused, not mapped afresh
    group = ProcessGroup(info)
    try:
        plan, report_path = _planned(args, info, group)
        if not plan.batch:
            return _run_one(args, settings, plan, report_path)
        return _run_batch(args, settings, plan, report_path, info, group)
    finally:
        group.leave()


def _run_one(args: argparse.Namespace, settings: SRRunSettings, plan: Plan, report_path: Path | None) -> int:
    """One volume: its errors end the run (exit code of the error); nothing is written unless it succeeds."""
    cancel = threading.Event()
    with sigterm_cancels(cancel, "sr"):  # a terminate request (Slicer's Cancel, kill) stops, writing nothing
        sink = Progress(args.progress, desc="sr")
        try:
            for job in plan.jobs:  # one, or none under torchrun beyond the first process
                if job.skip is not None:
                    logger.info("%s: %s; nothing to do", job.source, job.skip)
                    continue
                entry = _VolumeRun(args, settings, BatchProgress(sink, 1), cancel)(job)
                if report_path is not None:
                    write_json_atomic(entry, report_path, overwrite=True)
        finally:
            sink.close()
    return 0


def _run_batch(args: argparse.Namespace, settings: SRRunSettings, plan: Plan, report_path: Path | None,
               info: DistInfo, group: ProcessGroup) -> int:  # fmt: skip
    """A batch: each volume's failure is named and the batch goes on; a full disk stops it; the report is written
    whatever happens; the processes of a torchrun launch agree on the exit code once all are done."""
    who = f"process {info.rank} of {info.world_size}: " if info.world_size > 1 else ""
    if info.world_size > 1:
        logger.info("%s%d volume(s) on %s", who, len(plan.jobs), info.device)
    cancel = threading.Event()
    log = BatchLog(plan.jobs, plan.folder)
    sink = Progress(args.progress, desc="sr")
    progress = BatchProgress(sink, len(plan.jobs))
    one = _VolumeRun(args, settings, progress, cancel)
    index = 0
    try:
        with sigterm_cancels(cancel, "sr", outcome=""):  # the message is completed below
            for index, job in enumerate(plan.jobs):
                progress.index = index
                if job.skip is not None:
                    log.skipped.append({"volume": str(job.source), "why": job.skip})
                    logger.info("skipped %s: %s", job.source, job.skip)
                    progress.written()
                    continue
                try:
                    with _warnings_named(job.source):
                        log.reports.append(one(job))
                except Exception as exc:
                    if not _volume_failure(exc):
                        raise
                    log.fail(job, exc)
                    if _disk_full(exc):
                        log.stop(f"the disk is full: {one_line(str(exc), 300)}", index + 1)
                        logger.warning("stopping the batch: %s", _naming(job.source, str(exc)))
                        break
                    logger.warning("skipping %s", _naming(job.source, str(exc)))
    except (Cancelled, KeyboardInterrupt) as exc:
        log.stop("the batch was stopped (a signal, Ctrl-C or Slicer's Cancel)", index)
        _report_after(report_path, log.as_report())
        sink.close()
        _remove_if_empty(plan.created)
        how = str(exc) if isinstance(exc, Cancelled) else "sr was interrupted"
        raise Cancelled(f"{how} after {index} of {len(plan.jobs)} volume(s): {_done_text(log)}; the one being worked "
                        "on was not written; run the same command again with --skip-existing to do the other "
                        f"{len(log.not_tried)}{_report_text(report_path)}") from None  # fmt: skip
    except BaseException as exc:  # a bug, or a problem of the whole batch (the weights): what was done is reported
        log.stop(f"the batch stopped: {one_line(str(exc), 300)}", index)
        _report_after(report_path, log.as_report())
        sink.close()
        if not log.reports:
            _remove_if_empty(plan.created)
        raise
    sink.close()
    _report_after(report_path, log.as_report())
    log.tell(who)
    if not log.reports and info.world_size == 1:  # nothing written: the folders this run made go again
        _remove_if_empty(plan.created)
    return _batch_outcome(log, group, report_path, info)


def _done_text(log: BatchLog) -> str:
    where = f" to {log.folder}" if log.folder else ""
    kept = f" ({len(log.skipped)} done before were kept)" if log.skipped else ""
    if not log.reports:
        return f"none written{kept}"
    return f"{len(log.reports)} written{where}, complete{kept}"


def _report_text(report_path: Path | None) -> str:
    return f"; report: {report_path}" if report_path is not None else ""


def _batch_outcome(log: BatchLog, group: ProcessGroup, report_path: Path | None, info: DistInfo) -> int:
    """The exit code of a batch, the same in every process of a torchrun launch: 0 all written (or skipped); 7 some
    failed and others written; the failures' code (2 when they differ) when none was written; 4 stopped by a full
    disk. The error says it in one line; the closing lines above list the failures."""
    counts = group.reduce(log.counts())
    written, failed, skipped, not_tried, stopped, total, kept = counts[:7]
    per_code = dict(zip(FAILURE_CODES, counts[7:]))
    several = info.world_size > 1 and group.joined
    if several and info.is_main:
        logger.info("all %d processes: %d of %d volume(s) written to %s", info.world_size, written, total, log.folder)
    reports = f"{report_path}" if report_path is not None else ""
    if several and report_path is not None:
        reports = "the --report file of each process"
    see = f" (listed above{'; also in ' + reports if reports else ''})"
    if stopped:
        why = log.stopped or "another process found the disk full"
        raise OutputError(f"the batch stopped after {written + skipped + failed} of {total} volumes, {why}; "
                          f"{written} written to {log.folder}, {failed} failed, {not_tried} not tried{see}: free "
                          "some space and run the same command again with --skip-existing to go on")  # fmt: skip
    if not failed:
        return 0
    if written + kept == 0:
        codes = [c for c, n in per_code.items() if n]
        err: DiffusionCoreError = InputError(f"all {failed} volumes failed, nothing was written{see}")
        err.exit_code = codes[0] if len(codes) == 1 else 2
        raise err
    before = f" ({kept} done before kept)" if kept else ""
    raise PartialBatchError(f"{failed} of {total} volumes failed{see}; {written} written to {log.folder}{before}; fix "
                            "those inputs (or options) and run the same command again with --skip-existing to do only "
                            "them")  # fmt: skip
