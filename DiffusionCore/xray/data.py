"""Training data for the X-ray cascade: CT cubes per stage and the DRRs rendered from them.

* :func:`ct_to_cube` resamples a CT onto a cube of ``fov_mm`` side centred on the volume's centre left-right and
  head-foot and on the body front-to-back, axes aligned with the patient (LPS, array (z, y, x) with z
  superior-increasing), Gaussian-prefiltered so a 512^2 scan does not alias at 64^3.
* :func:`render_training_drr` renders the training-geometry radiograph (axis-aligned parallel beam, or the
  ray marcher with a pose jitter) and applies radiograph augmentation (gain/gamma, scatter-like blur, noise).
* :class:`XrayCubeDataset` draws augmented (cube, DRR) pairs: CT flips, small rotations, body-habitus zoom per axis,
  smooth elastic deformation, HU jitter.
* :func:`prepare_dataset` writes the cubes (NIfTI, int16 HU) and DRRs (``.npy``) plus ``manifest.json``.
* :func:`cube_size_problem` and :func:`body_fraction` say what makes a CT unusable (too few voxels along an axis:
  refused, or passed over in a cohort) or of little use (a body filling little of the cube: a warning) here.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..errors import InputError, OutputExistsError
from ..inputs import done_through
from ..intensity import hu_to_unit
from ..train.augment import rotation_matrix
from ..volume import AIR_HU, Volume, write_volume
from .config import XrayDataConfig
from .drr import DRRGeometry, hu_to_mu, project_parallel_axis, radiograph_style, render_drr

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def cube_grid_geometry(resolution: int, fov_mm: float, centre_lps: np.ndarray) -> tuple[tuple, tuple]:
    """(spacing (x, y, z), origin (x, y, z)) of an identity-direction cube centred on ``centre_lps``."""
    sp = fov_mm / resolution
    origin = tuple(float(c - (resolution - 1) / 2 * sp) for c in centre_lps)
    return (sp, sp, sp), origin


def volume_centre(vol: Volume) -> np.ndarray:
    """Physical LPS point (mm) at the centre of the volume's voxel grid."""
    idx = (np.array(vol.shape[::-1], dtype=np.float64) - 1) / 2
    return np.asarray(vol.origin) + vol.direction @ (np.asarray(vol.spacing) * idx)


#: The coarse cube that finds the body's front-to-back extent (:func:`body_ap_offset`): voxels per side, and its
#: side as a multiple of the cube's (wider, so a body that the cube would cut still shows its whole extent).
BODY_PROBE_RESOLUTION = 96
BODY_PROBE_FOV = 1.5


def body_ap_offset(cube: Volume) -> float:
    """How far (mm, along LPS y: + posterior) the middle of the body lies from the centre of an identity-direction
    cube: the middle of the front-to-back extent of its body mask (:func:`~DiffusionCore.metrics.body_mask` of the bare
    voxels, each counted as 1 mm: HU > -500, the table apart from the patient left out). 0 when the cube holds no body."""
    from ..metrics import body_mask

    rows = np.flatnonzero(body_mask(cube.array).any(axis=(0, 2)))  # array (z, y, x): y is axis 1
    if rows.size == 0:
        return 0.0
    return float((rows[0] + rows[-1]) / 2 - (cube.shape[1] - 1) / 2) * float(cube.spacing[1])


#: Fewest voxels a CT may have along any axis: the Gaussian filter that keeps a fine scan from aliasing on the cube
#: (:func:`_resample_cube`) needs 4. A CT that thin is a slab of a few centimetres at most; one that passes but fills
#: little of the cube is warned about (:func:`warn_little_body`).
MIN_CT_VOXELS = 4

#: What X-ray to CT was made for, said when a CT is refused or warned about (chest-lidc: 133 slices of 2.5 mm,
#: chest-dx: 64 of 5 mm).
WHOLE_CHEST = "CTs of the whole chest (about 300 mm head to foot, e.g. 60 slices of 5 mm)"

