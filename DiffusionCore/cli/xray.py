"""``xray2ct``, ``prepare-xray-data`` and ``evaluate-xray``: the X-ray to CT commands."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..devices import DistInfo, process_info, shard_list
from ..errors import ConfigError, InputError
from ..files import check_writable_file, refuse_overwriting_inputs
from ..results import OUTPUT_FORMATS, check_result_output, xray_provenance
from ..volume import split_volume_suffix
from ..xray.radiograph import RADIOGRAPH_FORMATS
from .batch import (
    BatchProgress,
    Job,
    KeptCheck,
    Plan,
    ProcessGroup,
    SkipInput,
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
    NameList,
    Progress,
    add_patient_arguments,
    add_progress_argument,
    bounded_int,
    check_dicom_patient,
    check_result,
    device_name,
    finite_float,
    seed_number,
    series_number_type,
    set_torch_threads,
    warn_taken_series_number,
)

logger = logging.getLogger(__name__)

#: Stages a cascade can have (64^3, 128^3, 256^3): the most --num-stages accepts when it is parsed.
MAX_STAGES = 3


class PhaseProgress:
    """One progress bar over a command's phases, each given a share of it (``shares``, in their order): :meth:`start`
    moves the bar to where a phase begins and names it; :meth:`within` is the ``progress(done, total, message)``
    callback that fills the phase's share (the generator's stages). The bar so moves through reading, loading the
    weights and writing too, instead of sitting at 0% and then at 100%.

    Args:
        sink: the callback drawn (:class:`~.common.Progress`), in per-mille units.
        shares: phase name -> its share of the bar (any positive numbers; normalised).
    """

    SCALE = 1000

    def __init__(self, sink: Progress, shares: dict[str, float]):
        self.sink = sink
        whole = float(sum(shares.values()))
        self.bounds: dict[str, tuple[float, float]] = {}
        at = 0.0
        for name, share in shares.items():
            self.bounds[name] = (at / whole, (at + share) / whole)
            at += share

    def _tell(self, fraction: float, message: str) -> None:
        self.sink(int(round(min(1.0, max(0.0, fraction)) * self.SCALE)), self.SCALE, message)

    def start(self, phase: str, message: str) -> None:
        """Phase ``phase`` begins: the bar at its start, with ``message`` (e.g. "loading the weights")."""
        self._tell(self.bounds[phase][0], message)

    def within(self, phase: str):
        """The ``progress(done, total, message)`` callback that fills ``phase``'s share of the bar."""
        low, high = self.bounds[phase]

        def progress(done: float, total: float, message: str = "") -> None:
            self._tell(low + (high - low) * (0.0 if total <= 0 else min(1.0, done / total)), message)

        return progress

    def finish(self, message: str = "done") -> None:
        self._tell(1.0, message)


