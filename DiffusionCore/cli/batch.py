"""What the batch commands share (``sr`` and ``xray2ct`` over a folder or list of inputs): the outputs' names, the
checks before any work, the batch's progress bar, its log, ``--report`` and exit code, and the loop that goes on past an
input that fails.

A batch goes on past an input that fails (unreadable, refused, over the memory budget, not writable, an output too
large for the space left), names it in the closing lines and the ``--report``, and exits 7 when others were written; a
full disk stops it (:func:`disk_left_full`). An input that is not for the command (:func:`not_for_this_tool`) and a
series of a patient folder that is not the one used are passed over, listed apart, not failed. The report is written
whatever happens (also on SIGTERM / Ctrl-C), and ``--skip-existing`` continues a batch: the names are a function of the
batch's inputs alone (:func:`batch_output_names`), but an input whose output exists keeps its name. A batch holds its
output folder while it runs (:func:`claim_batch_folder`): a second batch into it is refused. Under ``torchrun`` the
processes join a Gloo group only to agree, once all have finished their shares, on the batch's outcome and exit code
(:class:`ProcessGroup`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..devices import DistInfo
from ..errors import (
    Cancelled,
    DiffusionCoreError,
    InputError,
    NumericalError,
    OutputError,
    OutputExistsError,
    PartialBatchError,
    ResourceError,
)
from ..files import (
    FileIdentity,
    check_writable_file,
    file_identity,
    format_bytes,
    gzip_ends_with_size,
    publish_journal,
    resolved_path_key,
    still_published,
    write_json_atomic,
)
from ..results import check_result_output, planned_files, recorded_source, wants_dicom
from ..volume import WRITABLE_SUFFIXES, check_output_path, split_volume_suffix
from .common import Progress, is_out_of_memory, one_line, sigterm_cancels

logger = logging.getLogger(__name__)

#: Suffixes kept for outputs; others map to a writable one (DICOM folders become NIfTI).
_OUTPUT_SUFFIX = {".mhd": ".mha", ".nhdr": ".nrrd"}
_DEFAULT_OUTPUT_SUFFIX = ".nii.gz"


@dataclass
class Job:
    """One volume of a run: where it comes from and where its results go. ``skip``: why it is not done (its output
    exists and --skip-existing was given, or it is a file the batch names twice), else None."""

    source: Path
    output: Path
    uncertainty: Path | None
    as_dicom: bool = False
    skip: str | None = None


def output_name(source: Path) -> str:
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
#: output (``.NAME.PID.XXXXXXXX.partial.nii.gz``) needs about 40 more. Longer names are cut (:func:`short_name`).
MAX_NAME_BYTES = 200


def short_name(name: str) -> str:
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


def batch_output_names(sources: list[Path], kept: dict[int, str] | None = None) -> list[str]:
    """Output file names for a batch, a function of the inputs alone (the same inputs give the same names), but for
    ``kept``: input index -> the name its existing output has (:func:`existing_names`), which it keeps.

    Each input's own name (a DICOM folder ``s`` -> ``s.nii.gz``, ``.mhd`` -> ``.mha``, ``.nhdr`` -> ``.nrrd``). Inputs
    whose names have one stem (any case) get, first, the folders they lie in relative to the folder those inputs
    share, joined with ``_`` (``sub1/case`` + ``sub2/case`` -> ``sub1_case``, ``sub2_case``); those of one folder then
    keep their suffix (``x.nii`` + ``x.nii.gz`` -> ``x_nii.nii``, ``x_nii_gz.nii.gz``; a DICOM folder ``s`` beside
    ``s.nii.gz`` -> ``s_dicom.nii.gz``, ``s_nii_gz.nii.gz``). Names longer than :data:`MAX_NAME_BYTES` are cut
    (:func:`short_name`). Names that still clash get ``~`` and 8 hex digits of the sha1 of the input's absolute path
    (``a.png`` beside ``a_png.png``; names that differ only in case), and so do, at once, inputs of one name whose
    folders share none (on two Windows drives, ``C:\\scans`` and ``D:\\export``, or a drive and a network path). An
    input whose output exists (``kept``, found by the provenance of the outputs in the folder) keeps that output's
    name, whatever the names of inputs added since would give it; an input whose name then clashes with a kept one
    gets the hash.

    Raises:
        InputError: two inputs would still get one name (the same file given twice); the message names them.
    """
    kept = kept or {}
    names = [output_name(s) for s in sources]
    folders = [Path(os.path.abspath(s)).parent for s in sources]

    def clashing(current: list[str]) -> list[list[int]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(current):
            groups[_stem_key(n)].append(i)
        return [g for g in groups.values() if len(g) > 1]

    def path_hashed(i: int, name: str) -> str:
        stem, suffix = split_volume_suffix(name)
        return f"{stem}~{hashlib.sha1(os.fsencode(os.path.abspath(sources[i]))).hexdigest()[:8]}{suffix}"

    for group in clashing(names):  # the same name in different folders: their folders as a prefix
        try:
            root = Path(os.path.commonpath([str(folders[i]) for i in group]))
        except ValueError:  # no folder in common (two Windows drives): the path's hash tells them apart
            for i in group:
                names[i] = path_hashed(i, names[i])
            continue
        for i in group:
            rel = folders[i].relative_to(root).parts
            names[i] = "_".join((*rel, names[i]))
    for group in clashing(names):  # the same folder too: the suffix tells them apart
        for i in group:
            stem, suffix = split_volume_suffix(names[i])
            own_stem = split_volume_suffix(output_name(sources[i]))[0]
            names[i] = f"{stem}_{_suffix_tag(sources[i], own_stem)}{suffix}"
    for group in clashing(names):  # a suffix tag that is another input's name (a.png, a_png.png): the path's hash
        for i in group:
            names[i] = path_hashed(i, names[i])
    names = [short_name(n) for n in names]
    if kept:  # outputs made before keep their names; a new input named as one of them takes the hash
        taken = {_stem_key(n) for n in kept.values()}
        for i, n in enumerate(names):
            if i in kept:
                names[i] = kept[i]
            elif _stem_key(n) in taken:
                names[i] = short_name(path_hashed(i, n))
    left = clashing(names)
    if left:
        pairs = "; ".join(" and ".join(str(sources[i]) for i in g) + f" (both {names[g[0]]})" for g in left)
        raise InputError(f"several inputs would be written to the same output name: {pairs}; rename one of them, "
                         "or give them in separate batches")  # fmt: skip
    return names


def _file_identity(path: Path) -> FileIdentity:
    """What tells one file (or DICOM folder) from another: device and inode, else (nothing there, or a network drive
    that numbers no inodes) the resolved path (:func:`~DiffusionCore.files.file_identity`)."""
    return file_identity(path) or resolved_path_key(path)


def distinct_sources(sources: list[Path]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """``sources`` with each file once (by identity: a link to a file of the batch, a path through ``..``), and the
    ``(left out, the same file as)`` pairs."""
    seen: dict[FileIdentity, Path] = {}
    kept, twice = [], []
    for s in sources:
        key = _file_identity(s)
        if key in seen:
            twice.append((s, seen[key]))
        else:
            seen[key] = s
            kept.append(s)
    return kept, twice


def one_in_a_folder(batch: bool, sources: list[Path], folder: Path | None, out: Path) -> bool:
    """Whether a batch is one run after all: a folder (``folder``: the one searched, None for a list file) that holds
    one input, and a volume file's name as OUTPUT (a patient's folder with one CT series beside a scout, a study with
    one radiograph): that one input, as ``evaluate --reference`` takes the same folder."""
    return batch and len(sources) == 1 and folder is not None and not out.is_dir() and bool(split_volume_suffix(out.name)[1])


def single_job(source: Path, out: Path, output_format: str, uncertainty: Path | None = None) -> Job:
    """The job of a run of one input: OUTPUT as given, or the input's name inside it when it is a folder (a DICOM
    series is written as that folder); an uncertainty map's folder the same way."""
    as_dicom = wants_dicom(output_format, source, out)
    if out.is_dir() and not as_dicom:
        out = out / output_name(source)
    if uncertainty is not None and uncertainty.is_dir():
        uncertainty = uncertainty / output_name(source)
    return Job(source, out, uncertainty, as_dicom)