#: Share of the cube's voxels inside the body (:func:`body_fraction`) below which a CT is warned about. Measured on
#: the 64^3 cube of 350 mm: a whole chest fills 44% (chest-lidc) to 50% (chest-dx); half its length 23%, a quarter
#: 12%, its middle 180 mm across 17%, a 96x96x40 crop (68 x 68 x 100 mm) 0.8%. Below 20% four fifths of the cube
#: are air outside the body, which any method matches, so scores on it are inflated (xray-default's 3D SSIM on that
#: crop 0.88, on the whole chest 0.62) and training on it teaches mostly air.
MIN_BODY_FRACTION = 0.2
WHOLE_CHEST_BODY = "44-50%"  # of the cube, as measured above

_AXES = ("slices along z", "voxels along y", "voxels along x")  # array (z, y, x)


def cube_size_problem(shape: tuple[int, int, int]) -> str:
    """Why a CT of array shape ``(z, y, x)`` is too small to resample onto a cube (e.g. ``"3 slices along z"``), or
    ``""`` when it is not."""
    short = [f"{n} {axis}" for n, axis in zip(shape, _AXES) if n < MIN_CT_VOXELS]
    return " and ".join(short)


def too_small_message(name: str, why: str) -> str:
    """The refusal of a CT that :func:`cube_size_problem` finds too small (``why``), named ``name``."""
    return (
        f"{name} has {why}: X-ray to CT needs a CT volume of at least {MIN_CT_VOXELS} voxels along each axis to "
        f"resample it onto its cube, and was made for {WHOLE_CHEST}; give such a CT"
    )


def check_cube_size(vol: Volume, name: str) -> None:
    """Raise InputError naming ``name`` when ``vol`` is too small for the cube (:func:`cube_size_problem`)."""
    why = cube_size_problem(vol.shape)
    if why:
        raise InputError(too_small_message(name, why))


def body_fraction(cube: Volume | np.ndarray) -> float:
    """Share (0..1) of a cube's voxels inside the body (:func:`~DiffusionCore.metrics.body_mask` of the bare voxels:
    HU > -500 without the table, holes such as the lungs filled). Size-independent: the 64^3 cube is enough."""
    from ..metrics import body_mask

    return float(body_mask(cube.array if isinstance(cube, Volume) else cube).mean())


def warn_little_body(cube: Volume | np.ndarray, name: str, fov_mm: float, consequence: str) -> float:
    """Warn when the body of ``name`` fills less than :data:`MIN_BODY_FRACTION` of its cube; returns the share.

    Args:
        cube: the CT's cube (any resolution) in HU.
        name: the CT as the user knows it.
        fov_mm: the cube's side.
        consequence: what follows for the command (:data:`SCORES_ON_AIR`, :data:`TRAINING_ON_AIR`).
    """
    share = body_fraction(cube)
    if share < MIN_BODY_FRACTION:
        percent = f"{100 * share:.0f}" if share >= 0.01 else f"{100 * share:.1f}"
        logger.warning("%s: its body fills only %s%% of the %g mm cube that X-ray to CT works on (a whole chest "
                       "fills %s): %s", name, percent, fov_mm, WHOLE_CHEST_BODY, consequence)  # fmt: skip
    return share


#: What the scores of a reference whose body fills little of the cube mean (:func:`warn_little_body`).
SCORES_ON_AIR = (
    f"the scores then measure mostly air, which any method matches, and the model was trained on {WHOLE_CHEST}: "
    "score against such a CT"
)

#: What a training CT whose body fills little of the cube teaches (:func:`warn_little_body`).
TRAINING_ON_AIR = f"the model learns mostly air from it, where X-ray to CT is meant for {WHOLE_CHEST}"


