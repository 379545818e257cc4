"""Series whose recorded SliceThickness is not their slice spacing (probe 33: F10, F7, F11, and F6's --axis help).

What a user relies on: an interspaced series (thin slices with wide gaps, as HRCT makes) is refused before any work,
saying what was found, why and what to do, unless allowed (``--allow-interspaced``; the Slicer module's
``allow_interspaced`` and its batch CLI's ``--allowInterspaced``), and then the warning says the result may hold bright
rims; a batch passes such a series over and goes on; an overlapping series still runs with its note; the adaptation's
check-batch gain says that its pairs assume slices as thick as their spacing when the series' are not; a mismatch of
a few percent beyond rounding is named; and ``--axis`` says that z/y/x are the file's array axes.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import ct_phantom_array, write_dicom_series
from test_sr_settings import batch_script

from DiffusionCore.cli import sr as sr_cli
from DiffusionCore.cli.main import build_parser as build_main_parser
from DiffusionCore.cli.main import main
from DiffusionCore.errors import InputError
from DiffusionCore.sr.adapt import AdaptSettings
from DiffusionCore.sr.pipeline import SuperResolver
from DiffusionCore.volume import Volume, read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--tiny-test-model", "--no-adapt", "--progress", "none", "--factor", "2")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ct(shape=(6, 64, 64), spacing_mm: float = 4.0) -> Volume:
    """A small CT-like phantom with slices ``spacing_mm`` apart (0.8 mm pixels)."""
    return Volume(ct_phantom_array(shape), (0.8, 0.8, spacing_mm), (0.0, 0.0, 0.0), np.eye(3))


def series(folder: Path, thickness_mm: float, *, spacing_mm: float = 4.0, uid: str = "1.2.826.0.1.3680043.8.498.1",
           shape=(6, 64, 64)) -> Path:  # fmt: skip
    """A real CT DICOM series of :func:`ct`, its SliceThickness set to ``thickness_mm`` in every file."""
    for f in write_dicom_series(folder, ct(shape, spacing_mm), series_uid=uid):
        ds = pydicom.dcmread(f)
        ds.SliceThickness = f"{thickness_mm:g}"
        ds.save_as(f)
    return folder


def warnings_of(records) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


# -- F10: interspaced series -------------------------------------------------------------------------------------
def test_an_interspaced_series_is_refused_before_any_work_saying_what_why_and_what_to_do(
    tmp_path, monkeypatch, capsys
):
    """1 mm slices every 4 mm: refused by the engine (marked not for this tool) and by ``sr`` before the weights are
    loaded, naming what was found, why, and the two ways on."""
    folder = series(tmp_path / "hrct", 1.0)
    volume = read_volume(folder)
    with pytest.raises(InputError) as refused:
        SuperResolver.tiny_predictor().run(volume, factor=2)
    said = str(refused.value)
    assert "1 mm slices 4 mm apart: an interspaced protocol" in said
    assert "bright rims at edges" in said and "no better than interpolation" in said
    assert "--allow-interspaced" in said and "interpolate the gaps instead" in said
    assert getattr(refused.value, "not_for_this_tool", False)

    def no_weights(args):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(sr_cli, "load_resolver", no_weights)
    out = tmp_path / "out.nii.gz"
    assert main(["sr", str(folder), str(out), *FAST]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert (
        f"{folder} has 1 mm slices 4 mm apart: an interspaced protocol" in error
        and "--allow-interspaced" in error
    )
    assert not out.exists()


def test_the_threshold_is_half_the_spacing_and_overlapping_series_still_run(tmp_path, diffusioncore_log):
    """Slices half as thick as their spacing (gaps as wide as the slices) are refused; 60% of it runs with the note on
    gaps, and an overlapping series (twice as thick as its spacing) with its own note."""
    resolver = SuperResolver.tiny_predictor()
    with pytest.raises(InputError, match="2 mm slices 4 mm apart: an interspaced protocol"):
        resolver.run(read_volume(series(tmp_path / "half", 2.0)), factor=2)
    for thickness, says in ((2.4, "with gaps between them"), (8.0, "an overlapping reconstruction")):
        diffusioncore_log.clear()
        _, report = resolver.run(read_volume(series(tmp_path / f"t{thickness:g}", thickness)), factor=2)
        [note] = report["notes"]
        assert says in note and "bright rims" not in note
        assert warnings_of(diffusioncore_log) == [note]


def test_allowed_an_interspaced_series_runs_and_the_warning_names_bright_rims(
    tmp_path, diffusioncore_log, capsys
):
    folder = series(tmp_path / "hrct", 1.0)
    _, report = SuperResolver.tiny_predictor().run(read_volume(folder), factor=2, allow_interspaced=True)
    [note] = report["notes"]
    assert "1 mm thick but 4 mm apart" in note and "may hold bright rims at edges" in note
    assert warnings_of(diffusioncore_log) == [note]
    out = tmp_path / "out.nii.gz"
    assert main(["sr", str(folder), str(out), *FAST, "--allow-interspaced"]) == 0
    assert "may hold bright rims at edges" in capsys.readouterr().err and out.is_file()
    # the result's provenance (its sidecar, and so DICOM comments and Slicer nodes) says it was run anyway
    from DiffusionCore.provenance import read_provenance

    prov = read_provenance(out)
    assert prov.input_slice_thickness_mm == 1.0 and "with gaps between them" in prov.input_slice_note
    assert "run anyway, as asked" in prov.input_slice_note and "bright rims" in prov.input_slice_note


def test_files_that_disagree_on_the_thickness_are_named_in_the_results_provenance(tmp_path, capsys):
    """Two of six files say 2 mm where the others say 4 mm: the run warns, and the result records both values."""
    from DiffusionCore.provenance import read_provenance

    folder = series(tmp_path / "mixed", 4.0)
    for f in sorted(folder.iterdir())[:2]:
        ds = pydicom.dcmread(f)
        ds.SliceThickness = "2"
        ds.save_as(f)
    out = tmp_path / "out.nii.gz"
    assert main(["sr", str(folder), str(out), *FAST]) == 0
    assert "different slice thicknesses" in capsys.readouterr().err
    prov = read_provenance(out)
    assert prov.input_slice_thickness_mm == 4.0
    assert "files gave different slice thicknesses (4 mm in 4 files, 2 mm in 2 files), taken as 4 mm" in (
        prov.input_slice_note
    )
    # a series whose files agree records no such note
    plain = tmp_path / "plain.nii.gz"
    assert main(["sr", str(series(tmp_path / "same", 4.0)), str(plain), *FAST]) == 0
    assert read_provenance(plain).input_slice_note == ""


def test_a_batch_passes_an_interspaced_series_over_and_goes_on(tmp_path, capsys):
    root = tmp_path / "study"
    series(root / "thick", 4.0, uid="1.2.826.0.1.3680043.8.498.11")
    series(root / "hrct", 1.0, uid="1.2.826.0.1.3680043.8.498.12")
    out, report = tmp_path / "out", tmp_path / "report.json"
    rc = main(["sr", str(root), str(out), *FAST, "--report", str(report)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "1 of 2 volume(s) written" in err and "1 passed over" in err and "failed" not in err
    assert (out / "thick.nii.gz").is_file() and not (out / "hrct.nii.gz").exists()
    data = json.loads(report.read_text(encoding="utf-8"))
    [passed] = data["passed_over"]
    assert passed["volume"] == str(root / "hrct") and "an interspaced protocol" in passed["why"]
    # the console's passed-over line (cut at 400 characters) names the way to run it anyway (probe 35, N2)
    [line] = [x for x in err.splitlines() if "warning: passed over:" in x]
    assert "--allow-interspaced" in line


def test_the_slicer_batch_cli_refuses_in_its_own_flags_and_runs_when_allowed(tmp_path, capsys):
    batch = batch_script()
    source = tmp_path / "in.nrrd"
    write_volume(ct(), source)
    base = ["--factor", "2", "--noAdapt", "--tinyTestPredictor", "--sliceThickness", "1", str(source)]
    assert batch.main([*base, str(tmp_path / "refused.nrrd")]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "an interspaced protocol" in error and "--allowInterspaced" in error
    assert "--allow-interspaced" not in error and "in Python" not in error
    assert not (tmp_path / "refused.nrrd").exists()
    assert batch.main(["--allowInterspaced", *base, str(tmp_path / "allowed.nrrd")]) == 0
    assert "may hold bright rims" in capsys.readouterr().err and (tmp_path / "allowed.nrrd").is_file()


def test_the_three_front_ends_build_the_same_allow_interspaced_setting():
    from_sr = sr_cli.run_settings(
        build_main_parser().parse_args(["sr", "in.nii.gz", "out", "--allow-interspaced"])
    )
    batch = batch_script()
    from_batch = batch.run_settings(batch.settings_from_args(batch.build_parser().parse_args(
        ["--allowInterspaced", "in.nrrd", "out.nrrd"])))  # fmt: skip
    assert from_sr.allow_interspaced and from_sr == from_batch
    assert not sr_cli.run_settings(
        build_main_parser().parse_args(["sr", "in.nii.gz", "out"])
    ).allow_interspaced
    pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side logic")
    if str(ROOT / "CTDiffusionSR") not in sys.path:
        sys.path.insert(0, str(ROOT / "CTDiffusionSR"))
    from CTDiffusionSRLib.sr_logic import SRSettings

    module = SRSettings(allow_interspaced=True)
    assert "--allowInterspaced" in module.cli_arguments() and module.run_settings() == from_sr
    assert "--allowInterspaced" not in SRSettings().cli_arguments()


def hrct_node(scene, tmp_path, monkeypatch):
    """An interspaced series (1 mm slices every 4 mm) loaded as a node from (a stand-in of) Slicer's DICOM database,
    so that the job reads its thickness from the files; and the tiny predictor's settings."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")
    if str(ROOT / "CTDiffusionSR") not in sys.path:
        sys.path.insert(0, str(ROOT / "CTDiffusionSR"))
    from CTDiffusionSRLib import mrml_io
    from CTDiffusionSRLib.sr_logic import SRSettings
    from CTDiffusionSRLib.testing import DicomDatabaseStandIn

    folder = series(tmp_path / "hrct", 1.0)
    files = sorted(folder.iterdir())
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    node = mrml_io.add_volume_node(scene, read_volume(folder), "HRCT")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    database = DicomDatabaseStandIn()
    database.files = {uid: str(f) for uid, f in zip(uids, files)}
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    return node, SRSettings(factor=2, device="cpu", tiny_test_predictor=True, adapt_to_scan=False)


