"""X-ray commands end to end with tiny networks, radiograph reading, and the bad inputs users give."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionCore.cli.main import main
from DiffusionCore.errors import InputError
from DiffusionCore.volume import Volume, read_volume, write_volume
from DiffusionCore.xray.radiograph import as_radiograph, match_drr_style, read_radiograph, resize_radiograph

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("xray")
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 40)] * 3, indexing="ij")
    body = np.where((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1, 40.0, -1000.0)
    ct = (body + np.where(x**2 + (y - 0.4) ** 2 < 0.02, 900.0, 0.0)).astype(np.float32)
    write_volume(Volume(ct, (8.0, 8.0, 8.0)), d / "ct.nii.gz")
    gray = (np.random.default_rng(0).random((64, 72)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(gray), str(d / "xr.png"))
    rgb = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(d / "rgb.png"))
    sitk.WriteImage(sitk.GetImageFromArray(gray[:10, :10]), str(d / "tiny.png"))
    good = np.zeros((64, 64), np.uint16)
    good[:, 32:] = 1000
    img = sitk.GetImageFromArray(good)
    img.SetMetaData("0008|0060", "CR")
    img.SetMetaData("0028|0030", "0.5\\0.4")
    sitk.WriteImage(img, str(d / "m2.dcm"))
    raw = (d / "m2.dcm").read_bytes()
    assert b"MONOCHROME2" in raw
    (d / "m1.dcm").write_bytes(raw.replace(b"MONOCHROME2", b"MONOCHROME1"))  # same length, valid DICOM
    (d / "corrupt.dcm").write_bytes(raw[:200] + os.urandom(300))
    png = bytearray((d / "xr.png").read_bytes())
    png[60:120] = bytes(b ^ 0x55 for b in png[60:120])  # damaged image data: the PNG reader fails part-way
    (d / "damaged.png").write_bytes(bytes(png))
    return {p.stem.split(".")[0]: p for p in d.iterdir()} | {"dir": d}


def test_read_radiograph_dicom_monochrome_and_spacing(files):
    m2 = read_radiograph(files["m2"])
    m1 = read_radiograph(files["m1"])
    assert m2.pixel_spacing == (0.5, 0.4) and m2.metadata["photometric"] == "MONOCHROME2"
    assert m2.array[0, 40] == 1.0 and m2.array[0, 0] == 0.0
    assert m1.metadata["photometric"] == "MONOCHROME1"
    assert m1.array[0, 40] == 0.0 and m1.array[0, 0] == 1.0  # inverted: bright = attenuating
    png = read_radiograph(files["xr"])
    assert png.shape == (64, 72) and png.array.min() == 0 and png.array.max() == 1
    small = resize_radiograph(m2, 32)
    assert small.shape == (32, 32) and small.pixel_spacing == (1.0, 0.8)
    ref = np.linspace(0, 1, 4096).reshape(64, 64) ** 2
    matched = match_drr_style(png.array, ref)
    assert abs(np.median(matched) - np.median(ref)) < 0.02


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("rgb", "colour"),
        ("ct", "3D volume"),
        ("tiny", "10x10"),
        ("corrupt", "corrupt"),
        ("damaged", "cannot read"),
        ("missing", "does not"),
    ],
)
def test_bad_radiographs_give_one_error_line(files, tmp_path, capsys, name, message):
    src = files.get(name, files["dir"] / "missing.png")
    with pytest.raises(InputError, match=message):
        read_radiograph(src)
    code = main(["xray2ct", str(src), str(tmp_path / "o.nii.gz"), "--tiny-test-model", "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1]
    assert "ITK ERROR" not in err[-1] and not re.search(r"0x[0-9a-f]{6}", err[-1])  # the reader's words only
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_radiograph_far_from_square_is_run_with_a_warning_about_the_crop(files, tmp_path, capsys):
    """The model reads the middle square of the radiograph; of a panoramic strip that is a small part, and the run
    went ahead without a word."""
    strip = (np.random.default_rng(2).random((40, 200)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(strip), str(tmp_path / "strip.png"))
    for src, warned in ((tmp_path / "strip.png", True), (files["xr"], False)):  # xr.png: 64x72
        assert main(["xray2ct", str(src), str(tmp_path / f"{src.stem}.nii.gz"), "--tiny-test-model", "--progress",
                     "none"]) == 0
        err = capsys.readouterr().err
        assert ("only its middle 40x40 square is used (20% of the image)" in err) is warned
        assert ("warning: the radiograph is" in err) is warned  # an info line for the small crop of xr.png
        assert ("info: the radiograph is 64x72 pixels: its middle 64x64 square is used (89% of the image), leaving "
                "out 4 columns at the left and at the right" in err) is not warned


def test_a_reference_ct_with_nothing_to_see_in_the_training_geometry_is_named(tmp_path, capsys):
    """evaluate-xray renders the reference's radiograph itself; for a CT that holds too little body in the 350 mm
    cube (a scan a few centimetres across) that radiograph is blank. The message said "the radiograph is blank ...
    check the file", of a radiograph the user never gave."""
    box = np.full((20, 20, 20), -1000.0, np.float32)
    box[5:15, 5:15, 5:15] = 40.0
    write_volume(Volume(box, (1.0, 1.0, 1.0)), tmp_path / "small.nrrd")
    code = main(["evaluate-xray", "--reference", str(tmp_path / "small.nrrd"), "--tiny-test-model", "--progress",
                 "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: {tmp_path / 'small.nrrd'}: its radiograph in the training geometry "
                                            "(a PA view of")
    assert "check the file" not in err[-1]


def test_a_greyscale_radiograph_saved_in_colour_is_read_as_greyscale(files, tmp_path):
    """Screenshots, image editors and JPEG exports store radiographs as RGB(A) with equal channels."""
    grey = sitk.GetArrayFromImage(sitk.ReadImage(str(files["xr"])))
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgba = np.concatenate([rgb, np.full(grey.shape + (1,), 255, np.uint8)], axis=-1)
    chroma = np.random.default_rng(2).integers(-1, 2, rgb.shape)  # JPEG's colour rounding: +-1 grey level
    jpeg_like = np.clip(rgb.astype(np.int16) + chroma, 0, 255).astype(np.uint8)
    want = read_radiograph(files["xr"]).array
    for name, pixels in {"rgb": rgb, "rgba": rgba, "jpeg_like": jpeg_like}.items():
        path = tmp_path / f"{name}.png"
        sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(path))
        got = read_radiograph(path).array
        np.testing.assert_allclose(got, want, atol=0 if name != "jpeg_like" else 0.01)
    np.testing.assert_array_equal(as_radiograph(rgb).array, as_radiograph(grey).array)
    outs = {}
    for name in ("xr", "rgb"):
        src = files["xr"] if name == "xr" else tmp_path / "rgb.png"
        outs[name] = tmp_path / f"{name}.nii.gz"
        assert main(["xray2ct", str(src), str(outs[name]), "--tiny-test-model", "--progress", "none"]) == 0
    np.testing.assert_array_equal(read_volume(outs["rgb"]).array, read_volume(outs["xr"]).array)
    tinted = rgb.copy()
    tinted[..., 0] = np.clip(tinted[..., 0].astype(np.int16) + 40, 0, 255)  # a colour cast is colour
    with pytest.raises(InputError, match="is a colour image"):
        as_radiograph(tinted)


