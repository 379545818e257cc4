"""First Apply in both modules: the shipped default weights preselected, Apply enabled and working on the
sample data; with no weights for a family, Apply disabled with the reason and weights importable.

All on real MRML (slicer-core), the registries DiffusionCore really reads, and the command-line modules the
widgets run in the background. The widgets themselves (Qt) only copy these decisions onto buttons.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
for _module_dir in (ROOT / "CTDiffusionSR", ROOT / "XrayToCT"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

from CTDiffusionSRLib import mrml_io, weights_choice  # noqa: E402
from CTDiffusionSRLib.process import JobState  # noqa: E402
from CTDiffusionSRLib.sr_logic import SRJob, SRSettings, check_sr_input  # noqa: E402
from CTDiffusionSRLib.weights_choice import (  # noqa: E402
    apply_state,
    import_weights_file,
    registered_weights,
    weights_items,
    weights_problem,
)

import DiffusionCore.weights.registry as registry  # noqa: E402
from DiffusionCore.errors import OutputExistsError, WeightsError  # noqa: E402
from DiffusionCore.weights import list_weights  # noqa: E402

SHIPPED = {"sr": "sr-default", "xray": "xray-default"}


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """An empty user cache (imported weights go here), as the module's cache-folder setting exports it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(cache))
    return cache


@pytest.fixture
def no_shipped_weights(tmp_path, monkeypatch):
    """A build without the shipped weights: the bundled registry names them, their files are absent."""
    folder = tmp_path / "bundled"
    folder.mkdir()
    (folder / "registry.json").write_text(registry.BUNDLED_REGISTRY.read_text())
    monkeypatch.setattr(registry, "BUNDLED_REGISTRY", folder / "registry.json")
    monkeypatch.setattr(weights_choice, "bundled_registry_path", lambda: folder / "registry.json")
    return folder


def _view(entries) -> list[tuple]:
    return [(e["name"], e["source"], Path(e["path"]), e["available"]) for e in entries]


@pytest.mark.parametrize("family", ["sr", "xray"])
def test_the_shipped_default_is_listed_and_preselected_and_apply_is_enabled(family, user_cache):
    names, selected = weights_items(family, current="")
    assert selected == SHIPPED[family] and selected in names
    assert weights_problem(family, "") == "" and weights_problem(family, SHIPPED[family]) == ""
    state = apply_state(running=False, input_problem="", weights_problem=weights_problem(family, ""), action="go", cancel="stop")
    assert (state.text, state.enabled, state.tooltip, state.needs_weights) == ("Apply", True, "go", False)
    # the torch-free view the widget uses agrees with DiffusionCore's own registry
    assert [(e.name, e.source, e.path, e.available) for e in registered_weights(family)] == _view(list_weights(family))


@pytest.mark.parametrize("family", ["sr", "xray"])
def test_without_weights_apply_is_disabled_with_the_reason_and_import_enables_it(family, user_cache, no_shipped_weights):
    names, selected = weights_items(family, "")
    assert names == [] and selected == ""
    reason = weights_problem(family, "")
    assert SHIPPED[family] in reason and "no file on this computer" in reason and "Import weights" in reason
    state = apply_state(running=False, input_problem="", weights_problem=reason, action="go", cancel="stop")
    assert not state.enabled and state.tooltip == reason and state.needs_weights
    # an input problem is said first; running turns Apply into an enabled Cancel
    assert apply_state(running=False, input_problem="Select a volume.", weights_problem=reason, action="go", cancel="stop").tooltip == "Select a volume."
    assert apply_state(running=True, input_problem="", weights_problem=reason, action="go", cancel="stop").enabled

    # a family whose registry has no entry at all says so
    (no_shipped_weights / "registry.json").write_text(json.dumps({"weights": {}}))
    assert "No " in weights_problem(family, "") and "are installed" in weights_problem(family, "")

    # importing the weights file (the module's 'Import weights...') makes Apply possible again
    shipped_file = Path(registry.__file__).with_name(f"{SHIPPED[family]}.safetensors")
    name, sha = import_weights_file(shipped_file, f"my-{family}", family)
    assert name == f"my-{family}" and len(sha) == 64
    assert weights_items(family, "") == ([f"my-{family}"], f"my-{family}")
    assert weights_problem(family, "") == ""
    assert [(e.name, e.source, e.path, e.available) for e in registered_weights(family)] == _view(list_weights(family))


