"""Probe 40: a written series' SeriesDescription led with its input's description ("5mm SR x4 (synthetic)" for a
1.25 mm result of a "5mm" series): a radiologist browsing a PACS read "5mm" first and took the thin series for the
thick one. It now says what the series is and its own slice spacing, then the input it came from, always ending in
"(synthetic)", in at most 64 characters (DICOM's LO): ``"SR x4 1.25mm from 5mm (synthetic)"``.

The writer is called directly on small series (SimpleITK's, conftest, edited with pydicom).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from conftest import write_dicom_series

from DiffusionCore.dicom_out import DicomSource, series_description
from DiffusionCore.dicom_out import write_dicom_series as write_series
from DiffusionCore.provenance import Provenance

#: The longest SeriesDescription (an LO value).
LO_MAX = 64


class _Source:
    """A DicomSource stand-in: only its header's SeriesDescription is read."""

    def __init__(self, description: str) -> None:
        self.header = {"SeriesDescription": description}


def _thick_series(folder: Path, make_phantom, description: str) -> DicomSource:
    thick = make_phantom(shape=(4, 16, 16), spacing=(0.8, 0.8, 5.0))
    write_dicom_series(folder, thick)
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SeriesDescription, ds.PatientID = description, "P-40"
        ds.save_as(f)
    return DicomSource.from_path(folder)


def test_a_thin_series_says_what_it_is_and_its_spacing_before_the_thick_input(tmp_path, make_phantom):
    """chest-dx's "5mm" series at x4: the written 1.25 mm series does not begin with "5mm"."""
    source = _thick_series(tmp_path / "thick", make_phantom, "5mm")
    thin = make_phantom(shape=(16, 16, 16), spacing=(0.8, 0.8, 1.25))  # stands in for the x4 result
    prov = Provenance("sr", "SR x4 (synthetic)", "w", "0" * 64, {"factor": 4})
    out = write_series(thin, tmp_path / "thin", prov, source=source)
    written = {pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription for f in out.iterdir()}
    assert written == {"SR x4 1.25mm from 5mm (synthetic)"}


def test_the_description_forms():
    assert series_description(_Source("5mm"), "SR x4 (synthetic)", 1.25) == "SR x4 1.25mm from 5mm (synthetic)"
    assert series_description(None, "SR x4 (synthetic)", 1.25) == "SR x4 1.25mm (synthetic)"
    assert series_description(_Source("Chest 4mm"), "SR x2 (synthetic)", 2.0) == "SR x2 2mm from Chest 4mm (synthetic)"
    # a target spacing's title says the spacing itself: not twice
    assert series_description(_Source("5mm"), "SR 1.5 mm (synthetic)", 1.5) == "SR 1.5 mm from 5mm (synthetic)"
    # a title that says what it came from: the radiograph's description follows it
    assert series_description(_Source("Chest PA"), "CT from radiograph (synthetic)") == \
        "CT from radiograph Chest PA (synthetic)"  # fmt: skip
    assert series_description(None, "CT from radiograph (synthetic)") == "CT from radiograph (synthetic)"
    # an input that is itself a synthetic series: "(synthetic)" once, at the end
    assert series_description(_Source("SR x2 2.5mm from 5mm (synthetic)"), "SR x2 (synthetic)", 1.25) == \
        "SR x2 1.25mm from SR x2 2.5mm from 5mm (synthetic)"  # fmt: skip


def test_a_long_input_description_is_shortened_first_and_the_end_is_kept():
    long = "Thorax routine with contrast venous phase 5mm axial reconstruction B30f"
    text = series_description(_Source(long), "SR x4 (synthetic)", 1.25)
    assert len(text) <= LO_MAX and text.startswith("SR x4 1.25mm from Thorax routine")
    assert text.endswith(" (synthetic)")
    text = series_description(_Source(long), "CT from radiograph (synthetic)")
    assert len(text) <= LO_MAX and text.startswith("CT from radiograph Thorax") and text.endswith("(synthetic)")
    # a label too long for any of the input's description: the label is cut, "(synthetic)" never
    text = series_description(_Source(long), " ".join(["SR x2"] * 12) + " (synthetic)", 0.5)
    assert len(text) <= LO_MAX and text.startswith("SR x2 SR x2") and text.endswith(" (synthetic)")
    assert "Thorax" not in text