def test_the_slicer_module_refuses_an_interspaced_series_when_apply_is_pressed(scene, tmp_path, monkeypatch):
    """A node loaded from Slicer's DICOM database: the job reads the thickness from the series' files and refuses at
    once, naming the node; allowed, it hands the thickness and the permission to its CLI."""
    from CTDiffusionSRLib.sr_logic import SRJob, SRSettings

    node, settings = hrct_node(scene, tmp_path, monkeypatch)
    with pytest.raises(InputError, match="'HRCT' has 1 mm slices 4 mm apart: an interspaced protocol") as refused:
        SRJob(scene, node, settings)
    # said the way a Slicer user runs it anyway, not with a command-line flag
    assert "SRSettings(allow_interspaced=True)" in str(refused.value) and "(allow_interspaced=True in Python)" not in str(
        refused.value)  # fmt: skip
    job = SRJob(scene, node, SRSettings(**{**settings.to_dict(), "allow_interspaced": True}))
    (tmp_path / "job").mkdir()
    args = job.prepare(tmp_path / "job")
    assert "--allowInterspaced" in args and float(args[args.index("--sliceThickness") + 1]) == 1.0


# -- F7: the adaptation's gain on slices not as thick as their spacing --------------------------------------------
@pytest.mark.parametrize("thickness, caveat", [(8.0, True), (3.0, True), (4.0, False)])
def test_the_adaptation_gain_carries_a_caveat_when_the_thickness_note_applies(tmp_path, diffusioncore_log, thickness,
                                                                              caveat):  # fmt: skip
    volume = read_volume(series(tmp_path / "s", thickness, shape=(8, 64, 64)))
    _, report = SuperResolver.tiny_predictor().run(volume, factor=2, adapt=AdaptSettings(steps=2))
    done = report["predictor"]["adaptation"]
    [line] = [r.getMessage() for r in diffusioncore_log if "check-batch gain over cubic" in r.getMessage()]
    said = f"its pairs assume slices as thick as their 4 mm spacing, not the series' {thickness:g} mm"
    if caveat:
        assert said in line and said in done["caveat"] and "measures another task" in done["caveat"]
    else:
        assert "pairs assume" not in line and "caveat" not in done