def batch_jobs(sources: list[Path], out: Path, as_dicom: bool, noun: str = "volume",
               uncertainty: Path | None = None) -> tuple[list[Job], list[tuple[Path, Path]]]:  # fmt: skip
    """The jobs of a batch's distinct inputs, each named after its input (:func:`batch_output_names`) in the folder
    ``out`` (a DICOM series folder each with ``as_dicom``), its uncertainty map in the folder ``uncertainty``; and the
    ``(left out, the same file as)`` pairs of inputs named twice (:func:`named_twice_jobs`).

    Raises:
        OutputError: OUTPUT (or the uncertainty folder) is a volume file's name.
    """
    sources, twice = distinct_sources(sources)
    refuse_file_name_for_batch(out, "output", len(sources), noun)
    refuse_file_name_for_batch(uncertainty, "--uncertainty", len(sources), noun)
    names = batch_output_names(sources, existing_names(sources, out, as_dicom))
    jobs = [Job(s, out / (series_folder_name(n) if as_dicom else n), uncertainty / n if uncertainty else None, as_dicom)
            for s, n in zip(sources, names)]  # fmt: skip
    return jobs, twice


def existing_names(sources: list[Path], folder: Path, as_dicom: bool) -> dict[int, str]:
    """Input index -> the name of the output in ``folder`` whose provenance records that very input (its name and,
    where inputs share the name, its content's sha256: :func:`~DiffusionCore.results.recorded_source`; the absolute
    path that outputs recorded before 2026-12-07), for the inputs that have one
    output there: a batch continued after inputs were added keeps the names of what it made before (the new names
    would redo those inputs beside their old outputs). Empty when the folder does not exist yet."""
    if not folder.is_dir():
        return {}
    real = {}
    for i, s in enumerate(sources):
        with contextlib.suppress(OSError):
            real[os.path.realpath(s)] = i
    found: dict[int, list[str]] = defaultdict(list)
    digests: dict[int, str] = {}  # the contents of inputs that share a name, read once
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if as_dicom != entry.is_dir() or (not as_dicom and not split_volume_suffix(entry.name)[1]):
                continue
            recorded = _recorded(Path(entry.path))
        except OSError:
            continue
        made_from = recorded.input if recorded is not None else ""
        if made_from and os.path.isabs(made_from):  # a path, recorded before 2026-12-07
            i = real.get(os.path.realpath(made_from)) if os.path.lexists(made_from) else None
        else:  # its name and sha256 (no folder: results travel): the input of that name and content
            i = recorded_source(recorded, sources, digests) if made_from else None
        if i is not None:
            found[i].append(entry.name + _DEFAULT_OUTPUT_SUFFIX if as_dicom else entry.name)
    return {i: names[0] for i, names in found.items() if len(names) == 1}


def named_twice_jobs(twice: list[tuple[Path, Path]], jobs: list[Job], as_dicom: bool) -> list[Job]:
    """The jobs of the inputs a batch names twice (:func:`distinct_sources`' pairs): skipped, each with the output of
    the one it is the same file as (listed after the others, so the torchrun shares stay those of the distinct files)."""
    by_source = {job.source: job for job in jobs}
    return [Job(dup, by_source[first].output, None, as_dicom, skip=f"{NAMED_TWICE}{first}: done once")
            for dup, first in twice]  # fmt: skip


