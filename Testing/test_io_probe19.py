"""Probe 19 (a messy batch folder), the input and output side: the one-volume Slicer CLI given a folder or a list,
its messages in its own flags, upper-case suffixes, names too long for the file system, list files with a header
line or a missing entry, a text file given as a volume, and messages that named the wrong cause (the factor, a
truncated NRRD, a damaged DICOM slice, an empty file, a non-UTF-8 name, a DICOM series on a full disk)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_phantom_array, write_dicom_series

from DiffusionCore.errors import InputError, OutputError
from DiffusionCore.inputs import collect_volumes
from DiffusionCore.provenance import Provenance
from DiffusionCore.volume import Grid, Volume, check_output_path, itk_path, read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
SR_CLI = ROOT / "CTDiffusionSR" / "CLI" / "CTDiffusionSRBatch.py"
XRAY_CLI = ROOT / "XrayToCT" / "CLI" / "XrayToCTGenerate.py"
LONG = "x" * 240


def _ct(seed: int = 0, spacing=(0.8, 0.8, 4.0)) -> Volume:
    return Volume(ct_phantom_array((4, 24, 24), seed), spacing=spacing)


def _run(argv: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, encoding="utf-8", timeout=timeout,
                          env=env)  # fmt: skip


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# -- 5: the Slicer CLI takes one volume per run -------------------------------------------------------------------
def test_sr_cli_given_a_list_or_a_folder_of_volumes_says_it_takes_one_and_names_the_sr_command(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    for i, name in enumerate(("a.nii.gz", "b.mha")):
        write_volume(_ct(i), folder / name)
    listing = tmp_path / "batch list.txt"
    listing.write_text(f"{folder / 'a.nii.gz'}\n{folder / 'b.mha'}\n", encoding="utf-8")
    noted = tmp_path / "cases_noted"
    noted.write_text("cases/a.nii.gz\n", encoding="utf-8")
    for given, said in ((listing, "is a list of volumes, and this module takes one volume per run"),
                        (folder, "is a folder of 2 volume file(s) without a DICOM series, and this module takes one "
                                 "volume per run")):  # fmt: skip
        proc = _run([str(SR_CLI), "--noAdapt", "--tinyTestModel", str(given), str(tmp_path / "out.nrrd")], tmp_path)
        assert proc.returncode == 2, proc.stderr
        (line,) = _error_lines(proc)
        assert said in line and "python -m DiffusionCore sr " in line and "OUT_FOLDER" in line, line
        assert not (tmp_path / "out.nrrd").exists()
    proc = _run([str(SR_CLI), "--noAdapt", "--tinyTestModel", str(noted), str(tmp_path / "out.nrrd")], tmp_path)
    (line,) = _error_lines(proc)
    assert "cases_noted is a text file, not a volume; a list of volumes needs the suffix .txt, .lst, .list or .csv" in line


def test_sr_cli_given_a_folder_of_volumes_and_a_series_does_not_quietly_take_the_series(tmp_path):
    """Probe 32 D2: 11 volume files and a DICOM series in a subfolder: the series alone was super-resolved, exit 0."""
    folder = tmp_path / "study"
    folder.mkdir()
    for i, name in enumerate(("a.nii.gz", "b.mha")):
        write_volume(_ct(i), folder / name)
    write_dicom_series(folder / "series", _ct(2))
    proc = _run([str(SR_CLI), "--noAdapt", "--tinyTestModel", str(folder), str(tmp_path / "out.nrrd")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc)
    assert "is a folder of 2 volume file(s) and a DICOM series, and this module takes one volume per run" in line, line
    assert not (tmp_path / "out.nrrd").exists()


def test_sr_cli_names_its_own_flag_for_a_volume_that_is_not_ct(tmp_path):
    """The engine says `pass --allow-non-ct (allow_non_ct=True in Python)`; this CLI's flag is --allowNonCT."""
    mr = write_volume(Volume(np.linspace(0, 900, 4 * 24 * 24, dtype=np.float32).reshape(4, 24, 24), (0.8, 0.8, 4.0)),
                      tmp_path / "mr.nrrd")  # fmt: skip
    proc = _run([str(SR_CLI), "--noAdapt", "--tinyTestModel", str(mr), str(tmp_path / "out.nrrd")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc)
    assert "does not look like CT" in line and "pass --allowNonCT." in line, line
    assert "allow-non-ct" not in line and "in Python" not in line


def test_cli_translation_keeps_the_engine_words_and_maps_each_flag():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sr_batch_cli", SR_CLI)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.in_cli_terms("use --no-adapt or --adapt 30, not --adapt-steps; pass --allow-unregistered-weights "
                            "(allow_unregistered=True) if you trust it") == (
        "use --noAdapt or --adaptSeconds 30, not --adaptSteps; pass --allowUnregisteredWeights if you trust it")
    assert cli.ENGINE_FLAGS["guidance"] == "--guidanceScale"  # the diffusion-stage note's names, as before