#: What the out-of-memory error advises for X-ray to CT (the commands have no patch size).
XRAY_MEMORY_HINT = "run fewer stages or samples (--num-stages, --num-samples)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "xray2ct",
        help="generate a CT volume from a chest radiograph (synthetic; not for diagnosis)",
        description="Generate a synthetic CT from one radiograph with the X-ray to CT cascade; each stage is checked "
        "by re-projecting it (DRR) against the radiograph. The radiograph must be a frontal (PA or AP) chest view, "
        "head up, bones bright: a DICOM header's orientation is applied (and a 2D NRRD, MetaImage or NIfTI image is "
        "taken as 3D Slicer displays it), but a rotated, mirrored or inverted image without one (PNG, JPEG) is "
        "taken as it is (use --invert for bones dark). Its pixel spacing, from the header, sets the cube's size. "
        "A batch: INPUT a folder of radiographs (searched recursively, hidden files left out; files that are no "
        "radiograph, such as CT slices or secondary captures, are passed over and counted) or a list file (.txt, "
        ".lst, .list, .csv: one path per line), OUTPUT a folder; each CT is named after its radiograph (a.png -> "
        "a.nii.gz, also for a DICOM radiograph unless --output-format dicom: then a series folder a), as sr names a "
        "batch's outputs. A radiograph that fails is named and the batch goes on; one whose DICOM header marks a view "
        "the weights do not take (a lateral) is passed over unless --view is given; --report lists every one; the "
        "same command with --skip-existing continues a stopped batch. Exit codes: 0 every CT written (or skipped), 7 "
        "some radiographs failed and the others were written, 2 (or the failures' own code) none written, 4 an output "
        "that cannot be written (refused before any work) or a full disk (the batch stops), 130 cancelled (the "
        "outputs finished before are kept).",
    )
    p.add_argument("xray", metavar="INPUT", help=f"radiograph file ({RADIOGRAPH_FORMATS}), a sample name (cxr-pa), "
                   "or for a batch a folder of radiographs or a list file")  # fmt: skip
    p.add_argument("output", metavar="OUTPUT", help="output volume (.nii.gz, .nrrd, .mha) or, for a DICOM series, a "
                   "new folder; for a batch, a folder (created)")  # fmt: skip
    p.add_argument("extra_paths", nargs="*", help=argparse.SUPPRESS)  # refused with advice: several INPUTs
    p.add_argument(
        "--num-stages", type=bounded_int(1, MAX_STAGES), default=None,
        help="cascade stages to run (1: 64^3 preview ... 3: 256^3; default: every stage the weights have); more "
        "than the weights have is refused",
    )
    p.add_argument("--view", default=None, choices=("pa", "lateral"),
                   help="radiograph view, pa for any frontal view (default: what a DICOM radiograph's header says, "
                   "else pa)")  # fmt: skip
    p.add_argument("--weights", default=None, help="weights name or file (default: the shipped xray-default)")
    p.add_argument("--allow-unregistered-weights", action="store_true",
                   help="accept a weights file whose sha256 is not registered")  # fmt: skip
    p.add_argument(
        "--steps", type=bounded_int(1), default=None, help="DDIM steps per stage (default: the weights' config)"
    )
    p.add_argument("--lifting-start", type=finite_float(0.0, 1.0, low_open=True), default=None, metavar="T",
                   help="stage 1 starts from its lifting-only estimate noised to time T and lets the diffusion "
                   "refine it (smaller T: closer to that estimate); 1 starts from pure noise (default: the "
                   "weights' own, 1.0 for xray-default)")  # fmt: skip
    p.add_argument("--num-samples", type=bounded_int(1), default=None,
                   help="samples averaged per stage (default: the weights' config); their mean is the most "
                   "likely CT, each costs one more run of the stage")  # fmt: skip
    p.add_argument("--invert", action="store_true",
                   help="invert the radiograph's intensities first, for an image whose bones appear dark (a negative "
                   "saved as PNG or JPEG); never needed for DICOM: MONOCHROME1 and a PresentationLUTShape INVERSE are "
                   "applied as it is read, bones bright as a DICOM viewer shows them")  # fmt: skip
    p.add_argument("--seed", type=seed_number, default=0, help=f"noise seed, 0 to {MAX_SEED} (the same seed, device "
                   "and thread count give the same CT; --threads pins the thread count)")  # fmt: skip
    p.add_argument("--threads", type=bounded_int(0), default=0, metavar="N", help=THREADS_HELP)
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--fov-mm", type=finite_float(0.0, low_open=True), default=None, help="side of the output cube in mm")
    p.add_argument(
        "--save-stages", action="store_true", help="also write OUTPUT_stageN files for every stage"
    )
    p.add_argument("--no-consistency", dest="consistency", action="store_false",
                   help="skip the re-projection consistency step that makes each stage's DRR match the input "
                   "(shows the network's output alone)")  # fmt: skip
    p.add_argument("--report", default=None, help="write the JSON report (projection error per stage, and the "
                   "provenance: a local record of the run that names the radiograph by its full path, which the "
                   "result files do not) here; for a "
                   "batch: each radiograph's (with --skip-existing, those of the run it continues too), those failed, "
                   "skipped and not tried (as {radiograph, why}) and what the search passed over, written whatever "
                   "happens once the work has begun, also when stopped (under torchrun one file per process: "
                   "JSON.rankN.json)")  # fmt: skip
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    existing.add_argument("--skip-existing", action="store_true",
                          help="in a batch, leave a radiograph whose CT exists (with a NIfTI's provenance sidecar, "
                          "made from that radiograph), and do the others: rerun a stopped or partly failed batch with "
                          "this to continue it. A CT made with other weights or settings (--seed, --invert, --steps, "
                          "...) is refused before any work")  # fmt: skip
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="auto",
                   help="dicom: OUTPUT is a folder for a CT DICOM series labelled synthetic, in the radiograph's "
                   "patient and study (a radiograph that is no DICOM holds none, and is refused without --patient-id); "
                   "file: NIfTI, NRRD or MHA by OUTPUT's suffix; auto (default): a DICOM series when the "
                   "radiograph is DICOM and OUTPUT has no volume-file suffix")  # fmt: skip
    p.add_argument("--series-number", type=series_number_type, default=None, metavar="N",
                   help=SERIES_NUMBER_HELP + " (the final CT's; --save-stages series get their own)")
    add_patient_arguments(p, "a PNG, JPEG, TIFF, BMP, NRRD, MetaImage or NIfTI radiograph")
    p.add_argument("--tiny-test-model", action="store_true", help=argparse.SUPPRESS)  # tests: random tiny net
    add_progress_argument(p)
    p.set_defaults(func=run_xray2ct, memory_hint=XRAY_MEMORY_HINT)

    q = sub.add_parser(
        "prepare-xray-data",
        help="resample CTs to training cubes and render their DRRs (X-ray to CT training data)",
        description="For every CT: cubes per stage (64^3, 128^3, 256^3 over --fov-mm) as int16 NIfTI, the "
        "training-geometry DRR and augmented DRRs (pose jitter, intensity, noise, blur) as .npy, and a "
        "manifest.json. train xray --data accepts the output folder and trains on its cubes, saving their "
        "resampling; it renders its own DRRs in its config's view with fresh augmentation every step, so the DRR "
        "files are for inspection and for other tools.",
    )
    q.add_argument("--data", nargs="+", required=True, help="CT folder(s), list file or sample names")
    q.add_argument("--output-dir", required=True, help="folder for cubes, DRRs and manifest.json")
    q.add_argument("--fov-mm", type=finite_float(0.0, low_open=True), default=350.0, help="side of the cubic field of view (mm)")
    q.add_argument("--resolutions", default="64,128,256", help="cube sides, comma-separated")
    q.add_argument("--xray-resolutions", default="128,256,512", help="DRR sides, one per cube side")
    q.add_argument("--view", default="pa", choices=("pa", "lateral"), help="DRR view")
    q.add_argument("--augmented-copies", type=bounded_int(0), default=2, help="augmented DRRs per cube (0: none)")
    q.add_argument("--seed", type=int, default=0, help="augmentation seed")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the prepared dataset already in --output-dir (without it, such a folder is refused): "
                   "its manifest.json and files are rewritten, and its case folders that the new manifest does not "
                   "list are removed")  # fmt: skip
    add_progress_argument(q)
    q.set_defaults(func=run_prepare)

    e = sub.add_parser(
        "evaluate-xray",
        help="score X-ray to CT stages against a reference CT (model, mean-ct, lifting-only)",
        description="Render the training-geometry DRR of a reference CT, generate from it, and report 3D PSNR, "
        "3D SSIM (HU [-1024, 2048]) and re-projection PSNR per stage for the model and its baselines. Several "
        "references (a folder of CTs, a list file, or several paths) are scored one by one, then the mean and "
        "standard deviation over them per method and stage; a reference that cannot be scored is passed over and "
        "named.",
    )
    e.add_argument("--reference", required=True, nargs="+", metavar="REFERENCE",
                   help="reference CT(s): a volume file, DICOM series folder or sample name (chest-dx); or several, "
                   "a folder of CTs or a list file (.txt, one path per line)")  # fmt: skip
    e.add_argument("--num-stages", type=bounded_int(1, MAX_STAGES), default=None,
                   help="stages to evaluate (default: all the weights have; more is refused)")
    e.add_argument("--methods", action=NameList,
                   default=("model", "model-raw", "mean-ct", "lifting-only", "lifting+dc", "previous-stage",
                            "previous-stage+dc", "atlas"),
                   help="methods, comma- or space-separated: model (the cascade with its re-projection consistency step), "
                   "model-raw (without it), mean-ct (the prior), lifting-only, lifting+dc (the lifting-only volume "
                   "followed by the same consistency step), previous-stage (from stage 2 on: the previous stage's "
                   "model volume upsampled; needs model), previous-stage+dc (that volume followed by the consistency "
                   "step at the stage's grid: the stage network's own share is model's gain over it), atlas (weights "
                   "whose stage 1 refines an atlas: that atlas registered to the input)")  # fmt: skip
    e.add_argument("--weights", default=None, help="weights name or file (default: the shipped xray-default)")
    e.add_argument("--allow-unregistered-weights", action="store_true", help="accept unregistered weights")
    e.add_argument("--steps", type=bounded_int(1), default=None, help="DDIM steps per stage")
    e.add_argument("--lifting-start", type=finite_float(0.0, 1.0, low_open=True), default=None, metavar="T",
                   help="stage 1 starts from its lifting-only estimate noised to time T and lets the diffusion "
                   "refine it (smaller T: closer to that estimate); 1 starts from pure noise (default: the "
                   "weights' own, 1.0 for xray-default)")  # fmt: skip
    e.add_argument("--num-samples", type=bounded_int(1), default=None,
                   help="samples averaged per stage (default: the weights' config)")  # fmt: skip
    e.add_argument("--seed", type=seed_number, default=0, help=f"noise seed, 0 to {MAX_SEED}")
    e.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--threads", type=bounded_int(0), default=0, metavar="N", help=THREADS_HELP)
    e.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    e.add_argument("--overwrite", action="store_true", help="replace an existing JSON file")
    e.add_argument("--tiny-test-model", action="store_true", help=argparse.SUPPRESS)
    add_progress_argument(e)
    e.set_defaults(func=run_evaluate, memory_hint=XRAY_MEMORY_HINT)