# -- F11: the tolerance ignores rounding only ----------------------------------------------------------------------
@pytest.mark.parametrize("thickness, says", [(6.0, "an overlapping reconstruction"), (4.0, "with gaps between them"),
                                             (5.2, None), (4.8, None)])  # fmt: skip
def test_a_thickness_20_percent_off_the_spacing_is_named_and_rounding_is_not(tmp_path, thickness, says):
    """6 mm or 4 mm slices every 5 mm (the probe's T4 and T5) got no note within the old 20% band; 4% (a nominal value
    rounded in the header) still gets none."""
    volume = read_volume(series(tmp_path / "s", thickness, spacing_mm=5.0))
    _, report = SuperResolver.tiny_predictor().run(volume, factor=2)
    notes = report.get("notes", [])
    if says is None:
        assert notes == []
    else:
        assert len(notes) == 1 and says in notes[0] and f"{thickness:g} mm thick but 5 mm apart" in notes[0]


# -- F6: --axis names array axes -------------------------------------------------------------------------------------
def test_the_axis_help_says_z_y_x_are_the_files_array_axes_not_the_patients(capsys):
    with pytest.raises(SystemExit):
        build_main_parser().parse_args(["sr", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    axis = text[text.rindex("--axis {z,y,x}") :]  # the option, not the usage line
    axis = axis[: axis.index("--weights")]
    assert "array axis of the file" in axis and "slowest to fastest in storage" in axis
    assert "not the patient's" in axis and "reformatted or permuted" in axis


def test_a_thick_volume_simulated_from_a_dicom_reference_is_not_taken_for_an_interspaced_series(tmp_path):
    """Probe 35, N1: degrade() kept the thin reference's SliceThickness, so a slab-averaged volume of a DICOM series
    (2.5 mm slices to 5 or 10 mm slabs) was refused as 'interspaced' by SuperResolver.run. A slab is as thick as its
    new spacing; a decimated series keeps its thin slices' thickness (it is interspaced, and is said so)."""
    from DiffusionCore.degrade import degrade, interspaced_slices

    thin = read_volume(series(tmp_path / "thin", 4.0, shape=(16, 48, 48)))  # 4 mm slices 4 mm apart
    assert thin.metadata["slice_thickness_mm"] == 4.0
    slabs = degrade(thin, 4)
    assert slabs.metadata["slice_thickness_mm"] == pytest.approx(16.0) and interspaced_slices(slabs) is None
    out, _ = SuperResolver.tiny_predictor().run(slabs, factor=4)
    assert out.shape == (16, 48, 48)
    decimated = degrade(thin, 4, method="decimate")
    assert interspaced_slices(decimated) == (4.0, 16.0)
    assert degrade(thin, 2, axis="x").metadata["slice_thickness_mm"] == 4.0  # along another axis: the slices stay


def test_half_the_spacing_is_refused_whatever_the_positions_rounding(tmp_path):
    """Probe 35, N3: 2.5 mm slices measured 4.9997 or 5.0003 mm apart are one protocol, refused either way."""
    from DiffusionCore.degrade import interspaced_slices
    from DiffusionCore.volume import Grid

    for spacing in (4.9997, 5.0, 5.0003):
        grid = Grid((8, 16, 16), (0.7, 0.7, spacing), (0.0, 0.0, 0.0), np.eye(3))
        assert interspaced_slices(grid, 0, 2.5) is not None
    assert interspaced_slices(Grid((8, 16, 16), (0.7, 0.7, 5.0), (0.0, 0.0, 0.0), np.eye(3)), 0, 2.6) is None


def test_slicer_refusals_name_the_panels_checkboxes_and_the_sr_command_keeps_its_flags(scene, tmp_path, monkeypatch,
                                                                                       capsys):  # fmt: skip
    """The module's refusals (shown in Slicer's dialog or Apply's tooltip) say to tick the Advanced checkbox first,
    the Python console only after it, and no command-line flag; the ``sr`` command's own words are unchanged."""
    from CTDiffusionSRLib import mrml_io
    from CTDiffusionSRLib.sr_logic import SRJob, SRSettings

    node, settings = hrct_node(scene, tmp_path, monkeypatch)
    with pytest.raises(InputError) as refused:
        SRJob(scene, node, settings)
    said = str(refused.value)
    assert "To run it anyway, tick 'Allow interspaced slices' under Advanced (or, from Slicer's Python console, give " \
           "SRSettings(allow_interspaced=True) to the job); or interpolate the gaps instead" in said, said  # fmt: skip
    assert "--allow-interspaced" not in said and "--allowInterspaced" not in said
    # intensities that do not look like CT (a CT stored without its intercept: nothing below 0)
    unsigned = Volume(np.clip(ct().array, -1024.0, None) + 1024.0, (0.8, 0.8, 4.0), (0.0, 0.0, 0.0), np.eye(3))
    plain = mrml_io.add_volume_node(scene, unsigned, "CT unsigned")
    with pytest.raises(InputError) as refused:
        SRJob(scene, plain, settings)
    said = str(refused.value)
    assert said.startswith("'CT unsigned' does not look like CT in Hounsfield units"), said
    assert said.endswith("if this really is CT in HU, tick 'Allow non-CT intensities' under Advanced (or, from "
                         "Slicer's Python console, give SRSettings(allow_non_ct=True) to the job)."), said  # fmt: skip
    assert "--allow-non-ct" not in said and "in Python)" not in said
    SRJob(scene, plain, SRSettings(**{**settings.to_dict(), "allow_non_ct": True}))  # ticked: accepted
    # the sr command says its own flags, as before
    out = tmp_path / "out.nii.gz"
    assert main(["sr", str(tmp_path / "hrct"), str(out), *FAST]) == 2  # the series hrct_node wrote
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "To run it anyway, pass --allow-interspaced" in error and "Allow interspaced slices" not in error, error