def check_batch_folder(folder: Path, what: str) -> bool:
    """Make sure a batch's output folder exists and is writable; True when this call created it. The output folder
    (``what`` "output") is then claimed for the run (:func:`claim_batch_folder`)."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file; for a batch the {what} must be a folder.")
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
    if what == "output":
        try:
            claim_batch_folder(folder)
        except BaseException:
            if created:
                remove_if_empty([folder])
            raise
    return created


#: The lock file a batch holds in its output folder while it runs (hidden: batch searches pass over hidden files).
BATCH_LOCK_FILE = ".diffusioncore-batch.lock"
#: The output folders this process's batches hold (their absolute paths -> the lock).
_CLAIMS: dict[str, Any] = {}
_RELEASED_AT_EXIT = False


def _batch_lock(path: Path) -> Any:
    """The lock primitive of ``train``'s output folder (:class:`~DiffusionCore.train.outdir._Lock`: created with
    ``O_EXCL``, holding pid, host and start time; a lock whose process is gone is taken over), saying a batch's
    refusal."""
    from ..train.outdir import _Lock

    class BatchLock(_Lock):
        def after_dead_holder(self) -> str:
            return ("the outputs it finished are kept; run its command again with --skip-existing to do the ones "
                    "it left")  # fmt: skip

        def in_use_error(self, where: str, tail: str) -> OutputError:
            out = self.path.parent
            return OutputError(f"{out} is the output folder of another batch that is running ({where}, lock file "
                               f"{self.path}): two batches into one folder would write the same outputs; wait for it "
                               "to end and then run this command with --skip-existing to do what it left, or give "
                               f"another output folder{tail}")  # fmt: skip

    return BatchLock(path)


def claim_batch_folder(folder: Path) -> None:
    """Hold a batch's output folder for the run: one batch per folder at a time. Two batches into one folder (the same
    command started twice, a second batch over a first one still running) would both write each output, one failing to
    publish what the other wrote, and both doing the work. The second is refused at once, naming the process that
    holds the folder; a lock left by a run killed outright (``kill -9``) is taken over, with a warning. Released by
    :func:`release_batch_folders` when the run ends (:func:`run_batch`, :func:`plan_or_refuse` on a refusal; at exit
    in any case). Under ``torchrun`` only the first process (``RANK`` 0) claims it: the others write their shares into
    the same folder. A folder this process holds already (a plan made again before its run) is not claimed twice.

    Raises:
        OutputError: another batch that is running holds the folder (exit code 4).
    """
    from ..devices import env_int

    key = os.path.abspath(folder)
    if env_int("RANK", 0) != 0 or key in _CLAIMS:
        return
    lock = _batch_lock(Path(folder) / BATCH_LOCK_FILE)
    from ..train.outdir import acquire_folder_lock

    acquire_folder_lock(lock, folder, "a writable one")
    global _RELEASED_AT_EXIT
    if not _RELEASED_AT_EXIT:  # released at exit too, however the run ends (but kill -9)
        import atexit

        atexit.register(release_batch_folders)
        _RELEASED_AT_EXIT = True
    _CLAIMS[key] = lock


def release_batch_folders(folders: list[Path] | None = None) -> None:
    """Release the claims (:func:`claim_batch_folder`) this process holds on ``folders`` (default: all of them)."""
    keys = list(_CLAIMS) if folders is None else [os.path.abspath(f) for f in folders]
    for key in keys:
        lock = _CLAIMS.pop(key, None)
        if lock is not None:
            with contextlib.suppress(OSError):
                lock.release()


def refuse_file_name_for_batch(folder: Path | None, what: str, count: int, noun: str = "volume") -> None:
    """A batch writes into folders: a name such as ``out.nii.gz`` would become a folder of that name, into
    which a later single-volume run would then write without a word."""
    if folder is not None and not folder.is_dir() and split_volume_suffix(folder.name)[1]:
        raise OutputError(
            f"the input is a batch (a folder or list of {noun}s: {count} found), so the {what} must be a folder, and "
            f"{folder.name} is a volume file's name: give a folder (it is created), or one {noun} file as INPUT"
        )


@dataclass
class Plan:
    """What a run does: its jobs (this process's share under torchrun; those to skip marked), whether INPUT is a
    batch, the output folder of a batch, and the folders this run created (removed again if nothing is written)."""

    batch: bool
    jobs: list[Job]
    created: list[Path] = field(default_factory=list)
    folder: Path | None = None
    #: what the search of INPUT passed over, for the report: ``{"folder", "why", "files", "first"}`` per kind
    passed_over: list[dict[str, Any]] = field(default_factory=list)
    #: what the search of INPUT did not take for an input (files that are no volume, DICOM folders holding no CT
    #: series: :func:`~DiffusionCore.inputs.collect_volumes`'s ``left_out``), in the same form; the report lists them
    #: under ``left_out``, apart from the inputs the run passed over
    left_out: list[dict[str, Any]] = field(default_factory=list)


class SkipInput(Exception):  # noqa: N818 - not an error: the input is passed over, as one whose output exists
    """Raised by a command's runner of one input to pass it over (``sr`` never does; ``xray2ct`` for a lateral view in
    a batch of frontal weights): the batch lists it as skipped, with the message as why, and goes on."""


#: Why a skipped input was named twice: how its reason starts.
NAMED_TWICE = "the same file as "
#: How a skipped volume's reason ends when its outputs exist.
SKIP_EXISTING_NOTE = " (--skip-existing)"
#: What a batch's refusal of an existing output advises.
BATCH_EXISTS_ADVICE = ("pass --skip-existing to keep it and do the batch's other inputs (a stopped batch continues so), "
                       "or --overwrite to replace it")  # fmt: skip


@dataclass(frozen=True)
class KeptCheck:
    """What an output that ``--skip-existing`` keeps must have been made with, as far as a run knows it before any
    input is read: the weights' sha256 (``None``: not compared) and ``settings``, the provenance's settings this run
    fixes: key as the provenance records it -> (the option that sets it, this run's value)."""

    weights_sha256: str | None
    settings: dict[str, tuple[str, Any]]
    #: the voxel type of the output files (--output-dtype), read from an existing file's header; None: not compared
    output_dtype: str | None = None


def _setting_text(value: Any) -> str:
    """A recorded setting as a user reads it: none, on/off, ``steps 400``, ``12/12`` (one value per stage)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_setting_text(v)}" for k, v in value.items() if v not in (None, 0, 0.0)) or "default"
    if isinstance(value, list):
        return "/".join(_setting_text(v) for v in value)
    return str(value)


def settings_differences(recorded: dict[str, Any], planned: dict[str, tuple[str, Any]]) -> list[str]:
    """``"OPTION: RECORDED (this run: PLANNED)"`` for each key of ``planned`` (:attr:`KeptCheck.settings`) whose
    recorded value differs. A key the output does not record is not compared; a recorded list (one value per stage)
    agrees with a single planned value when each of its items equals it, and a recorded record with a planned one
    when it holds the same values under the planned keys (what was asked; it may also record what was done: an
    adaptation's steps run)."""
    out = []
    for key, (option, value) in planned.items():
        if key not in recorded:
            continue
        was = recorded[key]
        if isinstance(was, list) and not isinstance(value, list):
            same = all(item == value for item in was)
        elif isinstance(was, dict) and isinstance(value, dict):
            same = all(was.get(k) == v for k, v in value.items())
        else:
            same = was == value
        if not same:
            out.append(f"{option}: {_setting_text(was)} (this run: {_setting_text(value)})")
    return out


def existing_output(job: Job, kept: KeptCheck | None = None) -> str | None:
    """Why ``job``'s outputs count as done: every file it writes (with a NIfTI's provenance sidecar, and the
    --uncertainty map) exists. Outputs are written to hidden temporary files and renamed, so one that exists is whole.
    None when none exists.

    Raises:
        OutputExistsError: some of them exist and others not: not an output this command finished; or its provenance
            records another input, other weights or other settings (``kept``) than this run's.
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
    dtype = None
    for f in [] if job.as_dicom else [f for f in files if split_volume_suffix(f.name)[1]]:
        found, damaged = volume_file_state(f)
        if damaged:
            others = ", ".join(str(o) for o in files if o != f)
            raise OutputExistsError(
                f, f"exists but is not whole: {damaged}; the batch wrote it whole, so it was damaged since (an "
                "interrupted copy or sync, a bad disk)",
                f"delete it{' and ' + others if others else ''} so that --skip-existing redoes it, or pass "
                "--overwrite to redo every input")  # fmt: skip
        if f == job.output:
            dtype = found
    recorded = _recorded(job.output)
    made_from = recorded.input if recorded is not None and recorded.input else None
    if made_from is not None and not _same_input(made_from, job.source):
        raise OutputExistsError(
            job.output, f"exists but was made from {made_from}, not from {job.source}: the batch's output names depend "
            "on all its inputs, and inputs added or removed since the first run (a second file of the same name) "
            "changed them, so the files there do not belong to these inputs",
            "write the batch into a new output folder, or pass --overwrite to redo every input")  # fmt: skip
    if recorded is not None and kept is not None:
        planned = dict(kept.settings)
        if not str(recorded.settings.get("device") or "cpu").startswith("cpu"):
            planned.pop("torch_threads", None)  # the CPU thread count shapes a result made on the CPU only
        differ = settings_differences(recorded.settings, planned)
        if kept.output_dtype and dtype and dtype != kept.output_dtype:
            differ.append(f"--output-dtype: {dtype} (this run: {kept.output_dtype})")
        sha = recorded.weights_sha256.lower()
        if kept.weights_sha256 and sha and not kept.weights_sha256.startswith(sha):  # a NIfTI without sidecar: a prefix
            differ.insert(0, f"weights {recorded.weights or sha[:12]} (sha256 {sha[:12]}...; this run's: "
                             f"{kept.weights_sha256[:12]}...)")  # fmt: skip
        if differ:
            raise OutputExistsError(
                job.output, f"exists but was made with other settings than this run's: {'; '.join(differ)}",
                "run the batch with the settings it was made with, write it into a new output folder, or pass "
                "--overwrite to redo every input")  # fmt: skip
    return f"its output {job.output} exists{SKIP_EXISTING_NOTE}"


def _recorded(output: Path):
    """The provenance of an existing output (a DICOM series: its first file's, as :func:`read_provenance` reads a
    folder), or None when it records none (a file of another program)."""
    from ..provenance import read_provenance

    return read_provenance(output)


def _same_input(recorded: str, source: Path) -> bool:
    """Whether an output's recorded input is ``source``: the same file for an absolute path (what this software
    records since 2026-12-06), the same name for a relative one (recorded from another working folder) and for an
    absolute one that is no longer there (the input folder was moved or renamed since: a batch continued from its
    new place)."""
    if not os.path.isabs(recorded) or not os.path.lexists(recorded):
        return Path(recorded).name == source.name
    if os.path.realpath(recorded) == os.path.realpath(source):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(recorded, source)
    return False


def check_outputs(jobs: list[Job], args: argparse.Namespace, batch: bool, kept: KeptCheck | None = None) -> None:
    """Check before any work that each job's outputs can be written; with --skip-existing, mark the done ones (made
    from the same input, and with what ``kept`` says this run would use; to it are added the settings of ``args``
    the commands share: torch's thread count, which the output depends on (--threads, recorded as
    ``torch_threads``), and the voxel type of the files (--output-dtype))."""
    if kept is not None:
        kept = _with_shared_settings(kept, args)
    for job in jobs:
        if job.skip is not None:
            continue
        if args.skip_existing:
            job.skip = existing_output(job, kept)
            if job.skip is not None:
                continue
        try:
            check_result_output(job.output, job.as_dicom, overwrite=args.overwrite)
            if job.uncertainty is not None:
                check_output_path(job.uncertainty, overwrite=args.overwrite)
        except OutputExistsError as exc:
            raise exc.advising(BATCH_EXISTS_ADVICE) if batch else exc from None


def _with_shared_settings(kept: KeptCheck, args: argparse.Namespace) -> KeptCheck:
    """``kept`` with the thread count this run uses (``--threads``, set before the plan; 0: torch's default, as the
    provenance records it) and ``--output-dtype``, where the command has them."""
    import dataclasses

    settings = dict(kept.settings)
    if getattr(args, "threads", None) is not None and "torch_threads" not in settings:
        import torch

        settings["torch_threads"] = ("--threads", int(torch.get_num_threads()))
    dtype = kept.output_dtype or getattr(args, "output_dtype", None)
    return dataclasses.replace(kept, settings=settings, output_dtype=dtype)


#: Bytes per voxel of the voxel types of NIfTI (``datatype`` code), NRRD (``type``) and MetaImage (``ElementType``),
#: with the name --output-dtype gives them.
_NIFTI_TYPES = {2: ("uint8", 1), 4: ("int16", 2), 8: ("int32", 4), 16: ("float32", 4), 64: ("float64", 8),
                256: ("int8", 1), 512: ("uint16", 2), 768: ("uint32", 4)}  # fmt: skip
_NRRD_TYPES = {**{t: ("int16", 2) for t in ("short", "short int", "signed short", "signed short int", "int16",
                                            "int16_t")},
               **{t: ("uint16", 2) for t in ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t")},
               **{t: ("int8", 1) for t in ("signed char", "int8", "int8_t")},
               **{t: ("uint8", 1) for t in ("uchar", "unsigned char", "uint8", "uint8_t")},
               **{t: ("int32", 4) for t in ("int", "signed int", "int32", "int32_t")},
               **{t: ("uint32", 4) for t in ("uint", "unsigned int", "uint32", "uint32_t")},
               "float": ("float32", 4), "double": ("float64", 8)}  # fmt: skip
_MET_TYPES = {"MET_CHAR": ("int8", 1), "MET_UCHAR": ("uint8", 1), "MET_SHORT": ("int16", 2),
              "MET_USHORT": ("uint16", 2), "MET_INT": ("int32", 4), "MET_UINT": ("uint32", 4),
              "MET_FLOAT": ("float32", 4), "MET_DOUBLE": ("float64", 8)}  # fmt: skip


def volume_file_state(path: Path) -> tuple[str | None, str | None]:
    """``(voxel type, what is wrong)`` of an existing volume file (NIfTI-1, NRRD, MetaImage; the voxel type as
    --output-dtype names it, None where not told), from its header and its size alone: what is wrong is None when the
    file is as long as its header says (a plain file's size; a gzip stream's trailer, whose uncompressed size must be
    the header's), else why not.

    Cheap on purpose: ``--skip-existing`` looks at every output of a batch of hundreds before any work. A ``.nii.gz``
    cut short ends with compressed bytes where its trailer should be, so the trailer's size tells it (a wrong match has
    a chance of 1 in 2**32); its CRC-32, which only inflating the whole file checks, is not read: that would find a
    flipped byte inside a whole-length file (a bad disk), which a cut-short copy is not, at the cost of reading every
    output again. A zlib-compressed MetaImage records its compressed size, which the file must hold. Formats and
    encodings not known here (a detached data file, NIfTI-2) are taken as they are."""
    import gzip
    import math
    import struct

    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            gz = name.endswith(".gz")
            with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
                head = f.read(352)
            if len(head) < 348:
                return None, f"it ends inside its header ({len(head)} bytes of 348)"
            order = "<" if struct.unpack("<i", head[:4])[0] == 348 else ">"
            if struct.unpack(order + "i", head[:4])[0] != 348:
                return None, None  # not NIfTI-1 (NIfTI-2): taken as it is
            dims = struct.unpack(order + "8h", head[40:56])
            code = struct.unpack(order + "h", head[70:72])[0]
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            dtype = _NIFTI_TYPES.get(code, (None, 0))[0]
            if not 1 <= dims[0] <= 7:
                return dtype, f"its header is damaged (dim[0] = {dims[0]})"
            expected = max(offset, 352) + math.prod(max(0, d) for d in dims[1 : dims[0] + 1]) * bitpix // 8
            if gz:
                whole = gzip_ends_with_size(path, 0, expected)
            else:
                whole = path.stat().st_size >= expected
            if not whole:
                return dtype, (f"it is shorter than its header says ({format_bytes(expected)} of header and voxels"
                               f"{' uncompressed' if gz else ''})")  # fmt: skip
            return dtype, None
        if name.endswith((".nrrd", ".mha")):
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            nrrd = name.endswith(".nrrd")
            fields: dict[str, str] = {}
            offset = 0
            for raw in head.split(b"\n"):
                offset += len(raw) + 1
                line = raw.decode("latin-1").strip()
                if nrrd and not line and offset > 1:
                    break
                key, sep, value = line.partition(":" if nrrd else "=")
                if sep and not line.startswith("#"):
                    fields.setdefault(key.strip().lower(), value.strip().lstrip("=").strip())
                if not nrrd and key.strip().lower() == "elementdatafile":
                    break
            else:
                return None, "it ends inside its header"
            if nrrd:
                dtype, size = _NRRD_TYPES.get(fields.get("type", "").lower(), (None, 0))
                sizes = fields.get("sizes", "").split()
                if "data file" in fields or "datafile" in fields or not size or not sizes:
                    return dtype, None
                voxels = math.prod(int(v) for v in sizes) * size
                encoding = fields.get("encoding", "raw").lower()
                if encoding == "raw":
                    whole = path.stat().st_size >= offset + voxels
                elif encoding in ("gzip", "gz"):
                    whole = gzip_ends_with_size(path, offset, voxels)
                else:
                    return dtype, None
            else:
                dtype, size = _MET_TYPES.get(fields.get("elementtype", "").upper(), (None, 0))
                dims = fields.get("dimsize", "").split()
                if fields.get("elementdatafile", "").upper() != "LOCAL" or not size or not dims:
                    return dtype, None
                channels = int(fields.get("elementnumberofchannels", "1") or 1)
                if fields.get("compresseddata", "false").lower() == "true":
                    compressed = fields.get("compresseddatasize")
                    whole = compressed is None or path.stat().st_size >= offset + int(compressed)
                else:
                    whole = path.stat().st_size >= offset + math.prod(int(v) for v in dims) * size * channels
            if not whole:
                return dtype, "it is shorter than its header says"
            return dtype, None
    except (OSError, EOFError, ValueError, struct.error, gzip.BadGzipFile) as exc:
        return None, f"its header cannot be read ({one_line(str(exc), 120)})"
    return None, None


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders a run created, those that are still empty (the run's claim on them released first)."""
    release_batch_folders(folders)
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def series_folder_name(file_name: str) -> str:
    """A batch's DICOM series folder for an input: its output file name without the volume suffix."""
    return split_volume_suffix(file_name)[0]


