"""Real radiographs: reading (DICOM CR/DX, PNG, JPEG), windowing, resizing and matching to the DRR style.

The model sees radiographs in the *attenuation style* of :func:`DiffusionCore.xray.drr.radiograph_style`:
a float32 (H, W) image in [0, 1], air dark (0), dense bone bright (~1), rows superior first, columns the
patient's right first for a PA view. Real images are brought there by: MONOCHROME1 inversion (DICOM, done by SimpleITK's reader),
robust percentile windowing, inversion of a MONOCHROME2 DICOM marked PresentationLUTShape INVERSE
(:func:`presentation_lut_inversion`), optional quantile matching to a reference DRR, then resizing.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..files import check_detached_data_files
from ..inputs import has_dicom_marker, is_dicom_file
from ..volume import check_metaimage_header, image_io, is_localizer, itk_path, itk_utf8_name, sitk_message

logger = logging.getLogger(__name__)

#: Images smaller than this on either side are refused (a thumbnail or an icon, not a radiograph), whatever the model.
MIN_RADIOGRAPH_SIDE = 32
#: A radiograph whose shorter side is below this share of the model's input side (the largest ``xray_resolution`` of
#: its stages: 128 pixels for the shipped weights, so 64) is refused before it is run (:func:`check_model_input_size`):
#: enlarged more than twice, a thumbnail gives the model a blur with none of the detail it was trained on.
MIN_MODEL_INPUT_SHARE = 0.5
#: Percentiles used to window an image to [0, 1] (robust to collimator edges and burned-in labels).
WINDOW_PERCENTILES = (0.5, 99.5)
#: Channels of an RGB or RGBA image: made grey when the channels agree (:func:`greyscale_pixels`), else refused.
COLOUR_CHANNELS = (3, 4)
#: Suffixes of the plain image files (no header) a radiograph can come in.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: Largest difference between the colour channels, as a share of the image's value range (at least one grey
#: level), at which a 3- or 4-channel image is still greyscale stored in colour (as image editors, screenshots and
#: JPEG exports save radiographs); beyond it the image is refused as colour.
GREY_CHANNEL_TOLERANCE = 0.01
#: A colour image whose red, green and blue are each, to within this share of its value range (at least
#: :data:`TINT_MIN_LEVELS` grey levels) at every pixel, a gain and an offset of their mean is greyscale under a uniform
#: tint (a phone photo of a lightbox, a sepia-toned export): read as that mean, with a warning (:func:`uniform_tint`).
TINT_TOLERANCE = 0.03
TINT_MIN_LEVELS = 2.0
#: The largest ratio of the channels' gains in a tint, all of them positive: beyond it (or with a channel that falls
#: where the others rise, as in a colour map) the image is colour.
TINT_MAX_GAIN_RATIO = 2.0
#: Pixels (at most) of the evenly spaced subsample on which a tint's gains and offsets are fitted.
TINT_FIT_PIXELS = 1 << 16
#: The largest share of a tinted image's pixels whose channel the tint pushed beyond the image's darkest or brightest
#: value (clipped there: a lightbox's highlights); more is a cast that changed the picture, and it is refused.
TINT_MAX_CLIPPED_SHARE = 0.01
#: DICOM modalities whose images are not projection radiographs, as a message names them (a CT image is one only
#: when it is a localizer: a topogram or scout).
NOT_RADIOGRAPHS = {
    "CT": "a CT slice", "MR": "an MR image", "PT": "a PET image", "NM": "a nuclear medicine image",
    "US": "an ultrasound image", "MG": "a mammogram", "IO": "an intra-oral (dental) radiograph",
    "PX": "a panoramic dental radiograph", "OP": "an ophthalmic photograph", "OPT": "an ophthalmic tomography image",
    "SM": "a microscopy slide", "XC": "a photograph", "ES": "an endoscopy image", "SEG": "a segmentation",
}
#: DICOM ViewPosition (0018,5101) -> the view the model knows: "pa" is every frontal view (AP and PA, and the
#: decubitus views, whose horizontal beam is frontal too; the header's orientation turns them upright).
VIEW_POSITIONS = {"PA": "pa", "AP": "pa", "LLD": "pa", "RLD": "pa", "LL": "lateral", "RL": "lateral",
                  "LLO": "oblique", "RLO": "oblique"}
#: Where the model's input points, per view: (along a row, down a column) as patient directions (DICOM letters:
#: L/R left/right, A/P anterior/posterior, H/F head/feet). See the module docstring and DiffusionCore.xray.drr.
CANONICAL_DIRECTIONS = {"pa": ("L", "F"), "lateral": ("P", "F")}
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
#: Pixels whose height and width differ by less than this share are square (no resampling).
SQUARE_PIXEL_TOLERANCE = 0.01
#: BodyPartExamined (0018,0015) values of a chest radiograph (DICOM's defined term is CHEST; the others are in use).
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "LUNGS", "HEART", "RIBS", "CHEST_PA", "CHEST_AP", "TORSO"}


def body_part_note(metadata: dict) -> str:
    """A warning for a DICOM radiograph whose header names a body part other than the chest (the X-ray to CT
    weights are chest models: a shoulder or an abdomen still gives a chest-like volume), or ``""``."""
    part = str(metadata.get("body_part", "")).strip().upper()
    if not part or part in CHEST_BODY_PARTS:
        return ""
    return (f"the radiograph's header says BodyPartExamined {part}, and the weights were trained on chest radiographs: "
            "the result is a chest-like volume, not a CT of that region")


#: What a :class:`Radiograph` is, for the preprocessing X-ray to CT gives it (:attr:`Radiograph.kind`):
#: ``"radiograph"``, a real radiograph (cropped to its exposed region when it is mostly dark background, its grey
#: levels quantile-matched to the DRR style the model was trained on), or ``"drr"``, a digitally reconstructed
#: radiograph (e.g. rendered from a CT), taken as it is (only windowed).
RADIOGRAPH_KINDS = ("radiograph", "drr")
#: The photometric interpretations :meth:`Radiograph.from_array` takes (DICOM's (0028,0004) for greyscale): in
#: ``"MONOCHROME2"`` pixels high values are bright (attenuating), in ``"MONOCHROME1"`` ones they are dark.
PHOTOMETRIC_INTERPRETATIONS = ("MONOCHROME2", "MONOCHROME1")


@dataclass
class Radiograph:
    """A radiograph in attenuation style.

    Build one with :func:`read_radiograph` (a file) or :meth:`from_array` (pixels held in memory, e.g. a pydicom
    ``pixel_array``); ``Radiograph(array, ...)`` itself takes ``array`` as it is.

    Attributes:
        array: float32 (H, W) in [0, 1]; bright = more attenuation.
        pixel_spacing: (row, col) mm, or None when the file does not record it.
        metadata: provenance (source, photometric interpretation, modality, ...).
        kind: what the image is, which decides the preprocessing X-ray to CT gives it (:data:`RADIOGRAPH_KINDS`):
            ``"radiograph"`` (a real one: crop to the exposed region, grey levels matched to the DRR style) or
            ``"drr"`` (taken as it is). None (the default): ``"radiograph"`` when ``metadata["source"]`` names a file
            (what :func:`read_radiograph` records), else ``"drr"``; :attr:`preprocessing` says which applies.

    Raises:
        InputError: ``kind`` is not one of :data:`RADIOGRAPH_KINDS` (or None).
    """

    array: np.ndarray
    pixel_spacing: tuple[float, float] | None = None
    metadata: dict = field(default_factory=dict)
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in RADIOGRAPH_KINDS:
            raise InputError(f"a radiograph's kind must be one of {', '.join(map(repr, RADIOGRAPH_KINDS))} (or None); "
                             f"got {self.kind!r}")  # fmt: skip
        self.array = np.ascontiguousarray(radiograph_pixels(self.array, self.metadata.get("source", "image")))

    @property
    def preprocessing(self) -> str:
        """The :data:`RADIOGRAPH_KINDS` entry X-ray to CT preprocesses this image as: :attr:`kind` when it is given,
        else ``"radiograph"`` for an image read from a file (``metadata["source"]`` a path) and ``"drr"`` for any
        other (an array, ``metadata["source"] == "array"``)."""
        if self.kind is not None:
            return self.kind
        return "radiograph" if self.metadata.get("source", "array") != "array" else "drr"

    @classmethod
    def from_array(
        cls,
        pixels: np.ndarray,
        pixel_spacing: tuple[float, float] | None = None,
        *,
        kind: str = "radiograph",
        photometric: str = "MONOCHROME2",
        name: str = "the array",
        metadata: dict | None = None,
    ) -> Radiograph:
        """A radiograph held in memory (a pydicom ``pixel_array``, an image from PACS or a data loader), given what
        :func:`read_radiograph` gives a file's pixels, so X-ray to CT treats it as it treats that file.

        The pixels are inverted if ``photometric`` is ``"MONOCHROME1"`` and windowed between their 0.5 / 99.5
        percentiles (:func:`window_radiograph`), and the result is marked ``kind`` (by default a real radiograph:
        cropped to its exposed region and matched to the DRR style by
        :meth:`~DiffusionCore.xray.pipeline.XrayToCTGenerator.run`). The raw pixels of a DICOM file whose header does
        not turn the image (:func:`apply_dicom_header`) give the same CT as the file itself::

            ds = pydicom.dcmread(path)
            rad = Radiograph.from_array(ds.pixel_array, None, photometric=ds.PhotometricInterpretation)

        What only a file's header can say is not applied: the image is taken as shown (rows superior first, the
        patient's right on the left for a PA view; a header's orientation, view, PresentationLUTShape INVERSE and
        detector magnification are not read; pass ``invert=True`` to ``run`` for an image whose bones look dark,
        and ``metadata={"magnification": ...}`` for a magnification other than
        :data:`NOMINAL_MAGNIFICATION`). The caller's array is not modified.

        Args:
            pixels: (H, W) greyscale pixels in any units (integer or float), or a greyscale image stored as colour.
            pixel_spacing: (row, col) mm at the detector, or None when unknown (the model's field of view is used).
            kind: ``"radiograph"`` (default) or ``"drr"`` (:data:`RADIOGRAPH_KINDS`).
            photometric: ``"MONOCHROME2"`` (default: high values bright, bone bright) or ``"MONOCHROME1"`` (high
                values dark: a raw MONOCHROME1 DICOM ``pixel_array``); case and spaces ignored.
            name: how messages name the image.
            metadata: extra provenance kept in :attr:`metadata` (its ``"source"`` defaults to ``name``).

        Raises:
            InputError: not one 2D greyscale image, NaN or infinite values, a blank image, a spacing that is not two
                positive finite numbers, or an unknown ``kind`` or ``photometric``.
        """
        interpretation = str(photometric).strip().upper()
        if interpretation not in PHOTOMETRIC_INTERPRETATIONS:
            raise InputError(f"photometric must be one of {', '.join(map(repr, PHOTOMETRIC_INTERPRETATIONS))} "
                             f"(a greyscale radiograph); got {photometric!r}")  # fmt: skip
        if kind not in RADIOGRAPH_KINDS:
            raise InputError(f"kind must be one of {', '.join(map(repr, RADIOGRAPH_KINDS))}; got {kind!r}")
        spacing = None
        if pixel_spacing is not None:
            try:
                spacing = tuple(float(v) for v in pixel_spacing)
            except (TypeError, ValueError):
                spacing = ()
            if len(spacing) != 2 or not all(np.isfinite(v) and v > 0 for v in spacing):
                raise InputError(f"pixel_spacing must be two positive numbers (row, col) in mm, or None when it is "
                                 f"unknown; got {pixel_spacing!r}")  # fmt: skip
        shape = np.shape(pixels)
        if len(shape) == 3 and 1 < shape[0] <= MAX_STACK_IMAGES < min(shape[1:]) and shape[-1] not in COLOUR_CHANNELS:
            raise InputError(_stack_message(f"the array looks like a stack of {shape[0]} 2D images of "
                                            f"{shape[1]}x{shape[2]} pixels (shape {tuple(shape)})"))  # fmt: skip
        arr = radiograph_pixels(pixels, name)  # float32; the caller's own array when it is float32 already
        if interpretation == "MONOCHROME1":  # high values dark: negated (a new array), as the reader's inversion
            arr = np.negative(arr)  # (2^BitsStored - 1 - value) up to an offset, which the window below removes
        arr = window_radiograph(arr, source=name, in_place=interpretation == "MONOCHROME1")  # the caller's is kept
        meta = {"source": name, "photometric": interpretation, **(metadata or {})}
        return cls(arr, spacing, meta, kind)  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[0]), int(self.array.shape[1])

    def content_sha256(self) -> str:
        """Hex sha256 of the image as read (float32 in [0, 1]) and its pixel spacing: what results record as their
        input's ``input_sha256``."""
        from ..files import sha256_arrays

        return sha256_arrays(self.array, np.asarray(self.pixel_spacing or (0.0, 0.0), np.float64))


#: Pixels per block in which a colour image is turned greyscale (under 1 MB of float32 per block): never a float
#: copy of every channel of a large screenshot at once.
GREY_BLOCK_PIXELS = 1 << 15
#: A float64 image whose largest magnitude is above this or (non-zero) below :data:`FLOAT32_SAFE_MIN` is divided by
#: it before it becomes float32, which would turn it infinite or zero; a radiograph's absolute scale does not matter
#: (it is windowed by its percentiles).
FLOAT32_SAFE_MAX = 1e30
FLOAT32_SAFE_MIN = 1e-30


def _float32_scale(arr: np.ndarray, source: str) -> float:
    """What a float image is divided by to become float32 without overflow or underflow: 1, or its largest
    magnitude when that lies outside [:data:`FLOAT32_SAFE_MIN`, :data:`FLOAT32_SAFE_MAX`] (a float64 image). Checked on
    the image's own values (no float32 copy first, which would turn 1e300 into inf and 1e-300 into 0).

    Raises:
        InputError: NaN or infinite values.
    """
    if arr.dtype.kind != "f" or arr.size == 0:
        return 1.0  # integers: every value is finite, and even 2^63 fits float32's range
    lo, hi = float(arr.min()), float(arr.max())  # NaN propagates; no temporary the size of the image
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"{source} contains NaN or infinite values; re-export the image.")
    peak = max(abs(lo), abs(hi))
    if arr.dtype.itemsize > 4 and (peak > FLOAT32_SAFE_MAX or 0.0 < peak < FLOAT32_SAFE_MIN):
        logger.info("%s: its values reach %.3g, beyond what float32 holds; divided by that (a radiograph's scale does "
                    "not matter: it is windowed by its percentiles)", source, peak)  # fmt: skip
        return peak
    return 1.0


