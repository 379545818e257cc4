#!/usr/bin/env python-real
"""Slicer scripted CLI: a synthetic CT volume from one radiograph with DiffusionCore's ``XrayToCTGenerator``.

Runs the way Slicer runs a scripted CLI (flags first, then ``inputRadiograph outputVolume``, booleans as
bare flags, ``--returnparameterfile FILE``) and as a plain script:

    python XrayToCTGenerate.py --numStages 2 --view pa chest.dcm ct.nrrd

Each finished stage is announced on stdout as ``stage-ready {json}`` (stage, the number of stages the run makes,
file, projection error) and, with ``--stageDirectory``, written there as ``stage<N>.nrrd`` so that Slicer can show
a preview while the next stage runs. The interface is XrayToCTGenerate.xml; this parser mirrors it (a test checks that).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

logger = logging.getLogger("DiffusionCore")

TINY_MODEL_NAME = "tiny-test-model (random weights)"
STAGE_LINE_PREFIX = "stage-ready "
#: The share of the progress bar of each phase of a run (:class:`DiffusionCore.cli.xray.PhaseProgress`). The
#: generation's share is filled stage by stage, each sampling step weighted by its stage's voxel count
#: (:func:`DiffusionCore.xray.pipeline.stage_step_costs`). On a CPU, one stage of the shipped weights: reading a
#: 6000x7000 radiograph took about 1 s, loading the weights 1-2 s, the generation 4-5 s, writing 0.1-0.4 s.
PHASE_SHARES = {"reading": 4.0, "weights": 6.0, "generation": 86.0, "writing": 2.0, "scoring": 2.0}


def build_parser() -> argparse.ArgumentParser:
    from DiffusionCore.cli.common import THREADS_HELP, bounded_int, finite_float, seed_number
    from DiffusionCore.cli.main import CommandParser

    # the commands' parser: one error line, a dash-led file name pointed out; no abbreviations, which Slicer never
    # passes and which would name the hidden test option
    p = CommandParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("inputRadiograph", help="a frontal chest radiograph, head up: DICOM (CR, DX, a CT topogram), PNG, "
                   "JPEG, TIFF, BMP, or a 2D NRRD, MetaImage or NIfTI (taken as 3D Slicer displays it, with its pixel "
                   "spacing)")
    p.add_argument("outputVolume", help="generated CT volume to write")
    p.add_argument("--stageDirectory", default="", help="write stage<N>.nrrd previews into this folder")
    p.add_argument("--referenceVolume", default="", help="reference CT for PSNR/SSIM in the report")
    p.add_argument("--numStages", type=int, default=0,
                   help="stages of the cascade to run (1-3); 0 = every stage the weights have; more than they have runs "
                   "every stage they have, with a warning")
    p.add_argument(
        "--view", choices=("auto", "pa", "lateral"), default="auto",
        help="auto: what the DICOM header says (--dicomHeader or a DICOM input), else pa",
    )
    p.add_argument(
        "--dicomHeader", default="",
        help="the DICOM file the radiograph was loaded from (Slicer passes it): its modality, view and orientation "
        "are used as for a DICOM input",
    )
    p.add_argument("--fieldOfView", type=finite_float(0.0), default=0.0, help="cube width in mm; 0 = automatic")
    p.add_argument(
        "--invertIntensities", action="store_true",
        help="invert the radiograph first (bones dark); never needed for DICOM: MONOCHROME1 and PresentationLUTShape "
        "INVERSE are applied as it is read",
    )
    p.add_argument(
        "--weights", default="",
        help="a .safetensors weights file or a registered name; empty = the first registered X-ray weights installed",
    )
    p.add_argument("--allowUnregisteredWeights", action="store_true", help="accept an unregistered file")
    p.add_argument("--noConsistency", action="store_true", help="skip the re-projection consistency step")
    p.add_argument("--numSteps", type=int, default=0, help="sampling steps per stage; 0 = model default")
    p.add_argument("--numSamples", type=int, default=0, help="samples averaged per stage; 0 = model default")
    p.add_argument("--seed", type=seed_number, default=0)
    p.add_argument("--threads", type=bounded_int(0), default=0, help=THREADS_HELP)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tinyTestModel", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reportFile", default="", help="write a JSON report here")
    p.add_argument("--returnparameterfile", default="", help="file for output values (set by Slicer)")
    return p


def projection_figures(info: dict) -> dict[str, float]:
    """The stage's re-projection agreement with the input radiograph (e.g. ``projection_psnr`` in dB on
    [0, 1] and ``projection_ncc``), taken from the generator's per-stage info."""
    return {k: float(v) for k, v in info.items() if "projection" in k and isinstance(v, int | float)}