def report_file(args: argparse.Namespace, info: DistInfo) -> Path | None:
    """This process's --report path (one per process under torchrun), unchecked."""
    if not args.report:
        return None
    p = Path(args.report)
    if info.world_size > 1:
        p = p.with_name(f"{p.stem}.rank{info.rank}{p.suffix or '.json'}")
    return p


def checked_report_path(args: argparse.Namespace, info: DistInfo) -> Path | None:
    p = report_file(args, info)
    if p is None:
        return None
    # a batch continued with --skip-existing writes the report of this run over the first run's
    return check_writable_file(p, overwrite=args.overwrite or getattr(args, "skip_existing", False))


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

    def __init__(self, sink: Progress, n_volumes: int, write_share: float = WRITE_SHARE, noun: str = "volume"):
        self.sink = sink
        self.n = n_volumes
        self.index = 0
        self.write_share = float(write_share)
        self.noun = noun

    def _tell(self, frac: float, message: str) -> None:
        prefix = f"{self.noun} {self.index + 1}/{self.n}: " if self.n > 1 else ""
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


#: How long (seconds) the processes of a torchrun batch wait for each other at its end: the slowest one's share.
BATCH_WAIT_SECONDS = 30 * 24 * 3600.0
#: What one volume of a batch can fail with while the batch goes on (a full disk stops it: :func:`disk_full`).
VOLUME_FAILURES = (InputError, OutputError, ResourceError, NumericalError, MemoryError)
#: The exit codes a volume's failure can have (counted per code across torchrun's processes).
FAILURE_CODES = (1, 2, 4, 5)


