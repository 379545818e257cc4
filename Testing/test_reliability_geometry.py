"""Geometry is exact or refused: gantry-tilted DICOM series, sheared grids and NIfTI files whose pixdim
contradicts their sform.

Each test builds a file whose true geometry is known (a ball at a known physical position, or a known
affine) and checks where the reader puts every voxel, or that the writer refuses a format that would move
them.
"""

from __future__ import annotations

import gzip
import logging
import re
import struct

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ct_phantom_array, rotation_matrix, write_dicom_series

from DiffusionCore.cli.main import main as cli_main
from DiffusionCore.errors import InputError, OutputError
from DiffusionCore.geometry import axis_angles_deg, gantry_tilt, orthogonalisation_shift_mm
from DiffusionCore.volume import Volume, check_output_geometry, read_volume, write_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
BALL_HU, TISSUE_HU = 900.0, 40.0


def physical_points(vol: Volume) -> np.ndarray:
    """LPS position (mm) of every voxel centre, shape ``(z, y, x, 3)``."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in vol.shape), indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk1 @ vol.index_to_physical().T)[..., :3]


def ball_volume(shape, spacing, origin, direction, centre, radius: float) -> Volume:
    """Soft tissue holding a bone ball of ``radius`` mm at the LPS point ``centre``, sampled at the voxel
    centres of the given (possibly sheared) grid."""
    grid = Volume(np.zeros(shape, np.float32), spacing, origin, direction)
    inside = np.linalg.norm(physical_points(grid) - np.asarray(centre), axis=-1) < radius
    return grid.with_array(np.where(inside, BALL_HU, TISSUE_HU).astype(np.float32))


def tilted_direction(kind: str, degrees: float) -> np.ndarray:
    """Columns: the rows' direction, the columns' direction, the table step's direction (not the normal)."""
    t = np.deg2rad(degrees)
    if kind == "gantry":  # the usual tilt: the image plane turns about the L-R axis, the table moves along S
        return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), 0.0], [0.0, np.sin(t), 1.0]])
    # a stack whose slices drift along both in-plane axes, on an oblique image plane
    rot = rotation_matrix((0.3, -0.5, 0.8), 25.0)
    step = rot @ np.array([0.2, 0.3, 1.0]) / np.linalg.norm([0.2, 0.3, 1.0])
    return np.c_[rot[:, 0], rot[:, 1], step]