def test_a_folder_given_as_the_radiograph_is_called_a_folder(tmp_path):
    from DiffusionCore.xray.radiograph import read_radiograph

    xr = tmp_path / "xr"
    xr.mkdir()
    with pytest.raises(InputError, match=r"^radiograph \S*xr is a folder: give the path of one image file") as info:
        read_radiograph(xr)
    assert "does not exist" not in str(info.value)
    with pytest.raises(InputError, match=r"^radiograph \S*nope.png does not exist\. Check the path"):
        read_radiograph(tmp_path / "nope.png")
    proc = _run([str(XRAY_CLI), "--tinyTestModel", str(xr), str(tmp_path / "ct.nrrd")], tmp_path)
    (line,) = _error_lines(proc)
    assert f"radiograph {xr} is a folder" in line and "does not exist" not in line, line


# -- 6: upper-case suffixes ---------------------------------------------------------------------------------------
def test_volumes_with_upper_case_suffixes_are_collected_and_read(tmp_path):
    folder = tmp_path / "windows"
    folder.mkdir()
    vol = _ct()
    written = {}
    for name, lower in (("x.MHA", "x.mha"), ("y.NII", "y.nii"), ("UPPER.NII.GZ", "upper.nii.gz"),
                        ("Mixed.Nrrd", "mixed.nrrd")):  # fmt: skip
        write_volume(vol, tmp_path / lower)
        shutil.move(tmp_path / lower, folder / name)
        written[name] = folder / name
    write_volume(vol, tmp_path / "e.mha", compress=False)  # a detached header: E.MHD + its data file
    header = (tmp_path / "e.mha").read_bytes()
    cut = header.index(b"ElementDataFile = LOCAL\n")
    (folder / "E.MHD").write_bytes(header[:cut] + b"ElementDataFile = E.RAW\n")
    (folder / "E.RAW").write_bytes(header[cut + len(b"ElementDataFile = LOCAL\n"):])
    assert sorted(collect_volumes(folder)) == sorted([*written.values(), folder / "E.MHD"])
    for path in [*written.values(), folder / "E.MHD"]:
        np.testing.assert_allclose(read_volume(path).array, vol.array, atol=0.5, err_msg=str(path))
    out = write_volume(vol, tmp_path / "result.MHA")  # written too, and read back
    assert out.name == "result.MHA" and read_volume(out).shape == vol.shape


# -- 8: a path too long for the file system ------------------------------------------------------------------------
def test_an_output_name_too_long_for_the_file_system_says_so_and_what_to_do(tmp_path):
    from DiffusionCore.dicom_out import check_dicom_output
    from DiffusionCore.files import check_writable_file, write_json_atomic

    vol = _ct()
    for check in (lambda p: check_output_path(p), lambda p: write_volume(vol, p),
                  lambda p: check_dicom_output(p.with_suffix("")), lambda p: check_writable_file(p.with_suffix(".json")),
                  lambda p: write_json_atomic({}, p.with_suffix(".json"))):  # fmt: skip
        for name in (LONG + ".nii.gz", "y" * 260 + ".nii.gz"):  # too long with its temporary file; too long itself
            with pytest.raises(OutputError, match=r"^cannot write \S+: its name is too long for the file system \(\d+ "
                               r"bytes.*a name there may have at most 255\): use a shorter name or folder\.$"):
                check(tmp_path / name)
    assert os.listdir(tmp_path) == []
    deep = tmp_path.joinpath(*(["d" * 200] * 21))  # each name fits, the whole path does not
    with pytest.raises(OutputError, match=r"its path is too long for the file system .*use a shorter name or folder"):
        check_output_path(deep / "ct.nii.gz")


def test_sr_with_an_output_name_too_long_is_refused_before_any_work(tmp_path):
    src = write_volume(_ct(), tmp_path / "ct.nii.gz")
    out = tmp_path / f"{LONG}.nii.gz"
    proc = _run(["-m", "DiffusionCore", "sr", str(src), str(out), "--tiny-test-model", "--no-adapt", "--progress",
                 "none"], tmp_path)  # fmt: skip
    assert proc.returncode == 4, proc.stderr
    (line,) = _error_lines(proc)
    assert "its name is too long for the file system" in line and "use a shorter name or folder" in line, line
    assert "internal error" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz"]