def volume_failure(exc: BaseException) -> bool:
    return isinstance(exc, VOLUME_FAILURES) or is_out_of_memory(exc)


def failure_code(exc: BaseException) -> int:
    return exc.exit_code if isinstance(exc, DiffusionCoreError) else 5  # MemoryError, torch's out of memory


def not_for_this_tool(exc: BaseException) -> bool:
    """Whether an input's refusal says it is not for this command rather than broken: an isotropic volume (nothing to
    super-resolve), a 2D image or a single slice, a colour or 4D image, intensities that are not CT, an interspaced
    series (thin slices with gaps: :func:`DiffusionCore.degrade.check_interspaced`). A batch passes such
    an input over (listed apart, not failed; exit 7 is kept for real failures): run again, it would be refused again.
    The refusals say so themselves (:func:`DiffusionCore.errors.not_for_this_tool` marks them where they are raised)."""
    return bool(getattr(exc, "not_for_this_tool", False))


def series_passed_over(job: Job, log: BatchLog) -> None:
    """After a DICOM folder's volume was written: the other series of that folder (the reader takes the CT series, the
    largest where there are several, with one warning line) go into the report's ``passed_over`` and the closing count,
    each with why, so that a batch of hundreds does not lose a series in one line of its log."""
    if not job.source.is_dir() or not log.reports:
        return
    chosen = str((log.reports[-1].get("provenance") or {}).get("input_uid") or "")
    if not chosen:
        return
    try:
        others = _other_series(job.source, chosen)
    except Exception as exc:  # noqa: BLE001 - a report's detail: the volume was written
        logger.debug("could not list the series of %s: %s", job.source, exc)
        return
    if not others:
        return
    used = next((label for uid, label in others if uid == chosen), chosen)
    for uid, label in others:
        if uid == chosen:
            continue
        why = (f"{job.source} holds several series and {used} was used; this one, {label}, was not: put it in a "
               "folder of its own to super-resolve it")  # fmt: skip
        log.passed_over.append({log.noun: str(job.source), "series": label, "series_uid": uid, "why": why})


def _other_series(folder: Path, chosen: str) -> list[tuple[str, str]]:
    """``(uid, label)`` of each DICOM series in ``folder`` and the folders below it (as the reader searches it),
    ``chosen`` among them; empty when it holds one series."""
    import SimpleITK as sitk

    from ..dicom_in import describe_series
    from ..volume import itk_path

    series: dict[str, list[str]] = {}
    for d in [folder] + sorted(p for p in folder.rglob("*") if p.is_dir()):
        spelled = itk_path(d)  # as ITK can open it (Windows: a short name where its code page cannot spell it)
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(spelled) or ():
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(spelled, uid))
            if len(files) > len(series.get(uid, [])):
                series[uid] = files
    if len(series) < 2 or chosen not in series:
        return []
    return [(uid, describe_series(uid, files).label) for uid, files in series.items()]


