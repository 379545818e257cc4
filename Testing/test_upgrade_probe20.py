"""The upgrade path (probe 20): files that older versions wrote, used with the current code.

- weights a user imported as ``sr-default`` before weights of that name shipped (older versions allowed it): listed
  as hidden, told of once, checked by ``weights verify``, offered by the Slicer panels by their file, removable;
- a training checkpoint's file that an older version let the user register by name;
- resuming a run whose record lacks options added since, or whose recorded paths are relative to another folder;
- ``prepare-xray-data`` into a folder that already holds a prepared dataset;
- a result node of an older scene, which records no reference to its input, compared in the SR panel.

Real files, real registries in a temporary ``DIFFUSIONCORE_CACHE``, real subprocesses where a command is what the user
runs; the registry files are written by hand where an older version wrote them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import DiffusionCore.sr.pipeline  # noqa: F401  (registers the SR architecture check that verify compares with)
from DiffusionCore.errors import WeightsError
from DiffusionCore.sr.model import SRModel
from DiffusionCore.weights import registry
from DiffusionCore.weights.registry import save_safetensors

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CTDiffusionSR") not in sys.path:
    sys.path.insert(0, str(ROOT / "CTDiffusionSR"))
if importlib.util.find_spec("slicer") is not None:  # the SR panel over the Qt stand-in of the widget tests
    from test_slicer_widgets import _open, panels, scene, widgets  # noqa: F401


def _cli(cache: Path, *argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFUSIONCORE_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "DiffusionCore", *argv], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", env=env, cwd=cwd, timeout=600)  # fmt: skip


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _register_by_hand(cache: Path, name: str, file: Path, family: str) -> Path:
    """What an older version's ``import_weights`` did, without today's checks: copy ``file`` to
    ``cache/weights/NAME.safetensors`` and add it to the user registry."""
    folder = cache / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / f"{name}.safetensors"
    shutil.copyfile(file, copy)
    registry_file = folder / "registry.json"
    entries = json.loads(registry_file.read_text())["weights"] if registry_file.is_file() else {}
    entries[name] = {"file": copy.name, "sha256": _sha(copy), "family": family, "description": "", "model_card": ""}
    registry_file.write_text(json.dumps({"weights": entries}, indent=2))
    return copy


@pytest.fixture
def old_cache(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A user cache from before sr-default shipped: the user's own SR weights registered as ``sr-default``."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(cache))
    monkeypatch.setattr(registry, "_TOLD_HIDDEN", set(), raising=False)  # told once per process
    mine = tmp_path / "my_sr.safetensors"
    SRModel.tiny(seed=3).save(mine)
    return cache, _register_by_hand(cache, "sr-default", mine, "sr")


# -- 1. the user's own weights under a name that now ships --------------------------------------------------
def test_own_weights_under_a_name_that_now_ships_are_told_of_once_and_the_name_runs_the_shipped_ones(
    old_cache, diffusioncore_log
):
    cache, mine = old_cache
    shipped = registry.read_registry(registry.BUNDLED_REGISTRY)["sr-default"]["sha256"]
    for _ in range(2):
        assert registry.resolve_weights("sr-default", family="sr").sha256 == shipped  # the documented default
    told = [r.getMessage() for r in diffusioncore_log if r.levelno == logging.WARNING and "hidden" in r.getMessage()]
    assert len(told) == 1, told  # once per process
    assert "'sr-default'" in told[0] and str(mine) in told[0] and _sha(mine)[:12] in told[0]
    assert f"weights import {mine} --name NEW" in told[0] and "weights remove sr-default" in told[0]
    # listed after the shipped ones, marked, with the command that brings them back; never the default
    listed = [e for e in registry.list_weights("sr") if e["name"] == "sr-default"]
    assert [(e["source"], e["hidden"]) for e in listed] == [("bundled", False), ("user", True)]
    assert listed[1]["path"] == mine and listed[1]["sha256"] == _sha(mine)
    assert listed[1]["description"].startswith("HIDDEN") and f"weights import {mine} --name NEW" in listed[1]["description"]
    assert registry.first_available("sr") == "sr-default"
    # their file runs them: it is registered (by the user)
    assert registry.resolve_weights(str(mine), family="sr").sha256 == _sha(mine)


def test_weights_list_verify_and_remove_show_and_remove_the_hidden_own_weights(old_cache):
    cache, mine = old_cache
    listed = _cli(cache, "weights", "list", "--family", "sr")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    own = [i for i, line in enumerate(lines) if line.startswith("sr-default") and " user " in line]
    assert len(own) == 1 and "HIDDEN" in lines[own[0]] and str(mine) in lines[own[0] + 1]
    assert listed.stderr.count("are hidden by the weights of that name") == 1, listed.stderr

    verified = _cli(cache, "weights", "verify", "sr-default")
    assert verified.returncode == 0, verified.stderr
    assert [line.split() for line in verified.stdout.splitlines()] == [["sr-default", "bundled", "ok"],
                                                                       ["sr-default", "user", "ok"]]  # fmt: skip
    mine.write_bytes(mine.read_bytes()[:-8] + b"damaged!")  # verify checks the hidden file, not only the shipped one
    damaged = _cli(cache, "weights", "verify")
    assert damaged.returncode == 3 and "sr-default           user     FAILED: weights 'sr-default'" in damaged.stdout
    assert "fail their sha256 check" in damaged.stdout

    imported = _cli(cache, "weights", "import", str(ROOT / "DiffusionCore" / "weights" / "sr-default.safetensors"),
                    "--name", "sr-default")  # fmt: skip
    assert imported.returncode == 3 and "is the name of bundled weights: choose another name" in imported.stderr

    removed = _cli(cache, "weights", "remove", "sr-default")
    assert removed.returncode == 0, removed.stderr
    assert "removed your imported weights 'sr-default'" in removed.stderr
    assert "the shipped weights of that name stay" in removed.stderr
    assert not mine.exists()
    assert "sr-default" not in json.loads((cache / "weights" / "registry.json").read_text())["weights"]
    assert (ROOT / "DiffusionCore" / "weights" / "sr-default.safetensors").is_file()
    again = _cli(cache, "weights", "remove", "sr-default")  # only the shipped ones are left: refused as before
    assert again.returncode == 3 and "ships with the extension and cannot be removed" in again.stderr


def test_the_slicer_panels_offer_the_hidden_own_weights_by_their_file(old_cache, caplog, monkeypatch):
    from CTDiffusionSRLib import weights_choice

    cache, mine = old_cache
    monkeypatch.setattr(weights_choice, "_TOLD_HIDDEN", set(), raising=False)
    with caplog.at_level(logging.WARNING, logger=weights_choice.logger.name):
        names, selected = weights_choice.weights_items("sr", "")
        weights_choice.weights_items("sr", "")
    assert names == ["sr-default", str(mine)] and selected == "sr-default"
    told = [r.getMessage() for r in caplog.records if "hidden" in r.getMessage()]
    assert len(told) == 1 and str(mine) in told[0] and "Import weights" in told[0]
    assert weights_choice.weights_problem("sr", str(mine)) == "" and weights_choice.weights_problem("sr", "") == ""
    assert weights_choice.default_weights("sr") == "sr-default"
    status = weights_choice.hidden_weights_status("sr")  # the panel's status line, when it lists the weights
    assert status.startswith("Your imported weights 'sr-default' are hidden") and str(mine) in status
    assert weights_choice.hidden_weights_status("xray") == ""
    view = [(e.name, e.source, e.path, e.available) for e in weights_choice.registered_weights("sr")]
    assert view == [(e["name"], e["source"], Path(e["path"]), e["available"]) for e in registry.list_weights("sr")]


# -- 4. a training checkpoint's file registered by an older version ------------------------------------------
def test_a_registered_training_checkpoint_file_gets_the_checkpoint_explanation_and_the_fix(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(cache))
    ema = tmp_path / "run" / "checkpoint-00000003" / "ema.safetensors"  # what the checkpoint of a train sr run holds
    save_safetensors(ema, {"denoiser.w": torch.zeros(2), "num_updates": torch.tensor(3)},
                     {"kind": "model", "model": "ema", "step": 3})  # fmt: skip
    copy = _register_by_hand(cache, "ckpt-ema", ema, "sr")
    with pytest.raises(WeightsError) as refused:
        registry.resolve_weights("ckpt-ema", family="sr")
    said = str(refused.value)
    assert f"weights 'ckpt-ema' ({copy}) are a file of a training checkpoint (model 'ema', step 3)" in said
    assert "weights remove ckpt-ema" in said and "weights import RUN/EXPORTED.safetensors --name ckpt-ema" in said
    assert "re-export" not in said
    verified = _cli(cache, "weights", "verify", "ckpt-ema")
    assert verified.returncode == 3 and "FAILED: weights 'ckpt-ema'" in verified.stdout
    assert "a file of a training checkpoint (model 'ema', step 3)" in verified.stdout
    assert "weights remove ckpt-ema" in verified.stdout and _sha(copy) == _sha(ema)  # nothing was changed


# -- 2. resuming a run whose record lacks options added since ------------------------------------------------
def test_options_added_since_a_run_started_are_not_settings_that_differ():
    from DiffusionCore.train.checkpoint import config_differences

    saved = {"learning_rate": 0.001, "model": {"channels": 8}, "configs": [{"data": {"view": "pa"}}]}
    now = {"learning_rate": 0.0005, "model": {"channels": 8, "low_blocks": 0},
           "configs": [{"data": {"view": "pa", "processing": 0.0}}]}  # fmt: skip
    added: list[str] = []
    assert config_differences(saved, now, added=added) == ["learning_rate: 0.001 -> 0.0005"]
    assert added == ["configs.0.data.processing = 0.0", "model.low_blocks = 0"]
    # without the list, a key missing on one side stays a difference (a key the record has and the config lost)
    assert "model.low_blocks: '(none)' -> 0" in config_differences(saved, now)
    assert config_differences({"old_option": 1}, {}, added=[]) == ["old_option: 1 -> '(none)'"]


def test_resuming_a_run_of_an_older_version_names_real_differences_first_and_added_options_apart(tmp_path):
    from conftest import ct_phantom_array

    from DiffusionCore.volume import Volume, write_volume

    data = tmp_path / "thin.nii.gz"
    write_volume(Volume(ct_phantom_array((40, 48, 48), seed=3), spacing=(0.8, 0.8, 1.0)), data)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": {"channels": 4, "blocks": 1, "factors": [2]}, "pairs": {"thick_rows": 4, "width": 16},
                               "batch_size": 2, "val_every": 100, "checkpoint_every": 2, "val_pairs": 2}))  # fmt: skip
    out = tmp_path / "run"
    started = _cli(tmp_path / "cache", "train", "throughplane", "--config", str(cfg), "--data", str(data), "--out-dir",
                   str(out), "--max-steps", "2", "--threads", "1")  # fmt: skip
    assert started.returncode == 0, started.stderr
    # the record as an older version wrote it: without the options added since, and a learning rate set then
    state_file = next(out.glob("checkpoint-*/state.json"))
    state = json.loads(state_file.read_text())
    gone = {"model": ["low_blocks", "post_blocks"], "pairs": ["input_noise_hu", "kernel_jitter"]}
    for section, keys in gone.items():
        for key in keys:
            del state["config"][section][key]
    state["config"]["learning_rate"] = 0.01
    state_file.write_text(json.dumps(state, indent=2))
    resumed = _cli(tmp_path / "cache", "train", "throughplane", "--data", str(data), "--out-dir", str(out), "--resume",
                   "--max-steps", "3", "--threads", "1", "--learning-rate", "0.002")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    differ = [line for line in resumed.stderr.splitlines() if "differ from the run's" in line]
    assert len(differ) == 1 and differ[0].endswith("from this step on: learning_rate: 0.01 -> 0.002"), differ
    added = [line for line in resumed.stderr.splitlines() if "added since this run started" in line]
    assert len(added) == 1 and added[0].startswith("info: 4 option(s) added since this run started"), resumed.stderr
    assert str(state_file) in added[0] and "'(none)'" not in resumed.stderr
    for section, keys in gone.items():
        assert all(f"{section}.{key} = " in added[0] for key in keys)


# -- 3. prepare-xray-data into a folder that holds a prepared dataset ---------------------------------------
def _tree(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): _sha(f) for f in sorted(folder.rglob("*")) if f.is_file()}


def test_prepare_xray_data_refuses_a_prepared_folder_and_overwrite_leaves_only_what_it_lists(tmp_path):
    from conftest import ct_phantom_array

    from DiffusionCore.volume import Volume, write_volume

    cts = []
    for name, seed in (("lidc", 1), ("dx", 2)):
        cts.append(tmp_path / f"{name}.nii.gz")
        write_volume(Volume(ct_phantom_array((24, 32, 32), seed=seed), spacing=(2.0, 2.0, 3.0)), cts[-1])
    out = tmp_path / "prepared"
    sizes = ["--resolutions", "16", "--xray-resolutions", "16", "--augmented-copies", "1", "--progress", "none"]
    first = _cli(tmp_path / "cache", "prepare-xray-data", "--data", str(cts[0]), str(cts[1]), "--output-dir", str(out), *sizes)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["0000_lidc", "0001_dx", "manifest.json"]
    (out / "0000_lidc" / "notes.txt").write_text("the user's own notes")
    before = _tree(out)
    for order in (cts, cts[::-1]):  # the same order (its cube files exist) and the other (new case folders)
        refused = _cli(tmp_path / "cache", "prepare-xray-data", "--data", *map(str, order), "--output-dir", str(out), *sizes)
        assert refused.returncode == 4, refused.stderr
        said = f"error: {out} already holds a prepared dataset (manifest.json, 0000_lidc, 0001_dx); pass --overwrite"
        assert said in refused.stderr
        assert _tree(out) == before  # nothing written
    replaced = _cli(tmp_path / "cache", "prepare-xray-data", "--data", str(cts[1]), str(cts[0]), "--output-dir", str(out),
                    "--overwrite", *sizes)  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f for case in manifest["cases"] for f in case["files"].values()}
    assert [Path(case["source"]).name for case in manifest["cases"]] == ["dx.nii.gz", "lidc.nii.gz"]
    assert set(_tree(out)) == listed | {"manifest.json", "0000_lidc/notes.txt"}  # no unlisted copy of a CT is left
    assert "removed 1 case folder(s)" in replaced.stderr and "0001_dx" in replaced.stderr
    assert "kept 0000_lidc" in replaced.stderr  # the user's file is never deleted
    helped = _cli(tmp_path / "cache", "prepare-xray-data", "--help")
    assert "case folders that the new manifest does not" in " ".join(helped.stdout.split())


# -- 5. resuming from another folder a run that recorded relative paths ------------------------------------
def test_resuming_from_another_folder_names_the_recorded_relative_paths_and_their_options(tmp_path):
    from conftest import ct_phantom_array

    from DiffusionCore.sr.config import tiny_config
    from DiffusionCore.volume import Volume, write_volume

    (tmp_path / "data").mkdir()
    write_volume(Volume(ct_phantom_array((40, 40, 40)), (0.7, 0.7, 1.0)), tmp_path / "data" / "a.nii.gz")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"vae": {"channels": list(tiny_config().vae.channels)},
                                  "train": {"val_patches": 1, "val_fraction": 0.3, "val_every": 0}}))  # fmt: skip
    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere" / "deeper"
    started.mkdir()
    elsewhere.mkdir(parents=True)
    tiny = ["--patch-size", "8", "32", "32", "--batch-size", "1", "--device", "cpu", "--checkpoint-every", "1"]
    first = _cli(tmp_path / "cache", "train", "vae", "--config", str(config), "--data", "../data/a.nii.gz",
                 "--out-dir", "../run", "--max-steps", "1", *tiny, cwd=started)  # fmt: skip
    assert first.returncode == 0, first.stderr
    state = next((tmp_path / "run").glob("checkpoint-*/state.json"))
    assert json.loads(state.read_text())["config"]["train"]["data"] == ["../data/a.nii.gz"]  # as the user gave it

    moved = _cli(tmp_path / "cache", "train", "vae", "--out-dir", "../../run", "--resume", "--max-steps", "2", *tiny,
                 cwd=elsewhere)  # fmt: skip
    assert moved.returncode == 2, moved.stderr
    error = [line for line in moved.stderr.splitlines() if line.startswith("error: ")]
    assert error == [
        f"error: --resume: the run in ../../run recorded (in ../../run/{state.parent.name}/state.json) paths relative to "
        f"the folder the run was started from, which do not exist from here ({elsewhere}): its training data "
        "../data/a.nii.gz (give it again with --data); resume from the folder the run was started from, or give them "
        "again with these options"
    ]  # fmt: skip
    given = _cli(tmp_path / "cache", "train", "vae", "--out-dir", "../../run", "--resume", "--max-steps", "2", "--data",
                 str(tmp_path / "data" / "a.nii.gz"), *tiny, cwd=elsewhere)  # fmt: skip
    assert given.returncode == 0, given.stderr
    back_home = _cli(tmp_path / "cache", "train", "vae", "--out-dir", "../run", "--resume", "--max-steps", "3", *tiny,
                     cwd=started)  # fmt: skip
    assert back_home.returncode == 0, back_home.stderr


# -- 6. a result of an older scene, which records no reference to its input, compared ---------------------
def _older_scene_imported_beside_another_ct(scene, tmp_path):
    """A scene saved by a version before 2026-12-05 (its result records its input only as the node ID in the
    ``CTDiffusion.SourceNode`` attribute), imported beside another patient's CT, which takes that ID."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")
    from conftest import save_scene
    from CTDiffusionSRLib import mrml_io
    from CTDiffusionSRLib.testing import phantom_ct

    earlier = slicer.vtkMRMLScene()
    source = mrml_io.add_volume_node(earlier, phantom_ct(), "CT_A")
    result = mrml_io.add_volume_node(earlier, phantom_ct(seed=1), "CT_A SR x2 (synthetic)")
    mrml_io.set_provenance(result, kind="super-resolution", model="sr-default", weights_sha256="ab" * 32,
                           settings={"factor": 2}, title="SR x2 (synthetic)")  # fmt: skip
    result.SetAttribute(mrml_io.ATTR_SOURCE, source.GetID())  # what the older module recorded, and no reference
    save_scene(earlier, (source, result), tmp_path / "older.mrml")
    other = mrml_io.add_volume_node(scene, phantom_ct(seed=2), "Other patient CT")
    assert other.GetID() == source.GetID()  # the recorded ID now names another patient's scan
    scene.SetURL(str(tmp_path / "older.mrml"))
    scene.Import()
    loaded = next(n for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if n.GetName() == "CT_A SR x2 (synthetic)")
    return loaded, other


