"""Training one's own weights from the Slicer side, then using them (probe 15's defects of the modules' side).

- Extra options holding one ``--opt=value`` reach the train command (DiffusionTrain's parser took it for an option
  of its own and the job failed with "expected one argument").
- A refused start leaves the output folder as it was (an Overwrite refused for a typo in the data path had already
  replaced the run's config.json, and the next Resume failed on it; a refused new start left a folder behind).
- An existing weights file that is not registered disables Apply with the module's words (its tooltip pointed
  nowhere and Apply then refused with command-line advice); weights of the other module are named as such.
- On Windows, ``C:\\...`` paths in the data field and Extra options keep their backslashes.
- Resuming a folder that holds another family's run says which family it holds, before its config is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")

ROOT = Path(__file__).resolve().parents[1]
for _folder in (ROOT / "CTDiffusionSR", ROOT / "CTDiffusionSR" / "CLI"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

import DiffusionTrain  # noqa: E402
from conftest import ct_phantom_array, write_fake_trainer  # noqa: E402
from CTDiffusionSRLib import jobs, mrml_io  # noqa: E402
from CTDiffusionSRLib.process import JobState  # noqa: E402
from CTDiffusionSRLib.sr_logic import SRJob, SRSettings, check_weights  # noqa: E402
from CTDiffusionSRLib.testing import phantom_ct  # noqa: E402
from CTDiffusionSRLib.training import TrainingJob, run_family  # noqa: E402
from CTDiffusionSRLib.weights_choice import apply_state, import_weights_file, weights_problem  # noqa: E402
from test_slicer_widgets import _training_ui, scene, widgets  # noqa: E402, F401  (the Qt stand-in's fixtures)

from DiffusionCore.errors import ConfigError, InputError, WeightsError  # noqa: E402
from DiffusionCore.sampledata import data_entries, split_words  # noqa: E402
from DiffusionCore.volume import Volume, write_volume  # noqa: E402
from DiffusionCore.weights import registry  # noqa: E402

TINY_THROUGHPLANE = {"model": {"channels": 8, "blocks": 1, "factors": [2, 4]}, "pairs": {"thick_rows": 6, "width": 32},
                     "batch_size": 4, "val_every": 2, "checkpoint_every": 2, "val_pairs": 4}  # fmt: skip


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """An empty user cache: weights imported in the test go there."""
    monkeypatch.setenv("DIFFUSIONCORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A through-plane run of 2 steps started from the panel's logic with ONE option in Extra options
    (``--max-steps=2``), through the real DiffusionTrain script; ``(run folder, data folder, job)``."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "my scans"
    data.mkdir()
    write_volume(Volume(ct_phantom_array((60, 64, 64), seed=3), spacing=(0.8, 0.8, 1.0)), data / "thin.nii.gz")
    s = slicer.vtkMRMLScene()
    run = root / "run"
    job = TrainingJob(s, family="throughplane", config_path=None, config_text=json.dumps(TINY_THROUGHPLANE), data=data,
                      output_dir=run, device="cpu", extra_arguments="--max-steps=2")  # fmt: skip
    job.run(timeout=300)
    return run, data, job


# -- 3: one option in Extra options ------------------------------------------------------------------------
def test_one_option_in_extra_options_reaches_the_train_command(trained_run):
    run, _data, job = trained_run
    assert job.state == JobState.COMPLETED, job.error  # was: "argument --extraArguments: expected one argument"
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert (run / "throughplane.safetensors").is_file()


@pytest.mark.parametrize("typed", ["--seed=3", "--finetune-decoder", "--max-steps=20"])
def test_slicers_way_of_passing_a_string_parameter_keeps_a_value_that_starts_with_dashes(typed):
    """Slicer's CLI launcher passes a string parameter as its flag, then the value: two items."""
    parser = DiffusionTrain.build_parser()
    argv = ["--family", "sr", "--config", "", "--outputDirectory", "out", "--extraArguments", typed, "--resume"]
    args = parser.parse_args(DiffusionTrain.attach_values(argv, parser))
    assert (args.extraArguments, args.config, args.outputDirectory, args.resume) == (typed, "", "out", True)
    assert DiffusionTrain.extra_options(args.extraArguments) == [typed]