def free_bytes(folder: Path) -> int | None:
    """The space left to this user on the disk holding ``folder``, or None where it cannot be told."""
    import shutil

    try:
        return int(shutil.disk_usage(folder).free)
    except (OSError, ValueError):
        return None


#: The room below which a disk counts as full when the batch has no output of its own to measure the next one by.
MIN_ROOM_BYTES = 1 << 20


def _output_bytes(job: Job) -> int:
    """The least room writing ``job``'s outputs needs, from the finished files: their sizes (a DICOM series folder's
    files summed). A ``.nii.gz`` is written through its uncompressed ``.nii`` where both fit, else compressed in one
    pass (:func:`~DiffusionCore.volume.write_volume`), so its own size is what it needs at least."""
    total = 0
    paths = [job.output] if job.as_dicom else planned_files(job.output, False)
    if job.uncertainty is not None:
        paths += planned_files(job.uncertainty, False)
    for path in paths:
        with contextlib.suppress(OSError):
            if path.is_dir():
                total += sum(f.stat().st_size for f in path.iterdir())
                continue
            total += path.stat().st_size
    return total


def disk_left_full(folder: Path, log: BatchLog) -> str | None:
    """After an output did not fit on its disk (the writer removed its temporary files): why the batch stops, or None
    when it goes on.

    One output that does not fit is that volume's failure while smaller ones may still fit: in a batch of mixed sizes
    one large scan must not cost the rest of the night. The next outputs' sizes are known only once their volumes are
    read and run, so the smallest output this batch has made (written now or kept from an earlier run) stands for the
    smallest the others can need, with the room its writing needs at least (:func:`_output_bytes`): the batch stops when the space left is less than that, or, with no output made yet, less than
    :data:`MIN_ROOM_BYTES` (1 MiB); also when the free space cannot be told (as before)."""
    free = free_bytes(folder)
    if free is None:
        return "the free space could not be measured"
    outputs = {str(e.get("output")) for e in log.reports}
    made = [_output_bytes(job) for job in log.jobs
            if str(job.output) in outputs or (job.skip or "").endswith(SKIP_EXISTING_NOTE)]  # fmt: skip
    made = [n for n in made if n > 0]
    need = min(made) if made else MIN_ROOM_BYTES
    if free >= need:
        logger.info("%s free on the disk of %s: enough for writing an output of the smallest this batch made (%s), so "
                    "the batch goes on", format_bytes(free), folder, format_bytes(need))  # fmt: skip
        return None
    smallest = f"writing the smallest output this batch made needs ({format_bytes(need)})" if made else format_bytes(need)
    return f"{format_bytes(free)} free on the disk of {folder}, less than {smallest}"


def disk_full(exc: BaseException) -> bool:
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
        # the commands' own warnings name the input, or are about the whole batch
        if record.levelno >= logging.WARNING and not record.name.startswith(__package__):
            text = record.getMessage()
            if str(self.source) not in text and self.source.name not in text:
                record.msg, record.args = f"{self.source}: {text}", None
        return True


@contextlib.contextmanager
def warnings_named(source: Path | None):
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
        # imported before the group exists: its functions' ``group=group.WORLD`` defaults are bound at import, and
        # torch._dynamo imports it lazily mid-batch (building a model on the meta device does). Bound to this group
        # they keep it alive after destroy_process_group(): its Gloo threads then outlive leave(), and one still
        # releasing the last all_reduce's tensor (which needs the GIL) while Python exits aborts the process
        # ("terminate called without an active exception", exit -6; xray2ct under torchrun, a third of the runs)
        import torch.distributed.nn  # noqa: F401
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
    #: What the batch's inputs are ("volume", "radiograph"): the report's keys and the closing lines say it.
    noun: str = "volume"
    #: what the search of INPUT passed over (:attr:`Plan.passed_over`)
    passed_over: list[dict[str, Any]] = field(default_factory=list)
    #: what the search of INPUT did not take for an input (:attr:`Plan.left_out`)
    left_out: list[dict[str, Any]] = field(default_factory=list)
    #: output -> its entry in the report an earlier run of the batch left at the --report path (:func:`earlier_entries`)
    earlier: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the earlier run's entries of the inputs skipped as done (carried into this run's report)
    carried: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, job: Job, exc: BaseException) -> None:
        why = str(exc) if isinstance(exc, DiffusionCoreError) else f"out of memory ({one_line(str(exc), 200)})"
        self.failed.append({self.noun: str(job.source), "why": why})
        self.failed_codes.append(failure_code(exc))

    def pass_over(self, job: Job, exc: BaseException) -> None:
        """``job``'s input is not for this command (:func:`not_for_this_tool`): listed as passed over, not failed."""
        self.passed_over.append({self.noun: str(job.source), "why": str(exc)})
        logger.warning("passed over: %s", named_line(job.source, str(exc)))

    @property
    def passed(self) -> list[dict[str, Any]]:
        """The inputs this run passed over (:meth:`pass_over`, :func:`series_passed_over`), not what the search of
        INPUT left out (files that are no inputs, counted per folder)."""
        return [item for item in self.passed_over if self.noun in item]

    @property
    def searched_past(self) -> list[dict[str, Any]]:
        """What the search of INPUT did not take for an input (the report's ``left_out``): :attr:`left_out`, and the
        entries of :attr:`passed_over` that name a folder, not an input (``{"folder", "why", "files", "first"}``: kept
        there too, as earlier reports listed them)."""
        return [*self.left_out, *(item for item in self.passed_over if self.noun not in item)]

    def stop(self, why: str, after: int) -> None:
        """The batch stops before job ``after``: the rest are not tried."""
        self.stopped = why
        self.not_tried = [{self.noun: str(j.source), "why": f"not tried: {why}"} for j in self.jobs[after:]
                          if j.skip is None]  # fmt: skip

    def as_report(self) -> dict[str, Any]:
        many = f"{self.noun}s"
        order = {str(j.output): i for i, j in enumerate(self.jobs)}  # the inputs' order, earlier runs' entries too
        entries = sorted([*self.carried, *self.reports], key=lambda e: order.get(str(e.get("output")), len(order)))
        left_out = self.searched_past
        return {many: entries, "failed": self.failed, "skipped": self.skipped, "not_tried": self.not_tried,
                "stopped": self.stopped, "passed_over": self.passed_over, "left_out": left_out,
                "summary": {many: len(self.jobs), "written": len(self.reports), "failed": len(self.failed),
                            "skipped": len(self.skipped), "not_tried": len(self.not_tried),
                            "passed_over": len(self.passed),  # inputs found, not run: each in passed_over with why
                            "left_out": sum(int(item.get("files", 1)) for item in left_out),  # files not taken
                            "output": str(self.folder) if self.folder else None,
                            "seconds": round(time.perf_counter() - self.started, 3)}}  # fmt: skip

    def skip(self, job: Job) -> None:
        """``job`` is not done (:attr:`Job.skip` says why); one done by an earlier run keeps that run's report entry."""
        self.skipped.append({self.noun: str(job.source), "why": str(job.skip)})
        logger.info("skipped %s: %s", job.source, job.skip)
        entry = self.earlier.get(str(job.output)) if str(job.skip).endswith(SKIP_EXISTING_NOTE) else None
        if entry is not None:
            self.carried.append({**entry, "from_earlier_run": True})

    @property
    def kept(self) -> int:
        """The skipped volumes whose outputs exist (--skip-existing), not those of a file named twice."""
        return sum(item["why"].endswith(SKIP_EXISTING_NOTE) for item in self.skipped)

    def counts(self) -> list[int]:
        """written, failed, skipped, not tried, stopped, the share's volumes, kept, passed over, and the failures per
        FAILURE_CODES."""
        per_code = [sum(c == code for c in self.failed_codes) for code in FAILURE_CODES]
        per_code[FAILURE_CODES.index(2)] += sum(c not in FAILURE_CODES for c in self.failed_codes)
        return [len(self.reports), len(self.failed), len(self.skipped), len(self.not_tried), int(bool(self.stopped)),
                len(self.jobs), self.kept, len(self.passed), *per_code]  # fmt: skip

    def tell(self, who: str) -> None:
        """The closing lines of this process's share: one line of counts, then each failure on its own line."""
        n = len(self.jobs)
        where = f" to {self.folder}" if self.folder else ""
        line = f"{who}{len(self.reports)} of {n} {self.noun}(s) written{where} in {format_seconds(time.perf_counter() - self.started)}"
        if self.skipped:
            twice = sum(item["why"].startswith(NAMED_TWICE) for item in self.skipped)
            kinds = [f"{n} {what}" for n, what in ((self.kept, "done before"), (twice, "named twice"),
                                                   (len(self.skipped) - self.kept - twice, "passed over")) if n]  # fmt: skip
            line += f"; {len(self.skipped)} skipped ({', '.join(kinds)})"
        if self.not_tried:
            line += f"; {len(self.not_tried)} not tried"
        if self.passed:
            line += f"; {len(self.passed)} passed over, listed below"
        if self.failed:
            line += f"; {len(self.failed)} failed, listed below"
        logger.info("%s", line)
        for item in self.passed:
            logger.info("passed over: %s", named_line(item[self.noun], item["why"]))
        for item in self.failed:
            logger.warning("failed: %s", named_line(item[self.noun], item["why"]))