def test_a_result_of_an_older_scene_is_compared_with_the_input_only_with_a_notice(scene, tmp_path):
    from CTDiffusionSRLib import mrml_io
    from CTDiffusionSRLib.testing import phantom_ct

    loaded, other = _older_scene_imported_beside_another_ct(scene, tmp_path)
    source, notice = mrml_io.comparison_source(loaded, other)
    assert source is other and notice == (
        "'CT_A SR x2 (synthetic)' was saved by an older version of this module and does not record which volume it "
        "was made from. Compare it with the selected input, 'Other patient CT'? Do so only if that is the scan it was "
        "made from; otherwise select that scan as the input first."
    )
    assert mrml_io.comparison_source(loaded, None) == (None, (
        "'CT_A SR x2 (synthetic)' was saved by an older version of this module and does not record which volume it "
        "was made from. Select the CT it was made from as the input to compare it with."))  # fmt: skip
    # a current result is compared with its own input, whatever the selector holds; a plain volume with the input
    made_from = mrml_io.add_volume_node(scene, phantom_ct(seed=3), "CT_B")
    current = mrml_io.add_volume_node(scene, phantom_ct(seed=4), "CT_B SR x2 (synthetic)")
    mrml_io.set_provenance(current, kind="super-resolution", model="sr-default", weights_sha256="cd" * 32,
                           settings={}, source=made_from, recorded_input=mrml_io.recorded_input(made_from))  # fmt: skip
    assert mrml_io.comparison_source(current, other) == (made_from, "")
    assert mrml_io.comparison_source(other, made_from) == (made_from, "")
    scene.RemoveNode(made_from)  # its input deleted: not known any more, and said so by name
    source, notice = mrml_io.comparison_source(current, other)
    assert source is other and notice.startswith("'CT_B SR x2 (synthetic)' was made from 'CT_B', which is no longer in the scene.")


