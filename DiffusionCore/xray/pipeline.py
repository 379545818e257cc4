"""``XrayToCTGenerator``: a radiograph in, a CT volume (HU, mm geometry) out, stage by stage.

Each stage's volume is re-projected with the training geometry (parallel-beam DRR at 70 keV) and compared
with the input radiograph; the report lists that projection error per stage. ``on_stage`` receives every
stage's volume as soon as it is ready (a preview after stage 1).

Output geometry: a cube of side ``fov_mm`` centred at the LPS origin, identity direction, array (z, y, x)
with z superior-increasing. ``fov_mm`` is, in order: the user's value; the radiograph's pixel spacing times
the side of its square crop divided by the detector's magnification of the anatomy (from its DICOM header:
:func:`~DiffusionCore.xray.radiograph.header_magnification`, 1 for a CT localizer, else the header's factor or
:data:`~DiffusionCore.xray.radiograph.NOMINAL_MAGNIFICATION`, 1.1 for a PA chest at 180 cm); else the field of
view the model was trained on.

Before the square crop, a radiograph is resampled to square pixels when its header says they are not
(:func:`~DiffusionCore.xray.radiograph.square_pixels`), and one read from a file is cropped to its exposed region
when it is mostly dark background (:func:`~DiffusionCore.xray.radiograph.crop_to_exposed_region`: a small chest on a
black frame, burned-in text). Real radiographs read from files are windowed (0.5 / 99.5 percentiles) and then
quantile-matched to the DRR of the mean training CT stored in the weights (its in-body pixels), so their grey levels
follow the DRR style the model was trained on; arrays (e.g. DRRs) are only windowed, and the report's notes say
so (:data:`ARRAY_INPUT_NOTE`): pass a real radiograph as its path or :class:`Radiograph`, not its array. Which of the
two an image gets is its :attr:`Radiograph.preprocessing <DiffusionCore.xray.radiograph.Radiograph.preprocessing>`: a
real radiograph held in memory (a pydicom ``pixel_array``) is given the file's treatment by
:meth:`Radiograph.from_array <DiffusionCore.xray.radiograph.Radiograph.from_array>` (``kind="radiograph"``), and a DRR
by ``kind="drr"``.

After the run, a stage whose re-projection agrees poorly with the input (:data:`LOW_PROJECTION_PSNR_DB`) and a
frontal input that looks inverted or turned sideways (:func:`~DiffusionCore.xray.radiograph.inversion_note`) get a
warning.
"""

from __future__ import annotations

import logging
import numbers
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..intensity import unit_to_hu
from ..seeds import check_seed
from ..volume import Volume
from .atlas import normalised_cross_correlation
from .cascade import FAMILY, UnifiedHybridViTCascade
from .consistency import drr_consistency
from .drr import hu_to_mu, project_parallel_axis, radiograph_style
from .radiograph import (
    NOMINAL_MAGNIFICATION,
    Radiograph,
    as_radiograph,
    body_part_note,
    check_model_input_size,
    crop_to_exposed_region,
    inversion_note,
    invert_radiograph,
    match_drr_style,
    resize_radiograph,
    square_crop_note,
    square_pixels,
    window_bounds,
)

logger = logging.getLogger(__name__)

#: The field of view (mm, the output cube's side) a user may give: from a child's chest to far beyond any adult's.
FOV_RANGE_MM = (50.0, 1000.0)
#: DRR pixels below this (attenuation style) are air beside the body, left out of the style reference.
BODY_DRR_THRESHOLD = 0.05
#: A stage whose re-projection PSNR (dB, with the consistency step) is below this gets a warning: the shipped weights
#: give about 31 dB on the real radiographs (cxr-pa 31.2, the ct-topogram sample 32.8) and more on DRRs; an image with
#: bright shutter strips gave 11.6. Its NCC can still be 1.000: the consistency step makes the volume's line
#: integrals proportional to the input, and NCC ignores the overall gain, where the PSNR compares both scaled by
#: their own 99.5th percentile, which such an input (its brightest pixels well below 1 after the style matching) fails.
LOW_PROJECTION_PSNR_DB = 20.0