def _generator(args: argparse.Namespace):
    """The generator the options ask for; an explicit ``--num-stages`` beyond its stages is refused (exit 2)."""
    from ..xray.pipeline import XrayToCTGenerator

    if args.tiny_test_model:
        logger.warning("--tiny-test-model: a tiny random network for tests; the output is noise, not a CT")
        gen = XrayToCTGenerator.tiny()
    elif args.weights:
        gen = XrayToCTGenerator.from_pretrained(args.weights, allow_unregistered=args.allow_unregistered_weights)
    else:
        gen = XrayToCTGenerator.default()
    if args.num_stages is not None and args.num_stages > gen.num_stages:
        sides = ", ".join(f"{c.resolution}^3" for c in gen.cascade.configs)
        allowed = "1" if gen.num_stages == 1 else f"1 to {gen.num_stages}"  # 0 is refused when parsed
        raise ConfigError(
            f"--num-stages {args.num_stages}: the X-ray to CT weights have {gen.num_stages} stage(s) ({sides}); "
            f"give --num-stages {allowed}, or leave it out to run every stage"
        )
    return gen


def _weights_label(args: argparse.Namespace) -> str:
    """The weights a run used, as its provenance names them."""
    from ..xray.pipeline import default_weights_name

    return "tiny-test-model (random weights)" if args.tiny_test_model else args.weights or default_weights_name()


