"""Real radiographs: reading (DICOM CR/DX, PNG, JPEG), windowing, resizing and matching to the DRR style.

The model sees radiographs in the *attenuation style* of :func:`DiffusionCore.xray.drr.radiograph_style`:
a float32 (H, W) image in [0, 1], air dark (0), dense bone bright (~1), rows superior first, columns the
patient's right first for a PA view. Real images are brought there by: MONOCHROME1 inversion (DICOM, done by SimpleITK's reader),
robust percentile windowing, optional quantile matching to a reference DRR, then resizing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volume import check_metaimage_header, is_localizer

logger = logging.getLogger(__name__)

#: Images smaller than this on either side are refused (a thumbnail or an icon, not a radiograph).
MIN_RADIOGRAPH_SIDE = 32
#: Percentiles used to window an image to [0, 1] (robust to collimator edges and burned-in labels).
WINDOW_PERCENTILES = (0.5, 99.5)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: Largest difference between the colour channels, as a share of the image's value range (at least one grey
#: level), at which a 3- or 4-channel image is still greyscale stored in colour (as image editors, screenshots and
#: JPEG exports save radiographs); beyond it the image is refused as colour.
GREY_CHANNEL_TOLERANCE = 0.01
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


@dataclass
class Radiograph:
    """A radiograph in attenuation style.

    Attributes:
        array: float32 (H, W) in [0, 1]; bright = more attenuation.
        pixel_spacing: (row, col) mm, or None when the file does not record it.
        metadata: provenance (source, photometric interpretation, modality, ...).
    """

    array: np.ndarray
    pixel_spacing: tuple[float, float] | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.ascontiguousarray(radiograph_pixels(self.array, self.metadata.get("source", "image")))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[0]), int(self.array.shape[1])


def greyscale_pixels(arr: np.ndarray, source: str = "image") -> np.ndarray:
    """``(H, W)`` float32 from an ``(H, W, C)`` image with 2-4 channels stored per pixel: the grey channel of a
    grey + alpha image, or the mean of red, green and blue when they agree to within
    :data:`GREY_CHANNEL_TOLERANCE` (greyscale saved in colour); alpha is ignored.

    Raises:
        InputError: the colour channels differ (a photograph, a colour-mapped picture): not a radiograph.
    """
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape[-1] == 2:
        return np.ascontiguousarray(arr[..., 0])
    rgb = arr[..., :3]
    spread = float(rgb.max() - rgb.min()) if rgb.size else 0.0
    if float(np.abs(rgb - rgb[..., :1]).max(initial=0.0)) > max(1.0, GREY_CHANNEL_TOLERANCE * spread):
        raise InputError(
            f"{source} is a colour image (its red, green and blue differ); a radiograph is greyscale. Export it "
            "as a greyscale DICOM/PNG (or convert it, e.g. in 3D Slicer or an image editor) and try again."
        )
    return rgb.mean(axis=-1)


def radiograph_pixels(arr: np.ndarray, source: str = "image") -> np.ndarray:
    """The ``(H, W)`` float32 pixels of an array that is one greyscale radiograph: greyscale stored in colour
    (``(H, W, 3)`` or ``(H, W, 4)``) is converted (:func:`greyscale_pixels`) and single-slice axes are dropped.

    Raises:
        InputError: real colour, a 3D volume, fewer or more than 2 dimensions, a thumbnail, NaN or Inf.
    """
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = greyscale_pixels(arr, source)
    if arr.ndim == 3 and min(arr.shape) > 1:
        raise InputError(
            f"{source} is a 3D volume of shape {arr.shape}, not a radiograph. xray2ct needs one 2D "
            "projection image (a chest X-ray); to make a radiograph from a CT use the DRR tools."
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
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{source} contains NaN or infinite values; re-export the image.")
    return arr


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

    def axis(letter: str) -> frozenset:
        return frozenset((letter, _OPPOSITE[letter]))

    if want is None or directions is None or {axis(d) for d in directions} != {axis(d) for d in want}:
        return arr, spacing, ""  # not this view's axes (e.g. a lateral image called frontal): left alone
    row, col = directions
    done = []
    if axis(row) == axis(want[1]):  # the head-feet axis runs along the rows
        arr, row, col = arr.T, col, row
        spacing = None if spacing is None else (spacing[1], spacing[0])
        done.append("transposed")
    if row != want[0]:
        arr = arr[:, ::-1]
        done.append("flipped left-right" if view == "pa" else "flipped front-back")
    if col != want[1]:
        arr = arr[::-1, :]
        done.append("flipped upside down")
    return np.ascontiguousarray(arr), spacing, " and ".join(done)


def _check_size(p: Path, size: list[int], components: int) -> None:
    """Refuse, from the header alone, an image that cannot fit in memory (a corrupt header can claim
    billions of pixels) before it is decoded."""
    from ..files import check_memory_for

    pixels = int(np.prod(size, dtype=np.float64)) * max(1, components)
    check_memory_for(
        pixels * 16, f"decoding {p.name} ({'x'.join(map(str, size))} pixels)", "use a smaller image"
    )


def read_radiograph(path: str | os.PathLike) -> Radiograph:
    """Read a radiograph file into attenuation style.

    Args:
        path: DICOM (CR/DX/DX-like, any transfer syntax SimpleITK reads), PNG, JPEG, TIFF or BMP.

    Returns:
        :class:`Radiograph` with ``array`` (H, W) float32 in [0, 1] (MONOCHROME1 inverted, percentile
        windowed), ``pixel_spacing`` (row, col) mm from the DICOM header or None.

    Raises:
        InputError: missing/unreadable/corrupt file, colour image, 3D volume, image smaller than
            :data:`MIN_RADIOGRAPH_SIDE` pixels per side.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"radiograph {p} does not exist or is a folder; give the path of one image file.")
    check_metaimage_header(p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
        _check_size(p, [int(v) for v in reader.GetSize()], int(reader.GetNumberOfComponents()))
        img = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"cannot read {p} as an image ({first[:200]}). The file is corrupt or not a DICOM/PNG/JPEG "
            "radiograph; re-export it from the PACS or viewer."
        ) from exc
    is_dicom = reader.GetImageIO() == "GDCMImageIO" or p.suffix.lower() == ".dcm"
    tags = _dicom_tags(reader) if is_dicom else {}
    check_projection_modality(tags, p.name)  # before the pixel checks: a colour ultrasound is refused as ultrasound
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if img.GetNumberOfComponentsPerPixel() > 1:  # greyscale saved in colour (grey + alpha too); real colour refused
        arr = greyscale_pixels(arr, p.name)
    arr = radiograph_pixels(arr, p.name)
    # MONOCHROME1 (high values display dark): SimpleITK's GDCM reader already returns such images inverted
    # to MONOCHROME2 semantics (2^BitsStored - 1 - value), so bright = attenuating here for both; checked
    # on a crafted MONOCHROME1 file in Testing/test_xray_cli.py.
    arr, spacing, meta = apply_dicom_header(arr, header_spacing(tags), tags, p.name)
    meta = {"source": str(p), "format": "dicom" if is_dicom else p.suffix.lower().lstrip("."), **meta}
    return Radiograph(window_radiograph(arr), spacing, meta)


