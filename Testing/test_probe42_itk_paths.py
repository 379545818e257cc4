"""Probe 42, D5: non-ASCII paths on Windows without the UTF-8 code page.

SimpleITK hands ITK file names in UTF-8 and ITK opens them with the narrow (ANSI) fopen, so on Windows a path with
é, ü or 中 (a user name in ``C:\\Users\\José``, ``%TEMP%``, a study folder "Thorax_Übersicht") was not found: a
misleading "not recognized as a NIFTI file" on reading, a write failure after the whole computation. Now
:func:`~DiffusionCore.volume.itk_path` hands ITK the 8.3 short spelling of such a path, outputs are written under an
ASCII temporary name and renamed by Python, and where no ASCII spelling exists the path is refused before any work,
naming it and the ways out.

Windows is simulated on this system: ``volume._on_windows``, ``_windows_ansi_code_page`` and ``_windows_short_path``
are replaced (the short names are symbolic links, as an 8.3 name is a second name of the same file), and SimpleITK is
made to fail, as on Windows, on any name that is not ASCII.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_dicom_series
from PIL import Image
from test_sr_pipeline import thick_ct

from DiffusionCore import volume as volume_module
from DiffusionCore.cli.main import main
from DiffusionCore.errors import InputError, OutputError
from DiffusionCore.volume import Volume, itk_path, read_volume, split_volume_suffix, write_volume
from DiffusionCore.xray.radiograph import radiograph_file_kind, read_radiograph

#: What every refusal says to do.
WAYS_OUT = ("with ASCII letters only", "to a folder whose path is ASCII only",
            "Use Unicode UTF-8 for worldwide language support")


class AnsiWindows:
    """Windows with the code page 1252, whose short (8.3) names are the ones :meth:`short_name` gives (none else)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.short_names: dict[str, str] = {}  # a long path -> its 8.3 name
        self.itk_names: list[str] = []  # every file name ITK was handed
        self.code_page = 1252
        monkeypatch.setattr(volume_module, "_on_windows", lambda: True)
        monkeypatch.setattr(volume_module, "_windows_ansi_code_page", lambda: self.code_page)
        monkeypatch.setattr(volume_module, "_windows_short_path", self._short_path)
        self._ansi_itk(monkeypatch)

    def short_name(self, path: Path, short: str) -> Path:
        """Give ``path`` the 8.3 name ``short`` (a symbolic link beside it); returns the link."""
        link = path.parent / short
        link.symlink_to(path.name, target_is_directory=path.is_dir())
        self.short_names[str(path)] = short
        return link

    def _short_path(self, path: str) -> str | None:
        """GetShortPathNameW: each part of an existing path by its 8.3 name where it has one, else as it is."""
        if not os.path.exists(path):
            return None
        long = Path(path)
        parts, prefix = [long.anchor], Path(long.anchor)
        for part in long.parts[1:]:
            prefix = prefix / part
            parts.append(self.short_names.get(str(prefix), part))
        return str(Path(*parts))

    def _ansi_itk(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """SimpleITK's file functions fail on a non-ASCII name, as ITK's ANSI fopen does there."""

        def checked(name):
            if isinstance(name, str):
                self.itk_names.append(name)
                if not name.isascii():
                    raise AssertionError(f"ITK was handed {name}, which the ANSI code page cannot spell")
            return name

        read, write = sitk.ReadImage, sitk.WriteImage
        monkeypatch.setattr(sitk, "ReadImage", lambda name, *a, **k: read(checked(name), *a, **k))
        monkeypatch.setattr(sitk, "WriteImage", lambda img, name, *a, **k: write(img, checked(name), *a, **k))
        set_name = sitk.ImageFileReader.SetFileName
        monkeypatch.setattr(sitk.ImageFileReader, "SetFileName", lambda self, name: set_name(self, checked(name)))
        set_names = sitk.ImageSeriesReader.SetFileNames
        monkeypatch.setattr(sitk.ImageSeriesReader, "SetFileNames",
                            lambda self, names: set_names(self, [checked(n) for n in names]))  # fmt: skip
        ids, names = sitk.ImageSeriesReader.GetGDCMSeriesIDs, sitk.ImageSeriesReader.GetGDCMSeriesFileNames
        monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesIDs", staticmethod(lambda d, *a: ids(checked(d), *a)))
        monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesFileNames",
                            staticmethod(lambda d, *a: names(checked(d), *a)))  # fmt: skip


@pytest.fixture
def ansi_windows(monkeypatch) -> AnsiWindows:
    return AnsiWindows(monkeypatch)