def installed_default_weights() -> str:
    """The registered X-ray weights a run uses when none are chosen (the first whose file is here).

    Raises:
        WeightsError: none is installed; the message says how to get weights in Slicer.
    """
    from DiffusionCore.weights.registry import default_weights_name

    return default_weights_name(
        "xray", "X-ray to CT",
        how_to_get="choose a .safetensors file as Weights file, or import one with 'Import weights...' in the "
        "X-ray to CT module (reinstalling the extension restores the shipped xray-default).",
        how_to_reimport="import them again with 'Import weights...' in the X-ray to CT module, or choose a "
        ".safetensors file as Weights file.",
    )


def load_radiograph(path: str, invert: bool, dicom_header: str = ""):
    """The radiograph as DiffusionCore reads it (attenuation style in [0, 1]), optionally inverted.

    The engine's reader (:func:`DiffusionCore.xray.radiograph.read_radiograph`) takes a DICOM file's spacing from its
    tags, and a MetaImage/NRRD/NIfTI file's (what Slicer hands over) from its header unless it is exactly 1 x 1 mm:
    that is what images without spacing information (PNG, JPEG loaded in Slicer) report, and a real radiograph's
    pixels are far smaller, so it is treated as unknown (the model's field of view is used). A MetaImage/NRRD/NIfTI
    image is turned as 3D Slicer displays it (the module hands its node's pixels over that way already).

    ``dicom_header``: the DICOM file a Slicer node was loaded from. Slicer keeps the file's row and column order in
    the node, so the header's modality, view and orientation apply to the pixels handed over as they would to the
    file itself (:func:`DiffusionCore.xray.radiograph.apply_dicom_header`).
    """
    from DiffusionCore.xray.radiograph import (
        Radiograph,
        apply_dicom_header,
        apply_presentation_lut,
        header_spacing,
        invert_radiograph,
        read_dicom_header,
        read_radiograph,
    )

    radiograph = read_radiograph(path)
    if dicom_header and radiograph.metadata.get("format") == "dicom":
        logger.info("the input is DICOM: its own header is used, not %s", dicom_header)  # else turned twice
    elif dicom_header:
        tags = read_dicom_header(dicom_header)
        # a spacing the image file left unknown (1 x 1 mm, as Slicer shows a header without PixelSpacing) from the tags
        spacing = radiograph.pixel_spacing or header_spacing(tags)
        array, spacing, said = apply_dicom_header(radiograph.array, spacing, tags, Path(dicom_header).name)
        # the node's pixels as Slicer read them: MONOCHROME1 applied, the Presentation LUT not (the array is this
        # function's own, or a view of it: inverted in place)
        said = {**said, **apply_presentation_lut(array, tags, Path(dicom_header).name)}
        radiograph = Radiograph(array, spacing, {**radiograph.metadata, **said, "dicom_header": str(dicom_header)})
    return invert_radiograph(radiograph) if invert else radiograph


def radiograph_uid(path: str, dicom_header: str = "") -> str:
    """The SOPInstanceUID the provenance records as the input's, as ``xray2ct`` records it: a DICOM input's own (its
    header is the one used, see :func:`load_radiograph`), else that of ``dicom_header``, the DICOM file a Slicer
    node was loaded from; "" when neither is DICOM or holds one."""
    from DiffusionCore.cli.xray import radiograph_uid as read_uid
    from DiffusionCore.results import is_dicom_input

    source = path if is_dicom_input(path) or not dicom_header else dicom_header
    return read_uid(Path(source), None)  # as xray2ct reads it


def check_outputs(args: argparse.Namespace) -> None:
    """Every file the run writes, checked before any work as ``xray2ct`` checks its own: no output, sidecar, stage
    preview, report or return-parameter file may be an input (the radiograph, the reference CT, the DICOM header,
    the weights) or another output, whatever is replaced; each must be writable, and the report and the
    return-parameter file must not be folders.

    Raises:
        OutputError: exit code 4; the message names the file and what to do.
    """
    from DiffusionCore.cli.xray import MAX_STAGES
    from DiffusionCore.errors import OutputError
    from DiffusionCore.files import check_writable_file, refuse_overwriting_inputs
    from DiffusionCore.results import check_replaced_result, planned_outputs

    stages = Path(args.stageDirectory) if args.stageDirectory else None
    if stages is not None and stages.exists() and not stages.is_dir():
        raise OutputError(f"--stageDirectory {stages} is a file: give a folder for the stage previews (it is created)")
    previews = [("a stage preview", stages / f"stage{s}.nrrd") for s in range(1, MAX_STAGES + 1)] if stages else []
    files = [("--reportFile", args.reportFile), ("--returnparameterfile", args.returnparameterfile)]
    files = [(what, path) for what, path in files if path]
    inputs = [args.inputRadiograph, args.referenceVolume, args.dicomHeader, args.weights]
    outputs = [*planned_outputs(args.outputVolume, False), *previews, *files]
    refuse_overwriting_inputs([p or None for p in inputs], outputs, overwrite_option=None)
    check_replaced_result(args.outputVolume)
    for _, path in files:  # files the user (or Slicer) named: replaced, but never a folder
        check_writable_file(path, overwrite=True)