# -- 11: list files ------------------------------------------------------------------------------------------------
def test_a_one_column_csv_with_a_header_line_is_read_without_it(tmp_path, diffusioncore_log):
    a, b = write_volume(_ct(0), tmp_path / "a.nii.gz"), write_volume(_ct(1), tmp_path / "b.mha")
    for header in ("path", "Filename", '"Volume"', "CT scans of 2026"):
        listing = tmp_path / "cases.csv"
        listing.write_bytes(f"{header}\r\na.nii.gz\r\nb.mha\r\n".encode())
        diffusioncore_log.clear()
        assert collect_volumes(listing) == [a, b]
        said = [(r.levelname, r.getMessage()) for r in diffusioncore_log]
        assert ("INFO", f"{listing}, line 1: {header} is the column's header, not a path: skipped") in said, said
        assert not [m for level, m in said if level == "WARNING"]
    listing = tmp_path / "cases.txt"  # a .txt: a known header word only; an unknown first line is a missing entry
    listing.write_text("path\na.nii.gz\n", encoding="utf-8")
    assert collect_volumes(listing) == [a]
    listing.write_text("missing.nii.gz\na.nii.gz\n", encoding="utf-8")
    assert collect_volumes(listing) == [tmp_path / "missing.nii.gz", a]


def test_a_missing_list_entry_is_passed_over_as_an_unreadable_one_and_the_others_go_on(tmp_path):
    a = write_volume(_ct(0), tmp_path / "a.nii.gz")
    listing = tmp_path / "cases.txt"
    listing.write_text("gone.nii.gz\na.nii.gz\n", encoding="utf-8")
    proc = _run(["-m", "DiffusionCore", "sr", str(listing), str(tmp_path / "out"), "--tiny-test-model", "--no-adapt",
                 "--progress", "none"], tmp_path)  # fmt: skip
    assert (tmp_path / "out" / "a.nii.gz").is_file(), proc.stderr
    assert (f"{listing}, line 1: {tmp_path / 'gone.nii.gz'} (relative paths are taken from the list file's folder) "
            "does not exist") in proc.stderr
    assert proc.returncode != 0  # the batch says that one failed, and names it when it passes it over
    assert sum("gone.nii.gz" in line for line in proc.stderr.splitlines()) >= 2, proc.stderr
    with pytest.raises(InputError, match="does not exist: check the path"):  # one INPUT: strict as before
        collect_volumes(tmp_path / "gone.nii.gz")
    assert a.is_file()


def test_a_text_file_given_as_a_volume_is_named_as_a_text_file(tmp_path):
    for name in ("cases", "cases.tsv"):
        text = tmp_path / name
        text.write_text("a.nii.gz\nb.nii.gz\n", encoding="utf-8")
        with pytest.raises(InputError, match=rf"^{re.escape(str(text))} is a text file, not a volume; a list of "
                           r"volumes needs the suffix \.txt, \.lst, \.list or \.csv \(rename it, e\.g\. cases\.txt\)"):
            read_volume(text)
    from DiffusionCore.files import text_file_error

    header = tmp_path / "detached.MHD"  # a volume's text header is no list
    header.write_text("NDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = d.raw\n")
    assert text_file_error(header) is None and text_file_error(header.with_suffix(".nhdr")) is None
    image = tmp_path / "junk.bin"
    image.write_bytes(bytes(range(256)) * 4)  # binary: left to the image reader's message
    with pytest.raises(InputError, match="could not read"):
        read_volume(image)


# -- 12: messages that named the wrong cause -----------------------------------------------------------------------
def test_the_finer_than_pixels_note_blames_the_factor_for_thick_slices_and_the_slices_for_thin_ones():
    from DiffusionCore.sr.pipeline import finer_than_pixels_note

    thick = Volume(np.zeros((10, 20, 20), np.float32), (0.842, 0.842, 5.0))
    note = finer_than_pixels_note(thick, Grid((80, 20, 20), (0.842, 0.842, 0.625), (0, 0, 0), np.eye(3)), 0)
    assert note.endswith(": the factor (x8) is too high for 5 mm slices; the largest useful factor is x6 (0.833 mm "
                         "slices), or a target spacing of 0.833 mm or more"), note
    assert "thin already" not in note
    assert finer_than_pixels_note(thick, Grid((60, 20, 20), (0.842, 0.842, 0.833), (0, 0, 0), np.eye(3)), 0) == ""
    thin = Volume(np.zeros((10, 20, 20), np.float32), (0.6, 0.6, 0.6))
    note = finer_than_pixels_note(thin, Grid((40, 20, 20), (0.6, 0.6, 0.15), (0, 0, 0), np.eye(3)), 0)
    assert "its 0.6 mm slices are thin already" in note


