"""Super-resolution on MRML volume nodes: input checks, the SR job, the evaluation job and its table."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from DiffusionCore.degrade import MAX_FACTOR, check_interspaced, plan_thin_grid
from DiffusionCore.errors import DiffusionCoreError, GeometryError, InputError, OutputError
from DiffusionCore.evaluate import check_scorable
from DiffusionCore.provenance import sr_label, synthetic_image_notice
from DiffusionCore.volume import (
    axis_index,
    check_ct,
    check_series_slices,
    dicom_series_facts,
    require_ct,
    thick_axis,
)

from .jobs import CLIJob, check_temp_room, running_jobs
from .mrml_io import (
    ATTR_SYNTHETIC,
    ATTR_TITLE,
    add_volume_node,
    claim_output,
    dicom_source_files,
    follow_transform,
    in_scene,
    input_stamp,
    job_grid,
    place_beside,
    read_job_report,
    read_volume_file,
    recorded_environment,
    recorded_input,
    series_to_read_from_files,
    set_node_from_volume,
    set_provenance,
    show_like,
    synthetic_name,
    write_job_input,
)

logger = logging.getLogger(__name__)

#: Fewest slices along the thick axis that make sense to super-resolve.
MIN_THICK_SLICES = 2


@dataclass
class SRSettings:
    """What the user chose for one super-resolution run (0 / "" mean "the model's default").

    Attributes:
        factor: thin slices per thick slice; 0 = suggested from the spacing.
        target_spacing: wanted slice spacing in mm instead of a factor; 0 = use the factor.
        axis: "auto", "z", "y" or "x" (array axes).
        weights: registered name or .safetensors path; "" = bundled default.
        allow_unregistered_weights: accept a file whose sha256 is not registered.
        steps: 0 = the weights' default estimate (the posterior mean, one step); N > 0 = a posterior sample in N steps.
        guidance: guidance scale (1 = off); 0 = model default.
        device: "auto", "cpu" or "cuda".
        patch_size: tile (D, H, W) in thin voxels; (0, 0, 0) = automatic.
        overlap: tile overlap (D, H, W); (0, 0, 0) = default.
        seed: sampler seed.
        threads: CPU threads of the computation; 0 = automatic (``OMP_NUM_THREADS`` or all cores). The result depends
            on it (the same seed, device and thread count give the same result).
        num_samples: samples averaged; >= 2 gives an uncertainty map.
        data_consistency: project the result back onto the measured slices.
        allow_non_ct: run on intensities that do not look like CT in HU (e.g. a CT cropped inside the body).
        allow_interspaced: run on an interspaced DICOM series (slices at most half as thick as their spacing, with
            gaps: an HRCT-type protocol), which is refused otherwise; the result may hold bright rims at edges.
        adapt_to_scan: first fine-tune a copy of the model on this scan's own in-plane detail (on by default;
            skipped, with a note in the report, when the weights have no through-plane predictor).
        adapt_steps: training steps of that adaptation (deterministic; 400 = the engine's default).
        adapt_seconds: a time budget in seconds instead of ``adapt_steps`` when > 0 (the step count then
            depends on the machine's speed).
        tiny_test_model: a random tiny model (self-tests only).
        tiny_test_predictor: a random tiny through-plane predictor that can be adapted (self-tests only).
    """

    factor: int = 0
    target_spacing: float = 0.0
    axis: str = "auto"
    weights: str = ""
    allow_unregistered_weights: bool = False
    steps: int = 0
    guidance: float = 0.0
    device: str = "auto"
    patch_size: tuple[int, int, int] = (0, 0, 0)
    overlap: tuple[int, int, int] = (0, 0, 0)
    seed: int = 0
    threads: int = 0
    num_samples: int = 1
    data_consistency: bool = True
    allow_non_ct: bool = False
    allow_interspaced: bool = False
    adapt_to_scan: bool = True
    adapt_steps: int = 400  # DiffusionCore.sr.adapt.DEFAULT_ADAPT_STEPS (this module does not import torch)
    adapt_seconds: float = 0.0
    tiny_test_model: bool = False
    tiny_test_predictor: bool = False

    def cli_arguments(self) -> list[str]:
        """Flags of CTDiffusionSRBatch for these settings (booleans as bare flags, as Slicer passes them)."""
        args = [
            "--factor", str(int(self.factor)),
            "--targetSpacing", repr(float(self.target_spacing)),
            "--axis", self.axis,
            "--numSteps", str(int(self.steps)),
            "--guidanceScale", repr(float(self.guidance)),
            "--device", self.device,
            "--patchSize", ",".join(str(int(v)) for v in self.patch_size),
            "--overlap", ",".join(str(int(v)) for v in self.overlap),
            "--seed", str(int(self.seed)),
            "--numSamples", str(int(self.num_samples)),
            "--adaptSteps", str(int(self.adapt_steps)),
            "--adaptSeconds", repr(float(self.adapt_seconds)),
        ]
        if self.threads:
            args += ["--threads", str(int(self.threads))]
        if not self.adapt_to_scan:
            args.append("--noAdapt")
        if self.weights:
            args += ["--weights", self.weights]
        if self.allow_unregistered_weights:
            args.append("--allowUnregisteredWeights")
        if not self.data_consistency:
            args.append("--noDataConsistency")
        if self.allow_non_ct:
            args.append("--allowNonCT")
        if self.allow_interspaced:
            args.append("--allowInterspaced")
        if self.tiny_test_model:
            args.append("--tinyTestModel")
        if self.tiny_test_predictor:
            args.append("--tinyTestPredictor")
        return args

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def thin_grid_options(self) -> dict:
        """``factor``, ``target_spacing`` and ``axis`` as the engine takes them (0 and "auto": None, its default)."""
        return {
            "factor": int(self.factor) or None,
            "target_spacing": float(self.target_spacing) or None,
            "axis": None if self.axis == "auto" else self.axis,
        }

    def run_settings(self):
        """The engine's ``SRRunSettings`` (:mod:`DiffusionCore.sr.settings`) for these settings, checked: the
        settings CTDiffusionSRBatch builds from :meth:`cli_arguments`. Imports torch (the engine).

        Raises:
            ConfigError: options out of range or contradicting each other. GeometryError: both a factor and a
                target spacing.
        """
        from DiffusionCore.sr.adapt import AdaptSettings, budget_fields
        from DiffusionCore.sr.settings import SRRunSettings

        adapt = None
        if self.adapt_to_scan:
            adapt = AdaptSettings(**budget_fields(self.adapt_steps, self.adapt_seconds, optional=True))
        return SRRunSettings(
            **self.thin_grid_options(),
            steps=int(self.steps) or None,
            guidance=float(self.guidance) or None,
            seed=int(self.seed),
            device=self.device,
            patch_size=tuple(int(v) for v in self.patch_size) if any(self.patch_size) else None,
            overlap=tuple(int(v) for v in self.overlap) if any(self.overlap) else None,
            num_samples=int(self.num_samples),
            data_consistency=bool(self.data_consistency),
            allow_non_ct=bool(self.allow_non_ct),
            allow_interspaced=bool(self.allow_interspaced),
            adapt=adapt,
        )


def check_sr_input(node, settings: SRSettings | None = None) -> str:
    """Why ``node`` cannot be super-resolved with ``settings``, or ``""`` when it can.

    This is what the Apply button's tooltip says while the button is disabled.
    """
    settings = settings or SRSettings()
    if node is None:
        return "Select an input CT volume."
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        return f"'{node.GetName()}' is not a scalar (greyscale) volume."
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return f"'{node.GetName()}' holds no voxels."
    if image.GetPointData().GetScalars().GetNumberOfComponents() != 1:
        return f"'{node.GetName()}' is a colour/vector image; a greyscale CT is needed."
    dims = image.GetDimensions()
    if min(dims) < MIN_THICK_SLICES:
        return (f"'{node.GetName()}' is 2D ({dims[0]}x{dims[1]}x{dims[2]} voxels along x, y, z: one voxel thick); "
                "the X-ray to CT module takes radiographs.")
    try:
        vol_grid = job_grid(node)
    except DiffusionCoreError as exc:
        return str(exc)
    if settings.axis == "auto" and thick_axis(vol_grid) is None:  # with a target spacing too: along which axis?
        return (
            f"'{node.GetName()}' is nearly isotropic (spacing {', '.join(f'{s:.2f}' for s in vol_grid.spacing)} mm): "
            "choose the axis and a factor or target spacing."
        )
    if settings.factor < 0 or settings.num_samples < 1:
        return "Factor must be 0 (automatic) or more and the number of samples at least 1."
    if settings.factor == 1 or settings.factor > MAX_FACTOR:
        return f"Factor {settings.factor} is outside 2..{MAX_FACTOR} (0 = from the slice spacing)."
    return ""


#: How the panel runs an interspaced series anyway (the end of :func:`DiffusionCore.degrade.check_interspaced`'s
#: refusal, which names the ``sr`` command's flag otherwise).
ALLOW_INTERSPACED_IN_SLICER = ("tick 'Allow interspaced slices' under Advanced (or, from Slicer's Python console, give "
                               "SRSettings(allow_interspaced=True) to the job)")  # fmt: skip
#: How the panel runs a volume whose intensities do not look like CT anyway, instead of the ``sr`` command's flag.
ALLOW_NON_CT_IN_SLICER = ("tick 'Allow non-CT intensities' under Advanced (or, from Slicer's Python console, give "
                          "SRSettings(allow_non_ct=True) to the job)")  # fmt: skip


def intensity_problem(node, settings: SRSettings) -> str:
    """The pipeline's intensity checks (NaN/Inf, constant, non-CT values) on the node's voxels, or ``""``:
    run when Apply is pressed, so that the job is refused at once instead of failing in the background (and by
    :func:`remembered_intensity_problem` for Apply's state). A refusal of non-CT values says how to run it anyway in
    the panel (:data:`ALLOW_NON_CT_IN_SLICER`)."""
    from vtk.util import numpy_support

    voxels = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())  # a view, no copy
    name = f"'{node.GetName()}'"
    try:
        if settings.allow_non_ct:
            check_ct(voxels, name)
            if float(np.min(voxels)) == float(np.max(voxels)):
                require_ct(voxels, name)  # constant: refused even when non-CT values are allowed
        else:
            require_ct(voxels, name, how_to_allow=ALLOW_NON_CT_IN_SLICER)
    except InputError as exc:
        return str(exc)
    return ""


#: :func:`remembered_intensity_problem`'s verdicts: node ID -> (what it depends on, verdict), the latest few nodes.
_intensity_verdicts: dict[str, tuple[tuple, str]] = {}
INTENSITY_VERDICTS_KEPT = 8


def remembered_intensity_problem(node, settings: SRSettings) -> str:
    """:func:`intensity_problem` for Apply's state and tooltip, which the panel asks on every change of a setting: the
    voxels are read once per change of the node (its modification time: a rename, the message names it; and
    :func:`~CTDiffusionSRLib.mrml_io.input_stamp`: its voxels edited or replaced) and of ``allow_non_ct`` (the
    "Allow non-CT intensities" checkbox), not on every setting."""
    key = (node.GetMTime(), input_stamp(node), bool(settings.allow_non_ct))
    node_id = node.GetID()
    known = _intensity_verdicts.get(node_id) if node_id else None
    if known is not None and known[0] == key:
        return known[1]
    verdict = intensity_problem(node, settings)
    if node_id:
        _intensity_verdicts.pop(node_id, None)
        _intensity_verdicts[node_id] = (key, verdict)
        while len(_intensity_verdicts) > INTENSITY_VERDICTS_KEPT:
            _intensity_verdicts.pop(next(iter(_intensity_verdicts)))
    return verdict


def effective_factor(node, settings: SRSettings) -> int:
    """The factor the run will use, as the engine decides it (:func:`DiffusionCore.degrade.plan_thin_grid`, the
    one decision of the thin grid: the factor asked for, else suggested from the slice spacing and clamped to
    the supported maximum); for a target spacing, the nearest integer factor (for the node's name).

    Raises:
        GeometryError: what ``plan_thin_grid`` refuses (e.g. both a factor and a target spacing).
    """
    grid = job_grid(node)
    _, ax, k = plan_thin_grid(grid, **settings.thin_grid_options())
    if k is None:  # a target spacing
        k = max(1, int(round(grid.spacing_zyx[ax] / settings.target_spacing)))
    return int(k)


def check_weights(weights: str, family: str, allow_unregistered: bool):
    """Check chosen weights that exist here (a registered name or a file) before a job starts: safetensors,
    sha256 registered or explicitly allowed, the right model family. A wrong file is then reported at once
    instead of by the background process; a name or path that does not exist is left to the job, whose
    command reports it with the registered names.

    Returns:
        The checked weights (``ResolvedWeights``: their header's metadata says what they hold), or None for a
        name or path that does not exist here.

    Raises:
        WeightsError: what :func:`DiffusionCore.weights.resolve_weights` refuses.
    """
    from DiffusionCore.errors import WeightsError
    from DiffusionCore.weights import list_weights, resolve_weights

    from .weights_choice import weights_file_problem

    registered = weights in {w["name"] for w in list_weights()}
    if not registered and Path(weights).expanduser().is_file():
        # said in the module's words (its 'Import weights...'), as the Apply button's tooltip says it
        file = Path(weights).expanduser()
        problem = weights_file_problem(family, file, allow_unregistered=True)  # another family's weights
        if problem:
            raise WeightsError(problem)
        problem = "" if allow_unregistered else weights_file_problem(family, file)  # not registered
        if problem:
            raise WeightsError(f"{problem} {_SCRIPT_UNREGISTERED_HINT}")
    if registered or Path(weights).expanduser().is_file():
        return resolve_weights(weights, family=family, allow_unregistered=allow_unregistered)
    return None


#: What a script (not the panel, which has no such setting) may do with a weights file it trusts.
_SCRIPT_UNREGISTERED_HINT = "(In a script, allow_unregistered_weights=True in the settings accepts a file you trust.)"


def sampling_problem(steps: int, num_samples: int, resolved, name: str) -> str:
    """Why ``steps`` and ``num_samples`` ask the chosen weights for what they cannot give (``""`` when they can):
    Steps and Samples draw posterior samples from a diffusion stage, and weights that hold a through-plane predictor
    alone (the shipped sr-default) give one deterministic estimate. The job would stop with the engine's message; the
    module says it, in its own words, when Apply is pressed."""
    if resolved is None:
        return ""
    from DiffusionCore.sr.throughplane import COMPONENT

    if resolved.metadata.get("component") != COMPONENT:
        return ""
    asked = [f"{label} {value}" for label, value, on in (
        ("Steps", steps, steps > 0), ("Samples", num_samples, num_samples >= 2),
    ) if on]  # fmt: skip
    if not asked:
        return ""
    return (
        f"The weights {name} are a through-plane predictor without a diffusion stage: they give one deterministic "
        f"estimate, so {' and '.join(asked)} cannot be used. Set Steps to 0 and Samples to 1, or choose weights with "
        "a diffusion stage."
    )


#: How the panel names the options of ``DiffusionCore.sr.pipeline.DIFFUSION_STAGE_SETTINGS`` it has (its labels).
DIFFUSION_STAGE_LABELS = {"guidance": "Guidance scale", "patch_size": "Patch size", "overlap": "Overlap"}


def unused_options_notice(settings: SRSettings, resolved, name: str) -> str:
    """What the panel says after a job whose settings set options that the chosen weights leave unused (``""``
    otherwise): Guidance scale, Patch size and Overlap act on a diffusion stage alone, and weights that hold a
    through-plane predictor alone (the shipped sr-default) have none (the engine's words,
    :func:`DiffusionCore.sr.pipeline.no_diffusion_stage_note`, which the job's log shows too). Only options set away
    from their default (0 = automatic) count."""
    if resolved is None:
        return ""
    from DiffusionCore.errors import DiffusionCoreError
    from DiffusionCore.sr.pipeline import diffusion_stage_settings, no_diffusion_stage_note
    from DiffusionCore.sr.throughplane import COMPONENT

    if resolved.metadata.get("component") != COMPONENT:
        return ""
    try:
        unused = diffusion_stage_settings(settings.run_settings())  # 0 / (0, 0, 0): the default, not set
    except DiffusionCoreError:  # settings the job refuses, with its own message
        return ""
    note = no_diffusion_stage_note([DIFFUSION_STAGE_LABELS.get(option, option) for option in unused], name)
    return f"{note[0].upper()}{note[1:]}." if note else ""


def _predictor_plan(node, settings: SRSettings, resolved):
    """``(factors, grid, thin grid, axis)`` of a run of the chosen weights' through-plane predictor on ``node``, or
    None when the weights hold no predictor (or are not here)."""
    config = (resolved.metadata.get("config") or {}).get("throughplane") if resolved is not None else None
    if not isinstance(config, dict):
        return None
    from DiffusionCore.sr.throughplane import ThroughPlaneConfig

    grid = job_grid(node)
    thin, axis, _ = plan_thin_grid(grid, **settings.thin_grid_options())
    return ThroughPlaneConfig(**config).factors, grid, thin, axis


def target_spacing_problem(node, settings: SRSettings, resolved) -> str:
    """Why the chosen weights cannot make ``settings.target_spacing`` from ``node`` (``""`` when they can, or
    when no target spacing is asked): a through-plane predictor needs the output at least 1.5 times finer
    than the input (its smallest factor is 2). The job would stop with the same message; the module says it
    when Apply is pressed, with the spacings that work."""
    plan = _predictor_plan(node, settings, resolved) if settings.target_spacing > 0 else None
    if plan is None:  # no target spacing, or no predictor: any finer spacing works (cubic start)
        return ""
    from DiffusionCore.sr.settings import predictor_spacing_problem

    factors, grid, _, axis = plan
    return predictor_spacing_problem(grid.spacing_zyx[axis], settings.target_spacing, factors)


def missing_head_notice(node, settings: SRSettings, resolved, name: str) -> str:
    """What the panel says after a job whose whole factor (asked for, suggested from the spacing, or a target spacing
    that many times finer) the chosen weights' through-plane predictor has no head for (``""`` otherwise): the result
    is another head's, resampled (the engine's warning, :func:`DiffusionCore.sr.pipeline.missing_head_note`, which
    the job's log shows too). Never for the shipped weights, which have heads 2..8."""
    plan = _predictor_plan(node, settings, resolved)
    if plan is None:  # no predictor, or weights that are not here: nothing to say
        return ""
    from DiffusionCore.sr.pipeline import missing_head_note

    factors, grid, thin, axis = plan
    note = missing_head_note(factors, grid.spacing_zyx[axis] / thin.spacing_zyx[axis], name)
    return f"{note[0].upper()}{note[1:]}." if note else ""


def synthetic_input_notice(node) -> str:
    """What the panel says after a job whose input is itself a result of these modules (``""`` otherwise): its
    result rests on a model's estimate, not on an acquired scan (the engine's warning, in the panel's words)."""
    if node is None or node.GetAttribute(ATTR_SYNTHETIC) != "true":
        return ""
    return synthetic_image_notice(f"'{node.GetName()}'", node.GetAttribute(ATTR_TITLE) or "synthetic",
                                  "this result rests on that model's estimate")


def refuse_interspaced_series(node, settings: SRSettings, thickness: float | None) -> None:
    """Refuse, when Apply is pressed, a series whose DICOM SliceThickness (``thickness``, read from the node's files:
    the node keeps only the spacing) is at most half its slice spacing, unless ``settings.allow_interspaced``: the
    engine's refusal (:func:`DiffusionCore.degrade.check_interspaced`), which the job would otherwise give in the
    background.

    Raises:
        InputError: naming the node, what was found, why and what to do.
    """
    if not thickness or settings.allow_interspaced:
        return
    grid = job_grid(node)
    _, axis, _ = plan_thin_grid(grid, **settings.thin_grid_options())
    check_interspaced(grid, axis, thickness_mm=thickness, what=f"'{node.GetName()}'",
                      how_to_allow=ALLOW_INTERSPACED_IN_SLICER)


def refuse_series_the_job_cannot_read(node):
    """Refuse, when Apply is pressed, a DICOM series that the job would read from its files and then stop on
    (:func:`CTDiffusionSRLib.mrml_io.series_to_read_from_files`: e.g. slices of two spacings, which Slicer's
    reader stacks at their mean spacing), with the message the engine gives, instead of a job that fails in the
    background. Reads every slice's header once: the job hands what it found to ``write_job_input``.

    Returns:
        The series the job reads from its files, or None (the node's voxels).

    Raises:
        InputError: the engine's message (:func:`DiffusionCore.volume.check_series_slices`).
    """
    series = series_to_read_from_files(node)
    if series is not None:
        check_series_slices(series.files, f"'{node.GetName()}'")
    return series


class SRJob(CLIJob):
    """Super-resolve one volume node with CTDiffusionSRBatch in a background process.

    The result is a NEW node "<input> SR x<k> (synthetic)" beside the input in the subject hierarchy (or
    the chosen ``output_node``, never the input), with provenance attributes; with ``num_samples >= 2`` an
    uncertainty node "<input> SR x<k> uncertainty (synthetic)" as well.
    """

    script_name = "CTDiffusionSRBatch"

    def __init__(self, scene, input_node, settings: SRSettings, *, output_node=None, **kwargs):
        super().__init__(scene, **kwargs)
        reason = check_sr_input(input_node, settings) or intensity_problem(input_node, settings)
        if reason:
            raise InputError(reason)
        if output_node is not None and output_node.GetID() == input_node.GetID():
            raise OutputError("the output must be a new volume, not the input (the input is never modified).")
        if output_node is not None and any(getattr(job, "output_node", None) is output_node for job in running_jobs()):
            raise OutputError(f"'{output_node.GetName()}' is the output of a job that is still running: the later "
                              "result would silently replace the earlier. Choose another output, or wait.")
        if output_node is not None and (not output_node.IsA("vtkMRMLScalarVolumeNode") or any(
                output_node.IsA(kind) for kind in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLVectorVolumeNode"))):
            raise OutputError(f"the output '{output_node.GetName()}' is a {output_node.GetClassName()}, not a scalar "
                              "volume: choose a scalar volume or create a new one.")
        self.series = refuse_series_the_job_cannot_read(input_node)
        # only a DICOM series knows its slices' thickness; the node keeps their spacing alone
        sources = dicom_source_files(input_node)
        # each file's header read once: the slices' thickness and the scanner's storage cap
        self.slice_thickness, self.stored_max_hu = dicom_series_facts(sources)
        refuse_interspaced_series(input_node, settings, self.slice_thickness)
        if not (settings.tiny_test_model or settings.tiny_test_predictor):
            from DiffusionCore.weights.registry import first_available

            weights = settings.weights or first_available("sr")
            resolved = check_weights(weights, "sr", settings.allow_unregistered_weights) if weights else None
            problem = target_spacing_problem(input_node, settings, resolved)
            if problem:
                raise GeometryError(problem[0].upper() + problem[1:] + ".")
            problem = sampling_problem(settings.steps, settings.num_samples, resolved, weights)
            if problem:
                raise InputError(problem)
            for notice in (missing_head_notice(input_node, settings, resolved, weights),
                           unused_options_notice(settings, resolved, weights)):  # fmt: skip
                if notice:
                    self.notices.append(notice)
        self.input_node = input_node
        self.output_node = output_node
        self.settings = settings
        self.factor = effective_factor(input_node, settings)
        self.uncertainty_node = None
        self.input_stamp: tuple | None = None  # the input as the job read it (prepare)
        self.recorded_input = ("", "")  # its name and DICOM series UID then (prepare)
        notice = synthetic_input_notice(input_node)
        if notice:
            self.notices.append(notice)

    def prepare(self, tempdir: Path) -> list[str]:
        check_temp_room(tempdir, self.hand_off_bytes(), "the input and the result")
        source = write_job_input(self.input_node, tempdir, "input", series=self.series, dtype=self.hand_off_dtype())
        self.handed_over = []  # the log and the error name the volume, not its hand-off file
        self.hand_over(source, "the volume", self.input_node)
        self.handed_over.append((str(tempdir / "output.nrrd"), "the result", f"the result of '{self.input_node.GetName()}'"))
        self.input_stamp = input_stamp(self.input_node)
        # what the result records of its input, from the node as read: the node may be deleted before the end
        self.recorded_input = recorded_input(self.input_node, series=True)  # its series' UID, as sr records it
        args = self.settings.cli_arguments()
        if self.settings.num_samples >= 2:
            args += ["--uncertaintyVolume", str(tempdir / "uncertainty.nrrd")]
        if self.slice_thickness:  # read from the series' files when the job was made
            args += ["--sliceThickness", repr(float(self.slice_thickness))]
        if self.stored_max_hu is not None:  # the highest HU the series' files can hold: no thin voxel goes above it
            args += ["--storedMaximum", repr(float(self.stored_max_hu))]
        args += ["--reportFile", str(tempdir / "report.json"), "--returnparameterfile", str(tempdir / "return.txt")]
        return [*args, source, str(tempdir / "output.nrrd")]

    def hand_off_dtype(self) -> str:
        """How the input is handed over: as int16 when its voxels are stored in a type int16 holds exactly (a CT
        loaded from DICOM is int16: half the bytes of float32 to write, store and read), else float32."""
        import vtk

        exact = (vtk.VTK_SHORT, vtk.VTK_SIGNED_CHAR, vtk.VTK_UNSIGNED_CHAR, vtk.VTK_CHAR)
        return "int16" if self.input_node.GetImageData().GetScalarType() in exact else "float32"

    def hand_off_bytes(self) -> int:
        """About what the job's files take in its temporary folder: the input as handed over (:meth:`hand_off_dtype`)
        and the result (and the uncertainty map) as float32 volumes; the result is the input with the thick axis
        ``factor`` (or spacing / target spacing) times as long. A series read from its DICOM files is linked, not
        copied: counted all the same."""
        voxels = int(np.prod(self.input_node.GetImageData().GetDimensions()))
        ratio = float(self.factor)
        if self.settings.target_spacing > 0:
            ratio = max(self.input_node.GetSpacing()) / self.settings.target_spacing
        outputs = 2 if self.settings.num_samples >= 2 else 1
        return int(voxels * ((2 if self.hand_off_dtype() == "int16" else 4) + 4 * outputs * ratio))

    def label(self) -> str:
        """What the result is called after its input's name: "SR x4", or "SR 1.5 mm" for a target spacing."""
        return sr_label(None if self.settings.target_spacing > 0 else self.factor, self.settings.target_spacing)

    def result_files(self, tempdir: Path) -> list[tuple[Path, str]]:
        return [(tempdir / "output.nrrd", f"{synthetic_name(self.input_node.GetName(), self.label())}.nrrd")]

    def import_results(self, tempdir: Path) -> list:
        out_file = tempdir / "output.nrrd"
        if not out_file.is_file():
            raise OutputError("the super-resolution finished without writing its output; see the log.")
        result = read_volume_file(str(out_file))
        report = read_job_report(tempdir / "report.json")
        environment = recorded_environment(out_file, report)  # the job's, as its output file records it
        model = self.return_values.get("modelName") or report.get("model", "")
        sha = self.return_values.get("weightsSha256") or str(report.get("weights_sha256", ""))
        used = (report.get("settings") or {}).get("factor")
        if isinstance(used, int) and used >= 2:  # the engine's decision, on the grid it really read
            self.factor = used
        settings = {**self.settings.to_dict(), "factor_used": self.factor, "report_settings": report.get("settings")}
        label = self.label()
        if in_scene(self.scene, self.output_node):
            node = self.output_node
            set_node_from_volume(node, result)
            claim_output(self.scene, node)
            if node.GetDisplayNode() is None:  # e.g. a node a script made: shown like the input, as a new one is
                show_like(node, self.input_node)
        else:
            if self.output_node is not None:
                self.notices.append(
                    f"The chosen output volume '{self.output_node.GetName()}' was deleted while the job ran; "
                    "the result is in a new volume."
                )
            node = add_volume_node(self.scene, result, synthetic_name(self.input_node.GetName(), label), like=self.input_node)
            self.created_nodes.append(node)
        del result  # the node holds a copy: a large result is not held twice while the rest is imported
        from DiffusionCore.results import input_slice_thickness

        recorded = report.get("provenance") or {}  # the run's record of the input series' slice thickness
        input_slices = (input_slice_thickness({"slice_thickness_mm": recorded.get("input_slice_thickness_mm")}),
                        str(recorded.get("input_slice_note") or ""))  # fmt: skip
        set_provenance(node, kind="super-resolution", model=model, weights_sha256=sha, settings=settings,
                       source=self.input_node, title=f"{label} (synthetic)",
                       recorded_input=self.recorded_input, environment=environment,
                       input_sha256=str(report.get("input_sha256") or ""), input_slices=input_slices)  # fmt: skip
        place_beside(self.scene, self.input_node, node)
        # the result is in the input's own frame (the files' frame when they were read): under its transform
        frame = self.input_node if self.series is None else None
        follow_transform(frame, node)
        if not in_scene(self.scene, self.input_node):
            self.notices.append(
                f"'{self.recorded_input[0]}' was deleted while the job ran; the result was made from it as it was "
                "when the job started, and records its name."
            )
        elif self.input_stamp is not None and input_stamp(self.input_node) != self.input_stamp:
            self.notices.append(
                f"'{self.input_node.GetName()}' was changed while the job ran; the result was made from it as it was "
                "when the job started. Apply again for a result of the volume as it is now."
            )
        nodes = [node]
        unc_file = tempdir / "uncertainty.nrrd"
        if unc_file.is_file():
            unc = add_volume_node(
                self.scene, read_volume_file(str(unc_file)), synthetic_name(self.input_node.GetName(), f"{label} uncertainty")
            )
            self.created_nodes.append(unc)
            follow_transform(frame, unc)
            set_provenance(unc, kind="uncertainty", model=model, weights_sha256=sha, settings=settings,
                           source=self.input_node, title=f"{label} uncertainty (synthetic)",
                           recorded_input=self.recorded_input, environment=environment,
                           input_sha256=str(report.get("input_sha256") or ""), input_slices=input_slices)  # fmt: skip
            place_beside(self.scene, self.input_node, unc)
            self.uncertainty_node = unc
            nodes.append(unc)
        return nodes


#: Columns of the evaluation table: (report key, column title).
EVALUATION_COLUMNS = (
    ("psnr", "PSNR (dB)"),
    ("psnr_body", "PSNR body (dB)"),
    ("ssim", "SSIM"),
    ("hu_mae_body", "MAE body (HU)"),
    ("consistency_psnr", "Consistency PSNR (dB)"),
    ("seconds", "Seconds"),
)


#: What an evaluation table records of its run, in this order: (report key, label, where the report may hold it).
#: Each place is a path of keys into the report ("*": any method in it, e.g. ``method_details``'s ``sr``); the first
#: place present gives the value. ``requested`` is what the job asked for (:meth:`EvaluationJob.requested`), for a
#: report that does not say.
EVALUATION_FACTS: tuple[tuple[str, str, tuple[tuple[str, ...], ...]], ...] = (
    ("reference", "Reference", (("reference",),)),
    ("degradation", "Degradation", (("degradation",),)),
    ("factor", "Factor", (("factor",),)),
    ("axis", "Axis", (("axis",),)),
    ("hu_range", "HU range", (("hu_range",),)),
    ("slices_requested", "Slices asked for", (("slices_requested",),)),
    ("slices_scored", "Slices scored", (("slices_scored",),)),
    ("slices_dropped", "Slices left out", (("slices_dropped",),)),
    ("weights", "Weights", (("weights",), ("method_details", "*", "weights"), ("requested", "weights"))),
    ("weights_sha256", "Weights sha256", (("weights_sha256",), ("method_details", "*", "weights_sha256"))),
    ("adaptation", "Adaptation", (("adaptation",), ("method_details", "*", "adaptation"), ("requested", "adaptation"))),
    ("seed", "Seed", (("seed",), ("method_details", "*", "seed"), ("requested", "seed"))),
    ("device", "Device", (("device",), ("method_details", "*", "device"), ("requested", "device"))),
    ("torch_threads", "Threads", (("torch_threads",), ("method_details", "*", "torch_threads"))),
    ("body_mask", "Body mask", (("body_mask",),)),
    ("diffusioncore_version", "DiffusionCore version", (("diffusioncore_version",), ("version",))),
    ("torch_version", "torch version", (("torch_version",),)),
    ("date", "Date", (("date",),)),
    ("warnings", "Warnings", (("warnings",),)),
)
#: Attribute holding the whole report but its rows (JSON); ``<it>.<key>`` holds each key and each fact.
ATTR_EVALUATION = "CTDiffusion.Evaluation"
#: Report keys too large for attributes of their own (the rows, and a multi-volume report's parts).
_BULKY_KEYS = ("results", "volumes", "aggregate")


def _lookup(tree, path: tuple[str, ...]):
    """The value at ``path`` in nested dicts (``"*"``: the first item that has the rest), or None."""
    if not path:
        return tree
    if not isinstance(tree, dict):
        return None
    if path[0] == "*":
        found = (_lookup(v, path[1:]) for v in tree.values())
        return next((v for v in found if v not in (None, "")), None)
    return _lookup(tree.get(path[0]), path[1:])


def _readable(value) -> str:
    """A report value as text: numbers to 6 significant digits, lists and dicts flattened, empty parts left out."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_readable(v)}" for k, v in value.items() if v not in (None, "", [], {}))
    if isinstance(value, (list, tuple)):
        return ", ".join(_readable(v) for v in value) if value else "none"
    return str(value)


def _slice_range(value) -> str:
    """``[start, stop)`` as "start..stop-1 (n slices)"."""
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}..{value[1] - 1} ({value[1] - value[0]} slices)"
    return _readable(value)


def _adaptation_text(value) -> str:
    """An adaptation record (or request) as "N steps in S s, check-batch gain over cubic B -> A dB"."""
    if not isinstance(value, dict) or not {"steps", "seconds", "skipped"} & set(value):
        return _readable(value)
    if value.get("skipped"):
        return f"skipped: {value['skipped']}"
    steps, seconds = value.get("steps"), value.get("seconds")
    text = " in ".join(t for t in (f"{steps} steps" if steps else "", f"{seconds:.3g} s" if seconds else "") if t)
    before, after = value.get("gain_before_db"), value.get("gain_after_db")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        text += f", check-batch gain over cubic {before:.2f} -> {after:.2f} dB"
    return text


def _mask_text(value) -> str:
    """The body mask record as "definition; N voxels (f% of the volume)"."""
    if not isinstance(value, dict) or "definition" not in value:
        return _readable(value)
    text = str(value["definition"])
    if isinstance(value.get("voxels"), int):
        text += f"; {value['voxels']} voxels"
        if isinstance(value.get("fraction"), float):
            text += f" ({value['fraction']:.1%} of the volume)"
    return text


#: How a fact reads in the table's description, where :func:`_readable` would not read well.
_FACT_TEXT = {"slices_requested": _slice_range, "slices_scored": _slice_range, "adaptation": _adaptation_text,
              "body_mask": _mask_text}  # fmt: skip


def evaluation_facts(report: dict, requested: dict | None = None) -> dict[str, tuple[str, object]]:
    """What ``report`` (an ``evaluate`` JSON report, whatever keys of :data:`EVALUATION_FACTS` it has) says of its
    run: ``{key: (label, value)}`` for each fact found, in that order; ``requested`` fills what it does not say."""
    tree = {**report, "requested": requested or {}}
    facts = {}
    for key, label, places in EVALUATION_FACTS:
        value = next((v for v in (_lookup(tree, p) for p in places) if v not in (None, "")), None)
        if value is not None:
            facts[key] = (label, value)
    return facts


def table_from_evaluation(scene, report: dict, name: str, table_node=None, *, requested: dict | None = None):
    """A ``vtkMRMLTableNode`` with one row per method of a DiffusionCore evaluation report, that says what was
    measured: the report but its rows in the attribute :data:`ATTR_EVALUATION` (JSON), each of its keys and each
    fact of :func:`evaluation_facts` in ``ATTR_EVALUATION.<key>`` (text as is, other values as JSON), and the facts
    as "Label: value" lines in the node's description. ``requested``: what the job asked for (kept in
    ``ATTR_EVALUATION.requested``), for the facts the report does not state."""
    import vtk

    node = table_node or scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table = node.GetTable()
    table.Initialize()
    method_col = vtk.vtkStringArray()
    method_col.SetName("Method")
    table.AddColumn(method_col)
    for _key, title in EVALUATION_COLUMNS:
        col = vtk.vtkDoubleArray()
        col.SetName(title)
        table.AddColumn(col)
    for row in report.get("results", []):
        r = table.InsertNextBlankRow()
        table.SetValue(r, 0, vtk.vtkVariant(str(row["method"])))
        for c, (key, _title) in enumerate(EVALUATION_COLUMNS, start=1):
            value = row.get(key)
            table.SetValue(r, c, vtk.vtkVariant(float("nan") if value is None else float(value)))
    node.SetAttribute(ATTR_EVALUATION, json.dumps({k: v for k, v in report.items() if k != "results"}))
    facts = evaluation_facts(report, requested)
    recorded = {k: v for k, v in report.items() if k not in _BULKY_KEYS}
    recorded.update({k: value for k, (_label, value) in facts.items()})
    if requested:
        recorded["requested"] = requested
    for key, value in recorded.items():
        node.SetAttribute(f"{ATTR_EVALUATION}.{key}", value if isinstance(value, str) else json.dumps(value))
    node.SetDescription("\n".join(f"{label}: {_FACT_TEXT.get(key, _readable)(value)}"
                                  for key, (label, value) in facts.items()))  # fmt: skip
    table.Modified()
    node.Modified()
    return node


def evaluation_methods(settings: SRSettings) -> tuple[str, ...]:
    """What "Evaluate on this volume" scores: cubic B-spline, cubic followed by the data-consistency step (so that
    the network's own share shows), and super-resolution as Apply runs it: adapted to the scan when "Adapt to this
    scan" is on (``sr+adapt``, with the panel's steps or time), else the weights as they are (``sr``)."""
    return ("cubic", "cubic+dc", "sr+adapt" if settings.adapt_to_scan else "sr")


class EvaluationJob(CLIJob):
    """"Evaluate on this volume": simulate thick slices from a thin input, reconstruct, score; a table node.

    Runs ``python -m DiffusionCore evaluate`` in a background process (the same command-line protocol).
    ``adapt_steps`` / ``adapt_seconds``: how long ``sr+adapt`` adapts (the panel's settings; a time budget
    when ``adapt_seconds`` > 0). ``weights`` / ``allow_unregistered_weights``: the model methods' weights, as
    :class:`SRSettings` has them (:meth:`for_settings` takes them from there); they are checked when the job is
    made, as :class:`SRJob` checks its own. ``seed``: the model methods' random seed (``sr+adapt``'s adaptation
    depends on it), the panel's as Apply passes it; ``threads``: CPU threads (0 = automatic), which the adapted
    result depends on too.

    The table (:func:`table_from_evaluation`) is named after the input, the factor, the degradation and how the
    model ran (:meth:`table_name`), and records the report and what the job asked for (:meth:`requested`).
    """

    script_name = "DiffusionCore evaluate"

    def __init__(
        self,
        scene,
        input_node,
        *,
        factor: int,
        axis: str = "z",
        methods: tuple[str, ...] = ("cubic", "sr"),
        weights: str = "",
        steps: int = 0,
        device: str = "auto",
        degradation: str = "slab",
        adapt_steps: int = 400,
        adapt_seconds: float = 0.0,
        allow_unregistered_weights: bool = False,
        seed: int = 0,
        threads: int = 0,
        **kwargs,
    ):
        super().__init__(scene, **kwargs)
        if input_node is None or input_node.GetImageData() is None:
            raise InputError("Select a thin-slice CT volume to evaluate on.")
        if factor < 2:
            raise InputError("The evaluation factor must be 2 or more (thin slices per simulated thick slice).")
        if {"sr", "sr+adapt"} & set(methods):
            from DiffusionCore.weights.registry import first_available

            name = weights or first_available("sr")
            resolved = check_weights(name, "sr", bool(allow_unregistered_weights)) if name else None
            problem = sampling_problem(int(steps), 1, resolved, name)
            if problem:
                raise InputError(problem)
        self.series = refuse_series_the_job_cannot_read(input_node)
        check_scorable(job_grid(input_node).shape, int(factor), axis_index(axis), f"'{input_node.GetName()}'")
        self.input_node = input_node
        notice = synthetic_input_notice(input_node)
        if notice:
            self.notices.append(notice)
        self.factor, self.axis, self.methods = int(factor), axis, tuple(methods)
        self.weights, self.steps, self.device, self.degradation = weights, int(steps), device, degradation
        self.adapt_steps, self.adapt_seconds = int(adapt_steps), float(adapt_seconds)
        self.allow_unregistered_weights = bool(allow_unregistered_weights)
        self.seed, self.threads = int(seed), int(threads)
        self.table_node = None

    @classmethod
    def for_settings(cls, scene, input_node, factor: int, settings: SRSettings, **kwargs) -> EvaluationJob:
        """"Evaluate on this volume" with the settings Apply runs with: the methods of
        :func:`evaluation_methods`, and the weights (registered or allowed unregistered), steps, device, seed, threads
        and adaptation budget of ``settings``; ``kwargs`` as for the constructor (``axis``, ``on_line``, ...)."""
        return cls(
            scene, input_node, factor=factor, methods=evaluation_methods(settings), weights=settings.weights,
            allow_unregistered_weights=settings.allow_unregistered_weights, steps=settings.steps,
            device=settings.device, adapt_steps=settings.adapt_steps, adapt_seconds=settings.adapt_seconds,
            seed=settings.seed, threads=settings.threads, **kwargs,
        )  # fmt: skip

    def adaptation(self) -> dict | str:
        """How ``sr+adapt`` adapts, as asked: ``{"seconds": S}`` or ``{"steps": N}``; "off" without it."""
        if "sr+adapt" not in self.methods:
            return "off"
        return {"seconds": self.adapt_seconds} if self.adapt_seconds > 0 else {"steps": self.adapt_steps}

    def requested(self) -> dict:
        """What the job asked the command for (its table records it, for what the report does not say)."""
        return {
            "factor": self.factor, "axis": self.axis, "degradation": self.degradation, "methods": list(self.methods),
            "weights": self.weights, "allow_unregistered_weights": self.allow_unregistered_weights,
            "steps": self.steps, "device": self.device, "seed": self.seed, "threads": self.threads,
            "adaptation": self.adaptation(),
        }  # fmt: skip

    def table_name(self) -> str:
        """The table's name: the input, factor and degradation, and whether the model was adapted to the scan (for
        how long; with the seed when not 0, which the adaptation depends on), e.g. "CT evaluation x4 slab, adapted
        400 steps" or "CT evaluation x4 slab, not adapted"; the scene adds a counter only to a name in use."""
        name = f"{self.input_node.GetName()} evaluation x{self.factor} {self.degradation}"
        budget = self.adaptation()
        if isinstance(budget, dict):
            length = f"{budget['seconds']:g} s" if "seconds" in budget else f"{budget['steps']} steps"
            return f"{name}, adapted {length}" + (f", seed {self.seed}" if self.seed else "")
        if "sr" in self.methods:
            return f"{name}, not adapted"
        return name

    def argv(self, args):
        from .process import python_executable

        return [python_executable(), "-m", "DiffusionCore", *args]

    def prepare(self, tempdir: Path) -> list[str]:
        from vtk.util import numpy_support

        voxels = numpy_support.vtk_to_numpy(self.input_node.GetImageData().GetPointData().GetScalars())  # a view
        if np.count_nonzero(voxels > -500) == 0:
            raise InputError(f"'{self.input_node.GetName()}' has no voxel above -500 HU: no body to evaluate in.")
        reference = write_job_input(self.input_node, tempdir, "reference", series=self.series)
        self.handed_over = []
        self.hand_over(reference, "the volume", self.input_node)
        args = [
            "evaluate", "--reference", reference, "--factor", str(self.factor),
            "--axis", self.axis, "--degradation", self.degradation, "--methods", ",".join(self.methods),
            "--device", self.device, "--seed", str(self.seed), "--json", str(tempdir / "evaluation.json"),
            "--progress", "slicer",
        ]  # fmt: skip
        if self.weights:
            args += ["--weights", self.weights]
        if self.allow_unregistered_weights:
            args.append("--allow-unregistered-weights")
        if self.steps:
            args += ["--num-steps", str(self.steps)]
        if self.threads:
            args += ["--threads", str(self.threads)]
        if "sr+adapt" in self.methods:
            args += ["--adapt", repr(self.adapt_seconds)] if self.adapt_seconds > 0 else ["--adapt-steps", str(self.adapt_steps)]
        return args

    def import_results(self, tempdir: Path) -> list:
        report = json.loads((tempdir / "evaluation.json").read_text())
        report["reference"] = self.input_node.GetName()
        self.table_node = table_from_evaluation(self.scene, report, self.table_name(), requested=self.requested())
        self.created_nodes.append(self.table_node)
        place_beside(self.scene, self.input_node, self.table_node)
        return [self.table_node]