# -- gantry tilt -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, degrees, storage", [
    ("gantry", 20.0, "series"), ("gantry", -15.0, "series"), ("oblique", 0.0, "series"),
    ("gantry", 20.0, "enhanced"),  # one enhanced multi-frame CT file: its frames' positions drift the same way
])  # fmt: skip
def test_gantry_tilted_series_puts_every_voxel_at_its_physical_position(
    tmp_path, kind, degrees, storage, diffusioncore_log
):
    direction = tilted_direction(kind, degrees)
    shape, spacing, origin = (32, 48, 40), (0.8, 0.8, 2.5), (-16.0, -19.0, -30.0)
    # a ball near the middle of the acquisition (inside every slice's field of view), off the voxel centres
    centre = np.asarray(origin) + direction @ (np.asarray(spacing) * (19.3, 24.6, 15.4))
    radius = 6.0
    truth = ball_volume(shape, spacing, origin, direction, centre, radius)
    if storage == "series":
        write_dicom_series(tmp_path / "tilted", truth)
    else:
        from test_dicom_in import _enhanced_ct

        (tmp_path / "tilted").mkdir()
        _enhanced_ct(tmp_path / "tilted" / "enhanced.dcm", truth)

    vol = read_volume(tmp_path / "tilted")

    normal = np.cross(direction[:, 0], direction[:, 1])
    step = direction[:, 2] * 2.5
    np.testing.assert_allclose(vol.direction.T @ vol.direction, np.eye(3), atol=1e-9)  # an orthogonal grid
    np.testing.assert_allclose(np.abs(vol.direction[:, 2] @ normal), 1.0, atol=1e-9)
    np.testing.assert_allclose(vol.spacing[2], abs(step @ normal), rtol=1e-5)  # not the table step (2.5)
    assert vol.shape[0] == truth.shape[0]  # slices are never mixed or added
    # every acquired pixel is kept: the grid is widened by the drift
    assert vol.shape[1] >= truth.shape[1] and vol.shape[2] >= truth.shape[2]
    # where the ball is: voxels clearly inside or outside it (further than an in-plane pixel diagonal from
    # its surface, the reach of the in-plane interpolation) are classified as the truth says
    dist = np.linalg.norm(physical_points(vol) - centre, axis=-1)
    clear = np.abs(dist - radius) > 0.8 * np.sqrt(2) + 1e-6
    is_bone = vol.array > (BALL_HU + TISSUE_HU) / 2
    assert clear.sum() > 0.9 * vol.array.size
    np.testing.assert_array_equal(is_bone[clear], (dist < radius)[clear])
    centroid = physical_points(vol)[is_bone].mean(axis=0)
    assert np.linalg.norm(centroid - centre) < min(vol.spacing)
    # the notice names the tilt
    tilt = np.degrees(np.arccos(abs(direction[:, 2] @ normal)))
    notes = [r.getMessage() for r in diffusioncore_log if r.levelno > logging.DEBUG and "gantry tilt" in r.getMessage()]
    assert len(notes) == 1 and f"gantry tilt of {tilt:.1f} degrees" in notes[0]
    assert vol.metadata["gantry_tilt_deg"] == pytest.approx(tilt, abs=1e-3)


def test_untilted_series_is_not_resampled(tmp_path, oblique_phantom, diffusioncore_log):
    vol = oblique_phantom.with_array(np.round(oblique_phantom.array))
    write_dicom_series(tmp_path / "series", vol)
    back = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(back.array, vol.array)
    assert "gantry_tilt_deg" not in back.metadata
    assert not [r for r in diffusioncore_log if r.levelno >= logging.WARNING]


def test_gantry_tilt_ignores_rounded_positions():
    """Positions written with two decimals drift by rounding only: no tilt, no resampling."""
    d = rotation_matrix((0.3, -0.5, 0.8), 20.0)
    positions = np.round(np.array([10.0, -20.0, 5.0]) + np.outer(np.arange(60) * 1.25, d[:, 2]), 2)
    assert gantry_tilt(positions, d, (0.7, 0.7)) is None


def rewrite_tag(path, tag: str, value: str) -> None:
    """Change one header tag of a DICOM file, keeping its UIDs."""
    img = sitk.ReadImage(str(path))
    img.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(img)


def test_series_mixing_slice_orientations_is_refused(tmp_path, make_phantom):
    files = write_dicom_series(tmp_path / "mixed", make_phantom(shape=(6, 16, 16)))
    rewrite_tag(files[3], "0020|0037", "1\\0\\0\\0\\0.8660254\\0.5")  # 30 degrees off the others
    with pytest.raises(
        InputError, match=r"mixes slice orientations: slice003.dcm \(slice 4\) is turned 30.0 deg"
    ):
        read_volume(tmp_path / "mixed")


def test_a_localizer_stored_in_the_ct_series_is_left_out(tmp_path, make_phantom, diffusioncore_log):
    """Some scanners put the topogram (ImageType LOCALIZER, a coronal projection) in the CT series itself: the
    volume is read from the slices alone, and the notes say what was left out."""
    import pydicom
    from pydicom.uid import generate_uid

    vol = make_phantom(shape=(6, 16, 16))
    clean = read_volume(write_dicom_series(tmp_path / "clean", vol)[0].parent)
    files = write_dicom_series(tmp_path / "with_scout", vol)
    scout = pydicom.dcmread(files[0])
    scout.SOPInstanceUID = generate_uid()
    scout.InstanceNumber = 0
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout.save_as(files[0].parent / "scout.dcm")
    got = read_volume(files[0].parent)
    np.testing.assert_array_equal(got.array, clean.array)
    assert np.allclose(got.grid.index_to_physical(), clean.grid.index_to_physical())
    assert any("left out 1 localizer image(s)" in r.getMessage() for r in diffusioncore_log)
    only = tmp_path / "only_scout"
    only.mkdir()
    scout.save_as(only / "scout.dcm")
    with pytest.raises(InputError, match="holds only localizer images"):
        read_volume(only)