def _as_float32(arr: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``arr / scale`` as float32, without a float64 temporary the size of the image (``arr`` itself when it is
    float32 and ``scale`` is 1)."""
    if scale == 1.0:
        return arr.astype(np.float32, copy=False)
    out = np.empty(arr.shape, np.float32)
    np.divide(arr, scale, out=out, casting="same_kind")
    return out


def uniform_tint(rgb: np.ndarray, scale: float, spread: float) -> str:
    """How a colour image is tinted when it is greyscale under a uniform tint, or ``""``: each of red, green and blue
    an affine function (a positive gain and an offset) of their mean, fitted by least squares on an evenly spaced
    subsample of :data:`TINT_FIT_PIXELS`, and checked at every pixel to within :data:`TINT_TOLERANCE` of the image's
    value range ``spread`` (in row blocks of :data:`GREY_BLOCK_PIXELS`, as :func:`greyscale_pixels` does); the gains
    within :data:`TINT_MAX_GAIN_RATIO` of each other. A colour map (a channel that falls as the others rise), a coloured
    annotation or overlay (pixels off the fit), a cast that saturates a channel, and a photograph are no tint.

    Args:
        rgb: ``(H, W, 3)`` pixels in their own type.
        scale: what they are divided by to become float32 (:func:`_float32_scale`).
        spread: their value range, divided by ``scale``.

    Returns:
        The tint as a message names it (each channel's gain and offset), or ``""``.
    """
    h, w = rgb.shape[:2]
    step = max(1, int(np.ceil(np.sqrt(h * w / TINT_FIT_PIXELS))))
    sample = rgb[::step, ::step].reshape(-1, 3).astype(np.float64) / scale
    mean = sample.mean(axis=1)
    centred = mean - mean.mean()
    variance = float(np.dot(centred, centred))
    if variance <= 0.0:
        return ""
    gains = centred @ (sample - sample.mean(axis=0)) / variance  # the least-squares slope of each channel on the mean
    offsets = sample.mean(axis=0) - gains * mean.mean()
    if gains.min() <= 0.0 or gains.max() > TINT_MAX_GAIN_RATIO * gains.min():
        return ""
    tolerance = max(TINT_MIN_LEVELS, TINT_TOLERANCE * spread)
    lo = float(rgb.min()) / scale
    hi = lo + spread
    g32, o32 = gains.astype(np.float32), offsets.astype(np.float32)
    rows = max(1, GREY_BLOCK_PIXELS // max(1, w))
    clipped = 0
    for r0 in range(0, h, rows):
        block = _as_float32(rgb[r0 : r0 + rows], scale)
        fitted = block.mean(axis=-1, keepdims=True) * g32 + o32
        off = np.abs(block - fitted) > tolerance
        # a channel held at the darkest or brightest value where the tint would take it beyond: clipped, not colour
        at_end = ((block <= lo) & (fitted < lo + tolerance)) | ((block >= hi) & (fitted > hi - tolerance))
        if np.any(off & ~at_end):
            return ""
        clipped += int(np.count_nonzero(off.any(axis=-1)))
    if clipped > TINT_MAX_CLIPPED_SHARE * h * w:
        return ""
    return ", ".join(f"{name} {g:.2f} x grey {o:+.3g}" for name, g, o in zip(("red", "green", "blue"), gains, offsets))


def greyscale_pixels(arr: np.ndarray, source: str = "image") -> np.ndarray:
    """``(H, W)`` float32 from an ``(H, W, C)`` image with 2-4 channels stored per pixel: the grey channel of a
    grey + alpha image, or the mean of red, green and blue when they agree to within
    :data:`GREY_CHANNEL_TOLERANCE` (greyscale saved in colour) or are greyscale under a uniform tint
    (:func:`uniform_tint`: read with a warning that names the tint); alpha is ignored. The channels are compared and
    averaged in row blocks of :data:`GREY_BLOCK_PIXELS`: the memory needed is the float32 result and one block.

    Raises:
        InputError: the colour channels differ, and not by a uniform tint (a photograph, a colour-mapped picture, or
            a greyscale screenshot with a coloured annotation or overlay; the message says what share of the pixels
            is coloured), or NaN or infinite values.
    """
    arr = np.asarray(arr)
    scale = _float32_scale(arr[..., :3], source)
    if arr.shape[-1] == 2:
        return np.ascontiguousarray(_as_float32(arr[..., 0], scale))
    rgb = arr[..., :3]
    h, w = rgb.shape[:2]
    spread = (float(rgb.max()) - float(rgb.min())) / scale if rgb.size else 0.0
    tolerance = max(1.0, GREY_CHANNEL_TOLERANCE * spread)
    out = np.empty((h, w), np.float32)
    coloured = 0
    rows = max(1, GREY_BLOCK_PIXELS // max(1, w))
    for r0 in range(0, h, rows):
        block = _as_float32(rgb[r0 : r0 + rows], scale)  # (rows, W, 3): the only float copy of the channels
        coloured += int(np.count_nonzero(np.abs(block[..., 1:] - block[..., :1]).max(axis=-1) > tolerance))
        out[r0 : r0 + rows] = block.mean(axis=-1)
    if coloured:
        tint = uniform_tint(rgb, scale, spread)
        if tint:
            logger.warning("%s is greyscale with a uniform colour tint (%s): read as the mean of its red, green and "
                           "blue. If it is a colour picture rather than a tinted radiograph (a photo of a lightbox, a "
                           "sepia-toned export), give the radiograph itself.", source, tint)  # fmt: skip
            return out
        share = coloured / float(h * w)
        said = f"{100 * share:.2g}%" if share < 0.1 else f"{100 * share:.0f}%"
        small = (" (so few are usually an annotation, a measurement or an overlay drawn on a screenshot: export the "
                 "radiograph without it)" if share < 0.1 else "")  # fmt: skip
        raise InputError(
            f"{source} is a colour image (its red, green and blue differ); a radiograph is greyscale. {said} of its "
            f"pixels are coloured{small}. Export it as a greyscale DICOM/PNG (or convert it, e.g. in 3D Slicer or an "
            "image editor) and try again."
        )
    return out


#: An array given to :func:`as_radiograph` whose first axis has at most this many slices, each larger than that
#: on both sides, is taken for a stack of radiographs, not a CT volume (whose slices number in the tens or more).
MAX_STACK_IMAGES = 16


def _stack_message(what: str) -> str:
    return (f"{what}, not one radiograph: X-ray to CT makes one CT from one radiograph per call. For several, call "
            "run once per image (XrayToCTGenerator.run(image) in a loop; on the command line, xray2ct once per file).")


def radiograph_pixels(arr: np.ndarray, source: str = "image", *, keep_integers: bool = False) -> np.ndarray:
    """The ``(H, W)`` float32 pixels of an array that is one greyscale radiograph: greyscale stored in colour
    (``(H, W, 3)`` or ``(H, W, 4)``) is converted (:func:`greyscale_pixels`) and single-slice axes are dropped. The
    checks look at the array as it is (any type): a float64 image beyond float32's range is divided by its largest
    magnitude first (:func:`_float32_scale`); a float32 array comes back as it is, not copied.

    ``keep_integers``: an integer greyscale image comes back checked but in its own type, not copied (what the X-ray
    to CT module hands its job: MetaImage keeps the type, and uint16 is half the bytes of float32).

    Raises:
        InputError: real colour, a 3D volume, fewer or more than 2 dimensions, a thumbnail, NaN or Inf.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in COLOUR_CHANNELS:
        arr = greyscale_pixels(arr, source)
    if arr.ndim == 3 and min(arr.shape) > 1:
        raise InputError(
            f"{source} is a 3D volume of shape {arr.shape}, not a radiograph. xray2ct needs one 2D "
            "projection image (a chest X-ray); to try X-ray to CT on a CT, give the CT to evaluate-xray (--reference "
            "CT), which renders its radiograph (a DRR), generates a CT from it and scores that against the CT."
        )
    if arr.ndim == 3:
        arr = arr.reshape([s for s in arr.shape if s != 1] or [1])
    if arr.ndim != 2:
        raise InputError(f"{source} has {arr.ndim} dimensions; a radiograph is a 2D image (rows, columns).")
    if min(arr.shape) < MIN_RADIOGRAPH_SIDE:
        raise InputError(
            f"{source} is only {arr.shape[0]}x{arr.shape[1]} pixels; a radiograph needs at least "
            f"{MIN_RADIOGRAPH_SIDE} pixels per side. Use the full-resolution image, not a thumbnail."
        )
    if keep_integers and arr.dtype.kind in "iu":
        return arr
    return _as_float32(arr, _float32_scale(arr, source))


def min_input_side(model_side: int) -> int:
    """The fewest pixels a radiograph's shorter side may have for a model whose input is ``model_side`` pixels a side
    (:data:`MIN_MODEL_INPUT_SHARE` of it, and never under :data:`MIN_RADIOGRAPH_SIDE`)."""
    return max(MIN_RADIOGRAPH_SIDE, int(np.ceil(MIN_MODEL_INPUT_SHARE * model_side)))


def check_model_input_size(rad: Radiograph, model_side: int, name: str) -> None:
    """Refuse a radiograph too small for the model (a thumbnail or an icon exported instead of the image): its shorter
    side below :func:`min_input_side` of ``model_side`` (the model's input side, pixels). The message names the size
    found (in millimetres too when the pixel spacing is known), the minimum and what to do.

    Raises:
        InputError: the radiograph is smaller than the minimum on either side.
    """
    h, w = rad.shape
    least = min_input_side(model_side)
    if min(h, w) >= least:
        return
    mm = ""
    if rad.pixel_spacing is not None:
        row, col = (float(v) for v in rad.pixel_spacing)
        mm = (f" ({h * row:.0f}x{w * col:.0f} mm at {row:.3g} x {col:.3g} mm per pixel: a radiograph's pixels are "
              "0.1-0.2 mm)")  # fmt: skip
    raise InputError(
        f"{name} is only {h}x{w} pixels{mm}, a thumbnail rather than a radiograph: the model reads {model_side}x"
        f"{model_side} pixels and needs at least {least} pixels on each side. Export the full-resolution image (the "
        "DICOM file from the PACS or viewer, or a PNG/JPEG at its original size) and try again."
    )


def _dicom_tags(reader: sitk.ImageFileReader) -> dict[str, str]:
    tags = {}
    for key, name in (
        ("0028|0004", "photometric"),
        ("0008|0060", "modality"),
        ("0028|0030", "pixel_spacing"),
        ("0018|1164", "imager_pixel_spacing"),
        ("0028|0101", "bits_stored"),
        ("0008|0008", "image_type"),
        ("0018|5101", "view_position"),
        ("0020|0020", "patient_orientation"),
        ("0020|0037", "image_orientation"),
        ("0018|0015", "body_part"),
        ("0018|1114", "estimated_magnification"),
        ("0018|1110", "source_detector_mm"),
        ("0018|1111", "source_patient_mm"),
        ("0028|0a02", "spacing_calibration"),
        ("0028|0034", "pixel_aspect_ratio"),
        ("0028|0008", "number_of_frames"),
        ("2050|0020", "presentation_lut_shape"),
    ):
        if reader.HasMetaDataKey(key):
            tags[name] = reader.GetMetaData(key).strip()
    return tags


def _parse_spacing(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        parts = [float(p) for p in text.replace(",", "\\").split("\\") if p.strip()]
    except ValueError:
        return None
    if len(parts) == 2 and all(p > 0 for p in parts):
        return (parts[0], parts[1])
    return None


def header_spacing(tags: dict[str, str]) -> tuple[float, float] | None:
    """``(row, col)`` pixel spacing in mm from a DICOM header's PixelSpacing, else its ImagerPixelSpacing (the
    detector's, as CR and DX images often give only that); None when it gives neither."""
    return _parse_spacing(tags.get("pixel_spacing")) or _parse_spacing(tags.get("imager_pixel_spacing"))


def _spacing_text(text: str) -> str:
    """A header's spacing value as a message shows it: ``0 x 0 mm`` for ``0\\0``, else the value itself."""
    try:
        return " x ".join(f"{float(v):g}" for v in text.replace(",", "\\").split("\\")) + " mm"
    except ValueError:
        return repr(text)


def spacing_problem(tags: dict[str, str]) -> str:
    """What is wrong with a DICOM header's pixel spacing when it gives one that cannot be used (zero, negative,
    not two numbers: e.g. the cxr-pa sample's PixelSpacing ``0\\0``) and no usable other one, or ``""``."""
    if header_spacing(tags) is not None:
        return ""
    bad = [(name, tags[key]) for key, name in (("pixel_spacing", "PixelSpacing"),
                                                ("imager_pixel_spacing", "ImagerPixelSpacing")) if tags.get(key)]  # fmt: skip
    if not bad:
        return ""
    said = " and ".join(f"{_spacing_text(text)} ({name})" for name, text in bad)
    return f"the header's pixel spacing {said} is unusable"


def header_pixel_aspect(tags: dict[str, str]) -> tuple[float, float] | None:
    """``(row, col)`` relative pixel size from a DICOM header's PixelAspectRatio (vertical\\horizontal, e.g. ``2\\1``
    for pixels twice as tall as wide); None when it gives none or an unusable one."""
    return _parse_spacing(tags.get("pixel_aspect_ratio"))


#: Detector-plane magnification assumed for a radiograph whose header does not give one: a PA chest at 180 cm
#: magnifies mid-chest anatomy about 1.1 times on the detector.
NOMINAL_MAGNIFICATION = 1.1
#: Magnifications outside this range are not a radiograph's (a header error): the nominal one is used instead.
MAGNIFICATION_RANGE = (1.0, 2.0)


def header_magnification(tags: dict[str, str]) -> tuple[float, str]:
    """How much larger than in the patient the anatomy is at the pixel spacing :func:`header_spacing` gives, and why:

    * a CT localizer (topogram, scout): 1, its PixelSpacing is in the patient, at the isocentre (CT Image module);
    * a PixelSpacing calibrated to the patient (PixelSpacingCalibrationType), or one that differs from the
      ImagerPixelSpacing beside it (the modality already corrected it): 1;
    * else the header's EstimatedRadiographicMagnificationFactor, or DistanceSourceToDetector over
      DistanceSourceToPatient;
    * else :data:`NOMINAL_MAGNIFICATION` (tags without any of these: PNG, JPEG, a DICOM that does not say).
    """
    modality = tags.get("modality", "").strip().upper()
    if modality == "CT" and is_localizer(tags.get("image_type", "")) and _parse_spacing(tags.get("pixel_spacing")):
        return 1.0, "a CT localizer's pixel spacing (in the patient, at the isocentre)"
    pixel, imager = _parse_spacing(tags.get("pixel_spacing")), _parse_spacing(tags.get("imager_pixel_spacing"))
    if pixel is not None and tags.get("spacing_calibration", "").strip():
        return 1.0, f"PixelSpacing calibrated to the patient ({tags['spacing_calibration'].strip()})"
    detector = imager is not None and max(imager) < 1.0  # 1 x 1 mm is no detector's: GDCM writes it when it knows none
    if pixel is not None and detector and not np.allclose(pixel, imager, rtol=1e-3):
        return 1.0, "PixelSpacing (in the patient; the ImagerPixelSpacing beside it is the detector's)"

    def number(key: str) -> float | None:
        try:
            value = float(tags.get(key, "").split("\\")[0])
        except ValueError:
            return None
        return value if np.isfinite(value) and value > 0 else None

    lo, hi = MAGNIFICATION_RANGE
    factor = number("estimated_magnification")
    if factor is not None and lo <= factor <= hi:
        return factor, f"EstimatedRadiographicMagnificationFactor {factor:g}"
    sid, sod = number("source_detector_mm"), number("source_patient_mm")
    if sid is not None and sod is not None and lo <= sid / sod <= hi:
        return sid / sod, f"DistanceSourceToDetector / DistanceSourceToPatient ({sid:g} / {sod:g} mm)"
    return NOMINAL_MAGNIFICATION, f"nominal {NOMINAL_MAGNIFICATION} (a PA chest at 180 cm; the header gives none)"


def check_projection_modality(tags: dict[str, str], name: str) -> None:
    """Refuse a DICOM image that is not a projection radiograph (a CT slice, an MR image, ...), by its header.

    Raises:
        InputError: the modality is one of :data:`NOT_RADIOGRAPHS` (a CT image that is not a localizer).
    """
    modality = tags.get("modality", "").strip().upper()
    if modality in NOT_RADIOGRAPHS and not (modality == "CT" and is_localizer(tags.get("image_type", ""))):
        hint = " To super-resolve a CT, give its series to `sr` or the CT Diffusion SR module." if modality == "CT" else ""
        raise InputError(
            f"{name} is {NOT_RADIOGRAPHS[modality]} (DICOM Modality {modality}), not a radiograph: give a chest "
            f"radiograph (CR or DX) or a CT topogram (scout).{hint}"
        )


def _direction_letter(cosines: list[float]) -> str | None:
    """The patient direction (L/R/A/P/H/F) a DICOM (LPS) direction cosine vector points along, or None when it
    is oblique (no component above 0.9)."""
    axis = int(np.argmax(np.abs(cosines)))
    if abs(cosines[axis]) < 0.9:
        return None
    return ("L", "P", "H")[axis] if cosines[axis] > 0 else ("R", "A", "F")[axis]


def image_directions(tags: dict[str, str]) -> tuple[str, str] | None:
    """Where the image's rows and columns point in the patient, ``(along a row, down a column)`` as DICOM letters,
    from PatientOrientation (CR, DX) or else ImageOrientationPatient (a CT localizer); None when the header says
    neither or an oblique direction."""
    parts = [v.strip().upper() for v in tags.get("patient_orientation", "").split("\\")]
    if len(parts) == 2 and all(parts):
        letters = tuple(v if v in _OPPOSITE else None for v in parts)
    else:
        try:
            cos = [float(v) for v in tags.get("image_orientation", "").split("\\")]
        except ValueError:
            cos = []
        letters = (_direction_letter(cos[:3]), _direction_letter(cos[3:])) if len(cos) == 6 else (None, None)
    if None in letters or _OPPOSITE[letters[0]] == letters[1] or letters[0] == letters[1]:
        return None
    return letters  # type: ignore[return-value]


def header_view(tags: dict[str, str], directions: tuple[str, str] | None) -> tuple[str, str] | None:
    """``(view, what in the header says so)`` of a DICOM radiograph: ViewPosition, else the image's directions
    (left-right and head-feet: frontal; front-back and head-feet: lateral); None when the header says neither."""
    position = tags.get("view_position", "").strip().upper()
    if position in VIEW_POSITIONS:
        return VIEW_POSITIONS[position], f"ViewPosition {position}"
    if directions is not None:
        axes = {frozenset((d, _OPPOSITE[d])) for d in directions}
        if frozenset("HF") in axes:
            view = "pa" if frozenset("LR") in axes else "lateral"
            return view, f"image directions {directions[0]}\\{directions[1]}"
    return None


def _axis(letter: str) -> frozenset:
    return frozenset((letter, _OPPOSITE[letter]))


def _turn(
    arr: np.ndarray, spacing: tuple[float, float] | None, directions: tuple[str, str], want: tuple[str, str],
    across: str = "left-right",
) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    """Transpose and/or flip ``arr``, whose rows and columns point along ``directions`` ``(along a row, down a
    column)``, so that they point along ``want`` (the same two axes); ``across`` names the flip along a row."""
    row, col = directions
    done = []
    if _axis(row) == _axis(want[1]):  # the axis wanted down the columns runs along the rows
        arr, row, col = arr.T, col, row
        spacing = None if spacing is None else (spacing[1], spacing[0])
        done.append("transposed")
    if row != want[0]:
        arr = arr[:, ::-1]
        done.append(f"flipped {across}")
    if col != want[1]:
        arr = arr[::-1, :]
        done.append("flipped upside down")
    return np.ascontiguousarray(arr), spacing, " and ".join(done)


def orient_to_model(
    arr: np.ndarray, spacing: tuple[float, float] | None, directions: tuple[str, str] | None, view: str | None
) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    """Turn an image whose header gives its directions to the model's orientation for ``view``
    (:data:`CANONICAL_DIRECTIONS`: a frontal view with the head at the top and the patient's left on the right, as
    radiographs are read): transposed and/or flipped. Images whose header says nothing are left as they are.

    Returns:
        ``(array, (row, col) spacing, what was done or "")``.
    """
    want = CANONICAL_DIRECTIONS.get(view or "")
    if want is None or directions is None or {_axis(d) for d in directions} != {_axis(d) for d in want}:
        return arr, spacing, ""  # not this view's axes (e.g. a lateral image called frontal): left alone
    return _turn(arr, spacing, directions, want, "left-right" if view == "pa" else "front-back")


#: How 3D Slicer shows a 2D image in the view of its plane, by the axis (LPS x, y, z) the image's normal runs along:
#: the patient directions to the right of the screen and down it (the axial view: patient's left on the right,
#: posterior down; coronal: left on the right, feet down; sagittal: posterior on the right, feet down). An image
#: file without directions (PNG, JPEG, a NRRD or MetaImage with an identity direction) is shown as it is stored.
DISPLAYED_DIRECTIONS = {2: ("L", "P"), 1: ("L", "F"), 0: ("P", "F")}


def orient_as_displayed(
    arr: np.ndarray, spacing: tuple[float, float] | None, direction: np.ndarray
) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    """Turn a 2D image to how 3D Slicer displays it (:data:`DISPLAYED_DIRECTIONS`), from the LPS directions of its
    index axes: e.g. a NRRD, MetaImage or NIfTI radiograph stored mirrored with a direction of -1 along x, which
    Slicer shows the right way round.

    Args:
        arr: ``(rows, cols)`` pixels in file order.
        spacing: ``(row, col)`` mm, or None.
        direction: ``(3, 2)`` LPS direction cosines of the image's column axis (along a row) and row axis (down a
            column), as columns.

    Returns:
        ``(array, (row, col) spacing, what was done or "")``; an oblique image is left as it is.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 2)
    normal = np.cross(d[:, 0], d[:, 1])
    want = DISPLAYED_DIRECTIONS[int(np.argmax(np.abs(normal)))]
    letters = (_direction_letter(list(d[:, 0])), _direction_letter(list(d[:, 1])))
    if None in letters or {_axis(v) for v in letters} != {_axis(v) for v in want}:  # type: ignore[arg-type]
        return arr, spacing, ""
    return _turn(arr, spacing, letters, want)  # type: ignore[arg-type]


#: Bytes per pixel that reading a radiograph needs besides its decoded pixels: the float32 grey image, its windowed
#: copy and the work of the checks.
READ_BYTES_PER_PIXEL = 16
#: The largest side, in pixels, of an image read as a radiograph, refused from its header before it is decoded
#: (:func:`_check_size`). A radiograph has at most about 4,300 pixels a side (a 43 cm detector at 0.1 mm), a mammogram
#: about 6,000 (24 x 30 cm at 0.05 mm); nearly three times that leaves room for any real image, while a file whose
#: header claims more is a decompression bomb (a PNG of 30000x30000 zero pixels is 875 KB on disc and took 7.4 GB to
#: decode, under the free memory the memory check compares with) or a corrupt header.
MAX_RADIOGRAPH_SIDE = 16384


def _component_bytes(reader: sitk.ImageFileReader) -> int:
    """The bytes of one channel of one pixel of the image ``reader`` has read the header of (8 when unknown)."""
    try:
        return int(sitk.Image([1, 1], reader.GetPixelID(), max(1, reader.GetNumberOfComponents()))
                   .GetSizeOfPixelComponent())  # fmt: skip
    except RuntimeError:
        return 8


def _check_size(p: Path, size: list[int], components: int, component_bytes: int = 8) -> None:
    """Refuse, from the header alone, before it is decoded, an image with a side over :data:`MAX_RADIOGRAPH_SIDE`
    pixels (no radiograph is that large: a decompression bomb or a corrupt header), or one that cannot fit in memory
    (a corrupt header can claim billions of pixels): its decoded pixels (``components`` channels of
    ``component_bytes`` each) and :data:`READ_BYTES_PER_PIXEL` of work per pixel (a colour image is made grey before
    that work).

    Raises:
        InputError: a side is over :data:`MAX_RADIOGRAPH_SIDE` pixels.
        ResourceError: the image does not fit in memory.
    """
    from ..files import check_memory_for

    if size and max(size) > MAX_RADIOGRAPH_SIDE:
        shown = size[:2] if len(size) == 3 and size[2] == 1 else size  # a DICOM image is read as one slice of 3D
        raise InputError(
            f"{p.name} is {'x'.join(map(str, shown))} pixels by its header, more than the {MAX_RADIOGRAPH_SIDE} pixels a "
            "side xray2ct reads: no radiograph is that large (a chest radiograph has about 4,300 pixels a side, a "
            "mammogram about 6,000), so the file is corrupt or was enlarged. Export the radiograph at its acquired "
            "resolution (the DICOM file from the PACS or viewer, or a PNG/TIFF of it as acquired) and give that file."
        )
    pixels = int(np.prod(size, dtype=np.float64))
    check_memory_for(
        pixels * (READ_BYTES_PER_PIXEL + max(1, components) * component_bytes),
        f"decoding {p.name} ({'x'.join(map(str, size))} pixels)", "use a smaller image",
    )


#: Image formats whose header carries a pixel spacing worth reading (PNG, JPEG, TIFF and BMP are taken without one);
#: exactly 1 x 1 mm in them means "unknown" (what readers report for an image without spacing, and what 3D Slicer
#: writes for a PNG it loaded), since a radiograph's pixels are far smaller.
SPACING_HEADER_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".nii", ".nii.gz")
#: What ``xray2ct`` reads, as its help and messages name it.
RADIOGRAPH_FORMATS = "DICOM (CR, DX, a CT topogram), PNG, JPEG, TIFF, BMP, or a 2D NRRD, MetaImage (.mha/.mhd) or NIfTI"


def dicomdir_message(path: Path) -> str:
    """What to say of a DICOMDIR given as a radiograph (naming an image file it lists), or ``""`` when ``path`` is
    not one."""
    import pydicom

    from ..dicom_in import DICOMDIR_SOP_CLASS

    if not is_dicom_file(path):  # a DICOMDIR is a DICOM file (Part 10), with its mark
        return ""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 (any unreadable file: not a DICOMDIR, said by the caller's own message)
        return ""
    sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if sop_class != DICOMDIR_SOP_CLASS and "DirectoryRecordSequence" not in ds:
        return ""
    images = [r for r in ds.get("DirectoryRecordSequence", []) if str(r.get("DirectoryRecordType", "")).upper() == "IMAGE"]
    example = ""
    if images and images[0].get("ReferencedFileID"):
        parts = images[0].ReferencedFileID
        parts = [parts] if isinstance(parts, str) else list(parts)
        example = f", e.g. {path.parent.joinpath(*map(str, parts))}"
    listed = f" ({len(images)} image(s) listed)" if images else ""
    return (f"{path} is a DICOMDIR, the index of the files on a DICOM disc or folder, not an image: give one of the "
            f"image files it lists{example}{listed}.")  # fmt: skip


def _is_dicom(p: Path, reader: sitk.ImageFileReader) -> bool:
    """Whether the file ``reader`` read is DICOM: by its reader, the ``DICM`` mark at byte 128 whatever the file's
    name (the files of a DICOM disc are named IM000000, those of a PACS export or a DICOM receiver by their UID,
    1.2.840....12345; others end in .dicom, or were renamed .png), or a .dcm suffix (a file without the preamble)."""
    return reader.GetImageIO() == "GDCMImageIO" or is_dicom_file(p)


def _radiograph_io(p: Path) -> str:
    """The SimpleITK ImageIO that reads ``p``: the DICOM reader for a file with the ``DICM`` mark, whatever its name
    (else ITK might take it for what its name or its preamble says: a TIFF, as a dual-format DICOM's preamble is, or a
    PNG), else :func:`~DiffusionCore.volume.image_io`'s (by the suffix; ITK chooses for the others)."""
    io = image_io(p)
    return "GDCMImageIO" if not io and has_dicom_marker(p) else io


def check_single_frame(arr: np.ndarray, tags: dict[str, str], name: str) -> None:
    """Refuse a multi-frame DICOM radiograph (a series of exposures in one file) by what it is.

    Raises:
        InputError: ``arr`` holds more than one frame.
    """
    if arr.ndim == 3 and arr.shape[0] > 1:
        modality = tags.get("modality", "").strip().upper()
        said = f", DICOM Modality {modality}" if modality else ""
        raise InputError(
            f"{name} is a multi-frame radiograph ({arr.shape[0]} frames{said}); xray2ct takes one frontal chest "
            "radiograph: save the frame you want as a single-frame image (e.g. with a DICOM viewer, or in 3D Slicer) "
            "and give that file."
        )


def image_geometry(img: sitk.Image, p: Path) -> tuple[tuple[float, float] | None, np.ndarray]:
    """The ``(row, col)`` pixel spacing (mm, None when unknown) and the ``(3, 2)`` LPS directions of the column and
    row axes of a 2D image read from a non-DICOM file (a single-slice 3D image: of its two axes longer than 1)."""
    size = img.GetSize()
    dim = img.GetDimension()
    axes = [a for a in range(dim) if size[a] > 1][:2] if dim == 3 else [0, 1]
    if len(axes) < 2:
        axes = [0, 1]
    col_axis, row_axis = axes
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    cosines = np.zeros((3, 2))
    cosines[:dim, 0], cosines[:dim, 1] = direction[:, col_axis], direction[:, row_axis]
    spacing: tuple[float, float] | None = None
    if p.name.lower().endswith(SPACING_HEADER_SUFFIXES):
        row_mm, col_mm = float(img.GetSpacing()[row_axis]), float(img.GetSpacing()[col_axis])
        usable = all(np.isfinite(v) and v > 0 for v in (row_mm, col_mm))
        spacing = (row_mm, col_mm) if usable and (row_mm, col_mm) != (1.0, 1.0) else None
    return spacing, cosines


#: The first bytes of a PNG file, and the IHDR colour type of a grey + alpha PNG (Pillow's mode "LA"), which
#: SimpleITK cannot read ("Unknown PixelType"): read relabelled instead (:func:`relabel_grey_alpha_png`).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_GREY_ALPHA = 4


def is_grey_alpha_png(path: Path) -> bool:
    """Whether ``path`` is a grey + alpha PNG, from its IHDR."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return False
    return len(head) == 26 and head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR" and head[25] == PNG_GREY_ALPHA


#: PNG chunks kept when a grey + alpha PNG is relabelled (:func:`relabel_grey_alpha_png`): the critical ones. The
#: others (gamma, significant bits, background colour, ...) describe the grey + alpha layout and would not fit the
#: new one; none of them changes the stored pixels.
PNG_KEPT_CHUNKS = (b"IHDR", b"IDAT", b"IEND")
#: Bit depth of a grey + alpha PNG -> (bit depth, colour type) of the PNG whose pixels have the same bytes: 8-bit grey
#: + alpha is 16-bit grey (grey in the high byte), 16-bit grey + alpha is 8-bit RGBA (grey in red and green). Each
#: has as many bytes per pixel as the original, so its rows, filters and interlacing decode alike.
PNG_GREY_ALPHA_AS = {8: (16, 0), 16: (8, 6)}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def relabel_grey_alpha_png(path: Path) -> tuple[bytes, int]:
    """A grey + alpha PNG (which SimpleITK cannot read: "Unknown PixelType") as a PNG that it reads, byte for byte
    the same pixels under another colour type (:data:`PNG_GREY_ALPHA_AS`), and the original's bit depth; nothing is
    decoded here: SimpleITK's PNG reader (libpng) decodes the pixels, only the header's colour type and bit depth
    change (Pillow reads such files but is no dependency of DiffusionCore, and one file type does not warrant one). :func:`grey_of_relabelled` takes the grey channel back out of what SimpleITK reads of it.

    Raises:
        InputError: the file is not a well-formed grey + alpha PNG (a truncated file, a bit depth PNG does not
            allow for grey + alpha).
    """
    data = path.read_bytes()
    chunks, at = [], len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I", data[at : at + 4])[0], data[at + 4 : at + 8]
        body = data[at + 8 : at + 8 + length]
        if len(body) < length:
            break
        if kind in PNG_KEPT_CHUNKS:
            chunks.append((kind, body))
        at += 12 + length
        if kind == b"IEND":
            break
    depth = chunks[0][1][8] if chunks and chunks[0][0] == b"IHDR" and len(chunks[0][1]) == 13 else 0
    if depth not in PNG_GREY_ALPHA_AS or chunks[-1][0] != b"IEND":
        raise InputError(f"cannot read {path} as an image: it starts as a grey + alpha PNG but is truncated or corrupt "
                         f"(bit depth {depth}). Re-export it as a greyscale PNG and give that file.")  # fmt: skip
    new_depth, colour_type = PNG_GREY_ALPHA_AS[depth]
    ihdr = chunks[0][1]
    chunks[0] = (b"IHDR", ihdr[:8] + bytes([new_depth, colour_type]) + ihdr[10:])
    return PNG_SIGNATURE + b"".join(_png_chunk(kind, body) for kind, body in chunks), depth


def grey_of_relabelled(arr: np.ndarray, depth: int) -> np.ndarray:
    """The grey channel, in its own bit depth, of the pixels SimpleITK read from a relabelled grey + alpha PNG
    (:func:`relabel_grey_alpha_png` of a PNG of bit depth ``depth``); the alpha channel is dropped, as it is for an
    RGBA image."""
    if depth == 8:  # (H, W) uint16: grey in the high byte, alpha in the low one
        return (np.asarray(arr, np.uint16) >> 8).astype(np.uint8)
    arr = np.asarray(arr, np.uint8)  # (H, W, 4): grey's high and low bytes, then alpha's
    return (arr[..., 0].astype(np.uint16) << 8) | arr[..., 1]


#: The EXIF Orientation tag (in a JPEG's APP1 segment), and what each of its values asks of the stored pixels to show
#: the image as viewers do: (flip left-right first?, then quarter turns anticlockwise as ``np.rot90`` counts them,
#: what a message calls it). 1 is upright as stored.
EXIF_ORIENTATION_TAG = 0x0112
EXIF_ORIENTATIONS = {
    2: (True, 0, "flipped left-right"), 3: (False, 2, "turned 180°"), 4: (True, 2, "flipped upside down"),
    5: (True, 1, "flipped left-right and turned 90° anticlockwise"), 6: (False, -1, "turned 90° clockwise"),
    7: (True, -1, "flipped left-right and turned 90° clockwise"), 8: (False, 1, "turned 90° anticlockwise"),
}  # fmt: skip


def _tiff_orientation(data: bytes) -> int:
    """The Orientation in the first IFD of the TIFF structure ``data`` (an EXIF block), or 1."""
    order = {b"II": "little", b"MM": "big"}.get(data[:2])
    if order is None or len(data) < 8:
        return 1
    ifd = int.from_bytes(data[4:8], order)
    count = int.from_bytes(data[ifd : ifd + 2], order) if ifd + 2 <= len(data) else 0
    for at in range(ifd + 2, ifd + 2 + 12 * count, 12):
        entry = data[at : at + 12]
        if len(entry) < 12:
            break
        if int.from_bytes(entry[:2], order) == EXIF_ORIENTATION_TAG:
            kind = int.from_bytes(entry[2:4], order)  # SHORT (3), as EXIF says; a LONG (4) from some writers
            value = int.from_bytes(entry[8:12] if kind == 4 else entry[8:10], order)
            return value if value in EXIF_ORIENTATIONS else 1
    return 1


def exif_orientation(path: Path) -> int:
    """The EXIF Orientation (1-8) of a JPEG file, read from its segments before the pixels without decoding them
    (SimpleITK ignores it; Pillow, which reads it, is no dependency of this package, and the tag is a few bytes): 6
    for a photo of a screen or film taken with the phone turned, stored sideways and shown upright by every viewer.
    1 (upright as stored) for a JPEG that says none and for any other file."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                return 1
            while True:
                marker = f.read(2)
                if len(marker) < 2 or marker[0] != 0xFF or marker[1] in (0xD9, 0xDA):
                    return 1  # the end, or the pixels start: no EXIF before them
                if marker[1] == 0xFF:  # a fill byte before the marker
                    f.seek(-1, os.SEEK_CUR)
                    continue
                length = int.from_bytes(f.read(2), "big")
                if length < 2:
                    return 1
                if marker[1] == 0xE1:  # APP1
                    data = f.read(length - 2)
                    if data.startswith(b"Exif\0\0"):
                        return _tiff_orientation(data[6:])
                else:
                    f.seek(length - 2, os.SEEK_CUR)
    except OSError:
        return 1


def apply_exif_orientation(
    arr: np.ndarray, spacing: tuple[float, float] | None, orientation: int
) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    """Turn ``arr`` (``(rows, cols)`` as stored) as its EXIF ``orientation`` asks (:data:`EXIF_ORIENTATIONS`).

    Returns:
        ``(array, (row, col) spacing, what was done or "")``.
    """
    if orientation not in EXIF_ORIENTATIONS:
        return arr, spacing, ""
    flip, quarter_turns, done = EXIF_ORIENTATIONS[orientation]
    if flip:
        arr = arr[:, ::-1]
    arr = np.rot90(arr, quarter_turns)
    if spacing is not None and quarter_turns % 2:
        spacing = (spacing[1], spacing[0])
    return np.ascontiguousarray(arr), spacing, done


def is_tiff(path: Path) -> bool:
    """Whether ``path`` starts as a TIFF (or BigTIFF) file does, in either byte order, and is no DICOM file: DICOM lets
    the 128-byte preamble before its ``DICM`` mark be a TIFF header (a dual-format file), and the mark wins."""
    if has_dicom_marker(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
    except OSError:
        return False


def check_single_page(p: Path, size: list[int]) -> None:
    """Refuse, from its header, a multi-page TIFF (which SimpleITK reads as a stack: ``size`` ``[W, H, pages]``).

    Raises:
        InputError: the file is a TIFF of more than one page.
    """
    if len(size) == 3 and size[2] > 1 and is_tiff(p):
        raise InputError(
            f"{p.name} is a multi-page TIFF of {size[2]} pages ({size[0]}x{size[1]} pixels each), not one "
            "radiograph: xray2ct takes one radiograph per file. Save the page you want as its own file (e.g. in an "
            "image viewer or editor, or with tiffsplit) and give that file."
        )


def _read_grey_alpha_png(p: Path) -> tuple[sitk.ImageFileReader, sitk.Image]:
    """``(reader, image)`` of a grey + alpha PNG (a greyscale image saved with transparency by an image editor), which
    SimpleITK cannot read as it is: read relabelled (:func:`relabel_grey_alpha_png`) from a temporary copy, and its
    grey channel kept (alpha ignored, as for an RGBA image). The image is the grey channel alone, in the PNG's own
    bit depth (8 or 16).

    Raises:
        InputError: the file is corrupt, or too large for memory.
    """
    import tempfile

    relabelled, depth = relabel_grey_alpha_png(p)
    reader = sitk.ImageFileReader()
    with tempfile.TemporaryDirectory(prefix="diffusioncore-png-") as tmp:
        copy = Path(tmp) / "grey_alpha.png"
        copy.write_bytes(relabelled)
        del relabelled
        reader.SetFileName(itk_path(copy))
        reader.SetImageIO("PNGImageIO")
        try:
            reader.ReadImageInformation()
            size = [int(v) for v in reader.GetSize()]
            _check_size(p, size, 2, depth // 8)
            img = reader.Execute()
        except RuntimeError as exc:
            raise InputError(
                f"cannot read {p} as an image ({sitk_message(exc)[:200]}). It is a grey + alpha PNG that is corrupt; "
                "re-export it as a greyscale PNG and give that file."
            ) from exc
    grey = sitk.GetImageFromArray(grey_of_relabelled(sitk.GetArrayViewFromImage(img), depth))
    logger.info("%s: a grey + alpha PNG; its grey channel is read (the alpha channel, transparency, is ignored)", p.name)
    return reader, grey


def _read_image(p: Path) -> tuple[sitk.ImageFileReader, sitk.Image]:
    """``(reader, image)``: ``p`` read by SimpleITK after checking, from its header, that it is one image
    (:func:`check_single_page`) that fits in memory (:func:`_check_size`).

    Raises:
        InputError: the file cannot be read as an image (a DICOMDIR is named as such), or it is a multi-page TIFF.
    """
    check_metaimage_header(p)
    check_detached_data_files(p)  # a 2D .mhd / .nhdr whose data file lies outside its folder, or is a FIFO or device
    if is_grey_alpha_png(p):
        return _read_grey_alpha_png(p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(itk_path(p))  # a name ITK cannot take (not UTF-8) refused, not a C++ abort
    reader.SetImageIO(_radiograph_io(p))  # x.MHA too: ITK matches the suffix with its case; DICOM by its mark
    try:
        reader.ReadImageInformation()
        size = [int(v) for v in reader.GetSize()]
        check_single_page(p, size)
        _check_size(p, size, int(reader.GetNumberOfComponents()), _component_bytes(reader))
        img = reader.Execute()
    except RuntimeError as exc:
        index = dicomdir_message(p)
        if index:
            raise InputError(index) from exc
        raise InputError(
            f"cannot read {p} as an image ({sitk_message(exc)[:200]}). The file is corrupt or not a radiograph in a format "
            f"xray2ct reads ({RADIOGRAPH_FORMATS}); re-export it from the PACS or viewer."
        ) from exc
    return reader, img


def read_radiograph(path: str | os.PathLike) -> Radiograph:
    """Read a radiograph file into attenuation style.

    Args:
        path: DICOM (CR/DX/DX-like, any transfer syntax SimpleITK reads; told by its ``DICM`` mark whatever the file's
            name, e.g. named by its UID), PNG, JPEG, TIFF, BMP, or a 2D NRRD,
            MetaImage or NIfTI image (:data:`RADIOGRAPH_FORMATS`).

    Returns:
        :class:`Radiograph` with ``array`` (H, W) float32 in [0, 1] (MONOCHROME1 inverted, percentile
        windowed, a PresentationLUTShape INVERSE applied: :func:`presentation_lut_inversion`), ``pixel_spacing`` (row, col) mm from the DICOM header (or a NRRD, MetaImage or NIfTI header) or
        None. A DICOM image is turned as its header says (:func:`apply_dicom_header`); a NRRD, MetaImage or NIfTI
        image as 3D Slicer displays it (:func:`orient_as_displayed`); a JPEG as its EXIF Orientation says, as image
        viewers show it (:func:`apply_exif_orientation`). Each turn is said in ``metadata["oriented"]`` and the log.

    Raises:
        InputError: missing/unreadable/corrupt file, a DICOMDIR, colour image, 3D volume, multi-frame
            radiograph, multi-page TIFF, image smaller than :data:`MIN_RADIOGRAPH_SIDE` pixels per side.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"radiograph {p} is a folder: give the path of one image file (one radiograph per run).")
    if not p.is_file():
        raise InputError(f"radiograph {p} does not exist. Check the path (and quote it if it contains spaces).")
    reader, img = _read_image(p)
    is_dicom = _is_dicom(p, reader)
    tags = _dicom_tags(reader) if is_dicom else {}
    check_projection_modality(tags, p.name)  # before the pixel checks: a colour ultrasound is refused as ultrasound
    stored = sitk.GetArrayViewFromImage(img)  # the pixels in their own type, not copied
    if img.GetNumberOfComponentsPerPixel() > 1:  # greyscale saved in colour (grey + alpha too); real colour refused
        stored = greyscale_pixels(stored, p.name)
    if is_dicom:
        check_single_frame(stored, tags, p.name)
    arr = radiograph_pixels(stored, p.name)  # float32: the one copy of the image kept (windowed in place below)
    if np.may_share_memory(arr, stored):  # a float32 file: its pixels are the reader's
        arr = arr.copy()
    del stored
    spacing, cosines = (None, None) if is_dicom else image_geometry(img, p)
    del img  # the reader's copy of the pixels
    # MONOCHROME1 (high values display dark): SimpleITK's GDCM reader already returns such images inverted
    # to MONOCHROME2 semantics (2^BitsStored - 1 - value), so bright = attenuating here for both; checked
    # on a crafted MONOCHROME1 file in Testing/test_xray_cli.py.
    if is_dicom:
        arr, spacing, meta = apply_dicom_header(arr, header_spacing(tags), tags, p.name)
    else:
        meta = {}
        orientation = exif_orientation(p)
        arr, spacing, turned = apply_exif_orientation(arr, spacing, orientation)
        if turned:
            meta["oriented"] = f"{turned} as its EXIF Orientation ({orientation}) says, as image viewers show it"
        else:
            arr, spacing, turned = orient_as_displayed(arr, spacing, cosines)
            if turned:
                meta["oriented"] = f"{turned} to show it as 3D Slicer displays it, as its header's directions say"
        if turned:
            logger.info("%s: %s", p.name, meta["oriented"])
    meta = {"source": str(p), "format": "dicom" if is_dicom else p.suffix.lower().lstrip("."), **meta}
    arr = window_radiograph(arr, source=p.name, in_place=True)
    if is_dicom:
        meta.update(apply_presentation_lut(arr, tags, p.name))
    return Radiograph(arr, spacing, meta)


def apply_presentation_lut(arr: np.ndarray, tags: dict[str, str], name: str) -> dict:
    """:func:`presentation_lut_inversion` applied to a windowed radiograph ``arr`` (values in [0, 1], in place: the
    percentile window is symmetric, so 1 - window(x) is the window of the inverted image); returns the metadata to
    record (``presentation_lut``), or ``{}``. The reader uses it for a DICOM file, and the X-ray to CT module's command
    for its node's pixels with the DICOM file the node was loaded from (Slicer's reader, like this one, applies
    MONOCHROME1 but not the Presentation LUT)."""
    inverse = presentation_lut_inversion(tags)
    if not inverse:
        return {}
    np.subtract(1.0, arr, out=arr)
    logger.info("%s: %s", name, inverse)
    return {"presentation_lut": inverse}


def presentation_lut_inversion(tags: dict[str, str]) -> str:
    """What is done for a DICOM header's PresentationLUTShape (2050,0020), or ``""`` when nothing is. INVERSE means
    the image is displayed inverted (its lowest values white, P-Value = maximum - value), as DICOM viewers show it:
    for a MONOCHROME2 image it is inverted here too (bones bright, when its stored values are a MONOCHROME1's). A
    MONOCHROME1 image marked INVERSE is what DICOM's image modules ask for ("INVERSE shall be used if Photometric
    Interpretation is MONOCHROME1"): the one inversion its photometric interpretation says, which the reader has
    done (bones bright), not a second. IDENTITY or no shape: nothing more."""
    shape = tags.get("presentation_lut_shape", "").strip().upper()
    photometric = tags.get("photometric", "").strip().upper()
    if shape != "INVERSE" or photometric == "MONOCHROME1":
        return ""
    said = f"{photometric} " if photometric else ""
    return (f"inverted as its header's PresentationLUTShape INVERSE says: a DICOM viewer shows this {said}image with "
            "its lowest values white")  # fmt: skip


def apply_dicom_header(
    arr: np.ndarray, spacing: tuple[float, float] | None, tags: dict[str, str], name: str
) -> tuple[np.ndarray, tuple[float, float] | None, dict]:
    """What a DICOM radiograph's header says, applied to its pixels (in the file's row and column order): the
    modality checked (:func:`check_projection_modality`), the view read (:func:`header_view`) and the image turned
    to the model's orientation (:func:`orient_to_model`).

    Returns:
        ``(array, (row, col) spacing, metadata)``: the header's tags, with ``view`` and ``view_from`` when it gives a
        view, ``oriented`` when the image was turned, ``pixel_aspect`` ``(row, col)`` when it gives no spacing but a
        PixelAspectRatio of pixels that are not square, and ``spacing_problem`` when the spacing it gives is unusable.

    Raises:
        InputError: the header says the image is not a radiograph.
    """
    check_projection_modality(tags, name)
    meta: dict = dict(tags)
    meta["magnification"], meta["magnification_from"] = header_magnification(tags)
    directions = image_directions(tags)
    view = header_view(tags, directions)
    if view is not None:
        meta["view"], meta["view_from"] = view
    aspect = header_pixel_aspect(tags) if spacing is None else None
    arr, spacing, turned = orient_to_model(arr, spacing, directions, meta.get("view"))
    if turned:
        meta["oriented"] = f"{turned} to the model's orientation, as its header says ({directions[0]}\\{directions[1]})"  # type: ignore[index]
        logger.info("%s: %s", name, meta["oriented"])
    if aspect is not None and "transposed" in turned:
        aspect = (aspect[1], aspect[0])
    if aspect is not None and not np.isclose(aspect[0], aspect[1], rtol=SQUARE_PIXEL_TOLERANCE):
        meta["pixel_aspect"] = aspect
    if spacing is None and spacing_problem(tags):
        meta["spacing_problem"] = spacing_problem(tags)
    return arr, spacing, meta


#: DICOM modalities of projection radiographs (a CT localizer is one too).
RADIOGRAPH_MODALITIES = {"CR": "a radiograph", "DX": "a radiograph", "RF": "a fluoroscopy image",
                         "XA": "an angiography image"}  # fmt: skip


def radiograph_file_kind(path: str | os.PathLike) -> str:
    """What a file given where a CT volume is needed is, when it is a radiograph or another 2D image (from its
    header, without decoding its pixels): e.g. ``"a radiograph (DICOM Modality DX)"``, ``"a CT topogram (a
    localizer)"``, ``"a 2D image (1841x1955 pixels)"``; ``""`` when it is none of these or cannot be read."""
    p = Path(path)
    if not p.is_file():
        return ""
    reader = sitk.ImageFileReader()
    try:
        itk_utf8_name(p)
    except InputError:  # tried as a radiograph, so that reading it names the problem
        return "a file whose name is not UTF-8 text"
    reader.SetFileName(itk_path(p))  # Windows: a name its code page cannot spell refused, saying what to do
    reader.SetImageIO(_radiograph_io(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    size = [int(v) for v in reader.GetSize()]
    if _is_dicom(p, reader):
        tags = _dicom_tags(reader)
        modality = tags.get("modality", "").strip().upper()
        if modality == "CT" and is_localizer(tags.get("image_type", "")):
            return "a CT topogram (a localizer, DICOM Modality CT), a radiograph"
        if modality in RADIOGRAPH_MODALITIES:
            return f"{RADIOGRAPH_MODALITIES[modality]} (DICOM Modality {modality})"
        return ""
    if len(size) == 2 or (len(size) == 3 and sorted(size)[0] == 1):
        return f"a 2D image ({'x'.join(str(v) for v in size if v > 1)} pixels)"
    return ""


def read_dicom_header(path: str | os.PathLike) -> dict[str, str]:
    """The tags of a DICOM radiograph's header that :func:`apply_dicom_header` uses, read without decoding its pixels
    (e.g. the file a Slicer node was loaded from, whose pixels come from the node).

    Raises:
        InputError: the file is missing or is not DICOM.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p} is a folder; give the DICOM file the radiograph was loaded from, inside it.")
    if not p.is_file():
        raise InputError(f"the DICOM file {p} does not exist; give the file the radiograph was loaded from.")
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(itk_path(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{p} is not a readable DICOM file; give the DICOM file the radiograph was loaded from.") from exc
    return _dicom_tags(reader)


#: Two window bounds closer than this share of their magnitude (16 float32 steps) are equal: an image is blank when its
#: percentiles differ only by float32 rounding (a constant image resampled: 0.5 became 0.5 and 0.50000006).
BLANK_RELATIVE_TOLERANCE = 16 * float(np.finfo(np.float32).eps)

#: Rows per block in which :func:`window_radiograph` windows an image (float64 arithmetic, as for the whole image).
WINDOW_BLOCK_ROWS = 256


def window_bounds(
    arr: np.ndarray, source: str = "the radiograph", percentiles: tuple[float, float] = WINDOW_PERCENTILES,
    *, scratch: bool = False,
) -> tuple[float, float]:
    """The two percentiles of ``arr`` that :func:`window_radiograph` maps to 0 and 1: the one test of whether an image
    has anything to show, applied alike by ``xray2ct``, the X-ray to CT module's check of the chosen node and its
    background job.

    Args:
        arr: ``(H, W)`` pixels (float32 as :func:`radiograph_pixels` gives them).
        source: the image as the message names it (e.g. ``"'chest PA'"``, a node; or a file name).
        scratch: ``arr`` may be reordered in place (no copy the size of the image); its values stay.

    Raises:
        InputError: the percentiles are equal (to :data:`BLANK_RELATIVE_TOLERANCE` of their magnitude): the image is
            blank, or nearly uniform (e.g. a constant image with a few other pixels, a saturated exposure, a black
            frame with burned-in text); the message says how many pixels have that one value.
    """
    lo, hi = (float(v) for v in np.percentile(arr, percentiles, overwrite_input=scratch))
    spread, tolerance = hi - lo, BLANK_RELATIVE_TOLERANCE * max(abs(lo), abs(hi))
    if spread > tolerance:
        return lo, hi
    size = int(arr.size)
    same = arr == lo if spread == 0 else np.abs(arr - lo) <= tolerance  # within rounding: the same value
    others = size - int(np.count_nonzero(same))
    if others == 0:
        raise InputError(f"{source} is blank: all its pixels have the same value ({lo:g}). Use the radiograph itself.")
    said = (f"all but {others} of its {size} pixels have the same value ({lo:g})" if others < 0.001 * size
            else f"{100 * (size - others) / size:.1f}% of its pixels have the same value ({lo:g})")  # fmt: skip
    raise InputError(
        f"{source} is nearly uniform: {said}, so there is no picture to window (its {percentiles[0]:g}th and "
        f"{percentiles[1]:g}th percentiles are equal). Use the radiograph itself, not a blank, a mask or a "
        "saturated image."
    )


def window_radiograph(
    arr: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES, source: str = "the radiograph",
    *, in_place: bool = False,
) -> np.ndarray:
    """Robust windowing to [0, 1] between two percentiles of the image's values (:func:`window_bounds`).

    Args:
        arr: (H, W) any intensity units, bright = attenuating.
        source: how a message names the image.
        in_place: window a float32 ``arr`` itself (the caller's own copy): no second image in memory.

    Raises:
        InputError: nothing to window (:func:`window_bounds`).
    """
    arr = np.asarray(arr, dtype=np.float32)
    lo, hi = window_bounds(arr, source, percentiles)
    out = arr if in_place else np.empty_like(arr)
    for r0 in range(0, arr.shape[0], WINDOW_BLOCK_ROWS):  # float64 per block, not for the whole image
        rows = slice(r0, r0 + WINDOW_BLOCK_ROWS)
        out[rows] = np.clip((arr[rows] - lo) / (hi - lo), 0.0, 1.0)
    return out


def _interpolate(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``arr`` (H, W) resampled to ``size`` (rows, cols): bilinear, antialiased when shrinking."""
    import torch  # here, so that reading and checking radiographs (the Slicer module's input check) need no torch
    import torch.nn.functional as F

    arr = np.asarray(arr, dtype=np.float32)
    if any(stride < 0 for stride in arr.strides):  # torch takes positive strides only
        arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # torch warns of a read-only array (interpolate only reads it): one 2D copy
        arr = arr.copy()
    t = torch.from_numpy(arr)[None, None]  # a crop of a larger image is not copied: interpolate reads it strided
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


def square_pixels(rad: Radiograph) -> tuple[Radiograph, str]:
    """Resample a radiograph whose pixels are not square (a pixel spacing of 0.4 x 0.2 mm, a DICOM PixelAspectRatio
    of 2\\1) to square pixels of its finer spacing, so that the chest keeps its shape and every later crop reasons
    in millimetres; a radiograph of square pixels, or of unknown ones, is returned as it is.

    Returns:
        ``(radiograph, what was done or "")``.
    """
    size = rad.pixel_spacing or rad.metadata.get("pixel_aspect")
    if size is None:
        return rad, ""
    row, col = float(size[0]), float(size[1])
    if np.isclose(row, col, rtol=SQUARE_PIXEL_TOLERANCE):
        return rad, ""
    h, w = rad.shape
    fine = min(row, col)
    rows, cols = max(1, round(h * row / fine)), max(1, round(w * col / fine))
    arr = np.clip(_interpolate(rad.array, (rows, cols)), 0.0, 1.0)
    spacing = None if rad.pixel_spacing is None else (h * row / rows, w * col / cols)
    said = f"{row:g} x {col:g} mm" if rad.pixel_spacing is not None else f"{row:g}:{col:g} (PixelAspectRatio)"
    note = (f"resampled from {h}x{w} to {rows}x{cols} pixels to make its pixels square: they are {said} "
            "(height x width)")  # fmt: skip
    return Radiograph(arr, spacing, {**rad.metadata, "square_pixels_from": [h, w]}, rad.kind), note


#: Side (pixels) of the coarse grid on which the exposed region is found (the image is block-averaged down to it).
REGION_GRID = 256
#: Pixels at or below this share of the way from the image's darkest value to its bright end (99.5th percentile) are
#: background: a black border or canvas around the exposed field (air in the attenuation style is dark too).
BACKGROUND_LEVEL = 0.02
#: Side of the opening (a share of the coarse grid's side) that cuts burned-in text, markers and lines in the
#: background from the exposed region before the largest connected region is taken.
REGION_OPENING = 0.015
#: The exposed region is cropped to when more than this share of the square the model would otherwise see (the
#: image's middle square) lies outside it. Radiographs and training-geometry DRRs stay below it (cxr-pa 0%, the
#: DRRs of the sample CTs 5-8%, the ct-topogram sample, whose bottom 30% lies beyond its scan, 30%).
CROP_BACKGROUND_SHARE = 0.4
#: An exposed region below this share of the image is no chest (noise, a label): nothing is cropped.
MIN_REGION_SHARE = 0.05
#: An exposed region whose pixels (in [0, 1]) vary less than this (standard deviation) is a flat field, not anatomy:
#: nothing is cropped (a chest radiograph's varies by about 0.2).
MIN_REGION_CONTRAST = 0.02


@dataclass(frozen=True)
class ExposedRegion:
    """Where a radiograph's exposed body region lies.

    Attributes:
        box: ``(row0, row1, col0, col1)`` of the region's bounding box in pixels (ends exclusive).
        share_outside: the share of the image's middle square (what the model would see without a crop) outside
            the box.
        share_of_image: the box's share of the image's area.
    """

    box: tuple[int, int, int, int]
    share_outside: float
    share_of_image: float


def _block_means(arr: np.ndarray, f: int) -> np.ndarray:
    """``(ceil(H/f), ceil(W/f))`` means of ``f x f`` blocks of ``arr`` (H, W), an edge block padded with its last row
    and column (``np.pad(mode="edge")``); one band of ``f`` rows at a time, never a padded copy of the whole image."""
    h, w = arr.shape
    rows, cols = -(-h // f), -(-w // f)
    small = np.empty((rows, cols), np.float32)
    for i in range(rows):
        band = arr[i * f : (i + 1) * f]
        pad = ((0, f - band.shape[0]), (0, cols * f - w))
        if pad != ((0, 0), (0, 0)):
            band = np.pad(band, pad, mode="edge")
        small[i] = band.reshape(f, cols, f).mean(axis=(0, 2))
    return small


def exposed_region(arr: np.ndarray) -> ExposedRegion | None:
    """The exposed region of a radiograph: the bounding box of the largest connected region of pixels brighter than
    the background (:data:`BACKGROUND_LEVEL`), after an opening that cuts burned-in text and markers lying in the
    background from it; found on a block-averaged copy of at most :data:`REGION_GRID` pixels a side, then trimmed to
    the full-resolution pixels. None when the image holds no such region.

    Args:
        arr: ``(H, W)`` attenuation style (background dark).
    """
    from scipy import ndimage  # on first use: reading and checking radiographs needs no scipy

    h, w = arr.shape
    f = max(1, int(np.ceil(max(h, w) / REGION_GRID)))
    rows, cols = -(-h // f), -(-w // f)
    small = _block_means(arr, f)
    low, high = float(arr.min()), float(np.percentile(small, 99.5))
    if high <= low:
        return None
    level = low + BACKGROUND_LEVEL * (high - low)
    k = max(3, round(REGION_OPENING * max(rows, cols)) | 1)
    foreground = ndimage.binary_opening(small > level, structure=np.ones((k, k), bool))
    labels, n = ndimage.label(foreground, structure=np.ones((3, 3), bool))
    if n == 0:
        return None
    largest = 1 + int(np.argmax(ndimage.sum_labels(foreground, labels, index=np.arange(1, n + 1))))
    r_idx, c_idx = np.nonzero(labels == largest)
    r0, r1 = int(r_idx.min()) * f, min(h, (int(r_idx.max()) + 1) * f)
    c0, c1 = int(c_idx.min()) * f, min(w, (int(c_idx.max()) + 1) * f)
    # the coarse box is whole blocks: trim its edge blocks to the first and last full-resolution rows and columns
    # that hold exposed pixels
    inside = arr[r0:r1, c0:c1]  # a view: "any pixel above the level" is "the largest above it", with no mask copy
    row_any, col_any = inside.max(axis=1) > level, inside.max(axis=0) > level
    if row_any.any() and col_any.any():
        top, bottom = int(np.argmax(row_any)), len(row_any) - int(np.argmax(row_any[::-1]))
        left, right = int(np.argmax(col_any)), len(col_any) - int(np.argmax(col_any[::-1]))
        r0, r1 = r0 + min(top, f), r0 + max(bottom, len(row_any) - f)
        c0, c1 = c0 + min(left, f), c0 + max(right, len(col_any) - f)
    side = min(h, w)
    s0, t0 = (h - side) // 2, (w - side) // 2
    overlap = max(0, min(r1, s0 + side) - max(r0, s0)) * max(0, min(c1, t0 + side) - max(c0, t0))
    return ExposedRegion((r0, r1, c0, c1), 1.0 - overlap / side**2, (r1 - r0) * (c1 - c0) / (h * w))


def crop_to_exposed_region(rad: Radiograph) -> tuple[Radiograph, str]:
    """Crop a radiograph to its exposed region (:func:`exposed_region`) when more than
    :data:`CROP_BACKGROUND_SHARE` of the square the model would otherwise see is background around it: a small chest
    on a large black frame, a radiograph pasted on a black canvas with burned-in text. Otherwise it is returned as it
    is (so are radiographs whose field is exposed to its edges and DRRs of the training geometry).

    Returns:
        ``(radiograph, a warning saying what was cropped and why, or "")``.
    """
    region = exposed_region(rad.array)
    if region is None or region.share_outside <= CROP_BACKGROUND_SHARE or region.share_of_image < MIN_REGION_SHARE:
        return rad, ""
    r0, r1, c0, c1 = region.box
    if min(r1 - r0, c1 - c0) < MIN_RADIOGRAPH_SIDE:
        return rad, ""
    h, w = rad.shape
    arr = rad.array[r0:r1, c0:c1]
    if float(arr.std()) < MIN_REGION_CONTRAST:  # a flat field (a test pattern, a blank exposure): no anatomy to keep
        return rad, ""
    note = (
        f"the radiograph is mostly dark background ({100 * region.share_outside:.0f}% of its middle square lies "
        f"outside the exposed region): only that region is used, rows {r0}-{r1} and columns {c0}-{c1} "
        f"({r1 - r0}x{c1 - c0} of {h}x{w} pixels), leaving out the border and the text or markers burned into it. "
        "Crop the image to the chest if this region is not the chest."
    )
    return Radiograph(arr, rad.pixel_spacing, {**rad.metadata, "cropped_to": [r0, r1, c0, c1]}, rad.kind), note


#: A radiograph whose shorter side is below this share of its longer one loses much of itself to the square crop:
#: a warning says so (a crop that leaves out less, e.g. a portrait detector's 43x35 cm, gets an info line).
MIN_SQUARE_SHARE = 0.7


def square_crop_note(rad: Radiograph) -> tuple[int, str]:
    """What the square crop of :func:`resize_radiograph` leaves out of ``rad``: ``(logging level, text)``, a warning
    when the middle square is less than :data:`MIN_SQUARE_SHARE` of the longer side, else an info line; ``(DEBUG,
    "")`` for a square image. Millimetres are named when the pixel spacing is known (``rad`` has square pixels:
    :func:`square_pixels`)."""
    h, w = rad.shape
    if h == w:
        return logging.DEBUG, ""
    s, tall = min(h, w), h > w
    cut = max(h, w) - s
    first, second = cut // 2, cut - cut // 2  # as resize_radiograph crops: the odd row or column at the end
    mm = None if rad.pixel_spacing is None else float(rad.pixel_spacing[0] if tall else rad.pixel_spacing[1])
    unit = "rows" if tall else "columns"

    def amount(n: int) -> str:
        said = f"{n} {unit[:-1] if n == 1 else unit}"
        return said if mm is None else f"{n * mm:.0f} mm ({said})"

    ends = ("top", "bottom") if tall else ("left", "right")
    dropped = (f"{amount(first)} at the {ends[0]} and at the {ends[1]}" if first == second
               else f"{amount(first)} at the {ends[0]} and {amount(second)} at the {ends[1]}")  # fmt: skip
    if mm is not None:
        sides, middle = f"{h * mm:.0f}x{w * mm:.0f} mm ({h}x{w} pixels)", f"{s * mm:.0f}x{s * mm:.0f} mm"
    else:
        sides, middle = f"{h}x{w} pixels", f"{s}x{s}"
    share = 100.0 * s / max(h, w)
    if s < MIN_SQUARE_SHARE * max(h, w):
        return logging.WARNING, (
            f"the radiograph is {sides}: only its middle {middle} square is used ({share:.0f}% of the image), leaving "
            f"out {dropped}. A chest radiograph is about as wide as it is tall; crop the image to the chest if this is "
            "not one."
        )
    return logging.INFO, (f"the radiograph is {sides}: its middle {middle} square is used ({share:.0f}% of the image), "
                          f"leaving out {dropped}")  # fmt: skip


def resize_radiograph(rad: Radiograph, size: int | tuple[int, int], *, square: bool = True) -> Radiograph:
    """Centre-crop to a square (optional) and resize with antialiasing.

    Args:
        rad: input radiograph, of square pixels (:func:`square_pixels`) for the crop to keep the chest's shape.
        size: output side or (rows, cols).
        square: crop the longer side symmetrically first so the aspect ratio is kept (:func:`square_crop_note` says
            what that leaves out; the caller logs it).

    Returns:
        A new :class:`Radiograph`; pixel spacing rescaled when known.
    """
    arr = rad.array
    h, w = arr.shape
    if square and h != w:
        s = min(h, w)
        r0, c0 = (h - s) // 2, (w - s) // 2
        arr = arr[r0 : r0 + s, c0 : c0 + s]
        h = w = s
    rows, cols = (size, size) if isinstance(size, int) else size
    out = _interpolate(arr, (rows, cols))
    spacing = None
    if rad.pixel_spacing is not None:
        spacing = (rad.pixel_spacing[0] * h / rows, rad.pixel_spacing[1] * w / cols)
    return Radiograph(np.clip(out, 0, 1), spacing, {**rad.metadata, "resized_from": [h, w]}, rad.kind)


#: :func:`inversion_score` below this: the radiograph looks inverted (bones dark). Frontal chest radiographs and
#: DRRs score +0.14 (the ct-topogram sample) to +0.48, their inverted copies as much below 0; a non-chest image
#: scores near 0 (the shoulder-ap sample: 0.007) and is not called inverted.
INVERTED_SCORE = -0.05


def inversion_score(arr: np.ndarray) -> float:
    """How much brighter the middle column of a frontal chest radiograph (spine and mediastinum) is than the lung
    fields on either side of it: the median of the middle tenth of the width minus that of the bands at 20-35% and
    65-80% of the width, over 25-65% of the height. Positive in the attenuation style (bone bright); negative when
    the image is inverted (bones dark).

    Args:
        arr: ``(H, W)`` the model's square input, attenuation style, head up.
    """
    h, w = arr.shape
    band = arr[int(0.25 * h) : int(0.65 * h)]
    centre = band[:, int(0.45 * w) : int(0.55 * w)]
    lungs = np.concatenate([band[:, int(0.2 * w) : int(0.35 * w)].ravel(), band[:, int(0.65 * w) : int(0.8 * w)].ravel()])
    return float(np.median(centre) - np.median(lungs))


def inversion_note(arr: np.ndarray, invert: bool = False) -> str:
    """What to say of a frontal model input that looks inverted (:func:`inversion_score` below
    :data:`INVERTED_SCORE`), or ``""``. A chest radiograph turned by 90° (sideways, with no header to turn it upright:
    a PNG, a photo) scores low too, since its spine and heart run across the image: when the image's transpose scores
    higher than the image scores low (its middle *row* is the bright band), the note says it may be sideways or
    inverted and how to fix either; an upright inverted chest scores near 0 transposed and is called inverted. Nothing
    is refused.

    Args:
        arr: ``(H, W)`` the model's square input, attenuation style.
        invert: the input was inverted as asked (``--invert``).
    """
    score = inversion_score(arr)
    if score >= INVERTED_SCORE:
        return ""
    asked = " (it was inverted as asked: --invert, 'Invert intensities')" if invert else ""
    if inversion_score(np.ascontiguousarray(arr.T)) > -score:
        return (f"the radiograph looks turned sideways, or inverted{asked}: its middle column is darker than the bands "
                "beside it, while its middle row is brighter than those above and below it, as in a chest radiograph "
                "turned by 90° (spine and heart running across). If the chest lies sideways, turn it upright (head at "
                "the top; e.g. rotate it by 90° in an image viewer, or with 3D Slicer's Transforms module) and run it "
                "again; if it is upright and its bones are dark, run it again "
                f"{'without --invert' if invert else 'with --invert (in Slicer: tick Invert intensities)'}")  # fmt: skip
    fix = ("it was inverted as asked (--invert, 'Invert intensities'): run it without" if invert else
           "if its bones are dark, run it again with --invert (in Slicer: tick 'Invert intensities')")  # fmt: skip
    return (f"the radiograph looks inverted (bones dark): the middle of the chest (spine, heart) is darker than the lung "
            f"fields beside it; {fix}")  # fmt: skip


def invert_radiograph(rad: Radiograph) -> Radiograph:
    """The radiograph with its intensities inverted (for an image whose bones appear dark)."""
    return Radiograph((1.0 - rad.array).astype(np.float32), rad.pixel_spacing, {**rad.metadata, "inverted": True},
                      rad.kind)


def match_drr_style(
    image: np.ndarray, reference: np.ndarray | None = None, source: str = "the radiograph"
) -> np.ndarray:
    """Map a real radiograph's intensities onto the DRR style (quantile matching).

    Args:
        image: (H, W) in [0, 1] (e.g. :attr:`Radiograph.array`).
        reference: a DRR in attenuation style to match (its histogram); None only windows the image.
        source: how a message names ``image`` (:func:`window_bounds`).

    Returns:
        (H, W) float32 in [0, 1] whose value distribution follows ``reference``.
    """
    img = window_radiograph(np.asarray(image, dtype=np.float32), source=source)
    if reference is None:
        return img
    qs = np.linspace(0.0, 1.0, 257)
    src_q = np.quantile(img, qs)
    ref_q = np.quantile(np.asarray(reference, dtype=np.float32), qs)
    src_q = np.maximum.accumulate(src_q + np.arange(qs.size) * 1e-9)  # strictly increasing for interp
    return np.clip(np.interp(img, src_q, ref_q), 0.0, 1.0).astype(np.float32)


def as_radiograph(image: Radiograph | np.ndarray | str | os.PathLike) -> Radiograph:
    """A :class:`Radiograph` from a radiograph, a path, or a (H, W) array (windowed to [0, 1]).

    Raises:
        InputError: the array is not one radiograph; a list of images or a stack ``(N, H, W)`` of a few gets
            "one radiograph per call".
    """
    if isinstance(image, Radiograph):
        return image
    if isinstance(image, str | os.PathLike):
        return read_radiograph(image)
    if isinstance(image, list | tuple) and image and not np.isscalar(image[0]) and (
        isinstance(image[0], Radiograph | str | os.PathLike) or np.ndim(image[0]) >= 2
    ):
        raise InputError(_stack_message(f"the {type(image).__name__} holds {len(image)} images"))
    shape = np.shape(image)
    if len(shape) == 3 and 1 < shape[0] <= MAX_STACK_IMAGES < min(shape[1:]) and shape[-1] not in COLOUR_CHANNELS:
        raise InputError(_stack_message(f"the array looks like a stack of {shape[0]} 2D images of "
                                        f"{shape[1]}x{shape[2]} pixels (shape {tuple(shape)})"))  # fmt: skip
    arr = radiograph_pixels(image, "the array")
    if arr.min() < 0 or arr.max() > 1:
        arr = window_radiograph(arr)
    return Radiograph(arr, None, {"source": "array"}, "drr")