def test_a_truncated_raw_nrrd_and_a_header_only_one_are_called_truncated(tmp_path):
    whole = write_volume(_ct(), tmp_path / "ct.nrrd", compress=False, dtype="float32")
    data = whole.read_bytes()
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError, match=r"the file is truncated \(its header describes 9216 bytes of voxels, 8216 "
                       r"are there; an incomplete copy or download\)\. Copy it again\."):
        read_volume(cut)
    cut.write_bytes(data[:120])
    with pytest.raises(InputError, match=r"the file is truncated \(it ends inside its header.*Copy it again\."):
        read_volume(cut)
    assert read_volume(whole).shape == (4, 24, 24)


def test_a_dicom_series_with_a_slice_cut_short_names_that_file(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    files = write_dicom_series(series, Volume(ct_phantom_array((8, 24, 24)), (0.8, 0.8, 5.0)))
    damaged = Path(files[4])
    damaged.write_bytes(damaged.read_bytes()[:600])
    with pytest.raises(InputError, match=r"missing slices: a gap of 10\.00 mm after slice 4") as info:
        read_volume(series)
    assert f"{damaged} (0.6 kB where the slices read are" in str(info.value)
    assert "cut short" in str(info.value) and "copy the series again" in str(info.value)


def test_an_empty_file_says_what_to_do(tmp_path):
    for name in ("empty.nii.gz", "empty.nrrd", "empty.mha"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(InputError, match=rf"could not read \S*{name}: the file is empty \(0 bytes: an interrupted "
                           r"copy, download or export\)\. Copy or export it again\."):
            read_volume(tmp_path / name)


def test_a_non_utf8_file_name_is_shown_as_every_other_message_shows_it(tmp_path):
    name = os.fsdecode(b"bad\xff.mha")  # a lone surrogate, as Python holds the name it finds on disk
    with pytest.raises(InputError) as info:
        itk_path(str(tmp_path / name))
    assert f"cannot pass the file name {tmp_path / name} to ITK" in str(info.value)


# -- 13: a DICOM series on a full disk -----------------------------------------------------------------------------
def test_a_dicom_series_on_a_full_disk_says_the_disk_is_full_without_a_traceback(small_disk):
    from DiffusionCore.dicom_out import write_dicom_series as write_series

    vol = Volume(ct_phantom_array((16, 64, 64)), (0.8, 0.8, 1.0))
    prov = Provenance("sr", "SR x2 (synthetic)", "w", "0" * 64, {"factor": 2})
    with pytest.raises(OutputError) as info:
        write_series(vol, small_disk / "series", prov)
    text = str(info.value)
    assert text.startswith(f"could not write the DICOM series {small_disk / 'series'}: the disk holding {small_disk} "
                           "is full ("), text
    assert text.endswith("): free some space there or write to another folder"), text
    assert "Traceback" not in text and "With tag" not in text
    assert os.listdir(small_disk) == []


def test_upper_case_nifti_outputs_get_the_sidecar_a_lower_case_name_gets(tmp_path):
    from DiffusionCore.provenance import sidecar_path

    assert sidecar_path(tmp_path / "y.NII") == tmp_path / "y.json"
    assert sidecar_path(tmp_path / "UPPER.NII.GZ") == tmp_path / "UPPER.json"
    assert sidecar_path(tmp_path / "y.nii") == tmp_path / "y.json"


def test_a_target_spacing_beyond_the_largest_factor_says_what_to_give():
    from DiffusionCore.degrade import thin_grid
    from DiffusionCore.errors import GeometryError
    grid = Grid((40, 16, 16), (0.8, 0.8, 2.5), (0.0, 0.0, 0.0), np.eye(3))
    with pytest.raises(GeometryError, match=r"more than 8x finer than the 2.5 mm slices: give a target spacing of "
                       r"0.312 mm or more \(or --factor 8 at most\)"):
        thin_grid(grid, target_spacing=0.1)


def test_sr_given_a_list_without_a_list_suffix_names_the_input_not_the_output(tmp_path):
    write_volume(_ct(), tmp_path / "a.nii.gz")
    cases = tmp_path / "cases"  # a list of volumes saved without a suffix
    cases.write_text("a.nii.gz\n", encoding="utf-8")
    proc = _run(["-m", "DiffusionCore", "sr", str(cases), str(tmp_path / "o_cases"), "--no-adapt", "--tiny-test-model"],
                tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc)
    assert f"{cases} is a text file, not a volume; a list of volumes needs the suffix .txt" in line, line
    assert "o_cases" not in line and not (tmp_path / "o_cases").exists()


def test_the_finer_than_pixels_warning_is_in_the_reports_notes_too():
    from DiffusionCore.sr.pipeline import SuperResolver

    thick = Volume(ct_phantom_array((6, 24, 24), 0), spacing=(0.842, 0.842, 5.0))
    _, report = SuperResolver.tiny_predictor().run(thick, factor=8)
    assert any("the factor (x8) is too high for 5 mm slices" in n for n in report.get("notes", [])), report.get("notes")
