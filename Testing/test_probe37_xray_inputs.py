"""How xray2ct reads radiograph inputs (probe 37): a DICOM file is told by its ``DICM`` mark, whatever its name (named
by its UID as PACS exports and DICOM receivers name files, ``.dicom``, renamed ``.png``), for one input and in a
batch folder; the mark wins over a TIFF header in the preamble (a multi-frame DICOM is not a "multi-page TIFF");
PresentationLUTShape INVERSE is applied; the square crop is said, and its warning reaches the report's notes;
--save-stages with one stage says it writes nothing; and the messages of a few refusals."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import torch
from conftest import chest_like_ct
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from DiffusionCore.cli.main import main
from DiffusionCore.errors import ConfigError, InputError
from DiffusionCore.inputs import collect_volumes, has_dicom_marker, is_dicom_file
from DiffusionCore.xray.data import render_training_drr
from DiffusionCore.xray.pipeline import XrayToCTGenerator
from DiffusionCore.xray.radiograph import (
    Radiograph,
    as_radiograph,
    is_tiff,
    presentation_lut_inversion,
    read_radiograph,
    square_crop_note,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ["--tiny-test-model", "--progress", "none", "--threads", "1"]
UID_NAME = "1.2.826.0.1.3680043.8.498.12345"  # how a PACS export or a DICOM receiver names a file: its suffix ".12345"
#: A preamble that starts as a TIFF header does: DICOM allows it (a dual-format file), and real files carry one.
TIFF_PREAMBLE = b"II*\0" + bytes(124)
AXIAL = ["ORIGINAL", "PRIMARY", "AXIAL"]  # a CT slice's ImageType (not a localizer)


def dicom_file(path: Path, pixels: np.ndarray, *, modality: str = "DX", photometric: str = "MONOCHROME2",
               preamble: bytes = bytes(128), **tags) -> Path:
    """A small DICOM file (Part 10, ``DICM`` after ``preamble``) with these uint16 pixels (a 3D array: frames) and
    header tags (pydicom keywords)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, preamble
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = modality, photometric, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.PixelData = pixels.tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def chest(size: int = 96) -> np.ndarray:
    """A frontal chest radiograph in attenuation style (bones bright), (size, size) in [0, 1]."""
    drr = render_training_drr(torch.from_numpy(chest_like_ct())[None, None], 336.0, size)[0, 0].numpy()
    return (0.1 + 0.9 * drr).astype(np.float32)


def stored(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 4000).astype(np.uint16)


def ramp(rows: int = 48, cols: int = 40) -> np.ndarray:
    """Pixels whose every row and column differ (a flip or a transposition shows)."""
    return (np.arange(rows * cols).reshape(rows, cols) * 7 % 4000).astype(np.uint16)


# -- 1. a DICOM file is DICOM by its content, whatever its name ------------------------------------------------------
def test_a_dicom_file_is_told_by_its_mark_whatever_its_name(tmp_path):
    for name in (UID_NAME, "chest.dicom", "chest.png", "IM000001", "chest.tif"):
        for preamble in (bytes(128), TIFF_PREAMBLE):
            path = dicom_file(tmp_path / preamble[:2].hex() / name, ramp(), preamble=preamble)
            assert has_dicom_marker(path) and is_dicom_file(path), path
    png = tmp_path / "plain.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    text = tmp_path / "1.2.3.notes"
    text.write_text("x" * 300, encoding="utf-8")
    assert not is_dicom_file(png) and not is_dicom_file(text) and not is_dicom_file(tmp_path)
    bare = tmp_path / "no_preamble.dcm"  # a dataset written without the preamble and mark: still DICOM by its suffix
    bare.write_bytes(b"\x08\x00\x16\x00" + bytes(100))
    assert is_dicom_file(bare) and not has_dicom_marker(bare)