def test_chosen_weights_are_judged_and_a_wrong_family_import_is_refused(user_cache, tmp_path):
    assert "neither registered" in weights_problem("sr", "no-such-weights")
    sr_file = Path(registry.__file__).with_name("sr-default.safetensors")
    assert weights_problem("sr", str(sr_file)) == ""  # a file path is accepted (checked at Apply)
    xray_file = Path(registry.__file__).with_name("xray-default.safetensors")
    with pytest.raises(WeightsError, match="family"):
        import_weights_file(xray_file, "wrong", "sr")
    assert weights_items("sr", "")[0] == ["sr-default"]
    # a registered entry whose file was deleted is named
    name, _sha = import_weights_file(sr_file, "gone", "sr")
    # another file under a name already taken: the dialog is told to ask (not the command line's --overwrite)
    other = tmp_path / "other.safetensors"
    with safe_open(str(sr_file), "pt") as f:  # the same tensors, other metadata: another file (sha256)
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    save_file(tensors, str(other), metadata={**meta, "note": "retrained"})
    with pytest.raises(OutputExistsError) as refused:
        import_weights_file(other, "gone", "sr")
    assert "replace them, or import these under another name" in str(refused.value)
    assert "--overwrite" not in str(refused.value)
    assert import_weights_file(other, "gone", "sr", replace=True)[1] != _sha
    Path(next(e.path for e in registered_weights("sr") if e.name == "gone")).unlink()
    assert "missing" in weights_problem("sr", "gone") and "gone" not in weights_items("sr", "")[0]


def _crop_of_the_sample_ct(tmp_path) -> Path:
    """The file the Sample Data button "Chest CT, 5 mm slices" loads (fetched once, then cached), cropped."""
    import SimpleITK as sitk
    from CTDiffusionSRLib.sample_data import fetch_sample_file, source_for

    from DiffusionCore.errors import DataUnavailableError

    try:
        sample = fetch_sample_file(source_for("chest-dx"))
    except DataUnavailableError as exc:  # offline and not cached
        pytest.skip(f"the sample CT cannot be fetched here: {exc}")
    image = sitk.ReadImage(str(sample))
    size = image.GetSize()
    crop = image[size[0] // 2 - 40 : size[0] // 2 + 40, size[1] // 2 - 40 : size[1] // 2 + 40, size[2] // 2 - 6 : size[2] // 2 + 6]
    path = tmp_path / "ChestCT-5mm-crop.nrrd"
    sitk.WriteImage(crop, str(path))
    return path


def test_first_apply_super_resolves_the_sample_ct_with_the_preselected_default(scene, tmp_path):
    # The sample CT as the Sample Data button loads it (Slicer's storage node), cropped to keep this quick.
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ChestCT-5mm")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(_crop_of_the_sample_ct(tmp_path)))
    assert storage.ReadData(node)

    # the parameter node's defaults: factor from the spacing, weights "" = the preselected default
    settings = SRSettings(device="cpu")
    state = apply_state(
        running=False, input_problem=check_sr_input(node, settings), weights_problem=weights_problem("sr", settings.weights),
        action="go", cancel="stop",
    )
    assert state.enabled, state.tooltip
    job = SRJob(scene, node, settings)
    assert job.run(timeout=400) == JobState.COMPLETED, job.error
    result = job.result_nodes[0]
    factor = job.factor  # suggested from the 5 mm slices and the 0.84 mm pixels
    assert factor >= 5 and result.GetName() == f"ChestCT-5mm SR x{factor} (synthetic)"
    sha = next(e["sha256"] for e in list_weights("sr") if e["name"] == "sr-default")
    assert result.GetAttribute(mrml_io.ATTR_MODEL) == "sr-default" and result.GetAttribute(mrml_io.ATTR_WEIGHTS_SHA256) == sha
    dims = result.GetImageData().GetDimensions()
    assert dims[2] == 12 * factor and dims[:2] == (80, 80)
    from vtk.util import numpy_support

    voxels = numpy_support.vtk_to_numpy(result.GetImageData().GetPointData().GetScalars())
    assert np.isfinite(voxels).all() and voxels.min() < -500 and voxels.max() > 0  # air and tissue, in HU


def test_no_weights_stops_the_batch_cli_with_what_to_do(tmp_path, user_cache, no_shipped_weights, monkeypatch):
    import importlib.util

    for name, family, module in (
        ("CTDiffusionSRBatch", "sr", ROOT / "CTDiffusionSR" / "CLI" / "CTDiffusionSRBatch.py"),
        ("XrayToCTGenerate", "xray", ROOT / "XrayToCT" / "CLI" / "XrayToCTGenerate.py"),
    ):
        spec = importlib.util.spec_from_file_location(f"cli_{name}", module)
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        with pytest.raises(WeightsError) as err:
            cli.installed_default_weights()
        assert SHIPPED[family] in str(err.value) and "Import weights" in str(err.value)
        shutil.copy(Path(registry.__file__).with_name(f"{SHIPPED[family]}.safetensors"), tmp_path / "w.safetensors")
        import_weights_file(tmp_path / "w.safetensors", f"mine-{family}", family)
        assert cli.installed_default_weights() == f"mine-{family}"  # the truth: the first installed ones