def _stage_path(out: Path, stage: int) -> Path:
    """Where --save-stages writes stage ``stage``: OUTPUT_stageN with OUTPUT's suffix."""

    stem, suffix = split_volume_suffix(out.name)
    return out.with_name(f"{stem}_stage{stage}{suffix}")


def _refuse_extra_paths(args: argparse.Namespace) -> None:
    if args.extra_paths:
        paths = [args.xray, args.output, *args.extra_paths]
        raise ConfigError(
            f"xray2ct takes one INPUT and one OUTPUT, and got {len(paths)} paths ({', '.join(paths)}): for several "
            "radiographs give a folder of them, or a list file (.txt, one path per line), as INPUT and a folder as "
            "OUTPUT"
        )


def save_stages_note(num_stages: int, weights_stages: int, weights: str) -> str:
    """What --save-stages says when it has nothing to write (one stage is run: its volume is the result), or ``""``."""
    if num_stages > 1:
        return ""
    why = (f"the weights {weights} have 1 stage" if weights_stages == 1
           else f"--num-stages 1 runs 1 of the {weights_stages} stages of the weights {weights}")  # fmt: skip
    return f"--save-stages writes no stage file: {why}, so the result is stage 1's volume"


def _stage_files(job: Job, stages: int) -> dict[int, Path]:
    """Where --save-stages writes the stages before the last of ``job`` (``stages``: the stages run or planned)."""
    return {s: _stage_path(job.output, s) for s in range(1, stages)}


def planned_stages(args: argparse.Namespace) -> int:
    """How many stages a run of these options makes, known before the weights are loaded: ``--num-stages``, else the
    number of stage configurations the weights file's metadata records (its safetensors header, read without a
    tensor or a checksum), or that of the tiny test model; :data:`MAX_STAGES` when the header cannot be read (the
    weights' own check says why when they are loaded, before anything is written)."""
    from ..errors import WeightsError
    from ..weights.header import read_safetensors_header

    if args.num_stages:
        return int(args.num_stages)
    if args.tiny_test_model:
        from ..xray.cascade import TINY_RESOLUTIONS

        return len(TINY_RESOLUTIONS)
    try:
        path = _weights_file(args.weights)
        configs = read_safetensors_header(path)[1].get("configs") if path is not None else None
    except (WeightsError, OSError):
        return MAX_STAGES
    return len(configs) if isinstance(configs, list) and 1 <= len(configs) <= MAX_STAGES else MAX_STAGES


def _weights_file(weights: str | None) -> Path | None:
    """The file of the weights ``--weights`` names (a registered name or a path; the default weights when None), or
    None when it names none that exists; nothing is checked (:func:`_generator` loads and checks them).

    Raises:
        WeightsError: no X-ray to CT weights are registered (``weights`` None).
    """
    from ..weights.registry import list_weights
    from ..xray.pipeline import FAMILY, default_weights_name

    name = weights or default_weights_name()
    for entry in list_weights(FAMILY):
        if entry["name"] == name:  # the bundled entry first, as loading takes it
            return Path(entry["path"])
    path = Path(name).expanduser()
    return path if path.is_file() else None