def named_line(volume: str | Path, why: str, limit: int = 400) -> str:
    """``VOLUME: WHY`` in one line (cut to ``limit``), the volume said once where the message starts with it."""
    why = one_line(why, limit)
    return why if why.startswith(str(volume)) else f"{volume}: {why}"


def report_after(path: Path | None, data: dict[str, Any] | None) -> bool:
    """Write the --report, saying so when that fails too (a full disk): the run's own outcome stays the message.
    False when it could not be written."""
    if path is None or data is None:
        return True
    try:
        write_json_atomic(data, path, overwrite=True)
    except (OutputError, OSError) as exc:
        logger.warning("could not write the report %s: %s", path, one_line(str(exc), 300))
        return False
    return True


def earlier_entries(report_path: Path | None, noun: str) -> dict[str, dict[str, Any]]:
    """output -> entry of the report a run of the batch left at ``report_path`` (a stopped or partly failed run that
    this one continues with --skip-existing: the entries of the inputs it skips are carried into this run's report);
    empty when there is none or it is no batch report of these inputs."""
    import json

    if report_path is None or not report_path.is_file():
        return {}
    try:
        data = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get(f"{noun}s") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return {}
    return {str(e["output"]): e for e in entries if isinstance(e, dict) and e.get("output")}


@contextlib.contextmanager
def all_or_none(files: list[Path]) -> Iterator[None]:
    """The ``files`` an input's outputs are (a result, its provenance sidecar, its uncertainty map or stage files) that
    the block writes are removed again when it fails: a result without the rest is no finished output, which
    ``--skip-existing`` would keep. Only what this block itself put in place (:func:`~DiffusionCore.files.publish`,
    recorded in this thread's :func:`~DiffusionCore.files.publish_journal`) and is still that file is removed: a file
    that was there before, or that another process wrote at that name during the block (the reason the block failed,
    ``OutputExistsError``), is left."""
    with publish_journal() as journal:
        try:
            yield
        except BaseException:
            for f in files:
                if still_published(journal, f):
                    with contextlib.suppress(OSError):
                        os.unlink(f)
            raise


def plan_or_refuse(plan_jobs: Callable[[argparse.Namespace, DistInfo], Plan], args: argparse.Namespace,
                   info: DistInfo, group: ProcessGroup) -> tuple[Plan, Path | None]:  # fmt: skip
    """``plan_jobs(args, info)`` (the command's) and the --report path; under torchrun every process learns when
    another refused the run (before any work), so that all end together."""
    error: Exception | None = None
    plan = None
    try:
        plan = plan_jobs(args, info)
        report_path = checked_report_path(args, info)
    except Exception as exc:
        error = exc
        if plan is not None:  # the report refused: no empty output folder stays behind
            remove_if_empty(plan.created)
    code = 0 if error is None else error.exit_code if isinstance(error, DiffusionCoreError) else 1
    worst = group.reduce([code], "max")[0]
    if error is not None:
        release_batch_folders()
        group.leave()
        raise error
    if worst:
        release_batch_folders()
        group.leave()
        remove_if_empty(plan.created)
        refused = DiffusionCoreError("another process of this torchrun launch refused the run before any work; "
                                     "its error says why")  # fmt: skip
        refused.exit_code = worst
        raise refused
    return plan, report_path


#: ``make_one(progress, cancel)``: the command's runner of one input, ``one(job)`` -> that input's report entry.
OneRunner = Callable[[BatchProgress, threading.Event], Callable[[Job], dict[str, Any]]]


def run_one(command: str, make_one: OneRunner, plan: Plan, report_path: Path | None, *, progress_style: str = "auto",
            done: Callable[[Job, dict[str, Any]], None] | None = None) -> int:  # fmt: skip
    """A run of one input (``plan`` of no batch): its errors end the run (exit code of the error), nothing is written
    unless it succeeds, a terminate request (Slicer's Cancel, kill) stops it writing nothing. ``done(job, entry)``: what
    the command says once the input is written."""
    cancel = threading.Event()
    with sigterm_cancels(cancel, command):
        sink = Progress(progress_style, desc=command)
        try:
            for job in plan.jobs:  # one, or none under torchrun beyond the first process
                if job.skip is not None:
                    logger.info("%s: %s; nothing to do", job.source, job.skip)
                    continue
                entry = make_one(BatchProgress(sink, 1), cancel)(job)
                if report_path is not None:
                    write_json_atomic(entry, report_path, overwrite=True)
                if done is not None:
                    done(job, entry)
        finally:
            sink.close()
            release_batch_folders()
    return 0