def _placed(path: Path, vol: Volume | None = None) -> Path:
    """``vol`` (a thick CT) written at ``path`` by way of an ASCII name, as a file put there by another program."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = write_volume(vol or thick_ct(), Path(tempfile.mkdtemp()) / f"plain{split_volume_suffix(path.name)[1]}")
    shutil.move(plain, path)
    plain.parent.rmdir()
    return path


def _sr(src: Path, out: Path) -> int:
    return main(["sr", str(src), str(out), "--tiny-test-model", "--factor", "2", "--no-adapt", "--device", "cpu",
                 "--progress", "none", "--threads", "1"])  # fmt: skip


def _no_work(monkeypatch) -> None:
    """Make reading the input and loading the weights fail the test: a refusal must come before them."""
    import DiffusionCore.cli.sr as sr_cli

    def work(*args, **kwargs):
        raise AssertionError("the run started its work")

    monkeypatch.setattr(sr_cli, "load_resolver", work)


# -- reading --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, short", [("ct.nii.gz", None), ("Schädel.nii", "SCHDEL~1.NII"),
                                         ("Schädel.nrrd", "SCHDEL~1.NRR")])  # fmt: skip
def test_a_volume_under_a_non_ascii_folder_is_read_by_its_short_name(tmp_path, ansi_windows, name, short):
    expected = thick_ct()
    folder = tmp_path / "Müller"
    src = _placed(folder / name, expected)
    ansi_windows.short_name(folder, "MLLER~1")
    if short:
        ansi_windows.short_name(src, short)
    ansi_windows.itk_names.clear()  # those of the file's writing
    vol = read_volume(src, check=False)
    np.testing.assert_allclose(vol.array, expected.array, atol=1e-3)
    np.testing.assert_allclose(vol.spacing, expected.spacing)
    assert vol.metadata["source"] == str(src)  # the user's own spelling, not the short one
    assert ansi_windows.itk_names and all("MLLER~1" in n for n in ansi_windows.itk_names)


def test_a_nii_gz_whose_short_name_loses_its_suffix_is_refused_saying_what_to_do(tmp_path, ansi_windows):
    """``Schädel.nii.gz`` is ``SCHDEL~1.GZ`` in 8.3, which ITK does not take for NIfTI: refused, not "corrupt",
    naming the file (its folder has a short name: not to be renamed)."""
    src = _placed(tmp_path / "Müller" / "Schädel.nii.gz")
    ansi_windows.short_name(src.parent, "MLLER~1")
    ansi_windows.short_name(src, "SCHDEL~1.GZ")
    with pytest.raises(InputError) as exc:
        read_volume(src)
    message = str(exc.value)
    assert message.startswith(f"could not read {src}: ") and '"Schädel.nii.gz"' in message
    assert '"Müller"' not in message
    assert all(way in message for way in WAYS_OUT), message
    assert "corrupt" not in message and "not recognized" not in message


def test_a_dicom_series_in_a_non_ascii_folder_is_read_by_its_short_name(tmp_path, ansi_windows):
    folder = tmp_path / "Thorax_Übersicht"
    write_dicom_series(folder, thick_ct())
    ansi_windows.short_name(folder, "THORAX~1")
    vol = read_volume(folder, check=False)
    assert vol.shape == thick_ct().shape and vol.metadata["n_files"] == 6
    assert any(n.endswith(".dcm") for n in ansi_windows.itk_names)


def test_a_radiograph_under_a_non_ascii_folder_is_read_by_its_short_name(tmp_path, ansi_windows):
    folder = tmp_path / "Röntgen"
    folder.mkdir()
    pixels = (np.arange(72 * 64).reshape(72, 64) % 251).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "cxr.png")
    ansi_windows.short_name(folder, "RNTGEN~1")
    assert read_radiograph(folder / "cxr.png").array.shape == (72, 64)
    assert ansi_windows.itk_names and all(n.isascii() for n in ansi_windows.itk_names)


def test_a_2d_image_without_a_short_name_is_not_taken_for_a_non_utf8_name(tmp_path, ansi_windows):
    """``radiograph_file_kind`` (what a file given as a CT is) lets the refusal say what to do, not "not UTF-8"."""
    folder = tmp_path / "Röntgen"
    folder.mkdir()
    img = sitk.GetImageFromArray(np.zeros((8, 8), np.int16))
    sitk.WriteImage(img, str(folder.parent / "cxr.nrrd"))
    os.replace(folder.parent / "cxr.nrrd", folder / "cxr.nrrd")
    with pytest.raises(InputError, match='"Röntgen"'):
        radiograph_file_kind(folder / "cxr.nrrd")


# -- writing --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sr.nii.gz", "Schädel_sr.nii.gz", "Schädel_sr.nrrd", "胸部.mha", "Schädel_sr.nii"])
def test_a_result_is_written_at_its_non_ascii_path(tmp_path, ansi_windows, monkeypatch, name):
    folder = tmp_path / "Müller"
    folder.mkdir()
    ansi_windows.short_name(folder, "MLLER~1")
    vol = thick_ct()
    out = write_volume(vol, folder / name)
    assert out == folder / name and sorted(p.name for p in folder.iterdir()) == [name]  # no temporary file left
    assert ansi_windows.itk_names and all(n.isascii() for n in ansi_windows.itk_names)
    monkeypatch.undo()  # read back as it is written, without Windows' code page
    back = read_volume(out, check=False)
    np.testing.assert_allclose(back.array, vol.array, atol=1e-3)
    np.testing.assert_allclose(back.origin, vol.origin)


def test_stale_temporary_files_of_an_ascii_named_write_are_removed(tmp_path, ansi_windows):
    """A run killed while ITK wrote ``.Schadel.nii.gz.PID.X.partial.nii`` for ``Schädel.nii.gz``: the next run
    writing that output removes it, as it removes those named after the output itself."""
    folder = tmp_path / "Müller"
    folder.mkdir()
    ansi_windows.short_name(folder, "MLLER~1")
    stale = folder / ".Schadel.nii.gz.999999999.abcdefgh.partial.nii"
    stale.write_bytes(b"half")
    write_volume(thick_ct(), folder / "Schädel.nii.gz")
    assert not stale.exists()


# -- refused before any work ----------------------------------------------------------------------------------------
def test_sr_of_an_input_without_an_ascii_spelling_is_refused_before_any_work(tmp_path, ansi_windows, monkeypatch,
                                                                            capsys):  # fmt: skip
    """8.3 names turned off on the volume (``fsutil 8dot3name set 1``): exit 2, naming the folder and the ways out."""
    src = _placed(tmp_path / "Müller" / "ct.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    _no_work(monkeypatch)
    assert _sr(src, out / "sr.nii.gz") == 2
    err = capsys.readouterr().err
    assert f"error: could not read {src}: " in err and '"Müller"' in err
    assert all(way in err for way in WAYS_OUT), err
    assert list(out.iterdir()) == []


def test_sr_into_an_output_folder_without_an_ascii_spelling_is_refused_before_any_work(tmp_path, ansi_windows,
                                                                                      monkeypatch, capsys):  # fmt: skip
    src = _placed(tmp_path / "in" / "ct.nii.gz")
    out = tmp_path / "Ergebnisse_für_Müller"
    out.mkdir()
    import DiffusionCore.cli.sr as sr_cli

    monkeypatch.setattr(sr_cli, "read_volume", lambda *a, **k: pytest.fail("the input was read"))
    _no_work(monkeypatch)
    assert _sr(src, out / "sr.nii.gz") == 4
    err = capsys.readouterr().err
    assert f"error: cannot write {out / 'sr.nii.gz'}: " in err and '"Ergebnisse_für_Müller"' in err
    assert all(way in err for way in WAYS_OUT), err
    assert list(out.iterdir()) == []


def test_sr_reads_and_writes_through_short_names(tmp_path, ansi_windows, monkeypatch):
    folder = tmp_path / "José"
    src = _placed(folder / "ct.nii.gz")
    ansi_windows.short_name(folder, "JOS~1")
    out = folder / "Ergebnis_über.nii.gz"
    assert _sr(src, out) == 0
    assert ansi_windows.itk_names and all(n.isascii() for n in ansi_windows.itk_names)
    monkeypatch.undo()
    assert read_volume(out, check=False).spacing[2] == pytest.approx(thick_ct().spacing[2] / 2)
    # the result and its sidecar, nothing else
    assert sorted(p.name for p in folder.iterdir()) == ["Ergebnis_über.json", "Ergebnis_über.nii.gz", "ct.nii.gz"]


def test_a_non_ascii_output_name_needs_no_short_name(tmp_path, ansi_windows):
    """In an ASCII folder the output's own name may be anything: ITK writes an ASCII-named temporary file."""
    out = write_volume(thick_ct(), tmp_path / "Ergebnis_über.nrrd")
    assert out.is_file() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


# -- nothing changes where ITK takes any name -----------------------------------------------------------------------
def test_the_utf8_code_page_changes_nothing(tmp_path, ansi_windows, monkeypatch):
    ansi_windows.code_page = 65001
    monkeypatch.setattr(volume_module, "_windows_short_path", lambda path: pytest.fail("a short name was asked for"))
    path = str(tmp_path / "Müller" / "ct.nii.gz")
    assert itk_path(path) == path
    assert itk_path(path, OutputError) == path


def test_other_systems_are_not_asked_about_code_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(volume_module, "_on_windows", lambda: False)
    monkeypatch.setattr(volume_module, "_windows_ansi_code_page", lambda: pytest.fail("a code page was asked for"))
    monkeypatch.setattr(volume_module, "_windows_short_path", lambda path: pytest.fail("a short name was asked for"))
    folder = tmp_path / "Müller"
    folder.mkdir()
    out = write_volume(thick_ct(), folder / "Schädel.nii.gz")
    assert itk_path(out) == str(out)
    assert read_volume(out, check=False).shape == thick_ct().shape
