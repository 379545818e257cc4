"""``evaluate-xray``: generate a CT from the training-geometry DRR of a reference CT and score every stage.

Methods, all in the same run on the same input: ``model`` (the cascade, each stage, with the re-projection
consistency step that ``xray2ct`` applies by default), ``model-raw`` (the cascade without it: the network's
own output), ``mean-ct`` (the mean training CT stored in the weights: the prior alone), ``lifting-only``
(each stage's depth-lifted volume, no diffusion), ``lifting+dc`` (that volume followed by the same consistency
step: what the diffusion adds beyond the lifting and the physics is ``model``'s gain over this row) and, from
stage 2 on, ``previous-stage`` (the previous stage's ``model`` volume upsampled trilinearly to this stage's cube:
what a stage adds is its gain over this row; it needs ``model``), ``previous-stage+dc`` (that upsampled volume
followed by the consistency step at this stage's grid: the stage network's own share is ``model``'s gain over this
row) and, for weights whose stage 1 refines an atlas (``model.atlas_prior``), ``atlas`` (that atlas registered to
the input: what stage 1 adds is its gain over this row). Metrics (BENCHMARK.md): 3D PSNR and 3D SSIM with HU
clipped to [-1024, 2048] against the reference resampled to the stage's cube, re-projection PSNR (DRR of the
output vs the input, [0, 1]) and cross-view PSNR: the output's DRR in the view at right angles to the input's
(lateral for a PA radiograph) against the reference's, both scaled by the reference's 99.5th percentile. The input cannot show where things
lie along its rays; the cross view shows exactly that (the spine behind the heart or inside it).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError, NumericalError
from ..evaluate import run_environment
from ..metrics import HU_RANGE, psnr, ssim3d
from ..volume import Volume
from .consistency import drr_consistency
from .data import (
    SCORES_ON_AIR,
    check_cube_size,
    clinical_look,
    ct_to_cubes,
    render_training_drr,
    warn_little_body,
)
from .drr import cross_view, hu_to_mu, project_parallel_axis
from .pipeline import XrayToCTGenerator, projection_error, volume_from_unit
from .radiograph import window_radiograph

logger = logging.getLogger(__name__)

METHODS = ("model", "model-raw", "mean-ct", "lifting-only", "lifting+dc", "previous-stage", "previous-stage+dc",
           "atlas")


def reference_scores(result: Volume, reference: Volume) -> dict[str, float]:
    """3D PSNR and 3D SSIM of a generated CT against a reference CT, as :func:`evaluate_xray` scores a stage: the
    reference resampled to the body-centred cube of the result's size and field of view (the training geometry, in
    which a generated cube is centred on the body of its radiograph), HU clipped to [-1024, 2048]. The figures mean
    something when the radiograph shows that CT in the training geometry (its DRR, or a radiograph of the same
    patient taken alike); any reference size works, even one thinner than the SSIM window."""
    r = int(result.shape[0])
    fov = float(result.spacing[0]) * r
    cube = ct_to_cubes(reference, [r], fov)[r]
    warn_little_body(cube, str(reference.metadata.get("source") or "the reference CT"), fov, SCORES_ON_AIR)
    ref = cube.array
    return {"psnr": psnr(ref, result.array, hu_range=HU_RANGE), "ssim": ssim3d(ref, result.array, hu_range=HU_RANGE)}


def cross_view_psnr(vol_hu: torch.Tensor, ref_hu: torch.Tensor, fov_mm: float, view: str) -> float:
    """PSNR (dB) of a volume's parallel-beam DRR in the view at right angles to ``view`` against the reference's.

    Both are line integrals of the attenuation at 70 keV divided by the reference DRR's 99.5th percentile (one
    scale for both, so a volume too dense or too light along those rays scores lower), on [0, 1].

    Args:
        vol_hu, ref_hu: (1, 1, R, R, R) cubes in HU on the same grid.
        fov_mm: the cube's side.
        view: the input's view (``pa`` or ``lateral``).
    """
    spacing = (fov_mm / vol_hu.shape[-1],) * 3
    other = cross_view(view)
    ref = project_parallel_axis(hu_to_mu(ref_hu.float()), spacing, other)
    scale = torch.quantile(ref.flatten(), 0.995).clamp_min(1e-6)
    out = project_parallel_axis(hu_to_mu(vol_hu.float()), spacing, other)
    # not metrics.psnr: it clips both to the range, and the reference's densest 0.5% of rays lie above 1
    mse = float((((out - ref) / scale) ** 2).mean())
    return float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))


def evaluate_xray(
    generator: XrayToCTGenerator,
    reference: Volume,
    *,
    num_stages: int | None = None,
    methods: tuple[str, ...] = METHODS,
    steps: int | None = None,
    num_samples: int | None = None,
    lifting_start_t: float | None = None,
    seed: int = 0,
    device: str = "auto",
    reference_name: str = "reference",
    progress=None,
    look: tuple[float, float, float] | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """Score methods on one reference CT.

    ``look`` = (amount, sigma in pixels of a 128^2 radiograph, flattening) gives the DRR the look of a processed
    clinical radiograph first (:func:`~DiffusionCore.xray.data.clinical_look`, e.g. ``data.CLINICAL_LOOK``): how
    well a model reads a radiograph that is not a plain DRR.

    Args:
        reference_name: how the report and the messages name the reference; a sample CT's fetched file is named by
            the sample's name (:func:`reference_label`), however it was given.
        weights: the weights' name or file as the run named them; None: the registered name of the generator's
            weights (by their sha256), ``""`` for weights in no registry.

    Returns:
        ``{"reference": str, "reference_file": str, "results": [{"method", "stage", "psnr3d", "ssim3d",
        "reprojection_psnr", "cross_view_psnr", "seconds"}], "settings": {...}}``, and what ``evaluate``'s report
        also records (:func:`~DiffusionCore.evaluate.run_environment`: ``date``, ``diffusioncore_version``,
        ``torch_version``, ``python_version``, ``torch_threads``), ``weights``, ``weights_sha256`` and ``device``.
        ``settings`` holds the values used: ``steps`` and ``num_samples`` per stage and ``lifting_start_t`` (the
        weights' own where none were given; None when no diffusion ran), ``device`` and ``torch_threads``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    cascade = generator.cascade
    n = min(num_stages or cascade.num_stages, cascade.num_stages)
    if num_stages is not None and num_stages > n:
        logger.warning("%d stages were asked for, but the weights have %d; evaluating %d", num_stages, n, n)
    cfgs = cascade.configs[:n]
    fov = cfgs[0].data.fov_mm
    view = cfgs[0].data.view
    check_cube_size(reference, reference_name)
    by_resolution = ct_to_cubes(reference, [c.resolution for c in cfgs], fov)
    refs = {c.stage: by_resolution[c.resolution] for c in cfgs}
    finest = refs[cfgs[-1].stage]
    xres = max(c.xray_resolution for c in cascade.configs)
    xray = render_training_drr(torch.from_numpy(finest.array)[None, None], fov, xres, view)
    try:
        window_radiograph(xray[0, 0].numpy())  # what the generator refuses as blank: said of the CT the user gave
    except InputError:
        raise InputError(
            f"{reference_name}: its radiograph in the training geometry (a {view.upper()} view of a {fov:g} mm cube centred on "
            "the body) is blank: too little tissue denser than air lies in that cube. evaluate-xray needs a CT of the "
            "chest in Hounsfield units that covers the body across (air -1000 HU, soft tissue near 0)."
        ) from None
    warn_little_body(by_resolution[cfgs[0].resolution], reference_name, fov, SCORES_ON_AIR)  # scored, but on air
    if look is not None:
        xray = clinical_look(xray, *look)
    results: list[dict[str, Any]] = []

    def score(method: str, stage: int, vol_unit: torch.Tensor, seconds: float) -> None:
        vol = volume_from_unit(vol_unit, fov)
        ref = refs[stage].array
        bad = int(vol_unit.isnan().sum())  # no score is defined for NaN (the metrics refuse it): say whose it is
        if bad:
            raise NumericalError(
                f"evaluate-xray: method {method} (stage {stage}) returned {bad:,} NaN voxel(s) of {vol_unit.numel():,}: "
                "its result failed numerically; nothing was written. Check the weights and options; if they are "
                "right, report it (on the command line, --debug shows the traceback)."
            )
        results.append({
            "method": method,
            "stage": stage,
            "psnr3d": psnr(ref, vol.array, hu_range=HU_RANGE),
            "ssim3d": ssim3d(ref, vol.array, hu_range=HU_RANGE),
            "reprojection_psnr": projection_error(vol_unit.cpu(), xray, fov, view)["projection_psnr"],
            "cross_view_psnr": cross_view_psnr(torch.from_numpy(vol.array)[None, None],
                                               torch.from_numpy(ref)[None, None], fov, view),  # fmt: skip
            "seconds": seconds,
        })  # fmt: skip

    last: dict[str, torch.Tensor] = {}  # the model's previous stage, for previous-stage
    used: dict[str, Any] = {"steps": None, "num_samples": None, "lifting_start_t": None, "device": "cpu"}  # no diffusion
    for method in ("model", "model-raw"):
        if method not in methods:
            continue

        def on_stage(stage: int, vol: Volume, info: dict, method: str = method) -> None:
            from ..intensity import hu_to_unit

            unit = hu_to_unit(torch.from_numpy(vol.array))[None, None]
            score(method, stage, unit, info["seconds"])
            if method != "model":
                return
            if "prev" in last and ("previous-stage" in methods or "previous-stage+dc" in methods):
                r = unit.shape[-1]
                up = F.interpolate(last["prev"].float(), size=(r,) * 3, mode="trilinear", align_corners=False)
                if "previous-stage" in methods:
                    score("previous-stage", stage, up, 0.0)
                if "previous-stage+dc" in methods:
                    t0 = time.time()
                    corrected, _ = drr_consistency(up, xray, fov, view)
                    score("previous-stage+dc", stage, corrected, time.time() - t0)
            last["prev"] = unit

        _, run_report = generator.run(xray[0, 0].numpy(), num_stages=n, steps=steps, seed=seed, device=device,
                                      view=view, num_samples=num_samples, lifting_start_t=lifting_start_t,
                                      fov_mm=fov, on_stage=on_stage, progress=progress,
                                      consistency=method == "model")  # fmt: skip
        used = run_report["settings"]  # the values the cascade ran with: the weights' own where none were given
    with torch.no_grad():
        for c in cfgs:
            r = c.resolution
            if "mean-ct" in methods:
                t0 = time.time()
                mean = F.interpolate(
                    cascade.mean_ct.float().cpu(), size=(r,) * 3, mode="trilinear", align_corners=False
                )
                score("mean-ct", c.stage, mean, time.time() - t0)
            stage = cascade.stages[c.stage - 1].cpu()
            if "lifting-only" in methods or "lifting+dc" in methods:
                t0 = time.time()
                lifted = stage.lifted_only(xray)
                lifting_s = time.time() - t0
                if "lifting-only" in methods:
                    score("lifting-only", c.stage, lifted, lifting_s)
                if "lifting+dc" in methods:
                    t0 = time.time()
                    corrected, _ = drr_consistency(lifted, xray, fov, view)
                    score("lifting+dc", c.stage, corrected, lifting_s + time.time() - t0)
            if "atlas" in methods and stage.uses_atlas:
                t0 = time.time()
                score("atlas", c.stage, stage.registered_atlas(xray), time.time() - t0)
    env = run_environment()
    from ..weights.registry import registered_name

    name = (registered_name(generator.weights_sha256) or "") if weights is None else str(weights)
    return {
        "reference": reference_label(reference_name),
        "reference_file": os.path.abspath(str(reference.metadata.get("source") or reference_name)),
        "results": results,
        **env,
        "weights": name,
        "weights_sha256": generator.weights_sha256,
        "device": used["device"],
        "settings": {
            "fov_mm": fov,
            "view": view,
            "num_stages": n,
            "steps": used["steps"],
            "num_samples": used["num_samples"],
            "lifting_start_t": used["lifting_start_t"],
            "seed": seed,
            "device": used["device"],
            "torch_threads": env["torch_threads"],
            "hu_range": list(HU_RANGE),
            "weights": name,
            "weights_sha256": generator.weights_sha256,
            "input": "parallel-beam DRR of the reference at 70 keV (training geometry)"
            + ("" if look is None else f", given a clinical look (amount, sigma px at 128^2, flattening) {list(look)}"),
        },  # fmt: skip
    }


def reference_label(name: str | os.PathLike) -> str:
    """How a report names a reference CT: a sample CT by its name (``chest-dx``), whether it was given so or came
    from a folder or a list as the sample's fetched file; any other CT by the name it was given."""
    from ..sampledata import SAMPLES, sample_dir

    text = str(name)
    if text in SAMPLES:
        return text
    real = os.path.realpath(text)
    for sample, info in SAMPLES.items():
        if info.kind == "ct" and real.startswith(os.path.realpath(sample_dir(sample)) + os.sep):
            return sample
    return text


#: The scores of a row of an :func:`evaluate_xray` report.
XRAY_SCORE_KEYS = ("psnr3d", "ssim3d", "reprojection_psnr", "cross_view_psnr")


def aggregate_xray(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation of every score per method and stage over several references' reports
    (:func:`~DiffusionCore.evaluate.aggregate`)."""
    from ..evaluate import aggregate

    return aggregate(reports, XRAY_SCORE_KEYS, by=("method", "stage"))


def format_xray_aggregate(agg: dict[str, Any]) -> str:
    """:func:`aggregate_xray` as a plain-text table: mean +- SD per method, stage and score."""
    lines = [f"mean +- SD over {agg['n']} reference CT(s)",
             f"{'method':<18}{'stage':>6}{'N':>4}{'PSNR3D dB':>16}{'SSIM3D':>16}{'reproj dB':>16}"
             f"{'cross-view dB':>16}"]  # fmt: skip
    for r in agg["results"]:
        cells = []
        for key, digits in zip(XRAY_SCORE_KEYS, (2, 3, 2, 2)):
            mean, sd = r.get(f"{key}_mean"), r.get(f"{key}_sd")
            text = "" if mean is None else f"{mean:.{digits}f}" + ("" if sd is None else f" +- {sd:.{digits}f}")
            cells.append(f"{text:>16}")
        lines.append(f"{r['method']:<18}{r['stage']:>6}{r['n']:>4}" + "".join(cells))
    return "\n".join(lines)


def format_xray_table(report: dict[str, Any]) -> str:
    """A plain-text table of an :func:`evaluate_xray` report."""
    lines = [f"reference: {report['reference']}",
             f"{'method':<18}{'stage':>6}{'PSNR3D dB':>11}{'SSIM3D':>9}{'reproj dB':>11}{'cross-view dB':>15}"
             f"{'seconds':>9}"]  # fmt: skip
    for r in report["results"]:
        lines.append(f"{r['method']:<18}{r['stage']:>6}{r['psnr3d']:>11.2f}{r['ssim3d']:>9.3f}"
                     f"{r['reprojection_psnr']:>11.2f}{r['cross_view_psnr']:>15.2f}"
                     f"{r['seconds']:>9.2f}")  # fmt: skip
    return "\n".join(lines)