def stage_step_costs(resolutions: list[int]) -> list[int]:
    """What one sampling step of one sample costs at each stage, in steps of stage 1: the ratio of the stages' voxel
    counts, since the network's work per step grows with them (a 128^3 step costs about 8 times a 64^3 one; the tiny
    test model's 32^3 step 8 times its 16^3 one). The weights of a run's progress: without them the bar moved as fast
    through a 256^3 stage's steps as through the 64^3 preview's."""
    first = float(resolutions[0])
    return [max(1, round((float(r) / first) ** 3)) for r in resolutions]


def step_text(stage: int, stages: int, resolution: int, done: int, steps: int, samples: int) -> str:
    """A stage's progress as the user chose it: ``"stage 1/2 (64^3): step 3/10, sample 2/4"`` for the 13th of its
    ``steps x samples`` sampling steps (``done``; 0: ``"stage 1/2 (64^3): 10 steps x 4 samples"``); the sample is left
    out when there is one."""
    if done <= 0:  # the stage begins
        return f"stage {stage}/{stages} ({resolution}^3): {steps} steps" + (f" x {samples} samples" if samples > 1 else "")
    sample = min(samples, (done - 1) // steps + 1)
    text = f"stage {stage}/{stages} ({resolution}^3): step {done - (sample - 1) * steps}/{steps}"
    return f"{text}, sample {sample}/{samples}" if samples > 1 else text


def volume_from_unit(vol_unit: torch.Tensor, fov_mm: float, **metadata: Any) -> Volume:
    """A :class:`Volume` (HU) from one (1, 1, R, R, R) or (R, R, R) model-unit cube of side ``fov_mm``."""
    arr = unit_to_hu(vol_unit.detach().float().cpu()).reshape(vol_unit.shape[-3:]).numpy()
    r = arr.shape[-1]
    sp = fov_mm / r
    origin = (-(r - 1) / 2 * sp,) * 3
    return Volume(arr, (sp, sp, sp), origin, np.eye(3), dict(metadata))


def reproject_hu(hu: torch.Tensor, spacing_zyx: tuple[float, float, float], view: str) -> torch.Tensor:
    """The training-geometry radiograph (B, 1, R, R) of HU cube(s) (B, 1, R, R, R): parallel-beam line
    integrals in the attenuation style of the model's input, rows superior first."""
    return radiograph_style(project_parallel_axis(hu_to_mu(hu), spacing_zyx, view))


def projection_error(
    vol_unit: torch.Tensor, xray: torch.Tensor, fov_mm: float, view: str
) -> dict[str, float]:
    """Re-projection agreement of a stage volume with the input radiograph.

    Args:
        vol_unit: (1, 1, R, R, R) model units.
        xray: (1, 1, H, W) input radiograph, attenuation style [0, 1].

    Returns:
        ``{"projection_psnr": dB on [0, 1], "projection_ncc": normalised cross-correlation}``.
    """
    r = vol_unit.shape[-1]
    drr = reproject_hu(unit_to_hu(vol_unit.float()), (fov_mm / r,) * 3, view)
    ref = torch.nn.functional.interpolate(xray.float(), size=drr.shape[-2:], mode="bilinear", antialias=True,
                                          align_corners=False)  # fmt: skip
    mse = float(((drr - ref) ** 2).mean())
    ncc = float(normalised_cross_correlation(drr, ref)[0])
    return {"projection_psnr": float(10 * np.log10(1.0 / max(mse, 1e-12))), "projection_ncc": ncc}


#: The views :meth:`XrayToCTGenerator.run` takes (case-insensitive) and the one each means: ``"ap"`` is a frontal view
#: as ``"pa"`` is (a DICOM header's ViewPosition AP is read as ``"pa"`` too; :data:`.radiograph.VIEW_POSITIONS`).
VIEW_NAMES = {"pa": "pa", "ap": "pa", "lateral": "lateral"}
#: What :meth:`XrayToCTGenerator.run` notes when the image is an array (or a :class:`Radiograph` with no file as its
#: source): what such an input is not given that a radiograph read from a file is.
ARRAY_INPUT_NOTE = (
    "the image was given as an array, so it was taken as it is (as a DRR): not cropped to its exposed region and "
    "its grey levels only windowed (0.5 / 99.5 percentiles), not matched to the DRR style the model was trained on. "
    "For a real radiograph pass its file path or read_radiograph(path), as xray2ct and the X-ray to CT module do, "
    "or, for one held in memory, Radiograph.from_array(pixels, pixel_spacing, photometric=...)"
)


def check_view(view: str | None) -> str | None:
    """A run's ``view`` as the weights name views (``"pa"`` or ``"lateral"``), or None when it is not given.

    Raises:
        InputError: not one of :data:`VIEW_NAMES`.
    """
    if view is None:
        return None
    name = VIEW_NAMES.get(view.strip().lower()) if isinstance(view, str) else None
    if name is None:
        raise InputError(f"view must be 'pa' (any frontal view: PA and AP alike; 'ap' is taken as 'pa') or "
                         f"'lateral'; got {view!r}")  # fmt: skip
    return name


def check_count(value: int | None, name: str) -> int | None:
    """A run's step or sample count: a whole number of at least 1, or None (the weights' own).

    Raises:
        InputError: anything else (0, a negative or fractional number, a bool).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be a whole number of at least 1 (or None: the weights' own); got {value!r}")
    if value < 1:
        raise InputError(f"{name} must be at least 1; got {value}")
    return int(value)


def default_weights_name() -> str:
    """The registered X-ray-to-CT weights used when none are named: the first available entry of family
    ``xray`` (bundled registry first, then the user's; the shipped ones are ``xray-default``).

    Raises:
        WeightsError: no X-ray-to-CT weights are registered (or their files are missing).
    """
    from ..weights.registry import default_weights_name as registry_default

    return registry_default(
        FAMILY, "X-ray-to-CT", "train them with 'train xray' and pass --weights "
        "OUTPUT_DIR/xray_cascade.safetensors --allow-unregistered-weights, or import a weights file."
    )


class XrayToCTGenerator:
    """Radiograph -> CT pipeline around a :class:`UnifiedHybridViTCascade`.

    Args:
        cascade: the trained cascade (its configs say view, field of view and resolutions).
    """

    def __init__(self, cascade: UnifiedHybridViTCascade):
        self.cascade = cascade.eval()

    @classmethod
    def from_pretrained(cls, name_or_file: str | os.PathLike, *, allow_unregistered: bool = False) -> XrayToCTGenerator:
        """Load registered weights by name, or a safetensors file (checked against the registry; with
        ``allow_unregistered``, any cascade safetensors file), as :meth:`SuperResolver.from_pretrained`."""
        return cls(
            UnifiedHybridViTCascade.from_pretrained(name_or_file, allow_unregistered=allow_unregistered)
        )

    @classmethod
    def default(cls) -> XrayToCTGenerator:
        """The default registered weights (see :func:`default_weights_name`)."""
        return cls.from_pretrained(default_weights_name())

    @classmethod
    def tiny(cls, seed: int = 0) -> XrayToCTGenerator:
        """A tiny random-weight generator (16^3 -> 32^3) for tests and self-tests; its output is noise."""
        return cls(UnifiedHybridViTCascade.tiny(seed))

    @property
    def weights_sha256(self) -> str:
        return self.cascade.weights_sha256

    @property
    def num_stages(self) -> int:
        return self.cascade.num_stages

    def prepare_input(
        self, image: Radiograph | np.ndarray | str, fov_mm: float | None, notes: list[str] | None = None
    ) -> tuple[torch.Tensor, float, str]:
        """(1, 1, X, X) model input, field of view (mm) and where it came from.

        The radiograph is resampled to square pixels (:func:`.radiograph.square_pixels`), cropped to its exposed
        region when it is mostly background and is a real radiograph (:attr:`.radiograph.Radiograph.preprocessing`:
        read from a file, or marked ``kind="radiograph"``; :func:`.radiograph.crop_to_exposed_region`),
        centre-cropped to a square and resized; what was done, the part of the image the square crop leaves out
        included (:func:`.radiograph.square_crop_note`), is logged and appended to ``notes``, and so is that an array
        was taken as it is (:data:`ARRAY_INPUT_NOTE`).

        Raises:
            InputError: the image is blank or nearly uniform (:func:`.radiograph.window_bounds`, on the image as
                given: resampling would turn a constant into rounding noise).
        """
        rad = as_radiograph(image)
        window_bounds(rad.array)  # before any resampling, whatever the input
        said: list[tuple[int, str]] = []
        rad, resampled = square_pixels(rad)
        if resampled:
            said.append((logging.INFO, f"the radiograph was {resampled}"))
        from_file = rad.preprocessing == "radiograph"  # a real radiograph: read from a file, or marked so
        if from_file:  # arrays (DRRs, the API's own) are taken as they are
            rad, cropped = crop_to_exposed_region(rad)
            if cropped:
                said.append((logging.WARNING, cropped))
        else:  # in the report for a researcher; only a debug line: evaluate-xray and the demo give DRRs
            said.append((logging.DEBUG, ARRAY_INPUT_NOTE))
        level, crop = square_crop_note(rad)  # what the square crop below leaves out (a warning when it is much)
        if crop:
            said.append((level, crop))
        h, w = rad.shape
        if fov_mm is not None:
            lo, hi = FOV_RANGE_MM
            if not lo <= fov_mm <= hi:
                raise InputError(f"field of view {fov_mm:g} mm is implausible: it must be from {lo:g} to {hi:g} mm; "
                                 "give the chest width in mm (e.g. 350)")  # fmt: skip
            fov, source = float(fov_mm), "user"
        elif rad.pixel_spacing is not None:
            magnification = float(rad.metadata.get("magnification", NOMINAL_MAGNIFICATION))
            why = rad.metadata.get("magnification_from", f"nominal {NOMINAL_MAGNIFICATION}")
            fov = min(h * rad.pixel_spacing[0], w * rad.pixel_spacing[1]) / magnification
            source = f"pixel spacing / magnification {magnification:.3g}: {why}"
        else:
            fov, source = float(self.cascade.configs[0].data.fov_mm), "training field of view"
            if rad.metadata.get("spacing_problem"):
                said.append((logging.INFO, f"{rad.metadata['spacing_problem']}; using the training field of view "
                                           f"({fov:g} mm)"))  # fmt: skip
        for level, text in said:
            logger.log(level, text)
            if notes is not None:
                notes.append(text)
        x = max(c.xray_resolution for c in self.cascade.configs)
        rad = resize_radiograph(rad, x)
        reference = self.reference_drr(x) if from_file else None
        arr = match_drr_style(rad.array, reference, "the part of the radiograph that the model sees")
        return torch.from_numpy(arr)[None, None], fov, source

    @torch.no_grad()
    def reference_drr(self, size: int) -> np.ndarray | None:
        """In-body pixel values (1D) of the DRR of the mean training CT (attenuation style, rendered at
        size x size): the distribution real radiographs are quantile-matched to. None when the weights carry
        no informative mean CT."""
        mean = self.cascade.mean_ct.float().cpu()
        r = mean.shape[-1]
        fov = self.cascade.configs[0].data.fov_mm
        drr = radiograph_style(project_parallel_axis(hu_to_mu(unit_to_hu(mean)), (fov / r,) * 3,
                                                     self.cascade.configs[0].data.view))  # fmt: skip
        drr = torch.nn.functional.interpolate(drr, size=(size, size), mode="bilinear", align_corners=False)
        body = drr[drr > BODY_DRR_THRESHOLD]  # a collimated radiograph shows (almost) no air beside the body
        return body.numpy() if body.numel() > 16 and float(body.std()) > 0.05 else None

    @torch.no_grad()
    def run(
        self,
        image: Radiograph | np.ndarray | str,
        *,
        num_stages: int | None = None,
        steps: int | None = None,
        seed: int = 0,
        device: str = "auto",
        view: str | None = None,
        fov_mm: float | None = None,
        progress: Callable[[int, int, str], None] | None = None,
        cancel: threading.Event | None = None,
        on_stage: Callable[[int, Volume, dict], None] | None = None,
        consistency: bool = True,
        num_samples: int | None = None,
        lifting_start_t: float | None = None,
        invert: bool = False,
    ) -> tuple[Volume, dict[str, Any]]:
        """Generate a CT from a radiograph.

        Args:
            image: a file path, a :class:`Radiograph` (:func:`.radiograph.read_radiograph`), or a (H, W) array. A
                radiograph read from a file is cropped to its exposed region when it is mostly dark background and
                its grey levels are matched to the DRR style the model was trained on (what ``xray2ct`` and the
                X-ray to CT module do). An array (or a :class:`Radiograph` with no file as its ``source``) is taken
                as it is, as a DRR: no crop to the exposed region and no style matching, only windowing (values
                outside [0, 1] first windowed by their 0.5 / 99.5 percentiles); the report's ``notes`` say so. Pass an
                array only for a DRR (e.g. one rendered from a CT); for a real radiograph pass the path or
                ``read_radiograph(path)``: its CT can differ by hundreds of HU from that of its ``.array``. A real
                radiograph held in memory (a pydicom ``pixel_array``, an image from PACS) gets a file's treatment as
                ``Radiograph.from_array(pixels, pixel_spacing, photometric=...)``
                (:meth:`.radiograph.Radiograph.from_array`); a :class:`Radiograph`'s ``kind`` (``"radiograph"`` or
                ``"drr"``) decides it explicitly (:attr:`.radiograph.Radiograph.preprocessing`). An image
                whose shorter side is under half the model's input side (64 pixels for the shipped weights) is
                refused (InputError: a thumbnail, :func:`.radiograph.check_model_input_size`).
            num_stages: 1..the number of stages of the weights (default: all; more than it has is capped, with a
                warning and a note in the report).
            steps: DDIM steps per stage, at least 1 (default: each stage's config).
            seed: noise seed (the same seed, device and thread count give the same output).
            device: auto, cpu or cuda.
            view: the radiograph's view, case-insensitive: ``"pa"`` for any frontal view, PA and AP alike (``"ap"``
                is taken as ``"pa"``, as a DICOM header's ViewPosition AP is), or ``"lateral"``; it must be the one
                the weights were trained on (the shipped ones: ``"pa"``). Default: what a DICOM radiograph's header
                says (:func:`.radiograph.header_view`), else ``"pa"``.
            fov_mm: side of the output cube in mm (see module docstring for the default).
            progress: ``progress(done, total, message)``.
            cancel: set to stop between steps (raises :class:`Cancelled`; nothing is returned).
            on_stage: ``on_stage(stage, volume, info)`` after each stage.
            consistency: after each stage, scale every ray's attenuation so the volume re-projects onto the
                input (:func:`.consistency.drr_consistency`); the next stage starts from the corrected volume.
            num_samples: samples averaged per stage, at least 1 (default: each stage's ``diffusion.num_samples``).
            lifting_start_t: where stage 1 starts: its lifting-only volume noised to this time (< 1), or pure
                noise (1.0); default: the weights' ``diffusion.lifting_start_t``.
            invert: invert the radiograph's intensities first, for an image whose bones appear dark (a negative
                exported as PNG or JPEG; never needed for DICOM, whose MONOCHROME1 and PresentationLUTShape INVERSE
                are applied as it is read: bones bright, as a DICOM viewer shows them). A frontal
                input that still looks inverted, or turned sideways, gets a warning (:func:`.radiograph.inversion_note`).

        Returns:
            ``(volume, report)``: the CT (HU) and a dict with ``stages`` (one dict per stage: ``stage``,
            ``resolution``, ``seconds``, ``steps``, ``num_samples``, ``spacing_mm``, ``patches``,
            ``projection_psnr``, ``projection_ncc`` and ``consistency`` (``rays_corrected``, ``rays_emptied``,
            ``mean_abs_log_ratio``; None without the consistency step)), ``weights_sha256``, ``family``,
            ``fov_mm`` and ``fov_source`` (where the field of view came from), ``settings`` (the options used),
            ``timings`` (seconds: ``total``, as in :meth:`SuperResolver.run`), ``notes`` and ``input_sha256``
            (:meth:`.radiograph.Radiograph.content_sha256` of the image as read).
        """
        from ..devices import resolve_device

        seed = check_seed(seed)  # 32 bits, as every front end takes it
        steps, num_samples = check_count(steps, "steps"), check_count(num_samples, "num_samples")
        view = check_view(view)
        given_view = view is not None
        rad = as_radiograph(image)
        source = str(rad.metadata.get("source") or "")
        # a thumbnail is refused here too, as xray2ct and the X-ray to CT module refuse it: enlarged to the model's
        # input, it would give a blur with none of the detail the weights were trained on
        check_model_input_size(rad, max(c.xray_resolution for c in self.cascade.configs),
                               os.path.basename(source) if source not in ("", "array") else "the radiograph")  # fmt: skip
        input_sha256 = rad.content_sha256()  # the image as read, before --invert (a setting the report records)
        if invert:
            rad = invert_radiograph(rad)
        trained_view = self.cascade.configs[0].data.view
        from_header = view is None and "view" in rad.metadata
        view = view or rad.metadata.get("view") or "pa"
        if view != trained_view:
            if from_header:
                marked = f"the input is marked {view} (its DICOM header: {rad.metadata.get('view_from')})"
                fix = "; if the header is wrong, give the view (--view)"
            elif given_view:  # the user's own choice, not the input's
                marked = f"but --view {view} was given"
                fix = f"; if it is one, leave --view out or give --view {trained_view}"
            else:
                marked = f"the input is taken as {view} (no view given)"
                fix = f"; give --view {trained_view} if it is one"
            raise InputError(
                f"these weights were trained on {trained_view} radiographs, {marked}; "
                f"give a {trained_view} radiograph (or weights trained on {view} views){fix}"
            )
        if from_header:  # the log says what the header decided (also in the X-ray to CT module's log)
            shown = {"pa": "frontal (pa: PA and AP alike)"}.get(view, view)
            logger.info("view %s, as its DICOM header says (%s)", shown, rad.metadata.get("view_from"))
        notes = []
        num_stages = self.num_stages if num_stages is None else int(num_stages)
        if num_stages > self.num_stages:
            note = f"{num_stages} stages were asked for, but the weights have {self.num_stages}; ran {self.num_stages}"
            logger.warning(note)
            notes.append(note)
            num_stages = self.num_stages
        if num_stages < 1:
            raise InputError("num_stages must be at least 1")
        cfgs = self.cascade.configs[:num_stages]
        steps_per = [steps or c.diffusion.sampling_steps for c in cfgs]
        samples_per = [num_samples or c.diffusion.num_samples for c in cfgs]
        # the work, in sampling steps of one sample at stage 1's grid (stage_step_costs): preparing the input and each
        # stage's consistency step count as one step of that stage
        costs = stage_step_costs([c.resolution for c in cfgs])
        sampling = [n * k * w for n, k, w in zip(steps_per, samples_per, costs)]
        check = [w if consistency else 0 for w in costs]
        prepare_units = costs[0]
        starts = [prepare_units + sum(sampling[:i]) + sum(check[:i]) for i in range(num_stages)]
        total = starts[-1] + sampling[-1] + check[-1]

        def tell(done: int, message: str) -> None:
            if progress is not None:
                progress(int(done), total, message)

        tell(0, "preparing the radiograph (crop, resize, grey levels)")
        for done in ("presentation_lut", "oriented"):  # what its header said, done as it was read
            if rad.metadata.get(done):
                notes.append(f"the radiograph was {rad.metadata[done]}")
        other_part = body_part_note(rad.metadata)
        if other_part:
            logger.warning(other_part)
            notes.append(other_part)
        t0 = time.time()
        xray, fov, fov_source = self.prepare_input(rad, fov_mm, notes)
        del rad, image  # the full-resolution radiograph: the model sees the small input only (the caller's may stay)
        if view == "pa":
            note = inversion_note(xray[0, 0].numpy(), invert)  # inverted, or a chest turned sideways
            if note:
                logger.warning(note)
                notes.append(note)
        dev = resolve_device(device)
        self.cascade.to(dev)
        xray = xray.to(dev)
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same noise for a seed on every device
        stages: list[dict[str, Any]] = []
        volumes: list[Volume] = []
        stage_t = [time.time()]
        tell(prepare_units, step_text(1, num_stages, cfgs[0].resolution, 0, steps_per[0], samples_per[0]))

        def step_cb(stage: int, done: int, n: int) -> None:
            i = stage - 1
            per_sample = max(1, n // samples_per[i])  # the steps each sample takes
            tell(starts[i] + sampling[i] * done // max(n, 1),
                 step_text(stage, num_stages, cfgs[i].resolution, done, per_sample, samples_per[i]))  # fmt: skip

        def stage_cb(stage: int, vol_unit: torch.Tensor) -> None:
            now = time.time()
            info = {"stage": stage, "resolution": int(vol_unit.shape[-1]), "seconds": now - stage_t[-1],
                    "steps": steps_per[stage - 1], "num_samples": samples_per[stage - 1], "spacing_mm": fov / vol_unit.shape[-1]}  # fmt: skip
            stage_t.append(now)
            plan = self.cascade.stages[stage - 1].last_plan
            info["patches"] = plan.describe() if plan is not None else None  # None: one whole-grid pass
            info.update(projection_error(vol_unit, xray, fov, view))
            stages.append(info)
            vol = volume_from_unit(vol_unit[:1], fov, synthetic=True, stage=stage, source="xray2ct", method="xray2ct",
                                  weights_sha256=self.weights_sha256)  # what write_volume stamps
            volumes.append(vol)
            logger.info("stage %d: %d^3, %.1f s, projection PSNR %.1f dB", stage, info["resolution"],
                        info["seconds"], info["projection_psnr"])  # fmt: skip
            if on_stage is not None:
                on_stage(stage, vol, info)
            i = stage - 1
            if stage < num_stages:  # the next stage's first step comes after a while: say which one runs
                tell(starts[stage], step_text(stage + 1, num_stages, cfgs[stage].resolution, 0, steps_per[stage],
                                              samples_per[stage]))  # fmt: skip
            else:
                tell(starts[i] + sampling[i] + check[i], f"stage {stage}/{num_stages} ready")

        corrections: dict[int, dict[str, float]] = {}

        def post_stage(stage: int, vol_unit: torch.Tensor) -> torch.Tensor:
            i = stage - 1
            tell(starts[i] + sampling[i], f"stage {stage}/{num_stages}: consistency step (re-projection onto the "
                                          "radiograph)")  # fmt: skip
            out, corrections[stage] = drr_consistency(vol_unit, xray, fov, view)
            return out

        self.cascade.generate_stages(xray, num_stages, steps=steps, generator=gen, cancel=cancel,
                                     on_stage=stage_cb, step_callback=step_cb,
                                     post_stage=post_stage if consistency else None,
                                     num_samples=num_samples, lifting_start_t=lifting_start_t)  # fmt: skip
        for info in stages:
            info["consistency"] = corrections.get(info["stage"])
        poor = [info for info in stages if info["projection_psnr"] < LOW_PROJECTION_PSNR_DB]
        if consistency and poor:
            worst = min(poor, key=lambda info: info["projection_psnr"])
            note = (
                f"stage {worst['stage']}'s re-projection agrees poorly with the radiograph (projection PSNR "
                f"{worst['projection_psnr']:.1f} dB, where real chest radiographs give about 31 dB; its NCC "
                f"{worst['projection_ncc']:.3f} ignores the overall brightness): the image is probably not what the "
                "model expects. Likely causes: bright or dark borders or collimator shutters (crop the image to the "
                "chest), an inverted image (bones dark: --invert), or not a frontal chest radiograph"
            )
            logger.warning(note)
            notes.append(note)
        report = {
            "stages": stages,
            "weights_sha256": self.weights_sha256,
            "family": FAMILY,
            "fov_mm": fov,
            "fov_source": fov_source,
            "settings": {
                "num_stages": num_stages,
                "steps": steps_per,
                "num_samples": samples_per,
                "lifting_start_t": float(lifting_start_t if lifting_start_t is not None
                                         else cfgs[0].diffusion.lifting_start_t),  # fmt: skip
                "seed": seed,
                "device": str(dev),
                "view": view,
                "consistency": bool(consistency),
                "invert": bool(invert),
                "fov_mm": fov,
                "torch_threads": torch.get_num_threads(),  # the CT depends on it (slightly) on the CPU
            },  # fmt: skip
            "timings": {"total": time.time() - t0},
            "notes": notes,
            "input_sha256": input_sha256,
        }
        return volumes[-1], report