def test_slices_thicker_or_thinner_than_their_spacing_are_named(tmp_path, make_phantom, diffusioncore_log):
    """Super-resolution takes each slice as the average of the slab between its neighbours. A series whose
    SliceThickness says otherwise (an overlapping reconstruction, or one with gaps narrower than its slices) still
    runs, and the log and the report say what that means; a series as thick as its spacing gets no note. (Gaps as wide
    as the slices or wider are refused: Testing/test_interspaced.py.)"""
    from DiffusionCore.sr.pipeline import SuperResolver

    vol = make_phantom(shape=(6, 16, 16))
    s = vol.spacing[2]
    for thickness, says in ((f"{2.5 * s:g}", "an overlapping reconstruction"), (f"{0.75 * s:g}", "with gaps between them"),
                            (f"{s:g}", None)):
        files = write_dicom_series(tmp_path / thickness, vol)
        for f in files:
            rewrite_tag(f, "0018|0050", thickness)
        thick = read_volume(tmp_path / thickness)
        assert thick.metadata["slice_thickness_mm"] == float(thickness)
        diffusioncore_log.clear()
        _, report = SuperResolver.tiny_predictor().run(thick, factor=2)
        notes = report.get("notes", [])
        warned = [r.getMessage() for r in diffusioncore_log if r.levelno >= logging.WARNING and "mm thick" in r.getMessage()]
        if says is None:
            assert notes == [] and warned == []
        else:
            assert len(notes) == 1 and says in notes[0] and f"{float(thickness):g} mm thick but {s:g} mm apart" in notes[0]
            assert warned == notes


@pytest.mark.parametrize(
    "steps, says",
    [
        # a protocol with two slice spacings, either one the most common: refused, naming both spacings
        ((5, 5, 5, 5, 10, 10, 10, 10, 10), "5.00 mm apart after slice 1 but 10.00 mm after slice 5"),
        ((5, 5, 5, 5, 5, 5, 5, 10, 10), "5.00 mm apart after slice 1 but 10.00 mm after slice 8"),
        ((5, 5, 5, 5.6, 4.4, 5, 5, 5, 5), "slice 5 would be placed 0.6 mm"),  # one slice 12% of a spacing off
        ((5, 5, 5, 5, 5, 10, 5, 5, 5), "missing slices: a gap of 10.00 mm after slice 6"),  # one slice missing
        ((5, 5, 5, 5.3, 4.7, 5, 5, 5, 5), None),  # 0.3 mm of jitter: read as evenly spaced
    ],
)
def test_unevenly_spaced_series_is_refused_not_stacked_at_a_mean_spacing(tmp_path, make_phantom, steps, says):
    """ITK stacks a series at its mean slice spacing whatever the positions say; a series whose slices are not
    evenly spaced is refused, with the spacings named, instead of being read with slices millimetres off."""
    vol = make_phantom(shape=(len(steps) + 1, 16, 16), spacing=(0.8, 0.8, 5.0), direction=np.eye(3))
    files = write_dicom_series(tmp_path / "series", vol)
    along = np.concatenate([[0.0], np.cumsum(steps)])
    for f, z in zip(files, along):
        rewrite_tag(f, "0020|0032", "\\".join(f"{v:.6f}" for v in (*vol.origin[:2], vol.origin[2] + z)))
    if says is None:
        got = read_volume(tmp_path / "series")
        assert got.spacing[2] == pytest.approx(5.0) and got.shape == vol.shape
        return
    with pytest.raises(InputError, match=re.escape(says)) as info:
        read_volume(tmp_path / "series")
    if "evenly" in says or "apart" in says:
        assert "are not evenly spaced" in str(info.value) and "in their own folder" in str(info.value)