def named_volumes(data: str | os.PathLike | Iterable[str | os.PathLike]) -> set[Path]:
    """The volumes that ``data`` (as :func:`~DiffusionCore.inputs.collect_volumes` takes it) names itself: a volume
    file, a DICOM series folder or file, a sample's name; not those found in a folder or a list file. A named volume
    that cannot be used stops the run; one of a cohort is passed over (:func:`usable_volumes`)."""
    from ..inputs import is_dicom_file, is_volume_file
    from ..sampledata import sample_or_path

    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    named = set()
    for item in items:
        p = sample_or_path(item, "ct").expanduser()
        named.add(p.parent if p.is_file() and is_dicom_file(p) and not is_volume_file(p) else p)
    return named


def usable_volumes(paths: Iterable[Path], named: Iterable[Path] = ()) -> Iterator[tuple[Path, Volume]]:
    """:func:`~DiffusionCore.inputs.readable_volumes` without the CTs too small for the cube (:func:`cube_size_problem`).

    A too small volume of ``named`` (given by name on the command line) stops the run (InputError); one of a cohort
    (found in a folder or a list) is passed over with a warning naming it and why, as an unreadable series is, and
    the run goes on with the rest; if none is left: InputError listing why each was passed over.
    """
    from ..inputs import readable_volumes

    named = set(named)
    short: list[str] = []
    yielded = False
    for p, vol in readable_volumes(paths):
        why = cube_size_problem(vol.shape)
        if why:
            if Path(p) in named:
                raise InputError(too_small_message(str(p), why))
            short.append(f"{p}: {why}")
            logger.warning("passed over %s: it has %s, and X-ray to CT needs at least %d voxels along each axis "
                           "and was made for %s", p, why, MIN_CT_VOXELS, WHOLE_CHEST)  # fmt: skip
            continue
        yielded = True
        yield p, vol
    if not yielded and short:
        raise InputError(
            f"none of the CT volumes is large enough for X-ray to CT (at least {MIN_CT_VOXELS} voxels along each "
            f"axis; it was made for {WHOLE_CHEST}): " + "; ".join(short)
        )


def ct_to_cubes(vol: Volume, resolutions: list[int] | tuple[int, ...], fov_mm: float, *,
                body_centred: bool = True) -> dict[int, Volume]:
    """Resample a CT (HU) onto isotropic cubes of side ``fov_mm``, one per resolution (air outside), all centred on
    the same point (found once).

    Args:
        vol: CT volume in HU.
        resolutions: voxels per side of each cube.
        fov_mm: cube side in mm.
        body_centred: move the cubes front-to-back so the body's extent is centred in them. Where the patient lies
            in the scan's field of view front-to-back depends on the table height; a frontal radiograph does
            not show it, so a generated CT cannot know it, and training on it would teach an offset that no
            input decides. Left-right and head-foot stay on the volume's centre (the radiograph shows them).

    Returns:
        ``{R: Volume (R, R, R) HU}``, spacing fov/R, identity direction, centred on the input's centre
        (front-to-back on the body's middle when ``body_centred``).

    Raises:
        InputError: ``vol`` has fewer than :data:`MIN_CT_VOXELS` voxels along an axis.
    """
    check_cube_size(vol, str(vol.metadata.get("source") or "the CT volume"))
    centre = volume_centre(vol)
    if body_centred:
        probe = _resample_cube(vol, BODY_PROBE_RESOLUTION, BODY_PROBE_FOV * fov_mm, centre)
        centre = centre + np.array([0.0, body_ap_offset(probe), 0.0])
    return {int(r): _resample_cube(vol, int(r), fov_mm, centre) for r in resolutions}


def ct_to_cube(vol: Volume, resolution: int, fov_mm: float, *, body_centred: bool = True) -> Volume:
    """One cube of :func:`ct_to_cubes` (same arguments, one resolution)."""
    return ct_to_cubes(vol, [resolution], fov_mm, body_centred=body_centred)[int(resolution)]