def test_the_cli_descriptions_name_the_options_field_by_its_label():
    root = ET.parse(ROOT / "CTDiffusionSR" / "CLI" / "DiffusionTrain.xml").getroot()
    label = root.find(".//string[name='extraArguments']/label").text
    assert label == "Extra options"
    texts = [e.text or "" for e in root.iter("description")]
    assert not [t for t in texts if "More options" in t]
    family = root.find(".//string-enumeration[name='family']/description").text
    assert "--init-from sr-default to Extra options" in family
    assert "--seed=3" in root.find(".//string[name='extraArguments']/description").text


# -- 4: a refused start changes nothing in the output folder --------------------------------------------------
def _panel(widgets, tmp_path, monkeypatch, **params):  # noqa: F811 (the stand-in fixture, passed on)
    import types

    write_fake_trainer(tmp_path)
    monkeypatch.setenv("FAKE_TRAINER_STEPS", "1")
    monkeypatch.setattr(TrainingJob, "module_dir", lambda self: tmp_path)
    ui = _training_ui()
    ui.trainingFamilyComboBox.addItems(["throughplane", "sr", "xray"])
    p = types.SimpleNamespace(
        trainingOutputFolder="", trainingResume=False, trainingOverwrite=False, trainingUseSceneVolumes=False,
        trainingDataFolder="", trainingFamily="throughplane", trainingDevice="cpu", trainingExtraArguments="",
        trainingFromShippedWeights=False,
    )  # fmt: skip
    p.__dict__.update(params)
    panel = widgets.TrainingPanel(ui, lambda: p, "throughplane")
    return panel, ui, p


def _folder_state(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_refused_overwrite_leaves_the_runs_config_and_resume_still_works(widgets, scene, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "my scans e").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"channels": 32, "blocks": 6}}, indent=2))
    (run / "model.safetensors").write_text("previous run")
    (run / "checkpoint-00000010").mkdir()  # what Resume continues from
    (run / "checkpoint-00000010" / "state.json").write_text("{}")
    before = _folder_state(run)
    panel, ui, p = _panel(widgets, tmp_path, monkeypatch, trainingOutputFolder=str(run), trainingOverwrite=True,
                          trainingDataFolder=str(tmp_path / "my scans é"))  # a typo: refused  # fmt: skip
    ui.trainingConfigTextEdit.setPlainText('{"model": {"channels": 16, "blocks": 3}}')
    panel.onStart()
    assert panel.job is None and "does not exist" in widgets.dialogs.errors[-1]
    assert _folder_state(run) == before  # was: config.json replaced by the refused start's
    # a config the family refuses: refused as well, nothing written
    p.trainingDataFolder = str(tmp_path / "my scans e")
    ui.trainingConfigTextEdit.setPlainText('{"max_steps": 0}')
    panel.onStart()
    assert panel.job is None and "max_steps" in widgets.dialogs.errors[-1] and _folder_state(run) == before
    # the user ticks Resume instead: the run goes on with its own settings
    p.trainingOverwrite, p.trainingResume = False, True
    panel.onStart()
    assert panel.job is not None, widgets.dialogs.errors
    assert panel.job.wait(60) == JobState.COMPLETED
    argv = json.loads((run / "argv.json").read_text())
    assert argv[argv.index("--config") + 1] == str(run / "config.json")
    assert (run / "config.json").read_bytes() == before["config.json"]


def test_a_refused_new_start_leaves_no_folder_behind(widgets, scene, tmp_path, monkeypatch):  # noqa: F811
    data = tmp_path / "data"
    data.mkdir()
    new = tmp_path / "runs" / "new run"
    panel, ui, p = _panel(widgets, tmp_path, monkeypatch, trainingOutputFolder=str(new),
                          trainingDataFolder=str(tmp_path / "dat"))  # fmt: skip
    ui.trainingConfigTextEdit.setPlainText("{}")
    panel.onStart()  # a typo in the data path
    assert panel.job is None and "does not exist" in widgets.dialogs.errors[-1]
    assert not (tmp_path / "runs").exists()  # was: a new folder holding only config.json
    p.trainingDataFolder = str(data)
    ui.trainingConfigTextEdit.setPlainText('{"max_steps": 0}')
    panel.onStart()
    assert panel.job is None and not (tmp_path / "runs").exists()
    # volumes of the scene and a bad config: refused before the volumes are written into the folder
    node = mrml_io.add_volume_node(scene, phantom_ct(shape=(8, 16, 16)), "CT 1")
    ui.trainingVolumesSelector.checkedNodes = lambda: [node]
    p.trainingUseSceneVolumes = True
    panel.onStart()
    assert panel.job is None and "max_steps" in widgets.dialogs.errors[-1] and not (tmp_path / "runs").exists()
    # a good start writes the config and the volumes, then runs
    ui.trainingConfigTextEdit.setPlainText('{"batch_size": 4}')
    panel.onStart()
    assert panel.job is not None, widgets.dialogs.errors
    assert panel.job.wait(60) == JobState.COMPLETED
    assert json.loads((new / "config.json").read_text()) == {"batch_size": 4}
    argv = json.loads((new / "argv.json").read_text())
    assert argv[argv.index("--data") + 1] == str(new / "scene_volumes" / "volumes.txt")
    assert (new / "scene_volumes" / "000_CT_1.nrrd").is_file()