def test_the_sr_panel_asks_before_comparing_a_result_of_an_older_scene_with_the_input(
    panels, scene, tmp_path, monkeypatch  # noqa: F811  (fixtures of test_slicer_widgets)
):
    import slicer
    from CTDiffusionSRLib import views

    loaded, other = _older_scene_imported_beside_another_ct(scene, tmp_path)
    panel, p, ui = _open(panels.sr.SRWidget)
    p.inputVolume, p.resultVolume = other, loaded
    asked, answer = [], [False]
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *args, **kw: asked.append(text) or answer[0])
    red = views.composite_node(scene, "Red")
    for button in (ui.compareFadeButton, ui.compareSideBySideButton):
        button.emit("clicked(bool)", True)
        assert red.GetForegroundVolumeID() is None and red.GetBackgroundVolumeID() != other.GetID()  # not compared
    assert len(asked) == 2 and "saved by an older version" in asked[0] and "'Other patient CT'" in asked[0]
    assert ui.statusLabel.text == asked[0]
    answer[0] = True  # the user confirms that the selected input is the scan it was made from
    ui.compareFadeButton.emit("clicked(bool)", True)
    assert red.GetBackgroundVolumeID() == other.GetID() and red.GetForegroundVolumeID() == loaded.GetID()
    panel.cleanup()