def _resample_cube(vol: Volume, resolution: int, fov_mm: float, centre: np.ndarray) -> Volume:
    """The ``resolution^3`` cube of side ``fov_mm`` centred on the LPS point ``centre`` (Gaussian-prefiltered)."""
    spacing, origin = cube_grid_geometry(resolution, fov_mm, centre)
    img = vol.to_sitk()
    sigmas = [max(0.0, 0.5 * (spacing[0] ** 2 - s**2)) ** 0.5 / s for s in vol.spacing]  # in voxels
    if max(sigmas) > 0.3:
        # ITK needs a positive width on every axis: an axis already as coarse as the cube gets a negligible one
        img = sitk.SmoothingRecursiveGaussian(img, [max(s, 1e-3) * sp for s, sp in zip(sigmas, vol.spacing)])
    ref = sitk.Image([resolution] * 3, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin)
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    return Volume.from_sitk(out, source="cube", cube_of=vol.metadata.get("source", ""))


def render_training_drr(
    cube_hu: torch.Tensor,
    fov_mm: float,
    xray_resolution: int,
    view: str = "pa",
    *,
    rng: np.random.Generator | None = None,
    aug: XrayDataConfig | None = None,
) -> torch.Tensor:
    """Training-geometry radiograph(s) of HU cube(s), in attenuation style.

    Args:
        cube_hu: (B, 1, R, R, R) HU.
        fov_mm: cube side, mm.
        xray_resolution: output side in pixels.
        view: ``pa`` or ``lateral``.
        rng: random generator for augmentation; None renders the clean DRR.
        aug: augmentation strengths (pose jitter, gain/gamma, blur, noise).

    Returns:
        (B, 1, X, X) in [0, 1].
    """
    r = cube_hu.shape[-1]
    sp = fov_mm / r
    mu = hu_to_mu(cube_hu.float())
    if rng is not None and aug is not None and aug.pose_jitter_deg > 0:
        angles = tuple(float(a) for a in rng.uniform(-aug.pose_jitter_deg, aug.pose_jitter_deg, 3))
        geom = DRRGeometry(view=view, rotation_deg=angles, step_voxels=1.0).with_detector_for(
            (r, r, r), (sp,) * 3
        )
        line = render_drr(mu, (sp,) * 3, geom)
    else:
        line = project_parallel_axis(mu, (sp,) * 3, view)
    if line.shape[-1] != xray_resolution:
        line = F.interpolate(
            line, size=(xray_resolution,) * 2, mode="bilinear", align_corners=False, antialias=True
        )
    img = radiograph_style(line)
    if rng is None or aug is None:
        return img
    b = img.shape[0]
    gain = torch.from_numpy(
        rng.uniform(1 - aug.intensity_jitter, 1 + aug.intensity_jitter, (b, 1, 1, 1))
    ).float()
    gamma = torch.from_numpy(
        rng.uniform(1 - aug.intensity_jitter, 1 + aug.intensity_jitter, (b, 1, 1, 1))
    ).float()
    img = (img.clamp_min(0) ** gamma * gain).clamp(0, 1)
    if aug.blur_sigma_px > 0:
        sigma = float(rng.uniform(0, aug.blur_sigma_px))
        if sigma > 0.2:
            img = gaussian_blur(img, sigma)
    if aug.noise_std > 0:
        img = img + torch.from_numpy(rng.normal(0, aug.noise_std, img.shape)).float()
    img = img.clamp(0, 1)
    if aug.processing > 0:
        for i in range(b):
            if rng.random() < aug.processing:
                ranges = (*PROCESSING_RANGES, (0.0, float(aug.processing_flatten)))
                look = (float(rng.uniform(lo, hi)) for lo, hi in ranges)
                img[i : i + 1] = clinical_look(img[i : i + 1], *look)
    return img


#: Ranges of the clinical-look augmentation (``data.processing``), uniform: unsharp-mask amount and its Gaussian
#: sigma in pixels of a 128^2 radiograph. How much of the broad (``FLATTEN_SIGMA_PX``) variation is removed is drawn
#: in ``[0, data.processing_flatten]`` (0.7 by default).
PROCESSING_RANGES = ((0.0, 3.0), (1.0, 6.0))
FLATTEN_SIGMA_PX = 16.0