def test_a_start_whose_process_cannot_be_launched_leaves_the_folder_as_it_was(scene, tmp_path, monkeypatch):  # noqa: F811
    def cannot_launch(self):
        raise OSError(2, "No such file or directory: python-real")

    monkeypatch.setattr(jobs.ProcessRunner, "start", cannot_launch)
    (tmp_path / "data").mkdir()
    new, old = tmp_path / "a" / "b", tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text('{"batch_size": 8}')
    for out in (new, old):
        job = TrainingJob(scene, family="throughplane", config_path=None, config_text='{"batch_size": 2}',
                          data=tmp_path / "data", output_dir=out, overwrite=True)  # fmt: skip
        with pytest.raises(OSError):
            job.start()
    assert not (tmp_path / "a").exists()
    assert (old / "config.json").read_text() == '{"batch_size": 8}' and sorted(p.name for p in old.iterdir()) == ["config.json"]


# -- 5: weights files that are not registered, and weights of the other module ---------------------------------
def _unregistered(tmp_path, family: str) -> Path:
    """A copy of the shipped weights of ``family`` with other metadata: the same tensors, another sha256."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shipped = Path(registry.__file__).with_name(f"{family}-default.safetensors")
    with safe_open(str(shipped), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    path = tmp_path / f"run é/my {family}.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_file(tensors, str(path), metadata={**meta, "note": "trained by me"})
    return path


@pytest.mark.parametrize("family", ["sr", "xray"])
def test_an_unregistered_weights_file_disables_apply_with_the_modules_import(family, user_cache, tmp_path):
    path = _unregistered(tmp_path, family)
    with pytest.raises(WeightsError, match="not a registered weights file"):  # what DiffusionCore's registry decides
        registry.resolve_weights(str(path), family=family)
    reason = weights_problem(family, str(path))
    assert f"'my {family}.safetensors' is not a registered weights file" in reason  # was: "" (Apply enabled)
    assert "Press 'Import weights...'" in reason and "python -m" not in reason and "--" not in reason
    state = apply_state(running=False, input_problem="", weights_problem=reason, action="go", cancel="stop")
    assert not state.enabled and state.tooltip == reason
    with pytest.raises(WeightsError) as refused:  # what both modules' jobs check when made (a script's Apply)
        check_weights(str(path), family, allow_unregistered=False)
    assert str(refused.value).startswith(reason) and "python -m" not in str(refused.value)
    assert check_weights(str(path), family, allow_unregistered=True).name is None
    name, _sha = import_weights_file(path, f"mine-{family}", family)  # the module's Import weights...
    assert weights_problem(family, str(path)) == "" and weights_problem(family, name) == ""
    assert registry.resolve_weights(str(path), family=family).name == name  # the registry agrees


def test_weights_of_the_other_module_are_named_as_such(user_cache, tmp_path):
    sr_file, xray_file = (Path(registry.__file__).with_name(f"{f}-default.safetensors") for f in ("sr", "xray"))
    said = weights_problem("xray", str(sr_file))
    assert said == ("'sr-default.safetensors' holds CT super-resolution weights (the CT Diffusion SR module runs them), "
                    "not X-ray to CT weights. Choose X-ray to CT weights from the list, or add a file of them with "
                    "'Import weights...'.")  # fmt: skip
    assert "holds X-ray to CT weights (the X-ray to CT module runs them)" in weights_problem("sr", str(xray_file))
    mine = _unregistered(tmp_path, "sr")  # unregistered and of the other family: the family is said first
    assert "holds CT super-resolution weights" in weights_problem("xray", str(mine))
    for path, family in ((sr_file, "xray"), (xray_file, "sr"), (mine, "xray")):
        with pytest.raises(WeightsError, match="family"):  # the registry refuses them too
            registry.resolve_weights(str(path), family=family, allow_unregistered=True)
    assert weights_problem("sr", str(sr_file)) == "" and weights_problem("xray", str(xray_file)) == ""


def test_apply_with_an_unregistered_file_speaks_of_the_module_not_the_command_line(scene, user_cache, tmp_path):  # noqa: F811
    path = _unregistered(tmp_path, "sr")
    node = mrml_io.add_volume_node(scene, phantom_ct(shape=(6, 32, 32)), "CT_01")
    with pytest.raises(WeightsError) as refused:
        SRJob(scene, node, SRSettings(factor=2, weights=str(path), adapt_to_scan=False, device="cpu"))
    said = str(refused.value)
    assert "is not a registered weights file" in said and "Press 'Import weights...'" in said
    assert "allow_unregistered_weights=True" in said and "python -m DiffusionCore" not in said
    SRJob(scene, node, SRSettings(factor=2, weights=str(path), allow_unregistered_weights=True, adapt_to_scan=False,
                                  device="cpu"))  # a script's own choice: accepted  # fmt: skip


def test_judging_a_chosen_weights_file_imports_no_torch(tmp_path):
    path = Path(registry.__file__).with_name("xray-default.safetensors")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "CTDiffusionSR")!r})
        from CTDiffusionSRLib.weights_choice import weights_problem
        print(weights_problem("sr", {str(path)!r}))
        assert "torch" not in sys.modules
        """)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "holds X-ray to CT weights" in proc.stdout, proc.stderr[-2000:]