def read_reference(path: str):
    """The reference CT of --referenceVolume, read and checked before any work (the scores are computed only after
    the whole generation): a 3D volume of at least ``MIN_CT_VOXELS`` along each axis, in Hounsfield units.

    Raises:
        InputError: exit code 2; missing or unreadable, a 2D image, too small, or not CT-like.
    """
    from DiffusionCore.errors import InputError
    from DiffusionCore.volume import check_ct, mark_ct_checked, read_volume
    from DiffusionCore.xray.data import check_cube_size

    reference = read_volume(path, check=False)
    name = f"the reference CT {path}"
    check_cube_size(reference, name)
    doubts = check_ct(mark_ct_checked(reference), name)  # refused below, so not logged as a warning
    if doubts:
        raise InputError(f"{doubts[0]} The reference scores need a CT in Hounsfield units: give another "
                         "--referenceVolume, or none.")  # fmt: skip
    return reference


def run(args: argparse.Namespace) -> int:
    """The run, with SIGTERM (Slicer's Cancel, ``kill``) stopping it between steps: exit code 130, one line, and
    no output left (the stage previews, their folder if the run made it, and what was published before the signal
    are removed again)."""
    import contextlib
    import threading

    from DiffusionCore.cli.common import sigterm_cancels
    from DiffusionCore.errors import Cancelled

    cancel = threading.Event()
    written: list[Path] = []
    with sigterm_cancels(cancel, "X-ray to CT"):
        try:
            return _generate(args, cancel, written)
        except Cancelled:
            for path in reversed(written):
                with contextlib.suppress(OSError):  # a folder goes only once emptied
                    if path.is_dir():
                        path.rmdir()
                    else:
                        path.unlink(missing_ok=True)
            raise


def format_reference_scores(scores: dict[str, float], reference: str) -> str:
    """The scores of a generated CT against a reference CT
    (:func:`~DiffusionCore.xray.evaluate.reference_scores`: ``psnr``, ``ssim``) as a short block for the module's
    output, whether or not they also go into a report file."""
    from DiffusionCore.metrics import HU_RANGE

    low, high = HU_RANGE
    lines = [f"reference scores against {reference} (its body-centred cube, HU clipped to [{low:g}, {high:g}]):"]
    for key, label, unit, digits in (("psnr", "3D PSNR", " dB", 2), ("ssim", "3D SSIM", "", 3)):
        if key in scores:
            lines.append(f"  {label}  {float(scores[key]):.{digits}f}{unit}")
    return "\n".join(lines)


