"""X-ray to CT on radiographs as users have them: a dark border with burned-in text, non-square pixels, an inverted
image, a 2D NRRD stored mirrored, shutters, a multi-frame file, a DICOMDIR, a header spacing of 0 x 0 mm, and the
window of the DICOM series written from a radiograph. The real samples (cxr-pa, ct-topogram, shoulder-ap, the DRRs
of chest-dx and chest-lidc) are checked where this machine has them cached, to show what a fix leaves unchanged."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import chest_like_ct

from DiffusionCore import sampledata
from DiffusionCore.cli.main import main
from DiffusionCore.errors import InputError
from DiffusionCore.xray.data import ct_to_cubes, render_training_drr
from DiffusionCore.xray.pipeline import XrayToCTGenerator
from DiffusionCore.xray.radiograph import (
    INVERTED_SCORE,
    Radiograph,
    crop_to_exposed_region,
    inversion_score,
    read_radiograph,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]

#: The samples this machine already fetched (read before any test points the cache elsewhere).
SAMPLES = sampledata.sample_root()
TINY = ["--tiny-test-model", "--progress", "none"]


def cached_or_skip(*parts: str) -> Path:
    path = SAMPLES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not cached here (run `python -m DiffusionCore sample-data`)")
    return path


def chest(size: int = 160) -> np.ndarray:
    """A chest radiograph in attenuation style (H, W) in [0, 1]: the training-geometry DRR of a chest-like CT over a
    dark-grey exposed field (direct exposure is not black on a real detector)."""
    drr = render_training_drr(torch.from_numpy(chest_like_ct())[None, None], 336.0, size)[0, 0].numpy()
    return (0.1 + 0.9 * drr).astype(np.float32)


def on_black_canvas(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``image`` in the middle of a black canvas twice its size, with white burned-in text (bars) and a side marker
    in the black; returns the canvas and where the image lies in it (row0, row1, col0, col1)."""
    h, w = image.shape
    canvas = np.zeros((2 * h, 2 * w), np.float32)
    canvas[h // 2 : h // 2 + h, w // 2 : w // 2 + w] = image
    for col in range(10, 130, 14):  # "HOSPITAL A PORTABLE": letters apart from each other
        canvas[12:30, col : col + 8] = 1.0
    canvas[h // 2 + 20 : h // 2 + 40, 2 * w - 30 : 2 * w - 18] = 1.0  # an "R" marker beside the chest
    return canvas, (h // 2, h // 2 + h, w // 2, w // 2 + w)


def write_png(arr: np.ndarray, path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)), str(path))
    return path


def model_input(gen: XrayToCTGenerator, image, fov_mm: float | None = None) -> tuple[np.ndarray, float, str]:
    x, fov, source = gen.prepare_input(image, fov_mm)
    return x[0, 0].numpy(), fov, source


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# -- 1. a dark border around the chest ---------------------------------------------------------------------------
def test_a_radiograph_on_a_black_canvas_with_burned_in_text_is_cropped_to_its_exposed_region(tmp_path, capsys):
    """The border's black pixels were quantile-matched to the DRR style with the chest, which pushed the chest up to
    a solid dense block (and the small chest in a field of air re-projected even better than a correct input)."""
    alone = chest()
    canvas, (r0, r1, c0, c1) = on_black_canvas(alone)
    path = write_png(canvas, tmp_path / "border_text.png")
    gen = XrayToCTGenerator.tiny(seed=0)
    cropped, note = crop_to_exposed_region(read_radiograph(path))
    assert cropped.shape == alone.shape and cropped.metadata["cropped_to"] == [r0, r1, c0, c1]
    assert f"only that region is used, rows {r0}-{r1} and columns {c0}-{c1}" in note
    seen, _, _ = model_input(gen, str(path))
    assert correlation(seen, model_input(gen, str(write_png(alone, tmp_path / "alone.png")))[0]) > 0.99
    report = tmp_path / "report.json"
    assert main(["xray2ct", str(path), str(tmp_path / "ct.nii.gz"), "--report", str(report), *TINY]) == 0
    err = capsys.readouterr().err
    assert "warning: the radiograph is mostly dark background (" in err and "burned into it" in err
    assert any("mostly dark background" in n for n in json.loads(report.read_text())["notes"])


def test_a_small_chest_on_a_large_frame_keeps_its_size_in_millimetres():
    """Cropped with a known pixel spacing, the cube is the exposed region's width in the patient, not the frame's."""
    alone = chest()
    canvas, _ = on_black_canvas(alone)
    gen = XrayToCTGenerator.tiny(seed=0)
    _, fov, source = model_input(gen, Radiograph(canvas, (0.5, 0.5), {"source": "paed.png"}))
    assert fov == pytest.approx(alone.shape[1] * 0.5 / 1.1) and source.startswith("pixel spacing")


def test_exposed_radiographs_and_training_drrs_are_not_cropped():
    """Radiographs exposed to their edges, DRRs of the training geometry (air beside the body, black bands beyond
    the CT's length) and a topogram whose bottom third lies beyond its scan are taken whole, as before."""
    drr = render_training_drr(torch.from_numpy(chest_like_ct())[None, None], 336.0, 128)[0, 0].numpy()
    scout = chest(128)
    scout[88:] = 0.0  # beyond the scanned length: black, as in the ct-topogram sample
    for name, image in (("chest", chest()), ("drr", drr), ("scout", scout)):
        rad = Radiograph(image, None, {"source": f"{name}.png"})
        assert crop_to_exposed_region(rad) == (rad, ""), name


@pytest.mark.parametrize("sample", [("cxr-pa", "RG1_UNCR.dcm"), ("ct-topogram", "j2k.dcm"),
                                    ("shoulder-ap", "monochrome2.dcm")])  # fmt: skip
def test_the_real_radiograph_samples_are_not_cropped(sample):
    rad = read_radiograph(cached_or_skip(*sample))
    assert crop_to_exposed_region(rad) == (rad, "")


# -- 2. non-square pixels ----------------------------------------------------------------------------------------
def _dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    """A DX DICOM radiograph (MONOCHROME2) with these pixels and header tags (pydicom keywords)."""
    import pydicom

    img = sitk.GetImageFromArray(np.zeros((8, 8), np.uint16))
    img.SetMetaData("0008|0060", "DX")
    sitk.WriteImage(img, str(path))
    ds = pydicom.dcmread(path)
    for unknown in ("PixelSpacing", "ImagerPixelSpacing"):  # the 1 x 1 mm the writer puts in when it knows none
        if unknown in ds:
            delattr(ds, unknown)
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path


@pytest.mark.parametrize("tags", [{"PixelSpacing": [0.4, 0.2]}, {"PixelAspectRatio": [2, 1]}])
def test_non_square_pixels_are_made_square_before_the_square_crop(tmp_path, caplog, tags):
    """Every other row of a radiograph, stored with pixels twice as tall as wide: the chest was stretched to twice
    its height and the warning said only its middle square was used."""
    stored = (chest(160) * 4000).astype(np.uint16)
    gen = XrayToCTGenerator.tiny(seed=0)
    square = model_input(gen, str(_dicom(tmp_path / "square.dcm", stored, PixelSpacing=[0.2, 0.2])))
    with caplog.at_level(logging.INFO, logger="DiffusionCore"):
        halved = model_input(gen, str(_dicom(tmp_path / "halved.dcm", stored[::2], **tags)))
    assert correlation(halved[0], square[0]) > 0.99
    assert "square is used" not in caplog.text and "resampled from 80x160 to 160x160 pixels" in caplog.text
    if "PixelSpacing" in tags:
        assert halved[1] == pytest.approx(square[1])


def test_the_square_crop_warning_reasons_in_millimetres(tmp_path, capsys):
    strip = (np.random.default_rng(2).random((40, 200)) * 4000).astype(np.uint16)
    path = _dicom(tmp_path / "strip.dcm", strip, PixelSpacing=[0.5, 0.5])
    assert main(["xray2ct", str(path), str(tmp_path / "o.nii.gz"), *TINY]) == 0
    assert "the radiograph is 20x100 mm (40x200 pixels): only its middle 20x20 mm square is used" in capsys.readouterr().err


# -- 3. the window of the DICOM series written from a radiograph ---------------------------------------------------
def test_the_dicom_ct_from_a_radiograph_gets_a_ct_window_not_the_radiographs(tmp_path):
    import pydicom

    src = _dicom(tmp_path / "cr.dcm", (chest(64) * 30000).astype(np.uint16), WindowCenter=15000, WindowWidth=30000)
    out = tmp_path / "ct_series"
    assert main(["xray2ct", str(src), str(out), "--output-format", "dicom", *TINY]) == 0
    ds = pydicom.dcmread(sorted(out.iterdir())[0], stop_before_pixels=True)
    # first the window the X-ray to CT module shows the result in (a viewer opens the first), then the mediastinum's
    assert [float(v) for v in ds.WindowCenter] == [-300.0, 40.0]
    assert [float(v) for v in ds.WindowWidth] == [1500.0, 400.0]
    assert list(ds.WindowCenterWidthExplanation) == ["LUNG AND SOFT TISSUE", "MEDIASTINUM"]


# -- 4. inverted radiographs -----------------------------------------------------------------------------------------
def test_xray2ct_inverts_on_request_and_warns_of_a_radiograph_that_looks_inverted(tmp_path, capsys):
    normal = write_png(chest(), tmp_path / "normal.png")
    inverted = write_png(1.0 - chest(), tmp_path / "inverted.png")
    for path, extra, warned in ((normal, [], False), (inverted, [], True), (inverted, ["--invert"], False),
                                (normal, ["--invert"], True)):  # fmt: skip
        assert main(["xray2ct", str(path), str(tmp_path / f"{path.stem}{len(extra)}.nii.gz"), *extra, *TINY]) == 0
        err = capsys.readouterr().err
        assert ("the radiograph looks inverted (bones dark)" in err) is warned, (path.name, extra)
        assert ("run it without" in err) is (warned and bool(extra))
    gen = XrayToCTGenerator.tiny(seed=0)  # the API has the option too, and it undoes the inversion exactly
    a, _ = gen.run(str(normal), num_stages=1, steps=1)
    b, report = gen.run(str(inverted), num_stages=1, steps=1, invert=True)
    assert correlation(a.array, b.array) > 0.999  # the same but for 8-bit rounding
    assert not [n for n in report["notes"] if "looks inverted" in n]


def _sample_drr(name: str) -> np.ndarray:
    """The training-geometry DRR of a cached sample CT, as evaluate-xray renders it."""
    cached_or_skip(name)
    cfg = XrayToCTGenerator.default().cascade.configs[-1]
    cube = ct_to_cubes(sampledata.load_reference(name), [cfg.resolution], cfg.data.fov_mm)[cfg.resolution]
    return render_training_drr(torch.from_numpy(cube.array)[None, None], cfg.data.fov_mm, cfg.xray_resolution)[0, 0].numpy()


def _slicer_modules() -> None:
    """The modules' libraries on the path (the ``scene`` fixture skips where slicer-core is missing)."""
    for folder in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


@pytest.mark.parametrize("sample", ["cxr-pa/RG1_UNCR.dcm", "ct-topogram/j2k.dcm", "chest-dx", "chest-lidc"])
def test_the_samples_and_their_inverted_copies_are_told_apart(sample):
    """The inversion warning's score on what the shipped weights' model sees: every sample above 0, every inverted
    copy below the threshold."""
    if "/" in sample:
        rad = read_radiograph(cached_or_skip(*sample.split("/")))
    else:
        rad = Radiograph(_sample_drr(sample), None, {"source": f"{sample}.png"})
    gen = XrayToCTGenerator.default()
    upright = inversion_score(model_input(gen, rad)[0])
    flipped = inversion_score(model_input(gen, Radiograph(1.0 - rad.array, rad.pixel_spacing, rad.metadata))[0])
    assert upright > 0.1 and flipped < INVERTED_SCORE


# -- 5. 2D NRRD, MetaImage and NIfTI radiographs -------------------------------------------------------------------
def _image_2d(pixels: np.ndarray, path: Path, spacing=(0.2, 0.2), direction=(1, 0, 0, 1)) -> Path:
    img = sitk.GetImageFromArray(pixels.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_a_2d_volume_file_gives_its_spacing_and_is_turned_as_slicer_displays_it(tmp_path, suffix):
    """xray2ct took the 350 mm training field of view for these (the Slicer module took their spacing), and gave the
    model an image stored mirrored with a direction of -1 along x (which Slicer shows the right way round) mirrored."""
    shown = chest(96)
    shown[:20, :30] = 1.0  # a bright corner, so that a flip shows
    plain = read_radiograph(_image_2d(shown, tmp_path / f"plain{suffix}", spacing=(0.3, 0.3)))
    assert plain.pixel_spacing == pytest.approx((0.3, 0.3)) and "oriented" not in plain.metadata
    mirrored = read_radiograph(_image_2d(shown[:, ::-1], tmp_path / f"mirrored{suffix}", direction=(-1, 0, 0, 1)))
    np.testing.assert_allclose(mirrored.array, plain.array, atol=1e-6)
    assert mirrored.metadata["oriented"].startswith("flipped left-right to show it as 3D Slicer displays it")
    _, fov, source = model_input(XrayToCTGenerator.tiny(seed=0), mirrored)
    assert fov == pytest.approx(96 * 0.2 / 1.1) and source.startswith("pixel spacing")


def test_xray2ct_help_says_what_it_reads_and_how_it_must_lie(capsys):
    assert main(["xray2ct", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for said in ("NRRD", "MetaImage", "NIfTI", "TIFF", "frontal (PA or AP) chest view, head up",
                 "without one (PNG, JPEG) is taken as it is", "--invert"):  # fmt: skip
        assert said in text, said


def test_the_slicer_module_hands_over_a_mirrored_2d_image_as_slicer_displays_it(tmp_path, scene):
    _slicer_modules()
    from XrayToCTLib import XrayJob, XraySettings

    shown = chest(96)
    shown[:20, :30] = 1.0
    path = _image_2d(shown[:, ::-1], tmp_path / "mirrored.nrrd", direction=(-1, 0, 0, 1))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mirrored")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    assert storage.ReadData(node)
    args = XrayJob(scene, node, XraySettings(tiny_test_model=True)).prepare(tmp_path)
    handed = sitk.ReadImage(args[-2])
    np.testing.assert_allclose(sitk.GetArrayFromImage(handed), shown, atol=1e-6)
    assert handed.GetSpacing() == pytest.approx((0.2, 0.2))
    np.testing.assert_allclose(read_radiograph(args[-2]).array, read_radiograph(path).array, atol=1e-6)


# -- 6. a poor re-projection ---------------------------------------------------------------------------------------
def test_a_poor_reprojection_is_warned_naming_likely_causes():
    """Bright shutter strips on three sides: the input's brightest pixels end well below 1 after the style
    matching, the re-projection PSNR falls to about 11 dB (cxr-pa: 31), while its NCC, blind to the gain, stays near
    1. It was an info line."""
    shuttered = chest(256) * 0.9
    shuttered[:, :40] = shuttered[:, -40:] = shuttered[:28] = 1.0
    gen = XrayToCTGenerator.default()
    _, report = gen.run(Radiograph(shuttered, None, {"source": "collimated.png"}), steps=1, num_samples=1)
    stage = report["stages"][0]
    assert stage["projection_psnr"] < 20 and stage["projection_ncc"] > 0.95
    assert [n for n in report["notes"] if n.startswith("stage 1's re-projection agrees poorly with the radiograph")
            and "shutters" in n and "--invert" in n and "frontal chest" in n]  # fmt: skip
    _, fine = gen.run(Radiograph(chest(256), None, {"source": "chest.png"}), steps=1, num_samples=1)
    assert fine["stages"][0]["projection_psnr"] > 25 and fine["notes"] == []


# -- 7. files that are not one radiograph, and a spacing that cannot be used -----------------------------------------
def test_a_multi_frame_radiograph_is_named_as_such(tmp_path, capsys):
    """It was called "a 3D volume ... to make a radiograph from a CT use the DRR tools"."""
    path = _dicom(tmp_path / "dx2.dcm", np.stack([chest(64), chest(64)]) * 4000, NumberOfFrames=2)
    with pytest.raises(InputError, match=r"dx2.dcm is a multi-frame radiograph \(2 frames, DICOM Modality DX\)"):
        read_radiograph(path)
    assert main(["xray2ct", str(path), str(tmp_path / "o.nii.gz"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "single-frame image" in err and "3D volume" not in err and "DRR" not in err


def test_the_module_names_a_multi_frame_radiograph_as_such(scene):
    """It was called "a 3D volume ... (for a CT volume use the CT Diffusion SR module)"."""
    import vtk
    from vtk.util import numpy_support

    _slicer_modules()
    from XrayToCTLib import check_xray_input

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "dx2")
    image = vtk.vtkImageData()
    image.SetDimensions(64, 64, 2)
    frames = np.stack([chest(64), chest(64)]).astype(np.float32)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(frames.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    said = check_xray_input(node, {"modality": "DX"})  # the header of the file Slicer loaded it from
    assert said.startswith("'dx2' is a multi-frame radiograph (2 frames of 64x64, DICOM Modality DX)")
    assert "CT Diffusion SR" not in said
    assert "CT Diffusion SR" in check_xray_input(node, {})  # a 3D image without a radiograph's header


def test_a_dicomdir_is_named_an_index_by_the_reader_and_stands_for_its_folder_in_xray2ct(tmp_path, capsys):
    import pydicom
    from pydicom.fileset import FileSet
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(_dicom(tmp_path / "dx.dcm", (chest(64) * 4000).astype(np.uint16)))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "P1", generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
    fileset = FileSet()
    fileset.add(ds)
    fileset.write(tmp_path / "disc")
    dicomdir = tmp_path / "disc" / "DICOMDIR"
    with pytest.raises(InputError, match=r"is a DICOMDIR, the index of the files on a DICOM disc or folder, not an "
                       r"image: give one of the image files it lists, e\.g\. .*\(1 image\(s\) listed\)") as info:
        read_radiograph(dicomdir)  # the reader (the module's, the API's) names it
    listed = Path(str(info.value).split("e.g. ")[1].split(" (1 image")[0])
    assert listed.suffix == "" and read_radiograph(listed).metadata["modality"] == "DX"  # read as DICOM, by its mark
    # xray2ct takes it for its folder (probe 23): here one radiograph, so one run into the file named
    assert main(["xray2ct", str(dicomdir), str(tmp_path / "o.nii.gz"), *TINY]) == 0
    assert (tmp_path / "o.nii.gz").is_file() and "is a DICOMDIR, the index of a DICOM disc" in capsys.readouterr().err


def test_an_unusable_header_spacing_is_said(tmp_path):
    """cxr-pa's PixelSpacing is 0\\0: the training field of view was used without a word."""
    path = _dicom(tmp_path / "zero.dcm", (chest(64) * 4000).astype(np.uint16), PixelSpacing=[0, 0])
    _, report = XrayToCTGenerator.tiny(seed=0).run(str(path), num_stages=1, steps=1)
    assert report["fov_source"] == "training field of view"
    assert ("the header's pixel spacing 0 x 0 mm (PixelSpacing) is unusable; using the training field of view "
            f"({report['fov_mm']:g} mm)") in report["notes"]


def test_evaluate_xray_names_a_radiograph_given_as_its_reference(tmp_path, capsys):
    path = _dicom(tmp_path / "dx.dcm", (chest(64) * 4000).astype(np.uint16))
    assert main(["evaluate-xray", "--reference", str(path), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {path} is a radiograph (DICOM Modality DX), not a CT: evaluate-xray needs a CT volume")
    assert "single slice" not in err and f"xray2ct {path} OUTPUT" in err


# -- probe 47, finding 4: a real radiograph held in memory, given a file's preprocessing explicitly ------------------
def test_a_raw_in_memory_radiograph_from_array_gives_the_ct_of_its_file():
    """cxr-pa's raw pydicom pixels (MONOCHROME1, not inverted) gave a CT 410 HU off on average (3069 at most) as an
    array, and its read_radiograph(path).array one 754 HU off at most: the array was taken as a DRR. Given as
    ``Radiograph.from_array(pixels, photometric=...)`` it is the file's CT, bit for bit."""
    pydicom = pytest.importorskip("pydicom")
    path = cached_or_skip("cxr-pa", "RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    kept = pixels.copy()
    rad = Radiograph.from_array(pixels, None, photometric=ds.PhotometricInterpretation)
    assert np.array_equal(pixels, kept)  # the caller's pixels are not modified
    read = read_radiograph(path)
    assert np.array_equal(rad.array, read.array) and rad.kind == "radiograph" and rad.preprocessing == "radiograph"
    gen = XrayToCTGenerator.from_pretrained("xray-default")
    options = {"device": "cpu", "steps": 1, "num_samples": 1, "num_stages": 1}
    by_path, _ = gen.run(str(path), **options)
    in_memory, report = gen.run(rad, **options)
    assert np.array_equal(in_memory.array, by_path.array)
    assert report["input_sha256"] == read.content_sha256()
    as_drr, drr_report = gen.run(Radiograph(read.array, read.pixel_spacing, read.metadata, kind="drr"), **options)
    assert np.abs(as_drr.array - by_path.array).max() > 100  # kind="drr": no style matching, whatever the source
    assert any("taken as it is (as a DRR)" in n for n in drr_report["notes"])


def test_kind_and_photometric_of_an_in_memory_radiograph():
    rng = np.random.default_rng(0)
    chest = (rng.random((64, 80)) * 3000).astype(np.uint16)
    mono2 = Radiograph.from_array(chest, (0.2, 0.2))
    mono1 = Radiograph.from_array(4095 - chest, [0.2, 0.2], photometric="monochrome1 ")  # high values dark
    assert np.array_equal(mono1.array, mono2.array) and mono1.pixel_spacing == (0.2, 0.2)
    assert mono2.metadata["photometric"] == "MONOCHROME2" and mono2.metadata["source"] == "the array"
    assert Radiograph.from_array(chest, kind="drr").preprocessing == "drr"
    # without a kind, as before: a file's radiograph (read_radiograph records its path), else a DRR
    assert Radiograph(mono2.array, None, {"source": "chest.png"}).preprocessing == "radiograph"
    assert Radiograph(mono2.array).preprocessing == "drr"
    assert Radiograph(mono2.array, None, {"source": "chest.png"}, kind="drr").preprocessing == "drr"
    for bad, said in (({"kind": "xray"}, "kind must be one of 'radiograph', 'drr'"),
                      ({"photometric": "RGB"}, "photometric must be one of 'MONOCHROME2', 'MONOCHROME1'"),
                      ({"pixel_spacing": (0.0, 0.0)}, "pixel_spacing must be two positive numbers"),
                      ({"pixel_spacing": 0.2}, "pixel_spacing must be two positive numbers")):  # fmt: skip
        with pytest.raises(InputError, match=said):
            Radiograph.from_array(chest, **bad)
    with pytest.raises(InputError, match="a radiograph's kind must be one of"):
        Radiograph(mono2.array, None, {}, kind="DRR")
    with pytest.raises(InputError, match="is blank"):
        Radiograph.from_array(np.zeros((64, 64), np.uint16))


def test_the_kind_survives_every_preprocessing_step_and_decides_the_crop():
    """A real radiograph on a dark frame is cropped to its exposed region when it is marked so, whatever its
    metadata; a DRR marked so is not, even with a file name as its source."""
    canvas = np.zeros((256, 256), np.float32)
    canvas[64:192, 80:176] = 0.2 + 0.6 * np.random.default_rng(1).random((128, 96)).astype(np.float32)
    gen = XrayToCTGenerator.tiny()
    notes_real: list[str] = []
    gen.prepare_input(Radiograph.from_array(canvas, (0.3, 0.2)), None, notes_real)  # non-square: resampled first
    notes_drr: list[str] = []
    gen.prepare_input(Radiograph(canvas, (0.3, 0.2), {"source": "drr.png"}, kind="drr"), None, notes_drr)
    assert any("mostly dark background" in n for n in notes_real) and any("square" in n for n in notes_real)
    assert not any("mostly dark background" in n for n in notes_drr)