@pytest.mark.parametrize("name", [UID_NAME, "lateral.dicom", "lateral.png", "lateral_noext"])
@pytest.mark.parametrize("preamble", [bytes(128), TIFF_PREAMBLE], ids=["zero-preamble", "tiff-preamble"])
def test_a_dicom_named_anything_is_read_with_its_header(tmp_path, name, preamble):
    """It was read as a plain picture: its ViewPosition LL and its PatientOrientation ignored."""
    pixels = ramp()
    tags = {"ViewPosition": "LL", "PatientOrientation": ["A", "F"]}
    reference = read_radiograph(dicom_file(tmp_path / "ref.dcm", pixels, **tags))
    rad = read_radiograph(dicom_file(tmp_path / name, pixels, preamble=preamble, **tags))
    assert rad.metadata["format"] == "dicom" and rad.metadata["view"] == "lateral"
    assert rad.metadata["view_from"] == "ViewPosition LL" and rad.metadata["modality"] == "DX"
    assert "flipped front-back" in rad.metadata["oriented"]  # A\F turned to the model's P\F
    assert np.array_equal(rad.array, reference.array)
    assert np.allclose(rad.array[:, ::-1], read_radiograph(dicom_file(tmp_path / "pf.dcm", pixels)).array)


def test_a_uid_named_lateral_is_refused_as_the_dcm_is(tmp_path, capsys):
    path = dicom_file(tmp_path / UID_NAME, ramp(64, 64), preamble=TIFF_PREAMBLE, ViewPosition="LL")
    assert main(["xray2ct", str(path), str(tmp_path / "u.nii.gz"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "the input is marked lateral (its DICOM header: ViewPosition LL)" in err
    assert not (tmp_path / "u.nii.gz").exists()


@pytest.mark.parametrize("name", ["1.3.6.1.4.1.99.1.10", "slice.png"])
def test_a_ct_slice_named_anything_is_refused_as_one(tmp_path, name):
    path = dicom_file(tmp_path / name, ramp(64, 64), modality="CT", preamble=TIFF_PREAMBLE, ImageType=AXIAL)
    with pytest.raises(InputError, match=rf"{name} is a CT slice \(DICOM Modality CT\), not a radiograph"):
        read_radiograph(path)


def test_a_batch_folder_tells_dicom_by_content(tmp_path):
    """A folder of UID-named files: "5 of 5 radiograph(s) written", CT slices and a lateral among them."""
    folder = tmp_path / "export"
    image = stored(chest(64))
    dicom_file(folder / "1.2.826.0.1.3680043.8.498.1", image, ViewPosition="PA")
    dicom_file(folder / "1.2.826.0.1.3680043.8.498.2", image, preamble=TIFF_PREAMBLE, ViewPosition="LL")
    dicom_file(folder / "1.2.826.0.1.3680043.8.498.3", image, preamble=TIFF_PREAMBLE, ViewPosition="AP")
    dicom_file(folder / "1.2.826.0.1.3680043.8.498.4", ramp(64, 64), modality="CT", ImageType=AXIAL)
    dicom_file(folder / "slice.png", ramp(64, 64), modality="CT", ImageType=AXIAL)  # a CT slice renamed .png
    out, report = tmp_path / "cts", tmp_path / "report.json"
    assert main(["xray2ct", str(folder), str(out), "--report", str(report), *TINY]) == 0
    said = json.loads(report.read_text(encoding="utf-8"))
    assert sorted(Path(r["input"]).name for r in said["radiographs"]) == ["1.2.826.0.1.3680043.8.498.1",
                                                                         "1.2.826.0.1.3680043.8.498.3"]  # fmt: skip
    assert [Path(s["radiograph"]).name for s in said["skipped"]] == ["1.2.826.0.1.3680043.8.498.2"]
    assert "marks a lateral view (ViewPosition LL)" in said["skipped"][0]["why"]
    assert [(p["files"], p["why"]) for p in said["passed_over"]] == [(2, "DICOM files of Modality CT")]
    assert all(r["settings"]["view"] == "pa" for r in said["radiographs"])


def test_sr_finds_a_ct_series_of_uid_named_slices(tmp_path):
    """The scan is shared with sr: a series whose slices are named by their UID is a series too."""
    series = tmp_path / "cts" / "series"
    for k in (1, 2):
        dicom_file(series / f"1.2.826.0.1.3680043.8.498.{k}", ramp(16, 16), modality="CT")
    (tmp_path / "cts" / "readme.txt").write_text("notes\n", encoding="utf-8")
    assert collect_volumes(tmp_path / "cts") == [series]


# -- 2. the DICM mark wins over a TIFF header in the preamble --------------------------------------------------------
@pytest.mark.parametrize("name", ["frames.dcm", UID_NAME])
def test_a_multi_frame_dicom_with_a_tiff_preamble_is_named_as_a_multi_frame_radiograph(tmp_path, name, capsys):
    path = dicom_file(tmp_path / name, np.stack([ramp(64, 64)] * 2), preamble=TIFF_PREAMBLE)
    assert not is_tiff(path)
    with pytest.raises(InputError, match=r"is a multi-frame radiograph \(2 frames, DICOM Modality DX\)"):
        read_radiograph(path)
    assert main(["xray2ct", str(path), str(tmp_path / "o.nii.gz"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "multi-frame radiograph (2 frames" in err and "TIFF" not in err and "tiffsplit" not in err


def test_a_real_tiff_is_still_a_tiff(tmp_path):
    path = tmp_path / "x.tif"
    path.write_bytes(b"II*\0" + bytes(200))
    assert is_tiff(path)


# -- 3. PresentationLUTShape INVERSE ---------------------------------------------------------------------------------
def test_presentation_lut_inverse_inverts_a_monochrome2_image(tmp_path):
    pixels = ramp()
    plain = read_radiograph(dicom_file(tmp_path / "plain.dcm", pixels)).array
    identity = read_radiograph(dicom_file(tmp_path / "identity.dcm", pixels, PresentationLUTShape="IDENTITY"))
    inverse = read_radiograph(dicom_file(tmp_path / "inverse.dcm", pixels, PresentationLUTShape="INVERSE"))
    assert np.array_equal(identity.array, plain) and "presentation_lut" not in identity.metadata
    assert np.allclose(inverse.array, 1.0 - plain, atol=1e-6)
    assert inverse.metadata["presentation_lut"] == ("inverted as its header's PresentationLUTShape INVERSE says: a "
                                                    "DICOM viewer shows this MONOCHROME2 image with its lowest values "
                                                    "white")  # fmt: skip


def test_presentation_lut_inverse_of_a_monochrome1_image_is_its_one_inversion(tmp_path):
    """DICOM's image modules pair INVERSE with MONOCHROME1: the one inversion MONOCHROME1 says, not a second (else
    every conformant MONOCHROME1 DX would be read bones dark)."""
    pixels = ramp()
    m2 = read_radiograph(dicom_file(tmp_path / "m2.dcm", pixels)).array
    for shape in (None, "IDENTITY", "INVERSE"):
        tags = {"PresentationLUTShape": shape} if shape else {}
        m1 = read_radiograph(dicom_file(tmp_path / f"m1_{shape}.dcm", pixels, photometric="MONOCHROME1", **tags))
        assert np.allclose(m1.array, 1.0 - m2, atol=1e-6) and "presentation_lut" not in m1.metadata, shape
    assert presentation_lut_inversion({"photometric": "MONOCHROME1", "presentation_lut_shape": "INVERSE"}) == ""
    assert presentation_lut_inversion({"photometric": "MONOCHROME2", "presentation_lut_shape": " inverse "})


def test_a_chest_stored_inverted_and_marked_inverse_is_not_called_inverted(tmp_path):
    """dx_m1pix_as_m2_plut_inverse.dcm: bones bright in a viewer, read bones dark with "run it again with --invert"."""
    gen = XrayToCTGenerator.tiny(seed=0)
    negative = stored(1.0 - chest())  # bones low: shown bones bright only through the INVERSE shape
    marked = read_radiograph(dicom_file(tmp_path / "marked.dcm", negative, PresentationLUTShape="INVERSE"))
    _, report = gen.run(marked, device="cpu", steps=1, num_stages=1)
    assert not [n for n in report["notes"] if "looks inverted" in n]
    assert [n for n in report["notes"] if "PresentationLUTShape INVERSE" in n]
    _, unmarked = gen.run(read_radiograph(dicom_file(tmp_path / "unmarked.dcm", negative)), device="cpu", steps=1,
                          num_stages=1)  # fmt: skip
    assert [n for n in unmarked["notes"] if "looks inverted" in n]  # the same pixels without the shape: inverted


def test_the_slicer_modules_command_applies_the_presentation_lut_of_the_nodes_dicom_file(tmp_path):
    """The X-ray to CT module hands its node's pixels (as Slicer's reader gives them: MONOCHROME1 applied, the
    Presentation LUT not) and the DICOM file the node came from: its command reads them as xray2ct reads the file."""
    import importlib.util

    import SimpleITK as sitk

    spec = importlib.util.spec_from_file_location("xray_cli", Path(__file__).resolve().parents[1] / "XrayToCT" / "CLI"
                                                  / "XrayToCTGenerate.py")  # fmt: skip
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    marked = dicom_file(tmp_path / "marked.dcm", stored(1.0 - chest()), PresentationLUTShape="INVERSE")
    node_pixels = tmp_path / "node.nrrd"  # what the module writes of the node: the file's pixels as ITK reads them
    sitk.WriteImage(sitk.ReadImage(str(marked)), str(node_pixels))
    as_file = read_radiograph(marked)
    handed = cli.load_radiograph(str(node_pixels), False, str(marked))
    assert np.allclose(handed.array, as_file.array, atol=1e-6)
    assert handed.metadata["presentation_lut"] == as_file.metadata["presentation_lut"]


def test_the_help_of_invert_names_the_presentation_lut(capsys):
    assert main(["xray2ct", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "never needed for DICOM: MONOCHROME1 and a PresentationLUTShape INVERSE are applied" in help_text


# -- 4. the square crop is said, and its warning reaches the notes ---------------------------------------------------
def test_a_portrait_detector_image_says_what_its_square_crop_leaves_out(tmp_path, caplog):
    """A 43 x 35 cm detector image: 40 mm dropped top and bottom without a word."""
    image = np.zeros((432, 352), np.float32)
    image[:, :] = np.linspace(0.1, 0.9, 352)[None, :]
    rad = Radiograph(image, (1.0, 1.0), {"source": "det.dcm"})
    assert square_crop_note(rad) == (logging.INFO, "the radiograph is 432x352 mm (432x352 pixels): its middle 352x352 "
                                     "mm square is used (81% of the image), leaving out 40 mm (40 rows) at the top and "
                                     "at the bottom")  # fmt: skip
    gen = XrayToCTGenerator.tiny(seed=0)
    notes: list[str] = []
    with caplog.at_level(logging.INFO, logger="DiffusionCore"):
        gen.prepare_input(rad, None, notes)
    assert [n for n in notes if "leaving out 40 mm (40 rows) at the top and at the bottom" in n]
    assert "leaving out 40 mm (40 rows)" in caplog.text
    assert square_crop_note(Radiograph(image[:352], (1.0, 1.0), {})) == (logging.DEBUG, "")  # square: nothing


def test_the_crop_warning_goes_into_the_report_notes(tmp_path):
    wide = np.random.default_rng(0).uniform(0.3, 1.0, (64, 105)).astype(np.float32)  # exposed to its edges; 61% square
    level, said = square_crop_note(Radiograph(wide, None, {}))
    assert level == logging.WARNING and said.startswith(
        "the radiograph is 64x105 pixels: only its middle 64x64 square is used (61% of the image), leaving out 20 "
        "columns at the left and 21 columns at the right."
    )
    path = dicom_file(tmp_path / "wide.dcm", stored(wide))
    _, report = XrayToCTGenerator.tiny(seed=0).run(read_radiograph(path), device="cpu", steps=1, num_stages=1)
    assert [n for n in report["notes"] if "only its middle 64x64 square is used (61% of the image)" in n]


# -- 5. --save-stages with one stage ---------------------------------------------------------------------------------
def test_save_stages_with_one_stage_says_it_writes_nothing(tmp_path, capsys):
    from DiffusionCore.cli.xray import save_stages_note

    assert save_stages_note(1, 1, "xray-default") == ("--save-stages writes no stage file: the weights xray-default "
                                                      "have 1 stage, so the result is stage 1's volume")  # fmt: skip
    assert save_stages_note(2, 2, "w") == ""
    path = dicom_file(tmp_path / "pa.dcm", stored(chest(64)))
    out, report = tmp_path / "ss" / "ct.nii.gz", tmp_path / "report.json"
    out.parent.mkdir()
    options = ["--save-stages", "--num-stages", "1", "--report", str(report), *TINY]
    assert main(["xray2ct", str(path), str(out), *options]) == 0
    err = capsys.readouterr().err
    note = ("--save-stages writes no stage file: --num-stages 1 runs 1 of the 2 stages of the weights tiny-test-model "
            "(random weights), so the result is stage 1's volume")  # fmt: skip
    assert f"warning: {note}" in err
    said = json.loads(report.read_text(encoding="utf-8"))
    assert said["stage_outputs"] == [] and note in said["notes"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["ct.json", "ct.nii.gz"]


# -- 6. messages -----------------------------------------------------------------------------------------------------
def test_a_3d_volume_points_to_a_command_that_exists():
    with pytest.raises(InputError) as caught:
        as_radiograph(np.zeros((40, 64, 64), np.float32))
    said = str(caught.value)
    assert "give the CT to evaluate-xray (--reference CT)" in said and "DRR tools" not in said
    assert main(["evaluate-xray", "--help"]) == 0


def test_a_view_given_by_the_user_is_said_as_given():
    gen = XrayToCTGenerator.tiny(seed=0)
    with pytest.raises(InputError, match=r"trained on pa radiographs, but --view lateral was given; give a pa "
                                         r"radiograph .*leave --view out or give --view pa") as caught:  # fmt: skip
        gen.run(chest(64), device="cpu", steps=1, view="lateral")
    assert "marked" not in str(caught.value)


def test_num_stages_beyond_the_weights_names_what_is_accepted(monkeypatch):
    from DiffusionCore.cli import xray as cli

    args = argparse.Namespace(tiny_test_model=True, weights=None, allow_unregistered_weights=False, num_stages=3)
    with pytest.raises(ConfigError, match=r"have 2 stage\(s\) \(16\^3, 32\^3\); give --num-stages 1 to 2, or leave"):
        cli._generator(args)
    one = SimpleNamespace(num_stages=1, cascade=SimpleNamespace(configs=[SimpleNamespace(resolution=64)]))
    monkeypatch.setattr(XrayToCTGenerator, "tiny", staticmethod(lambda: one))
    args.num_stages = 2
    with pytest.raises(ConfigError, match=r"have 1 stage\(s\) \(64\^3\); give --num-stages 1, or leave it") as caught:
        cli._generator(args)
    assert "or less" not in str(caught.value)


def test_an_implausible_field_of_view_names_the_accepted_range():
    with pytest.raises(InputError, match=r"field of view 5000 mm is implausible: it must be from 50 to 1000 mm"):
        XrayToCTGenerator.tiny(seed=0).prepare_input(chest(64), 5000.0)


def test_a_text_file_is_refused_in_radiograph_terms(tmp_path, capsys):
    text = tmp_path / "hostname"
    text.write_text("workstation-7\n", encoding="utf-8")
    assert main(["xray2ct", str(text), str(tmp_path / "o.nii.gz"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (f"{text} is a text file, not a radiograph; a list of radiographs needs the suffix .txt, .lst, .list or "
            ".csv (rename it, e.g. hostname.txt), and a radiograph is one image file: DICOM") in err  # fmt: skip
    assert "volume" not in err


def test_a_copied_uid_named_file_reads_as_its_dcm(tmp_path):
    """The same bytes under both names read the same."""
    dcm = dicom_file(tmp_path / "pa.dcm", ramp(), preamble=TIFF_PREAMBLE, PatientOrientation=["R", "F"])
    uid = tmp_path / UID_NAME
    shutil.copyfile(dcm, uid)
    a, b = read_radiograph(dcm), read_radiograph(uid)
    assert np.array_equal(a.array, b.array) and a.metadata["oriented"] == b.metadata["oriented"]
    assert pydicom.dcmread(uid).preamble[:4] == b"II*\0"
