"""Probe 23 (a researcher's folder of radiographs through ``xray2ct``), the inputs' side: list files as spreadsheets
and Windows write them, broken links, and image files that were read wrongly or refused in the wrong words (a JPEG
stored sideways with an EXIF Orientation, a grey + alpha PNG, a multi-page TIFF)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image, ImageOps

from DiffusionCore.cli.main import main
from DiffusionCore.errors import InputError
from DiffusionCore.inputs import first_column, read_list_file
from DiffusionCore.xray.radiograph import read_radiograph, window_radiograph

TINY = ["--tiny-test-model", "--progress", "none"]


def _png(path, seed=0, size=(64, 72)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random(size[::-1]) * 255).astype(np.uint8)).save(path)
    return path


def _listed(listing):
    return read_list_file(listing, lambda p: [p], noun="radiograph")


def test_a_spreadsheets_csv_of_several_columns_names_its_first(tmp_path, caplog):
    """`filename,label` then `x.png,1`: every line was "does not exist ... Check the path"."""
    a, b = _png(tmp_path / "in" / "a.png"), _png(tmp_path / "in" / "b, c.png", 1)
    listing = tmp_path / "labels.csv"
    listing.write_text('filename,label\nin/a.png,1\n"in/b, c.png",0\nin/a.png,\n', encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="DiffusionCore"):
        assert _listed(listing) == [a, b, a]
    assert "column's header" in caplog.text and "the first is taken as the radiograph's path" in caplog.text
    assert first_column("x.png;1") == "x.png" and first_column("x.png") is None
    # a line that names an existing file as a whole wins over its first column
    odd = _png(tmp_path / "in" / "odd,1.png", 2)
    listing.write_text("in/odd,1.png\n", encoding="utf-8")
    assert _listed(listing) == [odd]


def test_windows_separators_in_a_list_are_read_as_folders(tmp_path, caplog):
    a = _png(tmp_path / "in" / "sub" / "a.png")
    listing = tmp_path / "list.txt"
    listing.write_text("in\\sub\\a.png\nin\\sub\\gone.png\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="DiffusionCore"):
        found = _listed(listing)
    assert found[0] == a and "Windows separators" in caplog.text
    assert "\\ is not a folder separator" in caplog.text  # the second line exists in neither spelling


def test_a_broken_link_in_a_list_is_named_as_one(tmp_path, caplog):
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "moved" / "chest.png")
    listing = tmp_path / "list.txt"
    listing.write_text("link.png\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="DiffusionCore"):
        _listed(listing)
    assert f"{link} is a broken symbolic link (to {tmp_path / 'moved' / 'chest.png'}, which does not exist)" in caplog.text


@pytest.mark.parametrize("orientation", [3, 5, 6, 8])
def test_a_jpeg_is_turned_as_its_exif_orientation_says(tmp_path, orientation):
    """A photo of a film taken with the phone turned is stored sideways with EXIF Orientation 6 and shown upright by
    every viewer; it was read sideways (and warned "looks inverted")."""
    rng = np.random.default_rng(orientation)
    upright = np.kron(rng.random((12, 8)), np.ones((8, 8)))  # 96x64 blocks: survives JPEG
    shown = Image.fromarray((upright * 255).astype(np.uint8))
    # stored so that a viewer applying the tag shows ``upright``: the inverse of the tag's transpose
    inverse = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
               8: Image.Transpose.ROTATE_270}[orientation]  # fmt: skip
    stored = shown.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "film.jpg"
    stored.save(path, quality=95, exif=exif)
    viewer = np.asarray(ImageOps.exif_transpose(Image.open(path)), dtype=np.float64)
    assert viewer.shape == upright.shape  # the test's own check that the stored file is what a viewer turns upright
    rad = read_radiograph(path)
    assert rad.array.shape == upright.shape
    assert np.corrcoef(rad.array.ravel(), viewer.ravel())[0, 1] > 0.98
    assert "EXIF Orientation" in rad.metadata["oriented"]


def test_a_grey_alpha_png_and_a_multi_page_tiff_are_named_as_what_they_are(tmp_path):
    la = tmp_path / "la.png"  # read as its grey channel since 2026-12-07 (Testing/test_probe39_xray_inputs.py)
    grey = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(grey).convert("LA").save(la)
    np.testing.assert_array_equal(read_radiograph(la).array, window_radiograph(grey.astype(np.float32)))
    pages = [Image.fromarray((np.random.default_rng(i).random((48, 40)) * 255).astype(np.uint8)) for i in range(2)]
    tiff = tmp_path / "two.tif"
    pages[0].save(tiff, save_all=True, append_images=pages[1:])
    with pytest.raises(InputError, match=r"two\.tif is a multi-page TIFF of 2 pages \(40x48 pixels each\)"):
        read_radiograph(tiff)


def test_a_csv_with_labels_drives_a_batch(tmp_path):
    _png(tmp_path / "x" / "first.png", 0)
    _png(tmp_path / "x" / "second.png", 1)
    listing = tmp_path / "cohort.csv"
    listing.write_text("filename,finding\nx/first.png,normal\nx/second.png,effusion\n", encoding="utf-8")
    assert main(["xray2ct", str(listing), str(tmp_path / "out"), *TINY]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["first.nii.gz", "second.nii.gz"]