def plan_xray_jobs(args: argparse.Namespace, info: DistInfo) -> Plan:
    """The radiographs this process handles (its share under torchrun) and their outputs, checked before any work
    as ``sr`` checks its own (:func:`~.sr.plan_jobs`): no output, stage output or report may be an input, and each
    must be writable (or done already, with --skip-existing)."""
    from ..results import planned_outputs
    from ..sampledata import sample_or_path
    from ..xray.collect import radiograph_batch

    given = sample_or_path(args.xray, "radiograph")  # a path, or a radiograph sample's name (fetched, checked)
    _refuse_text_file(given)
    batch, sources, passed_over, folder, searched = radiograph_batch(given)
    out = Path(args.output)
    if one_in_a_folder(batch, sources, folder, out):
        logger.info("%s holds one radiograph, %s: generating its CT into %s", folder, sources[0], out)
        batch = False
    twice: list[tuple[Path, Path]] = []
    if not batch:
        jobs = [single_job(sources[0], out, args.output_format)]
        as_dicom = jobs[0].as_dicom
    else:
        as_dicom = args.output_format == "dicom"
        jobs, twice = batch_jobs(sources, out, as_dicom, noun="radiograph")
        sources = [job.source for job in jobs]
    stages = planned_stages(args) if args.save_stages else 1  # the stages whose files --save-stages writes
    planned = [item for job in jobs for item in planned_outputs(job.output, job.as_dicom)]
    if args.save_stages:
        planned += [item for job in jobs for p in _stage_files(job, stages).values()
                    for item in planned_outputs(p, job.as_dicom, "a stage output")]  # fmt: skip
    refuse_overwriting_inputs([args.xray, given, args.weights, *searched, *sources],
                              [*planned, ("--report", report_file(args, info))])  # fmt: skip
    check_dicom_patient(jobs, args, what="radiograph", noun="radiograph")  # before the output folder is made
    jobs += named_twice_jobs(twice, jobs, as_dicom)
    created = [out] if batch and check_batch_folder(out, "output") else []
    try:
        jobs = shard_list(jobs, info)
        check_outputs(jobs, args, batch, _kept_check(args) if args.skip_existing else None)
        if args.save_stages:  # with the result: a stage's file is written before its result, so checked with it
            for job in (j for j in jobs if j.skip is None):
                for p in _stage_files(job, stages).values():
                    check_result_output(p, job.as_dicom, overwrite=args.overwrite)
    except BaseException:
        remove_if_empty(created)
        raise
    warn_taken_series_number(jobs, args.series_number)  # said before the work, not only once it is written
    return Plan(batch, jobs, created, out if batch else None, passed_over)


def _refuse_text_file(path: Path) -> None:
    """Refuse a text file given as INPUT (a list of radiographs saved without a list suffix, or any other text), in
    xray2ct's terms: radiographs, not the volumes of :func:`~DiffusionCore.files.text_file_error`.

    Raises:
        InputError: ``path`` is a text file without a list suffix (nor a volume header: a 2D .mhd or .nhdr).
    """
    from ..files import LIST_SUFFIXES, text_file_error

    if text_file_error(path) is None:
        return
    listing = ", ".join(LIST_SUFFIXES[:-1]) + f" or {LIST_SUFFIXES[-1]}"
    raise InputError(
        f"{path} is a text file, not a radiograph; a list of radiographs needs the suffix {listing} (rename it, e.g. "
        f"{path.with_suffix('.txt').name}), and a radiograph is one image file: {RADIOGRAPH_FORMATS}."
    )


def _kept_check(args: argparse.Namespace) -> KeptCheck:
    """What a CT kept by --skip-existing must have been made with: the weights, and the settings the command line
    fixes (the view, field of view, stages, steps, samples and start time only where given)."""
    from ..weights.registry import expected_sha256

    given = (("view", "--view", args.view), ("fov_mm", "--fov-mm", args.fov_mm),
             ("num_stages", "--num-stages", args.num_stages), ("steps", "--steps", args.steps),
             ("num_samples", "--num-samples", args.num_samples), ("lifting_start_t", "--lifting-start", args.lifting_start))
    settings = {"seed": ("--seed", args.seed), "invert": ("--invert", args.invert),
                "consistency": ("re-projection consistency (--no-consistency)", args.consistency)}
    settings.update({key: (option, value) for key, option, value in given if value is not None})
    return KeptCheck(None if args.tiny_test_model else expected_sha256(args.weights, "xray"), settings)