def _dicom_variant(src: Path, dst: Path, pixels: np.ndarray | None = None, **tags) -> Path:
    """A copy of the DICOM radiograph ``src`` with other pixels and header tags (pydicom keywords)."""
    import pydicom

    ds = pydicom.dcmread(src)
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(dst)
    return dst


@pytest.mark.parametrize(("tags", "magnification", "says"), [
    ({}, 1.1, "nominal 1.1"),  # the header gives nothing: a PA chest at 180 cm
    ({"ImagerPixelSpacing": [0.5, 0.4], "EstimatedRadiographicMagnificationFactor": 1.25}, 1.25,
     "EstimatedRadiographicMagnificationFactor 1.25"),
    ({"DistanceSourceToDetector": 1800, "DistanceSourceToPatient": 1600}, 1.125,
     "DistanceSourceToDetector / DistanceSourceToPatient"),
    ({"EstimatedRadiographicMagnificationFactor": 7.0}, 1.1, "nominal"),  # not a radiograph's: a header error
    ({"PixelSpacingCalibrationType": "GEOMETRY", "EstimatedRadiographicMagnificationFactor": 1.25}, 1.0,
     "calibrated to the patient"),
    ({"ImagerPixelSpacing": [0.55, 0.44]}, 1.0, "PixelSpacing (in the patient"),  # the modality corrected it
    ({"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, 1.0, "a CT localizer"),
])  # fmt: skip
def test_the_field_of_view_divides_the_detector_spacing_by_the_headers_magnification(files, tmp_path, tags,
                                                                                      magnification, says):
    """The cube's side is the radiograph's size in the patient: its pixel spacing over the magnification of the
    anatomy on the detector. That was 1.1 for every image; a CT localizer's spacing is already in the patient (its
    cube was 10% too small, so the anatomy 10% too large), and a DX header often gives its own factor or distances."""
    from DiffusionCore.xray.pipeline import XrayToCTGenerator

    path = _dicom_variant(files["m2"], tmp_path / "r.dcm", **tags)
    rad = read_radiograph(path)
    assert rad.metadata["magnification"] == pytest.approx(magnification) and says in rad.metadata["magnification_from"]
    _, fov, source = XrayToCTGenerator.tiny(seed=0).prepare_input(rad, None)
    assert fov == pytest.approx(min(64 * 0.5, 64 * 0.4) / magnification)
    assert source.startswith(f"pixel spacing / magnification {magnification:.3g}: ") and says in source


def test_dicom_images_that_are_not_radiographs_are_refused(files, tmp_path, capsys):
    """A CT slice, an MR image or a mammogram saved as one DICOM image would otherwise become a "CT" from a
    "radiograph"; a CT localizer (topogram, scout) is a projection radiograph and is read."""
    cases = {
        "ct_slice": ({"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}, "is a CT slice (DICOM Modality CT)"),
        "mr": ({"Modality": "MR"}, "is an MR image"),
        "mammo": ({"Modality": "MG"}, "is a mammogram"),
    }
    for name, (tags, message) in cases.items():
        src = _dicom_variant(files["m2"], tmp_path / f"{name}.dcm", **tags)
        with pytest.raises(InputError, match=re.escape(message)):
            read_radiograph(src)
        code = main(["xray2ct", str(src), str(tmp_path / f"{name}.nii.gz"), "--tiny-test-model", "--progress", "none"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1] and "radiograph (CR or DX) or a CT topogram" in err[-1]
        assert not (tmp_path / f"{name}.nii.gz").exists()
    scout = _dicom_variant(files["m2"], tmp_path / "scout.dcm", Modality="CT",
                           ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    rad = read_radiograph(scout)
    assert rad.metadata["view"] == "pa" and rad.metadata["view_from"] == "image directions L\\F"
    np.testing.assert_array_equal(rad.array, read_radiograph(files["m2"]).array)


def test_a_radiograph_is_turned_as_its_header_says(files, tmp_path):
    """Frontal radiographs stored mirrored, upside down or on their side (PatientOrientation, or a CT localizer's
    ImageOrientationPatient) reach the model head up with the patient's left on the right, as the training DRRs
    are; one whose header says nothing is left as it is."""
    rng = np.random.default_rng(3)
    upright = (rng.random((40, 56)) * 4000).astype(np.uint16)  # not square, so that a transpose shows
    spacing = ["0.5", "0.25"]  # (row, col) mm of the upright image
    want = read_radiograph(_dicom_variant(files["m2"], tmp_path / "up.dcm", upright, PatientOrientation=["L", "F"],
                                          PixelSpacing=spacing))
    assert "oriented" not in want.metadata and want.pixel_spacing == (0.5, 0.25)
    stored = {
        "mirrored": (upright[:, ::-1], {"PatientOrientation": ["R", "F"]}, "flipped left-right"),
        "upside_down": (upright[::-1], {"PatientOrientation": ["L", "H"]}, "flipped upside down"),
        "on_its_side": (upright.T, {"PatientOrientation": ["F", "L"]}, "transposed"),
        "both": (upright[::-1, ::-1].T, {"PatientOrientation": ["H", "R"]}, "transposed and flipped left-right and flipped upside down"),
        "scout_mirrored": (upright[:, ::-1], {"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
                                              "ImageOrientationPatient": [-1, 0, 0, 0, 0, -1]}, "flipped left-right"),
    }
    for name, (pixels, tags, done) in stored.items():
        pix_spacing = spacing[::-1] if pixels.shape != upright.shape else spacing
        rad = read_radiograph(_dicom_variant(files["m2"], tmp_path / f"{name}.dcm", pixels, PixelSpacing=pix_spacing,
                                             **tags))
        np.testing.assert_array_equal(rad.array, want.array, err_msg=name)
        assert rad.pixel_spacing == (0.5, 0.25), name
        assert rad.metadata["oriented"].startswith(done + " to the model's orientation"), name
    plain = read_radiograph(_dicom_variant(files["m2"], tmp_path / "plain.dcm", upright[:, ::-1], PixelSpacing=spacing))
    np.testing.assert_array_equal(plain.array, want.array[:, ::-1])  # no header: nothing to go by
    assert "view" not in plain.metadata


def test_a_lateral_radiograph_is_named_as_such(files, tmp_path, capsys):
    """The shipped weights take frontal views: a lateral (ViewPosition LL) is refused with what the header says
    and how to override a wrong header; --view pa overrides it."""
    src = _dicom_variant(files["m2"], tmp_path / "lat.dcm", ViewPosition="LL")
    assert read_radiograph(src).metadata["view"] == "lateral"
    out = tmp_path / "lat.nii.gz"
    code = main(["xray2ct", str(src), str(out), "--tiny-test-model", "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and not out.exists()
    assert "trained on pa radiographs, the input is marked lateral (its DICOM header: ViewPosition LL)" in err
    assert "give the view (--view)" in err
    assert main(["xray2ct", str(src), str(out), "--tiny-test-model", "--progress", "none", "--view", "pa"]) == 0
    frontal = _dicom_variant(files["m2"], tmp_path / "ap.dcm", ViewPosition="AP")
    assert main(["xray2ct", str(frontal), str(tmp_path / "ap.nii.gz"), "--tiny-test-model", "--progress", "none"]) == 0


def test_a_radiograph_of_another_body_part_is_run_with_a_warning(files, tmp_path, capsys):
    """The weights are chest models: a shoulder radiograph (BodyPartExamined SHOULDER, as the shoulder-ap sample
    says) still runs, and the log and the report say that the result is no CT of the shoulder."""
    for part, warned in (("SHOULDER", True), ("CHEST", False)):
        src = _dicom_variant(files["m2"], tmp_path / f"{part}.dcm", BodyPartExamined=part)
        report = tmp_path / f"{part}_report.json"
        assert main(["xray2ct", str(src), str(tmp_path / f"{part}.nii.gz"), "--tiny-test-model", "--progress", "none",
                     "--report", str(report)]) == 0
        notes = " ".join(json.loads(report.read_text())["notes"])
        err = capsys.readouterr().err
        says = f"BodyPartExamined {part}, and the weights were trained on chest radiographs"
        assert (says in notes and says in err) == warned and (says in notes or says in err) == warned, part


def test_xray2ct_end_to_end_subprocess(files, tmp_path):
    out = tmp_path / "ct_out.nii.gz"
    cmd = [sys.executable, "-m", "DiffusionCore", "xray2ct", str(files["xr"]), str(out), "--tiny-test-model",
           "--num-stages", "2", "--steps", "2", "--save-stages", "--fov-mm", "300", "--report",
           str(tmp_path / "r.json"), "--progress", "slicer"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "<filter-progress>1.0000</filter-progress>" in res.stdout
    vol = read_volume(out)
    assert vol.shape == (32, 32, 32) and np.allclose(vol.spacing, 300 / 32)
    stage1 = read_volume(tmp_path / "ct_out_stage1.nii.gz")
    assert stage1.shape == (16, 16, 16)
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["stage"] for s in report["stages"]] == [1, 2] and report["fov_mm"] == 300
    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert again.returncode == 4 and "already exists" in again.stderr


def test_xray2ct_refuses_a_report_it_could_not_write_before_it_runs(files, tmp_path):
    """A --report in a folder that does not exist was found out only at the end, after the CT had been written: the
    run said it failed (exit 4) and left its output. It is refused before anything runs, as ``sr`` refuses it."""
    out = tmp_path / "ct.nii.gz"
    cmd = [sys.executable, "-m", "DiffusionCore", "xray2ct", str(files["xr"]), str(out), "--tiny-test-model",
           "--steps", "1", "--report", str(tmp_path / "missing" / "r.json")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 4 and "missing does not exist or is not writable" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_xray2ct_refuses_a_report_that_is_a_folder_or_the_outputs_sidecar_before_it_runs(files, tmp_path, capsys):
    """--report DIR --overwrite failed after the CT was written (the rename onto a folder); --report OUT.json beside
    OUT.nii.gz named a file the user never gave."""
    (tmp_path / "reports").mkdir()
    out = tmp_path / "ct.nii.gz"
    common = ["xray2ct", str(files["xr"]), str(out), "--tiny-test-model", "--progress", "none"]
    assert main([*common, "--report", str(tmp_path / "reports"), "--overwrite"]) == 4
    assert "reports is a folder: give the name of a file to write" in capsys.readouterr().err
    assert main([*common, "--report", str(tmp_path / "ct.json")]) == 4
    assert "and the output's provenance sidecar" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]


def _train(argv: list[str]) -> int:
    from DiffusionCore.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "xray", *argv])
    return args.func(args)


def test_xray_training_data_passes_over_cohort_series_that_cannot_be_read(tmp_path, diffusioncore_log):
    """`prepare-xray-data` and `train xray` on CT folders read a cohort as the SR trainers do: a series that is
    not one regular volume is passed over with a warning naming it, and the others are used."""
    from conftest import passed_over, write_cohort_with_unreadable_series

    from DiffusionCore.xray.data import load_cubes

    paths = write_cohort_with_unreadable_series(tmp_path / "cohort")
    cubes, used = load_cubes(paths, [16], 350.0)
    assert len(cubes) == 1 and cubes[0][16].shape == (16, 16, 16) and used == [paths[0]]
    said = passed_over(diffusioncore_log)
    assert len(said) == 2 and "p2/ct" in said[0] and "p3/ct" in said[1]
    data = tmp_path / "prepared"
    assert main(["prepare-xray-data", "--data", str(tmp_path / "cohort"), "--output-dir", str(data), "--resolutions",
                 "16", "--xray-resolutions", "16", "--progress", "none"]) == 0  # fmt: skip
    manifest = json.loads((data / "manifest.json").read_text())
    assert [Path(case["source"]) for case in manifest["cases"]] == [paths[0]]
    from DiffusionCore.xray.data import prepare_dataset

    steps = []
    prepare_dataset(paths[::-1], tmp_path / "again", resolutions=(16,), xray_resolutions=(16,),
                    progress=lambda done, total, _what: steps.append((done, total)))  # fmt: skip
    assert steps == [(3, 3)]  # the readable series is last here; those passed over count as done


def test_prepare_train_resume_next_stage_and_evaluate(files, tmp_path):
    data = tmp_path / "prepared"
    assert main(["prepare-xray-data", "--data", str(files["ct"]), "--output-dir", str(data), "--resolutions",
                 "16,32", "--xray-resolutions", "32,32", "--fov-mm", "350", "--progress", "none"]) == 0  # fmt: skip
    manifest = json.loads((data / "manifest.json").read_text())
    files_ = manifest["cases"][0]["files"]
    assert {"cube_16", "cube_32", "drr_32", "drr_32_aug0"} <= set(files_)
    cube = read_volume(data / files_["cube_32"])
    assert cube.shape == (32, 32, 32) and np.allclose(cube.spacing, 350 / 32)
    drr = np.load(data / files_["drr_32"])
    assert drr.shape == (32, 32) and 0 <= drr.min() and drr.max() <= 1
    augmented = np.load(data / files_["drr_32_aug0"])
    assert augmented.shape == (32, 32) and 0 <= augmented.min() and augmented.max() <= 1
    assert 0 < np.abs(augmented - drr).mean() < 0.2  # jittered, noisy and blurred, still the same anatomy
    assert manifest["fov_mm"] == 350 and manifest["resolutions"] == [16, 32]

    s1 = tmp_path / "s1"
    common = ["--data", str(data), "--tiny-test-model", "--device", "cpu"]
    assert _train(["--config", "stage1", "--output-dir", str(s1), "--max-steps", "2", *common]) == 0
    assert (s1 / "xray_cascade.safetensors").is_file()
    tags = {json.loads(line)["tag"] for line in (s1 / "metrics.jsonl").read_text().splitlines()}
    assert {"loss/stage1/v_loss", "loss/stage1/drr_loss", "val/stage1/one_step_t0.5_projection_l1"} <= tags
    assert (
        _train(["--config", "stage1", "--output-dir", str(s1), "--max-steps", "3", "--resume", *common]) == 0
    )
    state = json.loads((s1 / "latest.json").read_text())
    assert "00000003" in json.dumps(state)
    s2 = tmp_path / "s2"
    assert _train(["--config", "stage2", "--output-dir", str(s2), "--max-steps", "2", "--stage1-checkpoint",
                   str(s1), "--freeze-stage1", *common]) == 0  # fmt: skip
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

    c1 = UnifiedHybridViTCascade.from_pretrained(s1 / "xray_cascade.safetensors")
    c2 = UnifiedHybridViTCascade.from_pretrained(s2 / "xray_cascade.safetensors")
    w1, w2 = c1.stages[0].final.weight, c2.stages[0].final.weight
    assert c2.num_stages == 2 and np.array_equal(w1.detach().numpy(), w2.detach().numpy())  # stage 1 frozen
    assert c2.mean_ct.min() < -0.5 < c2.mean_ct.max() - 0.3  # the mean training CT is stored

    joint = tmp_path / "joint"
    assert _train(["--config", "stage2", "--output-dir", str(joint), "--max-steps", "1", "--train-all-stages",
                   *common]) == 0  # fmt: skip
    tuned = tmp_path / "tuned"
    assert _train(["--config", "stage2", "--output-dir", str(tuned), "--max-steps", "1", "--load-all-stages",
                   str(s2 / "xray_cascade.safetensors"), "--unfreeze-all", *common]) == 0  # fmt: skip
    ct = UnifiedHybridViTCascade.from_pretrained(tuned / "xray_cascade.safetensors")
    for stage in (0, 1):  # both stages started from s2's weights and both moved
        assert not np.array_equal(ct.stages[stage].final.weight.detach().numpy(),
                                  c2.stages[stage].final.weight.detach().numpy())  # fmt: skip
    assert json.loads((joint / "latest.json").read_text())

    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "DiffusionCore", "evaluate-xray", "--reference", str(files["ct"]), "--weights",
           str(s2 / "xray_cascade.safetensors"), "--allow-unregistered-weights", "--steps", "1", "--json",
           str(out), "--progress", "none"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["reference"] == str(files["ct"]) and isinstance(report["results"], list)
    got = {(r["method"], r["stage"]) for r in report["results"]}
    assert got == {(m, s) for m in ("model", "model-raw", "mean-ct", "lifting-only", "lifting+dc") for s in (1, 2)} | {
        ("previous-stage", 2), ("previous-stage+dc", 2)}  # stage 1's model volume upsampled: the rows stage 2 must beat
    by = {(r["method"], r["stage"]): r for r in report["results"]}
    for s in (1, 2):  # the consistency step makes each stage, and the lifting volume, re-project onto the input
        assert by[("model", s)]["reprojection_psnr"] > by[("model-raw", s)]["reprojection_psnr"]
        assert by[("lifting+dc", s)]["reprojection_psnr"] > by[("lifting-only", s)]["reprojection_psnr"] + 3
    # and the upsampled stage 1 too, at stage 2's finer grid and radiograph
    assert by[("previous-stage+dc", 2)]["reprojection_psnr"] > by[("previous-stage", 2)]["reprojection_psnr"] + 3
    for r in report["results"]:
        assert set(r) == {"method", "stage", "psnr3d", "ssim3d", "reprojection_psnr", "cross_view_psnr", "seconds"}
        assert type(r["stage"]) is int and all(type(r[k]) is float for k in list(r)[2:])
        assert np.isfinite(r["psnr3d"]) and -1 <= r["ssim3d"] <= 1
    unregistered = [c for c in cmd[:-4] if c != "--allow-unregistered-weights"]  # no --json, no flag
    refused = subprocess.run(unregistered, capture_output=True, text=True, env=ENV, timeout=120)
    assert refused.returncode == 3 and "error:" in refused.stderr


def test_terminate_during_generation_leaves_no_output(files, tmp_path):
    """Slicer's Cancel (SIGTERM) stops xray2ct with exit 130 and one error line; no volume is written."""
    out = tmp_path / "ct_out.nii.gz"
    cmd = [sys.executable, "-m", "DiffusionCore", "xray2ct", str(files["xr"]), str(out), "--tiny-test-model",
           "--num-stages", "2", "--steps", "400", "--progress", "slicer"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stdout:  # wait until sampling has started
        if line.startswith("<filter-progress>") and float(line[17:23]) > 0:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: xray2ct was stopped by signal SIGTERM; no output was written."
    ]
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if "ct_out" in p.name] == []


def test_prepare_refuses_a_negative_number_of_augmented_copies(tmp_path, capsys):
    assert main(["prepare-xray-data", "--data", str(tmp_path), "--output-dir", str(tmp_path / "p"),
                 "--augmented-copies", "-1"]) == 2  # fmt: skip
    assert "argument --augmented-copies: must be an integer >= 0; got -1" in capsys.readouterr().err


def test_a_folder_given_as_the_radiographs_dicom_header_is_named_as_a_folder(tmp_path):
    """XrayToCTGenerate --dicomHeader FOLDER said "the DICOM file FOLDER does not exist"."""
    from DiffusionCore.errors import InputError
    from DiffusionCore.xray.radiograph import read_dicom_header

    with pytest.raises(InputError, match=r"is a folder; give the DICOM file the radiograph was loaded from, inside it"):
        read_dicom_header(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        read_dicom_header(tmp_path / "gone.dcm")
