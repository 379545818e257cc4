"""What Slicer's ExtensionsIndex checks before listing the extension, and the one-click Sample Data.

The rules come from Slicer/ExtensionsIndex (read at commit 07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c):
``scripts/check_description_files.py`` (extension name, repository name, category, project() name,
icon and screenshot URLs, licence file), ``.github/PULL_REQUEST_TEMPLATE.md`` (a 1-2 sentence description
for non-experts, the JSON consistent with the top-level CMakeLists.txt) and
``schemas/slicer-extension-catalog-entry-schema-v1.0.1.json`` (the keys of an entry). Only the rules that
need no network are checked here; the index's own run downloads the URLs and builds the extension.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
import struct
import subprocess
import sys
import textwrap
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

from CTDiffusionSRLib import sample_data, slicer_version  # noqa: E402
from CTDiffusionSRLib.dependencies import REQUIREMENTS  # noqa: E402

from DiffusionCore import sampledata  # noqa: E402
from DiffusionCore.errors import DataUnavailableError  # noqa: E402

INDEX_ENTRY_FOLDER = ROOT / "docs" / "extension-index"
MODULE_FILES = {"CTDiffusionSR": ROOT / "CTDiffusionSR", "XrayToCT": ROOT / "XrayToCT"}

#: The menu scheme: both interactive modules together under the index's "Image Synthesis" category (the
#: results are synthetic images), the batch and training command-line modules one level down.
MODULE_CATEGORY = "Image Synthesis"
CLI_CATEGORY = "Image Synthesis.Advanced"

#: ACCEPTED_EXTENSION_CATEGORIES of scripts/check_description_files.py.
INDEX_CATEGORIES = {
    "Active Learning",
    "Analysis",
    "Auto3dgm",
    "BigImage",
    "Cardiac",
    "Chest Imaging Platform",
    "Conda",
    "Converters",
    "DICOM",
    "DSCI",
    "Developer Tools",
    "Diffusion",
    "Examples",
    "Exporter",
    "FTV Segmentation",
    "Filtering",
    "Filtering.Morphology",
    "Filtering.Vesselness",
    "Holographic Display",
    "Image Synthesis",
    "IGT",
    "Informatics",
    "Netstim",
    "Neuroimaging",
    "Nuclear Medicine",
    "Orthodontics",
    "Osteotomy Planning",
    "Otolaryngology",
    "Photogrammetry",
    "Pipelines",
    "Planning",
    "Printing",
    "Quantification",
    "Radiotherapy",
    "Registration",
    "Remote",
    "Rendering",
    "SPHARM",
    "Segmentation",
    "Sequences",
    "Shape Analysis",
    "Shape Regression",
    "Shape Visualization",
    "Simulation",
    "SlicerCMF",
    "SlicerMorph",
    "Spectral Imaging",
    "Supervisely",
    "Surface Models",
    "SurfaceLearner",
    "Tomographic Reconstruction",
    "Tracking",
    "Tractography",
    "Training",
    "Ultrasound",
    "Utilities",
    "Vascular Modeling Toolkit",
    "Virtual Reality",
    "VisSimTools",
    "Web System Tools",
    "Wizards",
}
#: Keys of schemas/slicer-extension-catalog-entry-schema-v1.0.1.json ("additionalProperties": false).
SCHEMA_V101_KEYS = {
    "$schema",
    "category",
    "scm_url",
    "scm_revision",
    "scm_type",
    "build_dependencies",
    "build_subdirectory",
    "enabled",
    "tier",
}
SCHEMA_REQUIRED_KEYS = {"$schema", "category", "scm_url"}
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
#: check_license_file's accepted names.
LICENSE_FILE_NAMES = (
    "LICENSE",
    "LICENCE",
    "License.txt",
    "license.txt",
    "LICENSE.txt",
    "COPYING",
    "COPYING.txt",
)
#: Parameters of SampleData.SampleDataLogic.registerCustomSampleDataSource (Slicer 5.10,
#: Modules/Scripted/SampleData/SampleData.py) that exist in older releases too.
REGISTER_PARAMETERS = {
    "category",
    "sampleName",
    "uris",
    "fileNames",
    "nodeNames",
    "customDownloader",
    "thumbnailFileName",
    "loadFiles",
    "loadFileProperties",
    "checksums",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- helpers -----------------------------------------------------------------------------------------------
def cmake_text() -> str:
    return (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


def project_name() -> str:
    """The extension name as the index's checker reads it: the first project() argument."""
    match = re.search(r"project\s*\(\s*([^\s\)\n\r]+)", cmake_text(), re.IGNORECASE)
    assert match, "no project() in CMakeLists.txt"
    return match.group(1).strip("\"'")