def run_batch(command: str, make_one: OneRunner, plan: Plan, report_path: Path | None, info: DistInfo,
              group: ProcessGroup, *, progress_style: str = "auto", noun: str = "volume") -> int:  # fmt: skip
    """A batch of ``command`` (``sr``, ``xray2ct``): each input's failure is named and the batch goes on; a full disk
    stops it; the report is written whatever happens; the processes of a torchrun launch agree on the exit code once
    all are done. ``progress_style``: the command's ``--progress``; ``noun``: what the inputs are."""
    who = f"process {info.rank} of {info.world_size}: " if info.world_size > 1 else ""
    if info.world_size > 1:
        logger.info("%s%d %s(s) on %s", who, len(plan.jobs), noun, info.device)
    try:
        return _run_batch(command, make_one, plan, report_path, info, group, progress_style, noun, who)
    finally:
        release_batch_folders()


def _run_batch(command: str, make_one: OneRunner, plan: Plan, report_path: Path | None, info: DistInfo,
               group: ProcessGroup, progress_style: str, noun: str, who: str) -> int:  # fmt: skip
    cancel = threading.Event()
    log = BatchLog(plan.jobs, plan.folder, noun=noun, passed_over=list(plan.passed_over), left_out=list(plan.left_out),
                   earlier=earlier_entries(report_path, noun))  # fmt: skip
    sink = Progress(progress_style, desc=command)
    progress = BatchProgress(sink, len(plan.jobs), noun=noun)
    one = make_one(progress, cancel)
    index = 0
    try:
        with sigterm_cancels(cancel, command, outcome=""):  # the message is completed below
            for index, job in enumerate(plan.jobs):
                progress.index = index
                if job.skip is not None:
                    log.skip(job)
                    progress.written()
                    continue
                try:
                    with warnings_named(job.source):
                        log.reports.append(one(job))
                except SkipInput as skip:
                    job.skip = str(skip)
                    log.skip(job)
                    progress.written()
                except Exception as exc:
                    if not volume_failure(exc):
                        raise
                    if not_for_this_tool(exc):
                        log.pass_over(job, exc)
                        progress.written()
                        continue
                    if isinstance(exc, OutputExistsError):  # written meanwhile by another program: the command's words
                        exc = exc.advising("another program wrote it while this batch ran; move it away and run the "
                                           "same command again with --skip-existing to redo it")  # fmt: skip
                    log.fail(job, exc)
                    if disk_full(exc):
                        full = disk_left_full(plan.folder or job.output.parent, log)
                        if full is not None:
                            log.stop(f"the disk is full: {full}; {one_line(str(exc), 300)}", index + 1)
                            logger.warning("stopping the batch: %s", named_line(job.source, str(exc)))
                            break
                    logger.warning("failed, going on with the others: %s", named_line(job.source, str(exc)))
                else:
                    series_passed_over(job, log)
    except (Cancelled, KeyboardInterrupt) as exc:
        log.stop("the batch was stopped (a signal, Ctrl-C or Slicer's Cancel)", index)
        report_after(report_path, log.as_report())
        sink.close()
        log.tell(who)  # what was written, and each failure before the stop
        remove_if_empty(plan.created)
        how = str(exc) if isinstance(exc, Cancelled) else f"{command} was interrupted"
        raise Cancelled(f"{how} after {index} of {len(plan.jobs)} {noun}(s): {done_text(log)}; the one being worked "
                        "on was not written; run the same command again with --skip-existing to do the other "
                        f"{len(log.not_tried)}{report_text(report_path)}") from None  # fmt: skip
    except BaseException as exc:  # a bug, or a problem of the whole batch (the weights): what was done is reported
        log.stop(f"the batch stopped: {one_line(str(exc), 300)}", index)
        report_after(report_path, log.as_report())
        sink.close()
        if not log.reports:
            remove_if_empty(plan.created)
        raise
    sink.close()
    reported = report_after(report_path, log.as_report())
    log.tell(who)
    if not log.reports and info.world_size == 1:  # nothing written: the folders this run made go again
        remove_if_empty(plan.created)
    code = batch_outcome(log, group, report_path, info)
    if not reported:  # a script reads the report: its absence is no success
        raise OutputError(f"the batch's {noun}s were done ({len(log.reports)} written to {plan.folder}), but its report "
                          f"{report_path} could not be written (said above): free some space or give --report another "
                          "path, and run the same command again with --skip-existing to write it")  # fmt: skip
    return code


def done_text(log: BatchLog) -> str:
    where = f" to {log.folder}" if log.folder else ""
    kept = f" ({len(log.skipped)} done before were kept)" if log.skipped else ""
    if not log.reports:
        return f"none written{kept}"
    return f"{len(log.reports)} written{where}, complete{kept}"


def report_text(report_path: Path | None) -> str:
    return f"; report: {report_path}" if report_path is not None else ""


def batch_outcome(log: BatchLog, group: ProcessGroup, report_path: Path | None, info: DistInfo) -> int:
    """The exit code of a batch, the same in every process of a torchrun launch: 0 all written (or skipped); 7 some
    failed and others written; the failures' code (2 when they differ) when none was written; 4 stopped by a full
    disk. The error says it in one line; the closing lines above list the failures."""
    counts = group.reduce(log.counts())
    written, failed, skipped, not_tried, stopped, total, kept, passed = counts[:8]
    per_code = dict(zip(FAILURE_CODES, counts[8:]))
    several = info.world_size > 1 and group.joined
    if several and info.is_main:
        logger.info("all %d processes: %d of %d %s(s) written to %s", info.world_size, written, total, log.noun,
                    log.folder)  # fmt: skip
    reports = f"{report_path}" if report_path is not None else ""
    if several and report_path is not None:
        reports = "the --report file of each process"
    see = f" (listed above{'; also in ' + reports if reports else ''})"
    if stopped:
        why = log.stopped or "another process found the disk full"
        raise OutputError(f"the batch stopped after {written + skipped + failed} of {total} {log.noun}s, {why}; "
                          f"{written} written to {log.folder}, {failed} failed, {not_tried} not tried{see}: free "
                          "some space and run the same command again with --skip-existing to go on")  # fmt: skip
    if not failed:
        if passed and written + kept == 0:  # nothing at all could be done
            raise InputError(f"none of the {passed} {log.noun}s is for this command: each was passed over{see}, and "
                             "nothing was written; give inputs it takes (or the options they need, such as --axis, "
                             "--allow-non-ct or --allow-interspaced, as each line says)")  # fmt: skip
        return 0
    if written + kept == 0:
        codes = [c for c, n in per_code.items() if n]
        what = (f"{failed} {log.noun}(s) failed and {passed} were passed over (not for this command)" if passed else
                f"all {failed} {log.noun}s failed")  # fmt: skip
        err: DiffusionCoreError = InputError(f"{what}, nothing was written{see}")
        err.exit_code = codes[0] if len(codes) == 1 else 2
        raise err
    before = f" ({kept} done before kept)" if kept else ""
    raise PartialBatchError(f"{failed} of {total} {log.noun}s failed{see}; {written} written to {log.folder}{before}; fix "
                            "those inputs (or options) and run the same command again with --skip-existing to do only "
                            "them")  # fmt: skip