#: The fixed look that ``benchmarks/xray_eval.py evaluate --processed`` gives the DRR of a reference CT: amount,
#: sigma (pixels of 128^2) and flattening, mid-range of :data:`PROCESSING_RANGES` and of the default flattening range.
CLINICAL_LOOK = (1.5, 3.0, 0.4)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images or (B, C, D, H, W) volumes, edges replicated (also for
    kernels wider than the image)."""
    k = int(2 * round(3 * sigma) + 1)
    x = torch.arange(k, dtype=img.dtype, device=img.device) - k // 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    c, nd = img.shape[1], img.dim() - 2
    conv = F.conv2d if nd == 2 else F.conv3d
    for axis in range(nd):
        dim = img.dim() - 1 - axis
        shape = [1] * nd
        shape[nd - 1 - axis] = k
        n = img.shape[dim]
        idx = torch.clamp(torch.arange(-(k // 2), n + k // 2, device=img.device), 0, n - 1)
        img = conv(img.index_select(dim, idx), g.view(1, 1, *shape).expand(c, 1, *shape), groups=c)
    return img


def clinical_look(img: torch.Tensor, amount: float, sigma_px: float, flatten: float) -> torch.Tensor:
    """A DRR made to look like a processed clinical radiograph, its value histogram kept.

    Clinical radiographs are shown after processing that a DRR lacks: unsharp masking sharpens edges (ribs,
    vessels, the lung borders) and the broad brightness differences (mediastinum against lungs) are partly
    flattened so that the spine shows through the heart. The image's values are then put back on its own
    histogram (each pixel takes the value of the same rank in the input), because a real radiograph's
    histogram is matched to a DRR's before the model sees it (``radiograph.match_drr_style``): what is left is
    the spatial look.

    Args:
        img: (B, 1, H, W) in [0, 1].
        amount: unsharp-mask gain (0: none).
        sigma_px: its Gaussian sigma in pixels of a 128^2 radiograph (scaled to the image's width).
        flatten: share of the variation over :data:`FLATTEN_SIGMA_PX` (pixels of 128^2, scaled the same way) that
            is removed (0: none; above 1 the broad profile is inverted, as in an equalised radiograph).
    """
    scale = img.shape[-1] / 128
    out = img
    if flatten > 0:
        broad = gaussian_blur(out, FLATTEN_SIGMA_PX * scale)
        out = out - flatten * (broad - broad.mean(dim=(-2, -1), keepdim=True))
    if amount > 0:
        out = out + amount * (out - gaussian_blur(out, sigma_px * scale))
    flat_in, flat_out = img.flatten(1), out.flatten(1)
    ranks = flat_out.argsort(dim=1)
    matched = torch.empty_like(flat_in).scatter_(1, ranks, flat_in.sort(dim=1).values)
    return matched.view_as(img)


class XrayCubeDataset:
    """Augmented (CT cube, DRR) pairs at the resolutions of one or more stages.

    Args:
        cubes: per CT, a dict ``resolution -> (R, R, R) HU array``.
        aug: augmentation settings.
        fov_mm: cube side (mm).
    """

    def __init__(self, cubes: list[dict[int, np.ndarray]], aug: XrayDataConfig, fov_mm: float):
        if not cubes:
            raise InputError("no training CT volumes: give at least one CT (file, DICOM folder or list)")
        self.cubes = cubes
        self.aug = aug
        self.fov_mm = fov_mm

    def __len__(self) -> int:
        return len(self.cubes)

    def sample(
        self,
        rng: np.random.Generator,
        batch: int,
        resolutions: list[int],
        xray_resolution: int,
        augment: bool = True,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """A batch: ``({R: (B, 1, R, R, R) model units}, (B, 1, X, X) DRR)``; the DRR is rendered from the
        finest requested cube after the same augmentation is applied to every resolution."""
        vols: dict[int, list[np.ndarray]] = {r: [] for r in resolutions}
        for _ in range(batch):
            item = self.cubes[int(rng.integers(len(self.cubes)))]
            flip = augment and self.aug.flip and rng.random() < 0.5
            scale = 1 + rng.uniform(-self.aug.hu_jitter, self.aug.hu_jitter) if augment else 1.0
            rot_seed = int(rng.integers(2**31))
            zoom = tuple(np.exp(rng.uniform(-self.aug.zoom_jitter, self.aug.zoom_jitter, size=3)))
            control = rng.standard_normal((3, *ELASTIC_CONTROL)) if self.aug.elastic_mm > 0 else None
            for r in resolutions:
                c = item[r]
                if augment and (self.aug.max_rotation_deg > 0 or self.aug.zoom_jitter > 0 or control is not None):
                    angles = np.random.default_rng(rot_seed).uniform(-1, 1, size=3) * self.aug.max_rotation_deg
                    c = warp_cube(c, angles, zoom, control, self.aug.elastic_mm / (self.fov_mm / r))
                if flip:
                    c = c[:, :, ::-1]
                c = (c - AIR_HU) * scale + AIR_HU
                vols[r].append(np.ascontiguousarray(c, dtype=np.float32))
        hu = {r: torch.from_numpy(np.stack(v))[:, None] for r, v in vols.items()}
        finest = max(resolutions)
        drr = render_training_drr(hu[finest], self.fov_mm, xray_resolution, self.aug.view,
                                  rng=rng if augment else None, aug=self.aug)  # fmt: skip
        return {r: hu_to_unit(h) for r, h in hu.items()}, drr


#: Control grid of the elastic augmentation: a displacement per axis at 6^3 points, upsampled to the cube, so the
#: field varies over about a quarter of the field of view and is the same at every resolution.
ELASTIC_CONTROL = (6, 6, 6)


@functools.lru_cache(maxsize=4)
def _centred_voxels(shape: tuple[int, int, int]) -> torch.Tensor:
    """(D, H, W, 3) float64 voxel positions (z, y, x) relative to the grid's centre (read-only; cached, since
    every training sample of a stage warps a cube of the same shape)."""
    axes = [torch.linspace(-1.0, 1.0, n, dtype=torch.float64) * (n - 1) / 2 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def warp_cube(
    cube: np.ndarray,
    angles_deg: np.ndarray,
    zoom_zyx: tuple[float, float, float],
    control: np.ndarray | None = None,
    std_voxels: float = 0.0,
) -> np.ndarray:
    """Rotate, zoom each axis and elastically deform ``cube`` (R, R, R) HU about its centre, in one resampling.

    Args:
        angles_deg: ``(about_z, about_y, about_x)`` (see :func:`~DiffusionCore.train.augment.rotation_matrix`).
        zoom_zyx: per-axis zoom of the anatomy (> 1 enlarges), applied before the rotation.
        control: (3, *ELASTIC_CONTROL) standard-normal displacements (z, y, x) or None for no deformation.
        std_voxels: displacement standard deviation in voxels of this cube (clipped at 3 sd).

    Returns:
        (R, R, R) float32 HU, air where the warp reads from outside the cube.
    """
    r = cube.shape
    # output voxel o reads input voxel c + Z^-1 R^T (o - c) + d(o)
    matrix = np.diag(1.0 / np.asarray(zoom_zyx, dtype=np.float64)) @ rotation_matrix(angles_deg).T
    src = _centred_voxels(r) @ torch.from_numpy(matrix).T
    if control is not None and std_voxels > 0:
        up = F.interpolate(torch.from_numpy(control)[None].double(), size=r, mode="trilinear", align_corners=True)
        disp = (up[0] / up[0].std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6) * std_voxels).clamp(
            -3 * std_voxels, 3 * std_voxels
        )
        src = src + disp.permute(1, 2, 3, 0)
    half = torch.tensor([(n - 1) / 2 for n in r], dtype=torch.float64)
    grid = (src / half).flip(-1)[None].float()  # grid_sample wants (x, y, z), normalised to [-1, 1]
    inp = torch.from_numpy(np.asarray(cube, dtype=np.float32) - AIR_HU)[None, None]
    out = F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy() + AIR_HU


def load_cubes(
    paths: list[Path], resolutions: list[int], fov_mm: float, named: Iterable[Path] = ()
) -> tuple[list[dict[int, np.ndarray]], list[Path]]:
    """Read CTs (or prepared cube folders) and resample them to every requested resolution; a CT too small for the
    cube stops the run if it is one of ``named``, else it is passed over (:func:`usable_volumes`).

    Returns:
        ``(cubes, used)``: one ``{resolution: cube}`` per CT used, and the paths of those CTs (not those passed over).
    """
    out, used = [], []
    for p, vol in usable_volumes(paths, named):
        cubes = ct_to_cubes(vol, resolutions, fov_mm)
        warn_little_body(cubes[min(resolutions)], str(p), fov_mm, TRAINING_ON_AIR)
        out.append({r: cube.array for r, cube in cubes.items()})
        used.append(p)
        logger.info("loaded %s as cubes %s", p, resolutions)
    return out, used


def prepare_dataset(
    ct_paths: list[Path],
    output_dir: str | os.PathLike,
    *,
    resolutions: tuple[int, ...] = (64, 128, 256),
    xray_resolutions: tuple[int, ...] = (128, 256, 512),
    fov_mm: float = 350.0,
    view: str = "pa",
    augmented_copies: int = 2,
    aug: XrayDataConfig | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress=None,
    named: Iterable[Path] = (),
) -> Path:
    """Write training cubes and DRRs for every CT; returns the manifest path.

    Layout: ``output_dir/<case>/cube_<R>.nii.gz`` (int16 HU), ``drr_<X>.npy`` (clean, float32 [0, 1]) and
    ``drr_<X>_aug<k>.npy`` (augmented), and ``output_dir/manifest.json`` listing every file and setting.

    A folder that already holds a prepared dataset (a manifest or case folders) is refused unless ``overwrite``; with
    it, the files of that dataset that the new manifest does not list (case folders of other CTs or of another order,
    DRRs of other sizes) are removed once the new manifest is written, so that the folder holds what it lists.

    A CT too small for the cube stops the run if it is one of ``named`` (given by name on the command line), else it
    is passed over with a warning (:func:`usable_volumes`). A run that stops (a refused CT, an error, a cancel)
    removes the folders it made: the case folders, and ``output_dir`` if it did not exist before.
    """
    out = Path(output_dir)
    earlier = prepared_contents(out)
    if earlier and not overwrite:
        shown = ", ".join(p.name for p in earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        raise OutputExistsError(
            out, f"already holds a prepared dataset ({shown})",
            "pass --overwrite to replace it (its case folders that the new manifest does not list are removed), or "
            "choose another --output-dir",
        )
    made = [] if out.exists() else [out]  # removed again if the run stops
    out.mkdir(parents=True, exist_ok=True)
    aug = aug or XrayDataConfig(view=view, fov_mm=fov_mm)
    rng = np.random.default_rng(seed)
    cases = []
    total, done = len(ct_paths), 0
    try:
        for i, (p, vol) in enumerate(usable_volumes(ct_paths, named)):
            name = Path(str(p).rstrip("/")).name.split(".")[0] or f"case{i:04d}"
            cubes = ct_to_cubes(vol, resolutions, fov_mm)
            warn_little_body(cubes[min(resolutions)], str(p), fov_mm, TRAINING_ON_AIR)
            case_dir = out / f"{i:04d}_{name}"
            if not case_dir.exists():
                case_dir.mkdir()
                made.append(case_dir)
            files: dict[str, str] = {}
            for r, x in zip(resolutions, xray_resolutions):
                cube = cubes[r]
                write_volume(cube, case_dir / f"cube_{r}.nii.gz", overwrite=overwrite, dtype="int16")
                files[f"cube_{r}"] = str((case_dir / f"cube_{r}.nii.gz").relative_to(out))
                hu = torch.from_numpy(cube.array)[None, None]
                drr = render_training_drr(hu, fov_mm, x, view)[0, 0].numpy()
                _save_npy(case_dir / f"drr_{x}.npy", drr)
                files[f"drr_{x}"] = str((case_dir / f"drr_{x}.npy").relative_to(out))
                for k in range(augmented_copies):
                    a = render_training_drr(hu, fov_mm, x, view, rng=rng, aug=aug)[0, 0].numpy()
                    _save_npy(case_dir / f"drr_{x}_aug{k}.npy", a)
                    files[f"drr_{x}_aug{k}"] = str((case_dir / f"drr_{x}_aug{k}.npy").relative_to(out))
            cases.append({"source": str(p), "files": files})
            done = done_through(ct_paths, p)  # by the source's place in the list: series passed over count as done
            if progress is not None:
                progress(done, total, f"prepared {name}")
        if progress is not None and done < total:  # the last series were passed over
            progress(total, total, "the rest passed over")
        manifest = {
            "fov_mm": fov_mm,
            "view": view,
            "resolutions": list(resolutions),
            "xray_resolutions": list(xray_resolutions),
            "drr": "parallel beam, HU -> mu at 70 keV, line integrals scaled to [0, 1] at the 99.5th percentile",
            "cases": cases,
        }
        path = out / MANIFEST
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, path)
    except BaseException:  # a refused CT, an error, a cancel: nothing is left behind
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    _remove_unlisted(out, earlier, manifest)  # the new dataset is complete: what it replaces goes
    return path


#: A case folder of a prepared dataset: its CT's place in the list, then the CT's name (``0003_ct``).
_CASE_FOLDER = re.compile(r"^\d{4,}_")
#: The files :func:`prepare_dataset` writes into a case folder (and what a stopped write leaves).
_CASE_FILE = re.compile(r"^(cube_\d+\.nii\.gz|drr_\d+(_aug\d+)?\.npy)(\.partial)?$")


def prepared_contents(folder: Path) -> list[Path]:
    """The ``manifest.json`` and case folders of a dataset that :func:`prepare_dataset` wrote into ``folder`` (any
    version; case folders are those named ``NNNN_name`` that hold its cube or DRR files); empty when none."""
    if not folder.is_dir():
        return []
    found = [folder / MANIFEST] if (folder / MANIFEST).is_file() else []
    for case in sorted(folder.iterdir()):
        if case.is_dir() and _CASE_FOLDER.match(case.name) and any(_CASE_FILE.match(f.name) for f in case.iterdir()):
            found.append(case)
    return found


def _remove_unlisted(out: Path, earlier: list[Path], manifest: dict) -> None:
    """Remove the files of the dataset ``out`` held before (``earlier``: :func:`prepared_contents`) that ``manifest``
    does not list: only files :func:`prepare_dataset` writes, then their folder if that is left empty (a folder that
    also holds other files is kept, and named)."""
    listed = {out / f for case in manifest["cases"] for f in case["files"].values()}
    removed, kept = [], []
    for case in (p for p in earlier if p.is_dir()):
        try:
            for f in list(case.iterdir()):
                if _CASE_FILE.match(f.name) and f not in listed:
                    f.unlink()
            if case in {f.parent for f in listed}:
                continue
            case.rmdir()
            removed.append(case.name)
        except OSError:  # it holds files of the user's, or cannot be changed
            kept.append(case.name)
    if removed:
        logger.info("removed %d case folder(s) of the dataset %s held before, which the new manifest does not list: "
                    "%s", len(removed), out, ", ".join(removed))  # fmt: skip
    if kept:
        logger.warning("kept %s in %s: the new manifest does not list them, and they hold files prepare-xray-data "
                       "did not write or cannot be changed (its own were removed where they could be); delete them "
                       "if they are not yours", ", ".join(kept), out)  # fmt: skip


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, arr.astype(np.float32))
    os.replace(tmp, path)