def cmake_set(key: str) -> str:
    match = re.search(rf'set\s*\({key}\s*"([^"]*)"\s*\)', cmake_text())
    assert match, f"{key} is not set in CMakeLists.txt"
    return match.group(1)


def index_entry() -> dict:
    return json.loads((INDEX_ENTRY_FOLDER / f"{project_name()}.json").read_text(encoding="utf-8"))


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header; fails for anything that is not a PNG."""
    data = path.read_bytes()[:24]
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def repo_file_from_raw_url(url: str) -> Path:
    """The repository file a raw.githubusercontent.com URL of this repository's main branch points at."""
    owner_repo = urlsplit(cmake_set("EXTENSION_HOMEPAGE")).path.strip("/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert url.startswith(prefix), f"{url} is not a raw download URL of {owner_repo} (main)"
    return ROOT / url[len(prefix) :]


def module_init_assignments(module: str) -> dict[str, ast.expr]:
    """``self.parent.<attr> = <value>`` in the module class's ``__init__``, by attribute."""
    tree = ast.parse((MODULE_FILES[module] / f"{module}.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == module)
    init = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    found = {}
    for node in ast.walk(init):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            target = node.targets[0]
            if ast.unparse(target.value) == "self.parent":
                found[target.attr] = node.value
    return found


def module_categories() -> dict[str, list[str]]:
    return {m: ast.literal_eval(module_init_assignments(m)["categories"]) for m in MODULE_FILES}


def cli_categories() -> dict[str, str]:
    return {
        xml.stem: ET.parse(xml).getroot().findtext("category")
        for folder in MODULE_FILES.values()
        for xml in sorted((folder / "CLI").glob("*.xml"))
    }


# -- the extension name and the catalog entry ----------------------------------------------------------------
def test_extension_name_does_not_start_with_slicer_and_names_the_index_file():
    name = project_name()
    assert not name.lower().startswith("slicer"), (
        "check_extension_name: the name must not start with 'Slicer'"
    )
    entries = sorted(p.name for p in INDEX_ENTRY_FOLDER.glob("*.json"))
    assert entries == [f"{name}.json"], "the entry file is named after project() (check_cmakelists_content)"


def test_repository_is_slicer_plus_the_extension_name():
    entry = index_entry()
    homepage = cmake_set("EXTENSION_HOMEPAGE")
    assert entry["scm_url"].removesuffix(".git") == homepage
    repo = urlsplit(homepage).path.rstrip("/").split("/")[-1]
    assert repo == f"Slicer{project_name()}", "PULL_REQUEST_TEMPLATE: repository name is Slicer+ExtensionName"


def test_index_entry_follows_the_catalog_schema():
    path = INDEX_ENTRY_FOLDER / f"{project_name()}.json"
    raw = path.read_bytes()
    assert b"\r" not in raw, "check_json_file_format: LF line endings only"
    entry = json.loads(raw)
    assert SCHEMA_REQUIRED_KEYS <= set(entry) <= SCHEMA_V101_KEYS
    assert entry["$schema"] == SCHEMA_URL
    assert urlsplit(entry["scm_url"]).scheme == "https"  # check_scm_url_syntax: git or https
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert entry["scm_revision"] == "main" and entry["build_subdirectory"] == "."


def test_index_entry_is_consistent_with_the_top_level_cmake():
    entry = index_entry()
    assert entry["category"] == cmake_set("EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmake_set("EXTENSION_DEPENDS").split()
    assert entry["category"] in INDEX_CATEGORIES, "check_category: one of the index's categories"


def test_licence_file_at_the_root_is_the_licence_the_project_states():
    found = [ROOT / n for n in LICENSE_FILE_NAMES if (ROOT / n).is_file()]
    assert found, f"check_license_file: one of {LICENSE_FILE_NAMES} at the repository root"
    text = found[0].read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0" in text and len(text) > 10_000  # the full text
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]  # SPDX, as setuptools asks
    assert re.search(r"## Licence\s+Apache-2\.0", (ROOT / "README.md").read_text(encoding="utf-8"))


def test_extension_icon_is_a_128_pixel_png_in_the_repository():
    icon = repo_file_from_raw_url(cmake_set("EXTENSION_ICONURL"))
    assert icon.is_file(), f"EXTENSION_ICONURL names {icon.relative_to(ROOT)}, which is not in the repository"
    assert png_size(icon) == (128, 128)


def test_screenshots_are_real_images_in_the_repository():
    urls = cmake_set("EXTENSION_SCREENSHOTURLS").split()
    assert urls, "PULL_REQUEST_TEMPLATE: at least one screenshot"
    for url in urls:
        shot = repo_file_from_raw_url(url)
        assert shot.is_file(), f"{url} names a file that is not in the repository"
        width, height = png_size(shot)
        assert width >= 600 and height >= 400, f"{shot.name} is too small to show a result"


def test_description_is_one_plain_sentence_that_says_results_are_synthetic():
    text = cmake_set("EXTENSION_DESCRIPTION")
    assert text.endswith(".") and text.count(". ") == 0, "one sentence"
    assert len(text) <= 250
    assert "synthetic" in text and "not for diagnosis" in text
    jargon = ("ResShift", "ControlNet", "ViT", "latent", "cascade", "DDP")
    assert not [w for w in jargon if w.lower() in text.lower()], "no model internals: a radiologist reads it"


def test_contributors_are_the_same_everywhere():
    listed = cmake_set("EXTENSION_CONTRIBUTORS")
    for module in MODULE_FILES:
        assert ast.literal_eval(module_init_assignments(module)["contributors"]) == [listed]
    for xml in (ROOT / folder for folder in ("CTDiffusionSR/CLI", "XrayToCT/CLI")):
        for cli in xml.glob("*.xml"):
            assert ET.parse(cli).getroot().findtext("contributor") == listed


# -- menu placement ------------------------------------------------------------------------------------------
def test_modules_are_filed_under_the_extension_category():
    assert module_categories() == {m: [MODULE_CATEGORY] for m in MODULE_FILES}
    assert MODULE_CATEGORY == cmake_set("EXTENSION_CATEGORY")


def test_command_line_modules_are_grouped_below_the_modules():
    assert cli_categories() == {
        "CTDiffusionSRBatch": CLI_CATEGORY,
        "DiffusionTrain": CLI_CATEGORY,
        "XrayToCTGenerate": CLI_CATEGORY,
    }
    assert CLI_CATEGORY.split(".")[0] == MODULE_CATEGORY


def test_no_category_says_diffusion():
    """Slicer users read "Diffusion" as diffusion MRI (Slicer's own Diffusion category holds DTI tools)."""
    categories = [
        cmake_set("EXTENSION_CATEGORY"),
        index_entry()["category"],
        sample_data.SAMPLE_DATA_CATEGORY,
    ]
    categories += [c for cats in module_categories().values() for c in cats] + list(cli_categories().values())
    assert not [c for c in categories if "diffusion" in c.lower()], categories


# -- the supported Slicer version ----------------------------------------------------------------------------
def test_readme_install_states_the_minimum_slicer_version():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = readme[readme.index("### Install") : readme.index("### The modules")]
    assert f"3D Slicer {slicer_version.minimum_version_text()} or later" in install
    assert "Extensions Manager" in install and "cmake -DSlicer_DIR" in install and "module paths" in install


@pytest.mark.parametrize(
    ("major", "minor", "supported"),
    [(5, 8, False), (5, 9, False), (4, 11, False), (5, 10, True), (5, 11, True), (6, 0, True)],
)
def test_version_message(major, minor, supported):
    message = slicer_version.unsupported_slicer_message(major, minor, "X-ray to CT")
    if supported:
        assert message is None
    else:
        assert f"X-ray to CT needs 3D Slicer 5.10 or later; this is Slicer {major}.{minor}." in message
        assert slicer_version.DOWNLOAD_URL in message and "Extensions Manager" in message


def fake_slicer(monkeypatch, major: int, minor: int, no_main_window: bool) -> list:
    """A stand-in ``slicer`` module with ``slicer.app`` and ``slicer.util.errorDisplay``; returns the
    (signal, slot) connections made and the dialogs shown."""
    calls: list = []
    app = types.SimpleNamespace(
        majorVersion=major,
        minorVersion=minor,
        commandOptions=lambda: types.SimpleNamespace(noMainWindow=no_main_window),
        connect=lambda signal, slot: calls.append(("connect", signal, slot)),
    )
    util = types.SimpleNamespace(errorDisplay=lambda text, **kw: calls.append(("dialog", text, kw)))
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=app, util=util))
    monkeypatch.setattr(slicer_version, "_shown_dialog", False)
    return calls


def test_too_old_slicer_logs_and_shows_one_dialog_after_startup(monkeypatch, caplog):
    calls = fake_slicer(monkeypatch, 5, 8, no_main_window=False)
    with caplog.at_level(logging.ERROR):
        assert slicer_version.check_slicer_version("CT Diffusion SR") is False
        assert slicer_version.check_slicer_version("X-ray to CT") is False
    assert "needs 3D Slicer 5.10 or later; this is Slicer 5.8" in caplog.text
    slots = [slot for kind, signal, slot in calls if kind == "connect" and signal == "startupCompleted()"]
    assert len(slots) == 2 and not [c for c in calls if c[0] == "dialog"]  # deferred until startup completed
    for slot in slots:
        slot()
    dialogs = [c for c in calls if c[0] == "dialog"]
    assert len(dialogs) == 1 and "CT Diffusion SR needs 3D Slicer 5.10" in dialogs[0][1]


def test_supported_or_headless_slicer_shows_nothing(monkeypatch):
    calls = fake_slicer(monkeypatch, 5, 10, no_main_window=False)
    assert slicer_version.check_slicer_version("CT Diffusion SR") is True and calls == []
    calls = fake_slicer(monkeypatch, 5, 8, no_main_window=True)
    assert slicer_version.check_slicer_version("CT Diffusion SR") is False and calls == []  # logged only


def test_outside_slicer_nothing_is_checked(monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace())  # slicer-core: MRML, no app
    assert slicer_version.check_slicer_version("CT Diffusion SR") is True


@pytest.mark.parametrize("module", sorted(MODULE_FILES))
def test_each_module_checks_the_version_when_it_loads(module):
    tree = ast.parse((MODULE_FILES[module] / f"{module}.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == module)
    init = ast.unparse(next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"))
    assert "check_slicer_version(self.parent.title)" in init


# -- Sample Data ---------------------------------------------------------------------------------------------
def test_sample_sources_cover_both_modules_with_the_right_kind_of_scan():
    by_module = {s.module: s for s in sample_data.SAMPLE_SOURCES}
    assert set(by_module) == set(MODULE_FILES)
    assert sampledata.get_sample(by_module["CTDiffusionSR"].sample).kind == "ct"
    assert sampledata.get_sample(by_module["XrayToCT"].sample).kind == "radiograph"
    assert by_module["CTDiffusionSR"].sample == "chest-dx"  # 5 mm slices: what super-resolution is for
    assert by_module["XrayToCT"].sample == "cxr-pa"
    titles = [s.title for s in sample_data.SAMPLE_SOURCES]
    assert len(set(titles)) == len(titles)
    for source in sample_data.SAMPLE_SOURCES:
        assert (
            sample_data.source_for(source.title) is source and sample_data.source_for(source.sample) is source
        )
    with pytest.raises(KeyError, match="Chest CT, 5 mm slices"):
        sample_data.source_for("MRHead")


def test_registration_arguments_fit_sample_data_and_name_the_cached_files(cache_home):
    module_folder = ROOT / "CTDiffusionSR"
    cmake = (module_folder / "CMakeLists.txt").read_text(encoding="utf-8")
    for source in sample_data.SAMPLE_SOURCES:
        args = sample_data.registration_arguments(source, module_folder)
        assert set(args) <= REGISTER_PARAMETERS - {"customDownloader"}  # the shell adds its loader
        assert args["category"] == sample_data.SAMPLE_DATA_CATEGORY and args["sampleName"] == source.title
        lists = [args[k] for k in ("uris", "fileNames", "nodeNames", "checksums")]
        assert {len(v) for v in lists} == {1}, "SampleDataSource needs lists of one length"
        sample = sampledata.get_sample(source.sample)
        assert args["uris"] == [(cache_home / "sample-data" / source.sample / sample.filename).as_uri()]
        assert args["fileNames"] == [sample.filename] and args["nodeNames"] == [source.node_name]
        expected_checksum = None if sample.is_series else f"SHA256:{sample.sha256}"
        assert args["checksums"] == [expected_checksum]
        thumbnail = Path(args["thumbnailFileName"])
        assert thumbnail.is_file() and png_size(thumbnail)[0] >= 128
        assert f"Resources/Icons/{thumbnail.name}" in cmake, "the thumbnail is installed with the module"
    radiograph = sample_data.source_for("cxr-pa")
    assert radiograph.properties() == {"singleFile": True, "name": "ChestXray-PA"}


def test_the_module_registers_after_startup_with_its_own_loader():
    tree = ast.parse((ROOT / "CTDiffusionSR" / "CTDiffusionSR.py").read_text(encoding="utf-8"))
    connections = {
        (call.args[0].value, ast.unparse(call.args[1]))
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "slicer.app.connect"
    }
    assert ("startupCompleted()", "registerSampleData") in connections
    functions = {f.name: ast.unparse(f) for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert "customDownloader=loadSampleData" in functions["registerSampleData"]
    assert "fetch_sample_file(source)" in functions["loadSampleData"]


#: The samples this machine already fetched (read before any test points the cache elsewhere).
USER_CACHE = sampledata.sample_root()


def cached_or_skip(*parts: str) -> Path:
    path = USER_CACHE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not cached here (run `python -m DiffusionCore sample-data chest-dx cxr-pa`)")
    return path


def test_the_radiograph_loader_returns_the_sha256_checked_cached_file(cache_home):
    source = sample_data.source_for("cxr-pa")
    real = cached_or_skip("cxr-pa", "RG1_UNCR.dcm")
    folder = cache_home / "sample-data" / "cxr-pa"
    folder.mkdir(parents=True)
    (folder / real.name).write_bytes(real.read_bytes())
    path = sample_data.fetch_sample_file(source, offline=True)
    assert path == sample_data.cached_file(source) == folder / real.name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sampledata.get_sample("cxr-pa").sha256
    assert "pydicom-data" in sample_data.attribution(source)


def test_a_tampered_cached_radiograph_is_refused_and_deleted(cache_home):
    source = sample_data.source_for("cxr-pa")
    folder = cache_home / "sample-data" / "cxr-pa"
    folder.mkdir(parents=True)
    (folder / "RG1_UNCR.dcm").write_bytes(b"not the radiograph")
    with pytest.raises(DataUnavailableError, match="checksum mismatch"):
        sample_data.fetch_sample_file(source, offline=True)
    assert not (folder / "RG1_UNCR.dcm").exists()


def test_the_ct_loader_checks_the_series_and_converts_it_once(cache_home):
    source = sample_data.source_for("chest-dx")
    real = cached_or_skip("chest-dx", "dicom")
    dicom = cache_home / "sample-data" / "chest-dx" / "dicom"
    dicom.mkdir(parents=True)
    for f in sorted(real.glob("*.dcm")):  # links: the series digest reads the real files
        (dicom / f.name).symlink_to(f)
    path = sample_data.fetch_sample_file(source, offline=True)
    assert path == sample_data.cached_file(source) and path.is_file()
    from DiffusionCore.volume import read_volume

    volume = read_volume(path)
    assert volume.shape == (64, 512, 512) and volume.spacing[2] == pytest.approx(5.0)


def test_the_samples_load_as_slicer_volumes():
    """What ``slicer.util.loadVolume`` does for "VolumeFile": an archetype storage node reads the file."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed")
    import numpy as np
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    loaded = {}
    for name, parts in (
        ("chest-dx", ("chest-dx", "chest-dx.nii.gz")),
        ("cxr-pa", ("cxr-pa", "RG1_UNCR.dcm")),
    ):
        path = cached_or_skip(*parts)
        source = sample_data.source_for(name)
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", source.node_name)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        storage.SetSingleFile(bool(source.load_properties.get("singleFile", False)))
        assert storage.ReadData(node), f"Slicer's volume reader cannot read {path.name}"
        dims = node.GetImageData().GetDimensions()
        values = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
        loaded[name] = (dims, node.GetSpacing(), values.reshape(dims[::-1]))
    dims, spacing, _ = loaded["chest-dx"]
    assert dims == (512, 512, 64) and spacing[2] == pytest.approx(5.0)  # thick slices: what SR is for
    dims, _, image = loaded["cxr-pa"]
    assert dims[2] == 1
    # MONOCHROME1 is inverted by the reader: the mediastinum and spine are brighter than the lungs, so the
    # X-ray to CT module needs no inversion for this node (it has no DICOM database attributes either).
    rows, cols = image.shape[1:]
    middle = image[0, rows // 3 : 2 * rows // 3]
    centre = middle[:, cols // 2 - cols // 20 : cols // 2 + cols // 20].mean()
    lungs = np.mean([middle[:, c - cols // 20 : c + cols // 20].mean() for c in (cols // 4, 3 * cols // 4)])
    assert centre > lungs


def test_startup_hooks_import_without_the_packages_installed_on_first_use():
    """The version check and the Sample Data registration run at startup, before the first Apply installs
    torch and the pip packages, so they must import with only what Slicer ships: numpy, SimpleITK, VTK and
    scipy (official builds use Slicer_USE_SCIPY=ON; Slicer's SuperBuild/requirements/python-scipy.txt)."""
    blocked = sorted((set(REQUIREMENTS) - {"scipy"}) | {"torch"})
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError("not installed yet: " + name)
        sys.meta_path.insert(0, Block())
        sys.path[:0] = [{str(ROOT / "CTDiffusionSR")!r}]
        from CTDiffusionSRLib.slicer_version import check_slicer_version
        from CTDiffusionSRLib.sample_data import SAMPLE_SOURCES, registration_arguments
        for source in SAMPLE_SOURCES:
            registration_arguments(source, ".")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_modules_and_the_readme_credit_the_data_the_shipped_weights_were_trained_on():
    # both CTs are CC BY: whoever installs the weights sees the credit in Slicer (each module's acknowledgement)
    # and in the README, with the licences and the DOIs to cite
    for path in (ROOT / "CTDiffusionSR" / "CTDiffusionSR.py", ROOT / "XrayToCT" / "XrayToCT.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        text = next(ast.literal_eval(n.value.args[0]) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    and ast.unparse(n.targets[0]) == "self.parent.acknowledgementText")  # fmt: skip
        for credit in ("LIDC-IDRI", "CC BY 3.0", "Lung-PET-CT-Dx", "CC BY 4.0", "docs/model_cards"):
            assert credit in text, (path.name, credit)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doi in ("doi:10.7937/K9/TCIA.2015.LO9QL9SX", "doi:10.7937/TCIA.2020.NNC2-0461"):
        assert doi in readme.split("## Licence")[0].split("## Sample data and attribution")[1]



def test_registering_the_sample_data_at_slicer_start_loads_no_image_processing():
    # Slicer registers the Sample Data buttons at every start, through DiffusionCore.sampledata: that must not pull in
    # scipy's image modules or torch (half a second before; numpy and SimpleITK are loaded in Slicer anyway)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from CTDiffusionSRLib import sample_data; "
            "[sample_data.registration_arguments(s, sys.argv[1]) for s in sample_data.SAMPLE_SOURCES]; "
            "print(sorted(m for m in ('scipy.ndimage', 'torch') if m in sys.modules))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "CTDiffusionSR")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