def apply_dicom_header(
    arr: np.ndarray, spacing: tuple[float, float] | None, tags: dict[str, str], name: str
) -> tuple[np.ndarray, tuple[float, float] | None, dict]:
    """What a DICOM radiograph's header says, applied to its pixels (in the file's row and column order): the
    modality checked (:func:`check_projection_modality`), the view read (:func:`header_view`) and the image turned
    to the model's orientation (:func:`orient_to_model`).

    Returns:
        ``(array, (row, col) spacing, metadata)``: the header's tags, with ``view`` and ``view_from`` when it gives a
        view and ``oriented`` when the image was turned.

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
    arr, spacing, turned = orient_to_model(arr, spacing, directions, meta.get("view"))
    if turned:
        meta["oriented"] = f"{turned} to the model's orientation, as its header says ({directions[0]}\\{directions[1]})"  # type: ignore[index]
        logger.info("%s: %s", name, meta["oriented"])
    return arr, spacing, meta


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
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{p} is not a readable DICOM file; give the DICOM file the radiograph was loaded from.") from exc
    return _dicom_tags(reader)


def window_radiograph(arr: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> np.ndarray:
    """Robust windowing to [0, 1] between two percentiles of the image's values.

    Args:
        arr: (H, W) any intensity units, bright = attenuating.
    """
    lo, hi = np.percentile(arr, percentiles)
    if hi <= lo:
        raise InputError("the radiograph is blank (all pixels have the same value); check the file.")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


#: A radiograph whose shorter side is below this share of its longer one loses much of itself to the square crop.
MIN_SQUARE_SHARE = 0.7


def resize_radiograph(rad: Radiograph, size: int | tuple[int, int], *, square: bool = True) -> Radiograph:
    """Centre-crop to a square (optional) and resize with antialiasing.

    Args:
        rad: input radiograph.
        size: output side or (rows, cols).
        square: crop the longer side symmetrically first so the aspect ratio is kept.

    Returns:
        A new :class:`Radiograph`; pixel spacing rescaled when known.
    """
    arr = rad.array
    h, w = arr.shape
    if square and h != w:
        s = min(h, w)
        if s < MIN_SQUARE_SHARE * max(h, w):
            logger.warning(
                "the radiograph is %dx%d pixels: only its middle %dx%d square is used (%.0f%% of the image). A chest "
                "radiograph is about as wide as it is tall; crop the image to the chest if this is not one.",
                h, w, s, s, 100.0 * s / max(h, w),
            )  # fmt: skip
        r0, c0 = (h - s) // 2, (w - s) // 2
        arr = arr[r0 : r0 + s, c0 : c0 + s]
        h = w = s
    import torch  # here, so that reading and checking radiographs (the Slicer module's input check) need no torch
    import torch.nn.functional as F

    rows, cols = (size, size) if isinstance(size, int) else size
    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    out = F.interpolate(t, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    spacing = None
    if rad.pixel_spacing is not None:
        spacing = (rad.pixel_spacing[0] * h / rows, rad.pixel_spacing[1] * w / cols)
    return Radiograph(out.clamp(0, 1).numpy(), spacing, {**rad.metadata, "resized_from": [h, w]})


def match_drr_style(image: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Map a real radiograph's intensities onto the DRR style (quantile matching).

    Args:
        image: (H, W) in [0, 1] (e.g. :attr:`Radiograph.array`).
        reference: a DRR in attenuation style to match (its histogram); None only windows the image.

    Returns:
        (H, W) float32 in [0, 1] whose value distribution follows ``reference``.
    """
    img = window_radiograph(np.asarray(image, dtype=np.float32))
    if reference is None:
        return img
    qs = np.linspace(0.0, 1.0, 257)
    src_q = np.quantile(img, qs)
    ref_q = np.quantile(np.asarray(reference, dtype=np.float32), qs)
    src_q = np.maximum.accumulate(src_q + np.arange(qs.size) * 1e-9)  # strictly increasing for interp
    return np.clip(np.interp(img, src_q, ref_q), 0.0, 1.0).astype(np.float32)


def as_radiograph(image: Radiograph | np.ndarray | str | os.PathLike) -> Radiograph:
    """A :class:`Radiograph` from a radiograph, a path, or a (H, W) array (windowed to [0, 1])."""
    if isinstance(image, Radiograph):
        return image
    if isinstance(image, str | os.PathLike):
        return read_radiograph(image)
    arr = radiograph_pixels(image, "the array")
    if arr.min() < 0 or arr.max() > 1:
        arr = window_radiograph(arr)
    return Radiograph(arr, None, {"source": "array"})