def radiograph_uid(source: Path, dicom_source) -> str:
    """The SOPInstanceUID of a DICOM radiograph ("" for other files), for the provenance of every output format: the
    headers read for a DICOM output (``dicom_source``), else read here."""
    from ..results import dicom_source_for

    if dicom_source is None:
        try:
            dicom_source = dicom_source_for(source)
        except InputError:  # read as a radiograph, but with no SOPInstanceUID to record
            return ""
    return "" if dicom_source is None else str(dicom_source.header.get("SOPInstanceUID", ""))


class _RadiographRun:
    """Runs one radiograph of a run, from its file to its written CT (the weights loaded with the first)."""

    def __init__(self, args: argparse.Namespace, info: DistInfo, progress: BatchProgress, cancel: threading.Event,
                 batch: bool = False):  # fmt: skip
        self.args, self.info, self.progress, self.cancel, self.batch = args, info, progress, cancel, batch
        self.gen = None  # loaded after the first radiograph is read: input problems are reported first
        self.stages_warned = False  # --save-stages with nothing to save: warned once, noted in every report

    def _view_note(self, job: Job, rad, trained: str) -> str:
        """A batch of frontal weights passes over a radiograph its DICOM header marks lateral (a PA and lateral study
        holds both); a --view that overrides the header is noted. Returns the note ("" when there is none).

        Raises:
            SkipInput: in a batch, without --view, a view the weights were not trained on.
        """
        marked, said = rad.metadata.get("view"), rad.metadata.get("view_from")
        if not marked:
            return ""
        if self.args.view is None:
            if self.batch and marked != trained:
                raise SkipInput(f"its DICOM header marks a {marked} view ({said}), and the weights take {trained} "
                                f"radiographs; give --view {trained} if the header is wrong")  # fmt: skip
            return ""
        if self.args.view != marked:
            note = f"its DICOM header marks a {marked} view ({said}); taken as {self.args.view}, as --view says"
            logger.warning("%s: %s", job.source, note)
            return note
        return ""

    def __call__(self, job: Job) -> dict[str, Any]:
        from ..results import dicom_source_for, named_patient_source, planned_files, write_result
        from ..xray.radiograph import check_model_input_size, read_radiograph

        args, progress = self.args, self.progress
        t0 = time.perf_counter()
        progress.before_run(f"reading {job.source.name}")
        rad = read_radiograph(job.source)
        dicom_source = dicom_source_for(job.source) if job.as_dicom else None
        uid = radiograph_uid(job.source, dicom_source)  # recorded whatever the output format
        if self.gen is None:
            progress.before_run("loading the weights")
            self.gen = _generator(args)
        gen = self.gen
        check_model_input_size(rad, max(c.xray_resolution for c in gen.cascade.configs), job.source.name)
        view_note = self._view_note(job, rad, gen.cascade.configs[0].data.view)
        num_stages = args.num_stages or gen.num_stages
        stage_files = _stage_files(job, num_stages) if args.save_stages else {}
        stages_note = save_stages_note(num_stages, gen.num_stages, _weights_label(args)) if args.save_stages else ""
        if stages_note and not self.stages_warned:
            logger.warning("%s", stages_note)
            self.stages_warned = True
        stage_volumes: list[tuple] = []  # written with the final result, once every volume passed its check

        def on_stage(stage: int, vol, info: dict) -> None:
            if stage in stage_files:
                check_result(vol, f"stage {stage} of the xray2ct result")
                stage_volumes.append((vol, stage_files[stage]))

        vol, report = gen.run(rad, num_stages=num_stages, steps=args.steps, seed=args.seed,
                              num_samples=args.num_samples, lifting_start_t=args.lifting_start,
                              device=self.info.device, view=args.view, fov_mm=args.fov_mm, progress=progress,
                              on_stage=on_stage, cancel=self.cancel, consistency=args.consistency,
                              invert=args.invert)  # fmt: skip
        for note in (view_note, stages_note):
            if note:
                report.setdefault("notes", []).append(note)
        progress.after_run("checking the result")
        check_result(vol, "the xray2ct result")
        # the input's absolute path, for --report (the local record of the run); the files beside the result record
        # only its name (provenance.input_name): a folder's name may be a patient's
        provenance = xray_provenance(Path(os.path.abspath(job.source)), report, _weights_label(args), uid)
        report["provenance"] = provenance.as_dict()
        if job.as_dicom and dicom_source is None and args.patient_id:  # a radiograph of no patient: the one named
            dicom_source = named_patient_source(args.patient_id, args.patient_name or "", provenance.date)
        progress.writing(job.output)
        paths = [p for _, p in stage_volumes] + [job.output]
        files = [] if job.as_dicom else [f for p in paths for f in planned_files(p, False)]
        with all_or_none(files):  # the stage files are written first, the result last
            for stage_vol, path in stage_volumes:
                write_result(stage_vol, path, provenance, as_dicom=job.as_dicom, dicom_source=dicom_source,
                             keep_frame_of_reference=False, overwrite=args.overwrite)  # fmt: skip
            write_result(vol, job.output, provenance, as_dicom=job.as_dicom, dicom_source=dicom_source,
                         keep_frame_of_reference=False, overwrite=args.overwrite,
                         series_number=args.series_number)  # fmt: skip
        progress.written()
        for st in report["stages"] if not self.batch else ():  # a batch's log: the pipeline's line per stage
            logger.info("stage %d: %d^3 at %.2f mm, projection PSNR %.2f dB, NCC %.3f", st["stage"], st["resolution"],
                        st["spacing_mm"], st["projection_psnr"], st["projection_ncc"])  # fmt: skip
        what = "a DICOM series" if job.as_dicom else f"{vol.shape[0]}^3 at {vol.spacing[0]:.2f} mm"
        seconds = time.perf_counter() - t0
        logger.info("%s -> %s (%s, %.1f s)", job.source, job.output, what, seconds)
        return {"input": str(job.source), **report, "output": str(job.output), "result": what,
                "stage_outputs": [str(p) for _, p in stage_volumes], "seconds": round(seconds, 3)}  # fmt: skip