def _generate(args: argparse.Namespace, cancel, written: list[Path]) -> int:
    from DiffusionCore.cli.common import Progress, check_result, set_torch_threads, write_return_parameters
    from DiffusionCore.cli.xray import PhaseProgress, xray_provenance
    from DiffusionCore.files import keep_freed_memory, write_json_atomic
    from DiffusionCore.results import write_result
    from DiffusionCore.volume import write_volume
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    t0 = time.perf_counter()
    shares = {k: v for k, v in PHASE_SHARES.items() if k != "scoring" or args.referenceVolume}
    bar = PhaseProgress(Progress("slicer"), shares)
    check_outputs(args)  # before any work: no output may be an input, and each can be written
    set_torch_threads(args.threads)  # the result depends on it (recorded as torch_threads)
    # the reading is said in a comment alone (the bar is at its start anyway): an input refused while it is read
    # leaves no progress line, as no work was done
    reference = None
    if args.referenceVolume:
        print("<filter-comment>reading the reference CT</filter-comment>", flush=True)
        reference = read_reference(args.referenceVolume)
    print("<filter-comment>reading the radiograph</filter-comment>", flush=True)
    radiograph = load_radiograph(args.inputRadiograph, False, args.dicomHeader)  # inverted by the generator
    uid = radiograph_uid(args.inputRadiograph, args.dicomHeader)
    if args.stageDirectory and not Path(args.stageDirectory).is_dir():
        written.append(Path(args.stageDirectory))  # made by this run: removed again if it is cancelled
        Path(args.stageDirectory).mkdir(parents=True, exist_ok=True)
    bar.start("weights", "loading the weights")
    keep_freed_memory()  # a one-shot process: the network's buffers are reused, not mapped afresh
    if args.tinyTestModel:
        generator = XrayToCTGenerator.tiny(seed=0)
        model_name = TINY_MODEL_NAME
    else:
        if args.weights:
            generator = XrayToCTGenerator.from_pretrained(
                args.weights, allow_unregistered=args.allowUnregisteredWeights
            )
        else:
            args.weights = installed_default_weights()
            generator = XrayToCTGenerator.from_pretrained(args.weights)
        model_name = args.weights
    from DiffusionCore.xray.radiograph import check_model_input_size

    # a thumbnail is refused, as xray2ct refuses it
    check_model_input_size(radiograph, max(c.xray_resolution for c in generator.cascade.configs), "the radiograph")
    settings = {
        "consistency": not args.noConsistency,
        "num_stages": args.numStages or None,
        "steps": args.numSteps or None,
        "num_samples": args.numSamples or None,
        "seed": args.seed,
        "device": args.device,
        "view": None if args.view == "auto" else args.view,
        "fov_mm": args.fieldOfView or None,
        "invert": bool(args.invertIntensities),
    }
    errors: list[dict[str, float]] = []
    planned = min(args.numStages or generator.num_stages, generator.num_stages)  # the generator caps it, with a note

    def on_stage(stage: int, volume, info: dict) -> None:
        figures = projection_figures(info)
        errors.append(figures)
        record = {"stage": int(stage), "stages": planned, "projection": figures, "shape": list(volume.shape), "file": ""}
        if args.stageDirectory:
            check_result(volume, f"the stage {stage} volume")
            path = Path(args.stageDirectory) / f"stage{int(stage)}.nrrd"
            written.append(path)  # a preview: removed again if the run is cancelled
            write_volume(volume, path, overwrite=True, dtype="float32", compress=False)
            record["file"] = str(path)
        print(STAGE_LINE_PREFIX + json.dumps(record), flush=True)
        text = ", ".join(f"{k} {v:.4g}" for k, v in figures.items()) or "no projection figures"
        print(f"<filter-comment>stage {stage} ready: {text}</filter-comment>", flush=True)

    result, report = generator.run(radiograph, progress=bar.within("generation"), on_stage=on_stage, cancel=cancel,
                                   **settings)  # fmt: skip
    check_result(result, "the generated CT")
    bar.start("writing", "writing the result")
    # with the provenance in the file: Slicer reads it into the output node, which the modules then label synthetic
    provenance = xray_provenance(Path(args.inputRadiograph), report, model_name, uid)
    written += write_result(result, args.outputVolume, provenance, overwrite=True, dtype="float32", compress=False)
    metrics = {}
    if reference is not None:  # scored as evaluate-xray scores: on the reference's body-centred cube
        from DiffusionCore.xray.evaluate import reference_scores

        bar.start("scoring", "scoring the result against the reference CT")
        metrics = reference_scores(result, reference)
        print(format_reference_scores(metrics, args.referenceVolume), flush=True)  # with or without --reportFile
    elapsed = time.perf_counter() - t0
    sha = str(report.get("weights_sha256", ""))
    if args.reportFile:
        written.append(write_json_atomic(
            {
                "model": model_name,
                "settings": settings,
                "seconds": elapsed,
                "projection_errors": errors,
                "reference_metrics": metrics,
                **report,
                "provenance": provenance.as_dict(),
            },
            args.reportFile,
        ))
    if args.returnparameterfile:  # written in place, not atomically: listed first
        written.append(Path(args.returnparameterfile))
    write_return_parameters(
        args.returnparameterfile,
        {
            "weightsSha256": sha,
            "modelName": model_name,
            "projectionErrors": ",".join(f"{e.get('projection_psnr', math.nan):.6g}" for e in errors),
            "elapsedSeconds": f"{elapsed:.3f}",
        },
    )
    bar.finish("done")
    return 0


def _load():
    from DiffusionCore.cli.common import run_guarded, setup_logging
    from DiffusionCore.cli.main import standard_streams

    return build_parser(), run_guarded, setup_logging, standard_streams  # the parser reads DiffusionCore's defaults


def main(argv: list[str] | None = None) -> int:
    try:  # stdlib only, inside DiffusionCore: fails only where DiffusionCore itself is missing
        from DiffusionCore.cli.missing import needs_packages, own_torch_cache, slicer_install_hint
    except ImportError as exc:
        sys.exit(f"error: DiffusionCore is not installed in this Python ({exc}); install the extension again.")

    with own_torch_cache():  # before torch is imported (by the parser's defaults already)
        parser, run_guarded, setup_logging, standard_streams = needs_packages(_load, "X-ray to CT")
        from DiffusionCore.cli.common import SLICER_BUG_HINT

        # as python -m DiffusionCore: a closed stdout or stderr, or a reader that left (| head), fails no run
        with standard_streams():
            args = parser.parse_args(argv)
            setup_logging()
            return run_guarded(lambda: run(args), install_hint=slicer_install_hint("X-ray to CT"),
                               memory_hint="run fewer stages or use the GPU", bug_hint=SLICER_BUG_HINT)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