def test_tilted_series_whose_slices_do_not_follow_one_line_is_refused(tmp_path, make_phantom):
    """A tilt drifts in proportion to the table position; one slice off that line has no geometry."""
    vol = make_phantom(shape=(8, 16, 16), spacing=(0.8, 0.8, 2.5), direction=tilted_direction("gantry", 20.0))
    files = write_dicom_series(tmp_path / "tilted", vol)
    ipp = np.asarray(vol.index_to_physical() @ [0.0, 0.0, 5.0, 1.0])[:3] + [2.0, 0.0, 0.0]  # 2 mm along x
    rewrite_tag(files[5], "0020|0032", "\\".join(f"{v:.6f}" for v in ipp))
    with pytest.raises(InputError, match=r"do not follow one line.*lies 1\.\d\d mm off the straight line"):
        read_volume(tmp_path / "tilted")


# -- sheared grids ---------------------------------------------------------------------------------------
def sheared_volume() -> Volume:
    """A CT on a sheared grid (the k axis leans 20 degrees towards y), as read from a sheared NRRD."""
    t = np.deg2rad(20.0)
    shear = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, np.sin(t)], [0.0, 0.0, np.cos(t)]])
    return Volume(ct_phantom_array((8, 32, 32)), (0.8, 0.8, 3.2), (-12.0, -12.0, -20.0), shear)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_sheared_grid_round_trips_exactly_through_nrrd_and_mha(tmp_path, suffix):
    vol = sheared_volume()
    back = read_volume(write_volume(vol, tmp_path / f"sheared{suffix}"))
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(physical_points(back), physical_points(vol), atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_sheared_grid_is_refused_in_nifti_with_a_format_that_holds_it(tmp_path, suffix):
    vol = sheared_volume()
    assert orthogonalisation_shift_mm(vol.direction, vol.spacing, vol.shape) > 5.0  # what NIfTI would do
    with pytest.raises(
        OutputError, match=r"sheared \(its axes meet at 90.0, 90.0, 70.0 degrees.*NRRD \(ct.nrrd\)"
    ):
        write_volume(vol, tmp_path / f"ct{suffix}")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file
    with pytest.raises(OutputError, match="move voxels by up to"):
        check_output_geometry(vol.grid, tmp_path / f"ct{suffix}")  # the same check, before any work


def test_tilted_grid_is_written_to_dicom_as_a_tilted_acquisition(tmp_path, diffusioncore_log):
    """A grid sheared along k only (rows and columns perpendicular, the slices stepping along the table: how 3D
    Slicer reads a gantry-tilted series, and so what the SR module makes of one) is what a tilted acquisition
    stores, each slice at its own ImagePositionPatient: the DICOM export writes it, and reading the series back
    puts every voxel where it was. A shear within the slice plane is still refused."""
    import pydicom

    from DiffusionCore.dicom_out import write_dicom_series as write_series
    from DiffusionCore.provenance import Provenance

    direction = tilted_direction("gantry", 20.0)
    shape, spacing, origin = (24, 48, 40), (0.8, 0.8, 2.0), (-16.0, -19.0, -30.0)
    centre = np.asarray(origin) + direction @ (np.asarray(spacing) * (19.3, 24.6, 11.4))
    vol = ball_volume(shape, spacing, origin, direction, centre, 6.0)
    prov = Provenance("sr", "SR x2 (synthetic)", "w", "0" * 64, {"factor": 2})
    folder = write_series(vol, tmp_path / "series", prov)

    files = sorted(folder.iterdir())
    first, last = pydicom.dcmread(files[0]), pydicom.dcmread(files[-1])
    np.testing.assert_allclose([float(v) for v in last.ImagePositionPatient],
                               (vol.index_to_physical() @ (0.0, 0.0, shape[0] - 1, 1.0))[:3], atol=1e-3)  # fmt: skip
    assert float(first.SpacingBetweenSlices) == pytest.approx(2.0 * np.cos(np.deg2rad(20.0)), rel=1e-5)
    back = read_volume(folder)  # resampled onto an orthogonal grid, as any tilted series
    assert back.metadata["gantry_tilt_deg"] == pytest.approx(20.0, abs=1e-3)
    dist = np.linalg.norm(physical_points(back) - centre, axis=-1)
    clear = np.abs(dist - 6.0) > 0.8 * np.sqrt(2) + 1e-3
    is_bone = back.array > (BALL_HU + TISSUE_HU) / 2
    np.testing.assert_array_equal(is_bone[clear], (dist < 6.0)[clear])

    skewed = np.eye(3)
    skewed[:, 1] = (np.sin(np.deg2rad(10.0)), np.cos(np.deg2rad(10.0)), 0.0)  # columns 80 degrees from the rows
    with pytest.raises(OutputError, match=r"sheared \(its rows and columns are not perpendicular\).*NRRD"):
        write_series(Volume(vol.array, spacing, origin, skewed), tmp_path / "skewed", prov)


def test_nearly_orthonormal_grid_is_still_written_to_nifti(tmp_path, oblique_phantom):
    """Direction cosines rounded to 6 decimals (as DICOM headers hold them) move no voxel measurably."""
    vol = Volume(
        oblique_phantom.array,
        oblique_phantom.spacing,
        oblique_phantom.origin,
        np.round(oblique_phantom.direction, 6),
    )
    back = read_volume(write_volume(vol, tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(physical_points(back), physical_points(vol), atol=1e-3)


@pytest.fixture
def cli_logging():
    """The ``DiffusionCore`` logger as it was before a command run in this process replaced its handler
    with one on the (captured) stderr."""
    logger = logging.getLogger("DiffusionCore")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_sr_refuses_a_sheared_result_in_nifti_and_writes_it_to_nrrd(tmp_path, capsys, cli_logging):
    write_volume(sheared_volume(), tmp_path / "sheared.nrrd")
    argv = ["--progress", "none", "--num-steps", "1", "--tiny-test-model"]
    assert cli_main(["sr", str(tmp_path / "sheared.nrrd"), str(tmp_path / "out.nii.gz"), *argv]) == 4
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NIfTI holds only orthogonal grids" in errors[0] and "out.nrrd" in errors[0]
    assert not (tmp_path / "out.nii.gz").exists()
    assert cli_main(["sr", str(tmp_path / "sheared.nrrd"), str(tmp_path / "out.nrrd"), *argv]) == 0
    out = read_volume(tmp_path / "out.nrrd")
    np.testing.assert_allclose(out.direction, sheared_volume().direction, atol=1e-9)


# -- NIfTI: pixdim against sform -------------------------------------------------------------------------
def nifti_with_sform(path, affine_ras: np.ndarray, *, pixdim_z: float | None, qform: bool = False):
    """A NIfTI holding a 32x32x8 (i, j, k) int16 CT with ``affine_ras`` as its sform (code 1) and the
    stored pixdim[3] set to ``pixdim_z`` (None: as nibabel computes it)."""
    data = np.full((32, 32, 8), TISSUE_HU, np.int16)
    data[:4] = -1000
    data[10:14, 20:26, 5] = int(BALL_HU)  # an asymmetric marker: a mirrored reading cannot pass
    img = nib.Nifti1Image(data, affine_ras)
    img.set_sform(affine_ras, code=1)
    img.set_qform(affine_ras if qform else None, code=1 if qform else 0)
    if pixdim_z is not None:
        img.header["pixdim"][3] = pixdim_z
    nib.save(img, str(path))
    if pixdim_z is not None:  # stored as given (nibabel replaces a 0 only when it reads the file)
        with gzip.open(path, "rb") as f:
            assert struct.unpack_from("<f", f.read(348), 76 + 4 * 3)[0] == pixdim_z
    return path, data


def axis_aligned_affine() -> np.ndarray:
    a = np.diag([-0.8, -0.8, 5.0, 1.0])
    a[:3, 3] = (20.0, 30.0, -40.0)
    return a


def oblique_affine() -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rotation_matrix((1.0, 2.0, 0.5), 30.0) @ np.diag([0.7, 0.9, 5.0])
    a[:3, 3] = (-50.0, 12.5, 80.0)
    return a


def sheared_affine() -> np.ndarray:
    a = axis_aligned_affine()
    a[1, 2] = 5.0 * np.sin(np.deg2rad(20.0))  # the k axis leans 20 degrees towards A
    a[2, 2] = 5.0 * np.cos(np.deg2rad(20.0))
    return a


@pytest.mark.parametrize(
    "affine, pixdim_z, qform",
    [
        (axis_aligned_affine(), 0.0, False),  # pixdim z = 0: ITK reads 1 mm, the sform says 5 mm
        (oblique_affine(), 0.0, True),  # an oblique sform, and a qform made from pixdim z = 0
        (axis_aligned_affine(), 1.0, False),  # pixdim contradicts the sform
        (sheared_affine(), None, True),  # a sheared sform: ITK falls back to the (rotation-only) qform
    ],
    ids=["pixdim0", "pixdim0-oblique-qform", "pixdim-contradicts", "sheared-sform"],
)
def test_nifti_geometry_comes_from_its_sform(tmp_path, affine, pixdim_z, qform, diffusioncore_log):
    path, data = nifti_with_sform(tmp_path / "ct.nii.gz", affine, pixdim_z=pixdim_z, qform=qform)
    vol = read_volume(path)
    np.testing.assert_allclose(vol.index_to_physical(), LPS_TO_RAS @ affine, atol=1e-4)
    np.testing.assert_array_equal(vol.array, data.transpose(2, 1, 0))  # nibabel (i, j, k) -> ours (z, y, x)
    assert nib.load(str(path)).affine == pytest.approx(affine, abs=1e-4)  # nibabel agrees
    notes = [r.getMessage() for r in diffusioncore_log if r.levelno > logging.DEBUG and "sform" in r.getMessage()]
    assert len(notes) == 1 and "using the sform, as nibabel and 3D Slicer do" in notes[0]
    if pixdim_z == 0.0:
        assert "0 mm)" in notes[0]


def test_sheared_nifti_is_read_exactly_and_kept_in_nrrd(tmp_path):
    path, _ = nifti_with_sform(tmp_path / "ct.nii.gz", sheared_affine(), pixdim_z=None, qform=True)
    vol = read_volume(path)
    assert axis_angles_deg(vol.direction)[2] == pytest.approx(110.0, abs=1e-3)  # j and k, in LPS
    with pytest.raises(OutputError, match="NRRD"):
        write_volume(vol, tmp_path / "copy.nii.gz")
    back = read_volume(write_volume(vol, tmp_path / "copy.nrrd"))
    np.testing.assert_allclose(back.index_to_physical(), LPS_TO_RAS @ sheared_affine(), atol=1e-4)


def test_consistent_nifti_reads_without_a_notice(tmp_path, oblique_phantom, diffusioncore_log):
    back = read_volume(write_volume(oblique_phantom, tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(back.index_to_physical(), oblique_phantom.index_to_physical(), atol=1e-3)
    assert "geometry_note" not in back.metadata
    assert not [r for r in diffusioncore_log if r.levelno > logging.DEBUG and "sform" in r.getMessage()]