def run_xray2ct(args: argparse.Namespace) -> int:
    from ..files import keep_freed_memory

    set_torch_threads(args.threads)  # before any work: the CT depends on the thread count (slightly)
    _refuse_extra_paths(args)
    info = process_info(args.device)  # its place in a torchrun launch
    group = ProcessGroup(info)
    try:
        plan, report_path = plan_or_refuse(plan_xray_jobs, args, info, group)
        keep_freed_memory()  # a one-shot process: the network's buffers are reused, not mapped afresh

        def make_one(progress: BatchProgress, cancel: threading.Event) -> _RadiographRun:
            return _RadiographRun(args, info, progress, cancel, plan.batch)

        if plan.batch:
            return run_batch("xray2ct", make_one, plan, report_path, info, group, progress_style=args.progress,
                             noun="radiograph")  # fmt: skip
        return run_one("xray2ct", make_one, plan, report_path, progress_style=args.progress,
                       done=lambda job, entry: print(f"wrote {job.output} ({entry['result']}; synthetic CT)"))
    finally:
        group.leave()


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 8:
        raise InputError(f"{what} must list sizes of at least 8, got {text!r}")
    return vals


def run_prepare(args: argparse.Namespace) -> int:
    from ..files import refuse_overwriting_inputs
    from ..inputs import collect_volumes
    from ..xray.data import named_volumes, prepare_dataset

    res = _int_list(args.resolutions, "--resolutions")
    xres = _int_list(args.xray_resolutions, "--xray-resolutions")
    if len(res) != len(xres):
        raise InputError("--resolutions and --xray-resolutions need the same number of values")
    refuse_overwriting_inputs(args.data, [("--output-dir", args.output_dir)])  # cubes written into the CT folder
    paths = collect_volumes(args.data)  # folders, list files, volume files and CT samples' names
    progress = Progress(args.progress, desc="prepare-xray-data")
    try:
        manifest = prepare_dataset(paths, args.output_dir, resolutions=res, xray_resolutions=xres,
                                   fov_mm=args.fov_mm, view=args.view, augmented_copies=args.augmented_copies,
                                   seed=args.seed, overwrite=args.overwrite, progress=progress,
                                   named=named_volumes(args.data))  # fmt: skip
    finally:
        progress.close()
    print(f"wrote {manifest} ({len(paths)} CT volume(s))")
    return 0


def _reference_ct(path: str | Path):
    """A reference CT for evaluate-xray, read and checked for the cube (before the weights are loaded).

    Raises:
        InputError: unreadable, not a CT (a radiograph is named as one, with the command that takes it), too small.
    """
    from ..sampledata import load_reference
    from ..xray.data import check_cube_size
    from ..xray.radiograph import radiograph_file_kind

    try:
        ref = load_reference(path)
    except InputError as exc:
        what = radiograph_file_kind(path)
        if not what:
            raise
        raise InputError(
            f"{path} is {what}, not a CT: evaluate-xray needs a CT volume of the chest (a file or a DICOM "
            "series folder, or a sample: chest-dx), renders its radiograph itself and scores what the model makes of "
            f"it. To make a CT from this radiograph, run: python -m DiffusionCore xray2ct {path} OUTPUT"
        ) from exc
    check_cube_size(ref, str(path))
    return ref


