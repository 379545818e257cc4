"""Training X-ray to CT stage 2 on one's own (or the shipped) stage 1, as a new user does (probe 17's defects).

- A stage-2 run given only the stage-2 config and ``--stage1-checkpoint`` builds stage 1 as that checkpoint records it
  (it built stage 1 from the shipped stage1.json, which neither xray-default nor any other stage 1 fit, so the help's
  own example always failed).
- A stage 1 that does not fit says what the file holds and what the run built, and how to make them agree.
- The Slicer training panel trains stage 2 on a stage 1 (Extra options ``--stage1-checkpoint``, or 'Start from the
  shipped weights' with a stage-2 preset), and refuses at Start a stage-1 preset the shipped weights do not fit.
- ``--resume`` of a run already at ``--max-steps`` is refused (exit 2) and changes nothing; so is ``--resume`` with
  ``--init-from`` (a new run's option), before any work.
- ``--freeze-stage1`` says what it does (it changes something only with --train-all-stages).
- The ``train xray`` commands of the README and the model card that start from the shipped weights build networks those
  weights fit.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from DiffusionCore.cli.main import build_parser, main
from DiffusionCore.config import config_to_dict
from DiffusionCore.nn.architecture import build_on_meta
from DiffusionCore.volume import Volume, write_volume
from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
from DiffusionCore.xray.config import SHIPPED_CONFIGS, load_stage_config, tiny_stage_config

ROOT = Path(__file__).resolve().parents[1]


def _stage_tensors(path: Path, stage: int) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(f"stages.{stage - 1}.")}


def _metadata(path: Path) -> dict:
    from DiffusionCore.weights.registry import METADATA_KEY

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {})[METADATA_KEY])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny stage configs (stage 1 at 16^3, stage 2 at 32^3), a chest-like CT and a stage-1 run of one step."""
    from conftest import chest_like_ct

    root = tmp_path_factory.mktemp("probe17")
    for name, cfg in (("s1.json", tiny_stage_config(1, 16)), ("s1r32.json", tiny_stage_config(1, 32)),
                      ("s2.json", tiny_stage_config(2, 32))):  # fmt: skip
        cfg.training.batch_size = 1
        (root / name).write_text(json.dumps(config_to_dict(cfg)))
    write_volume(Volume(chest_like_ct(), (14.0, 14.0, 14.0)), root / "ct.nii.gz")
    rc = main(["train", "xray", "--config", str(root / "s1.json"), "--data", str(root / "ct.nii.gz"),
               "--output-dir", str(root / "runs" / "s1"), "--max-steps", "1", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    return root


def _help_example() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["train"]
    xray = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction").choices["xray"]
    return re.search(r"Example: (train xray [^(]*?)\s*(?:\(|\.\s)", xray.description).group(1), xray.format_help()


# -- 1: the help's example, as written -------------------------------------------------------------------------------
def test_the_help_example_trains_stage_two_on_a_stage_one_training_folder(tiny, capsys):
    example, _ = _help_example()
    assert example == "train xray --config stage2.json --data CTs/ --output-dir runs/s2 --stage1-checkpoint runs/s1"
    places = {"stage2.json": tiny / "s2.json", "CTs/": tiny / "ct.nii.gz", "runs/s2": tiny / "runs" / "help s2",
              "runs/s1": tiny / "runs" / "s1"}  # fmt: skip
    argv = [str(places.get(word, word)) for word in shlex.split(example)]
    assert main([*argv, "--max-steps", "1", "--device", "cpu"]) == 0, capsys.readouterr().err
    exported = tiny / "runs" / "help s2" / "xray_cascade.safetensors"
    configs = _metadata(exported)["configs"]
    assert [c["resolution"] for c in configs] == [16, 32]  # stage 1 as runs/s1 records it, not stage1.json's
    first = _stage_tensors(tiny / "runs" / "s1" / "xray_cascade.safetensors", 1)
    assert all((t == _stage_tensors(exported, 1)[k]).all() for k, t in first.items())  # loaded, and kept fixed


def test_a_stage_one_checkpoint_folder_without_export_records_its_config_too(tiny, capsys):
    """A training folder whose run was stopped before it exported: its checkpoint's state.json records the stages."""
    import shutil

    folder = tiny / "runs" / "s1 checkpoint only"
    shutil.copytree(tiny / "runs" / "s1", folder)
    (folder / "xray_cascade.safetensors").unlink()
    out = tiny / "runs" / "from checkpoint"
    rc = main(["train", "xray", "--config", str(tiny / "s2.json"), "--data", str(tiny / "ct.nii.gz"), "--output-dir",
               str(out), "--stage1-checkpoint", str(folder), "--max-steps", "1", "--device", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert _metadata(out / "xray_cascade.safetensors")["configs"][0]["resolution"] == 16


# -- 2: a stage 1 that does not fit says what the file holds and what the run built -------------------------------------
def test_a_stage_one_of_another_resolution_is_named_with_both_resolutions_and_the_fix(tiny, capsys):
    out = tiny / "runs" / "bad"
    rc = main(["train", "xray", "--config", str(tiny / "s1r32.json"), str(tiny / "s2.json"), "--data",
               str(tiny / "ct.nii.gz"), "--output-dir", str(out), "--stage1-checkpoint", str(tiny / "runs" / "s1"),
               "--max-steps", "1", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 3 and not out.exists()
    assert "it holds stage 1 at 16^3 from 32-pixel pa DRRs, 350 mm field of view" in err
    assert "this run built stage 1 at 32^3 from 32-pixel pa DRRs, 350 mm field of view" in err
    assert "Leave stage 1's config out of --config (the run then takes it from the file's own record)" in err
    assert "or no --config" not in err


def test_init_from_weights_of_another_config_names_the_config_to_give(tiny, capsys):
    rc = main(["train", "xray", "--config", str(tiny / "s1r32.json"), "--data", str(tiny / "ct.nii.gz"),
               "--output-dir", str(tiny / "runs" / "bad init"), "--init-from", str(tiny / "runs" / "s1"),
               "--max-steps", "1", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 3
    assert "--init-from" in err and "it holds stage 1 at 16^3" in err and "this run built stage 1 at 32^3" in err
    assert "Give --config the configuration those weights were trained with" in err and "or no --config" not in err


# -- 9: resuming a run that is already at --max-steps ----------------------------------------------------------------
def test_resume_at_max_steps_is_refused_and_changes_nothing(tiny, capsys):
    import shutil

    run = tiny / "runs" / "done"
    shutil.copytree(tiny / "runs" / "s1", run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc = main(["train", "xray", "--data", str(tiny / "ct.nii.gz"), "--output-dir", str(run), "--resume",
               "--max-steps", "1", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert f"nothing to train: the run in {run} is at step 1, at or past --max-steps 1" in err
    assert "--max-steps 2" in err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_with_init_from_is_refused_before_any_work(tiny, capsys):
    """--init-from (or its other spelling --load-all-stages) starts a new run; with --resume it was taken silently
    and the run went on from its checkpoint, so the user believed it continued the weights they named."""
    run = tiny / "runs" / "s1"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for spelling in ("--init-from", "--load-all-stages"):
        rc = main(["train", "xray", "--data", str(tiny / "ct.nii.gz"), "--output-dir", str(run), "--resume",
                   spelling, str(run), "--max-steps", "3", "--device", "cpu"])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2
        assert err.strip().splitlines()[-1] == (
            f"error: --init-from / --load-all-stages starts a new run; drop it to continue the run in {run} with "
            "--resume")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# -- 8: --freeze-stage1 --------------------------------------------------------------------------------------------
def test_freeze_stage1_says_it_matters_only_with_train_all_stages(tiny, capsys, caplog):
    _, help_text = _help_example()
    flat = " ".join(help_text.split())
    assert "--freeze-stage1 with --train-all-stages: keep the earlier stage(s) fixed" in flat
    assert "the earlier ones are always fixed, so it changes nothing" in flat
    rc = main(["train", "xray", "--config", str(tiny / "s2.json"), "--data", str(tiny / "ct.nii.gz"), "--output-dir",
               str(tiny / "runs" / "frozen"), "--stage1-checkpoint", str(tiny / "runs" / "s1"), "--freeze-stage1",
               "--max-steps", "1", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    assert "--freeze-stage1 changes nothing here: only stage 2 is trained" in capsys.readouterr().err


# -- 1, 11: documented commands that start stage 2 on the shipped stage 1 -------------------------------------------
def _documented_stage_two_runs() -> list[tuple[str, str]]:
    from test_docs_commands import doc_commands

    found = []
    for doc in ("README.md", "docs/model_cards/xray-default.md"):
        for cmd in doc_commands((ROOT / doc).read_text(encoding="utf-8")):
            argv = shlex.split(cmd)
            if argv[:2] == ["train", "xray"] and "--stage1-checkpoint" in argv:
                found.append((doc, cmd))
    return found


def test_the_documented_stage_two_runs_on_the_shipped_stage_one_build_a_stage_one_it_fits():
    """Every ``train xray ... --stage1-checkpoint xray-default`` of the README and the model card builds a cascade
    whose stage 1 the shipped weights fit (checked on the meta device: nothing network-sized is allocated or trained).
    The model card's stage-2 recipe named stage1_cpu, which xray-default no longer is."""
    from DiffusionCore.xray.train import XrayTrainOptions, check_stage_fits, plan_stages

    runs = [(doc, cmd) for doc, cmd in _documented_stage_two_runs() if "--stage1-checkpoint xray-default" in cmd]
    assert {doc for doc, _ in runs} == {"README.md", "docs/model_cards/xray-default.md"}
    for doc, cmd in runs:
        args = build_parser().parse_args(shlex.split(cmd))
        configs = [load_stage_config(c if c in SHIPPED_CONFIGS else ROOT / c) for c in args.config]
        opts = XrayTrainOptions(configs=configs, data=args.data, output_dir=Path(args.output_dir),
                                stage_checkpoints={1: args.stage1_checkpoint})  # fmt: skip
        plan = plan_stages(opts)
        cascade = build_on_meta(lambda p=plan: UnifiedHybridViTCascade(p.configs), f"{doc}: {cmd}")
        check_stage_fits(cascade.state_dict(), plan.configs, plan.sources[1], [1], "--stage1-checkpoint", plan.origins)


# -- 3, 10: the Slicer training panel -------------------------------------------------------------------------------
@pytest.fixture
def panel(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is needed for the Slicer-side tests")
    for folder in (ROOT / "CTDiffusionSR", ROOT / "CTDiffusionSR" / "CLI"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    from CTDiffusionSRLib import training

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene, training
    scene.Clear(True)


def test_the_panel_trains_stage_two_on_a_stage_one_given_in_extra_options(tiny, panel):
    from CTDiffusionSRLib.process import JobState

    scene, training = panel
    out = tiny / "runs" / "panel s2"
    lines: list[str] = []
    job = training.TrainingJob(scene, family="xray", config_path=tiny / "s2.json", data=tiny / "ct.nii.gz",
                               output_dir=out, device="cpu", on_line=lines.append,
                               extra_arguments=f"--stage1-checkpoint '{tiny / 'runs' / 's1'}' --max-steps 1")  # fmt: skip
    assert job.run(timeout=240) == JobState.COMPLETED, (job.error, lines[-5:])
    assert [c["resolution"] for c in _metadata(out / "xray_cascade.safetensors")["configs"]] == [16, 32]


def test_start_from_the_shipped_weights_with_a_stage_two_preset_trains_it_on_the_shipped_stage_one(tiny, panel):
    scene, training = panel
    presets = training.list_presets("xray")
    job = training.TrainingJob(scene, family="xray", config_path=presets["stage2_cpu"], data=tiny / "ct.nii.gz",
                               output_dir=tiny / "runs" / "panel shipped s2", from_shipped_weights=True,
                               extra_arguments="--max-steps 1")  # fmt: skip
    assert job.extra_arguments == "--stage1-checkpoint xray-default --max-steps 1"
    job = training.TrainingJob(scene, family="xray", config_path=presets["stage1_default"], data=tiny / "ct.nii.gz",
                               output_dir=tiny / "runs" / "panel shipped s1", from_shipped_weights=True)  # fmt: skip
    assert job.extra_arguments == "--init-from xray-default"


def test_start_from_the_shipped_weights_refuses_a_stage_one_preset_they_do_not_fit_at_start(tiny, panel):
    from DiffusionCore.errors import ConfigError

    scene, training = panel
    out = tiny / "runs" / "panel refused"
    with pytest.raises(ConfigError) as refused:
        training.TrainingJob(scene, family="xray", config_path=training.list_presets("xray")["stage1_cpu"],
                             data=tiny / "ct.nii.gz", output_dir=out, from_shipped_weights=True)  # fmt: skip
    said = str(refused.value)
    assert said.startswith("'Start from the shipped weights' continues xray-default, which was trained with the "
                           "stage1_default preset (stage 1 at 64^3")  # fmt: skip
    assert "the stage1_cpu preset builds stage 1 at" in said
    # the two presets build the same grid and width: the message names what differs (probe 21, defect 19)
    assert "model.lifting_residual false (xray-default: true)" in said
    assert "model.refine_xray false (xray-default: true)" in said
    assert "Choose stage1_default in 'Config preset'" in said and "--config" not in said
    assert not out.exists()
    with pytest.raises(ConfigError, match="this configuration builds stage 1 at 32\\^3"):
        training.TrainingJob(scene, family="xray", config_path=None, config_text=(tiny / "s1r32.json").read_text(),
                             data=tiny / "ct.nii.gz", output_dir=out, from_shipped_weights=True)  # fmt: skip


# -- 7: which stages a cascade's lineage trained ----------------------------------------------------------------------
def test_exported_weights_record_where_each_stage_comes_from_and_an_untrained_stage_one_is_warned_of(tiny, caplog,
                                                                                                       monkeypatch):
    import logging

    common = ["--data", str(tiny / "ct.nii.gz"), "--max-steps", "1", "--device", "cpu"]
    lonely, on_s1 = tiny / "runs" / "s2 without s1", tiny / "runs" / "s2 on s1"
    assert main(["train", "xray", "--config", str(tiny / "s1.json"), str(tiny / "s2.json"), "--output-dir",
                 str(lonely), *common]) == 0  # fmt: skip
    assert main(["train", "xray", "--config", str(tiny / "s2.json"), "--output-dir", str(on_s1),
                 "--stage1-checkpoint", str(tiny / "runs" / "s1"), *common]) == 0  # fmt: skip
    meta = _metadata(lonely / "xray_cascade.safetensors")
    assert meta["untrained_stages"] == [1]
    assert meta["stage_lineage"] == {"1": "never trained (random initial weights)", "2": "trained with train xray"}
    meta = _metadata(on_s1 / "xray_cascade.safetensors")
    assert meta["untrained_stages"] == []
    assert meta["stage_lineage"]["1"].startswith("loaded from s1 (sha256 ")  # by its name: its folders stay out
    # a stage 2 trained on top of the untrained stage 1 of another file inherits it
    again = tiny / "runs" / "s3 lineage"
    assert main(["train", "xray", "--config", str(tiny / "s2.json"), "--output-dir", str(again),
                 "--stage1-checkpoint", str(lonely), *common]) == 0  # fmt: skip
    assert _metadata(again / "xray_cascade.safetensors")["untrained_stages"] == [1]

    import shutil

    shutil.copy(lonely / "xray_cascade.safetensors", tiny / "lonely copy.safetensors")  # a file not loaded before
    monkeypatch.setattr(logging.getLogger("DiffusionCore"), "propagate", True)  # the command line's logging stops it
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # said once, not at every load
            UnifiedHybridViTCascade.from_pretrained(tiny / "lonely copy.safetensors")
        UnifiedHybridViTCascade.from_pretrained(on_s1 / "xray_cascade.safetensors")
    warned = [r.getMessage() for r in caplog.records if "never trained" in r.getMessage()]
    assert len(warned) == 1 and str(tiny / "lonely copy.safetensors") in warned[0], warned
    assert "stage(s) 1 of these weights were never trained" in warned[0] and "--stage1-checkpoint" in warned[0]


# -- 5, 4: a prepared folder -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared_lateral(tiny):
    """``prepare-xray-data`` of the CT at 16^3 only, with lateral DRRs."""
    out = tiny / "prepared lateral"
    assert main(["prepare-xray-data", "--data", str(tiny / "ct.nii.gz"), "--output-dir", str(out), "--resolutions",
                 "16", "--xray-resolutions", "16", "--view", "lateral", "--augmented-copies", "0",
                 "--progress", "none"]) == 0  # fmt: skip
    return out


def test_a_prepared_folder_coarser_than_the_stage_is_refused_with_both_resolutions(tiny, prepared_lateral, capsys):
    out = tiny / "runs" / "upsampled"
    rc = main(["train", "xray", "--config", str(tiny / "s1r32.json"), "--data", str(prepared_lateral),
               "--output-dir", str(out), "--max-steps", "1", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and not (out / "xray_cascade.safetensors").exists()
    assert (f"the prepared data in {prepared_lateral} has cubes of 16^3 voxels and this run trains a stage at 32^3; "
            "prepare it again with --resolutions 32, or give the CT folder as --data") in err  # fmt: skip


def test_a_prepared_folder_of_another_view_is_said_and_its_drrs_are_not_read(tiny, prepared_lateral, capsys):
    rc = main(["train", "xray", "--config", str(tiny / "s1.json"), "--data", str(prepared_lateral),
               "--output-dir", str(tiny / "runs" / "pa on lateral"), "--max-steps", "1", "--device", "cpu"])  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 0
    assert (f"warning: the prepared data in {prepared_lateral} was prepared for lateral radiographs, and this run "
            "trains on pa ones: train xray renders its own DRRs from the prepared cubes in the config's view "
            "(data.view) and does not read the prepared DRRs") in err  # fmt: skip


# -- 6: stages that disagree on the radiograph ------------------------------------------------------------------------
def _stage_two_variant(tiny: Path, name: str, **data) -> Path:
    cfg = json.loads((tiny / "s2.json").read_text())
    cfg["data"].update(data)
    (tiny / name).write_text(json.dumps(cfg))
    return tiny / name


def test_a_cascade_whose_stages_have_other_views_or_fields_of_view_is_refused_in_training(tiny, capsys):
    for name, data, said in (
        ("s2lat.json", {"view": "lateral"}, "stage 1 is for pa radiographs over a 350 mm field of view and stage 2 "
                                            "for lateral ones over 350 mm"),
        ("s2fov.json", {"fov_mm": 250.0}, "stage 1 is for pa radiographs over a 350 mm field of view and stage 2 "
                                          "for pa ones over 250 mm"),
    ):  # fmt: skip
        out = tiny / "runs" / f"mixed {name}"
        rc = main(["train", "xray", "--config", str(_stage_two_variant(tiny, name, **data)), "--data",
                   str(tiny / "ct.nii.gz"), "--output-dir", str(out), "--stage1-checkpoint", str(tiny / "runs" / "s1"),
                   "--max-steps", "1", "--device", "cpu"])  # fmt: skip
        err = " ".join(capsys.readouterr().err.split())
        assert rc == 2 and not out.exists()
        assert said in err and "data.view and data.fov_mm must be the same in all stages" in err
        assert f"stage 1's config from the configuration recorded in {tiny / 'runs' / 's1'}" in err


def test_loading_weights_whose_stages_disagree_warns_once(tiny, caplog, monkeypatch):
    import logging

    from DiffusionCore.xray.config import load_stage_config as stage

    s2lat = _stage_two_variant(tiny, "s2lat.json", view="lateral")
    path = tiny / "mixed views.safetensors"
    UnifiedHybridViTCascade([stage(tiny / "s1.json"), stage(s2lat)]).save_pretrained(path)
    monkeypatch.setattr(logging.getLogger("DiffusionCore"), "propagate", True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        UnifiedHybridViTCascade.from_pretrained(path)
    said = list(caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            UnifiedHybridViTCascade.from_pretrained(path)
    assert not [r for r in caplog.records if "same in all stages" in r.getMessage()]  # said once per file
    warned = [r.getMessage() for r in {id(r): r for r in said}.values() if "same in all stages" in r.getMessage()]
    assert len(warned) == 1 and "stage 2 for lateral ones" in warned[0] and "uses stage 1's view" in warned[0]