# -- 6: Windows paths keep their backslashes --------------------------------------------------------------------
def test_windows_paths_in_the_data_field_and_extra_options_keep_their_backslashes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # file names holding backslashes stand for Windows paths here
    for name in (r"D:\cohort\p1.nrrd", r"C:\Users\me\my scans é\a.nii.gz", r"C:\Users\me\b.nii.gz"):
        (tmp_path / name).write_text("x")
    assert data_entries(r"chest-lidc D:\cohort\p1.nrrd", windows=True) == ["chest-lidc", r"D:\cohort\p1.nrrd"]
    typed = r'"C:\Users\me\my scans é\a.nii.gz" C:\Users\me\b.nii.gz'
    assert data_entries(typed, windows=True) == [r"C:\Users\me\my scans é\a.nii.gz", r"C:\Users\me\b.nii.gz"]
    with pytest.raises(InputError, match=r"C:\\Users\\me\\my does not exist"):  # unquoted: named as typed
        data_entries(r"C:\Users\me\my scans é\c.nii.gz chest-lidc", windows=True)
    extra = r'--init-from C:\Users\me\runs\throughplane.safetensors --description "Dr O\'Brien" --max-steps 50'
    assert DiffusionTrain.extra_options(extra, windows=True) == [
        "--init-from", r"C:\Users\me\runs\throughplane.safetensors", "--description", r"Dr O\'Brien", "--max-steps", "50"]
    assert split_words(r"--note=it\'s", windows=True) == [r"--note=it\'s"]
    assert split_words("O'Brien C:\\x", windows=True) == ["O'Brien", "C:\\x"]  # an apostrophe is a letter there
    with pytest.raises(ValueError, match="No closing quotation"):
        split_words('"C:\\a b', windows=True)
    # elsewhere the POSIX rules stay: a backslash escapes, both quotes group
    assert split_words(r"a\ b 'c d'", windows=False) == ["a b", "c d"]


# -- 13: resuming another family's run ---------------------------------------------------------------------------
def test_resuming_another_familys_run_says_which_family_it_holds(trained_run, scene, tmp_path):  # noqa: F811
    run, data, _job = trained_run
    assert run_family(run) == "throughplane" and run_family(tmp_path) is None
    (run / "config.json").write_text(json.dumps(TINY_THROUGHPLANE))  # the run's own config, as the panel keeps it
    with pytest.raises(ConfigError) as refused:
        TrainingJob(scene, family="xray", config_path=run / "config.json", data=data, output_dir=run, resume=True)
    assert str(refused.value) == (
        f"The output folder {run} holds a 'throughplane' training run, not a 'xray' one: to continue it, choose "
        "'throughplane' as the Model family and tick 'Resume'; to train 'xray', choose another output folder.")
    with pytest.raises(ConfigError, match="holds a 'throughplane' training run, not a 'sr' one"):
        TrainingJob(scene, family="sr", config_path=None, data=data, output_dir=run, resume=True)
    TrainingJob(scene, family="throughplane", config_path=run / "config.json", data=data, output_dir=run, resume=True)