def training_ct_note(reference: str | Path, training_data: list[str]) -> str:
    """What to say when ``reference`` is one of the sample CTs the weights were trained on (their metadata's ``data``):
    its scores show how the weights fit their training data, not how they do on a new patient; ``""`` otherwise."""
    from ..sampledata import SAMPLES, sample_dir, sample_named

    try:
        name = sample_named(str(reference), "ct")
    except InputError:
        name = None
    if name is None:
        real = os.path.realpath(reference)
        name = next((n for n in training_data if n in SAMPLES
                     and real.startswith(os.path.realpath(sample_dir(n)) + os.sep)), None)  # fmt: skip
    if name is None or name not in training_data:
        return ""
    return (f"{reference} is the sample CT {name}, one of the CTs these weights were trained on: its scores show how "
            "the weights fit their training data (the lifting-only volume is close to it there), not how they do on a "
            "new patient; the leave-one-out tables of docs/model_cards/xray-default.md give those, or score a CT of "
            "your own")


def run_evaluate(args: argparse.Namespace) -> int:
    from ..files import keep_freed_memory, refuse_overwriting_inputs, write_json_atomic
    from ..xray.evaluate import aggregate_xray, evaluate_xray, format_xray_aggregate, format_xray_table
    from .evaluate import check_scores, reference_sources

    several, sources = reference_sources(list(args.reference))
    refuse_overwriting_inputs([*args.reference, *sources, args.weights], [("--json", args.json_out)])
    if args.json_out:
        check_writable_file(args.json_out, overwrite=args.overwrite)
    methods = tuple(args.methods)
    set_torch_threads(args.threads)  # before any work: the scores depend on the thread count (slightly)
    keep_freed_memory()  # a one-shot process: the network's buffers are reused, not mapped afresh
    loaded: list = []

    def generator():  # loaded once the first reference passed its checks: its problems are reported first
        if not loaded:
            loaded.append(_generator(args))
        return loaded[0]

    progress = Progress(args.progress, desc="evaluate-xray")
    settings = {"num_stages": args.num_stages, "methods": methods, "steps": args.steps, "num_samples": args.num_samples,
                "lifting_start_t": args.lifting_start, "seed": args.seed, "device": args.device}  # fmt: skip
    reports: list[dict] = []
    passed_over: list[dict[str, str]] = []
    try:
        if not several:
            ref = _reference_ct(args.reference[0])
            reports.append(evaluate_xray(generator(), ref, reference_name=str(args.reference[0]), progress=progress,
                                         **settings))  # fmt: skip
        else:
            n = len(sources)
            for i, path in enumerate(sources):

                def overall(done: float, total: float, message: str = "", _i: int = i, _p: Path = path) -> None:
                    progress(int(round((_i + (done / total if total else 0.0)) * 1000)), n * 1000, f"{_p.name}: {message}")

                try:
                    ref = _reference_ct(path)
                    reports.append(evaluate_xray(generator(), ref, reference_name=str(path), progress=overall,
                                                 **settings))  # fmt: skip
                except InputError as exc:  # this CT's own problem (unreadable, not a CT, too small, blank DRR)
                    why = str(exc).removeprefix(f"{path}: ")
                    logger.warning("passed over %s: %s", path, why)
                    passed_over.append({"reference": str(path), "why": why})
                    continue
            if not reports:
                raise InputError(f"none of the {n} references could be scored: "
                                 + "; ".join(f"{p['reference']}: {p['why']}" for p in passed_over))  # fmt: skip
    finally:
        progress.close()
    for report in reports:
        check_scores(report["results"], f"evaluate-xray {report['reference']}" if several else "evaluate-xray")
        note = training_ct_note(report["reference"], generator().cascade.training_data)
        if note:
            logger.warning("%s", note)
            report.setdefault("notes", []).append(note)
    out = reports[0]
    if several:
        out = {"references": reports, "passed_over": passed_over, "aggregate": aggregate_xray(reports),
               "settings": reports[0]["settings"]}  # fmt: skip
    if args.json_out:  # written before the tables: the scores are kept whatever happens to the printing
        write_json_atomic(out, args.json_out, overwrite=True)
    for report in reports:
        print(format_xray_table(report))
    if several:
        print(format_xray_aggregate(out["aggregate"]))
        for p in passed_over:
            print(f"passed over {p['reference']}: {p['why']}")
    return 0
