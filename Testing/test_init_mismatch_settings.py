"""`train xray --init-from` / `--stage1-checkpoint` with a config whose stage model differs from the one the weights
were trained with names the model settings that differ, as a config file spells them, beside what the file holds and
what the run built (before, the refusal described both stages, and two configs of the same grid and width read the
same). The Slicer panel's 'Start from the shipped weights' check says it with the same helper
(``DiffusionCore.train.checkpoint.model_differences``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ct_phantom_array

from DiffusionCore.config import config_to_dict
from DiffusionCore.train.checkpoint import model_differences
from DiffusionCore.volume import Volume, write_volume
from DiffusionCore.xray.config import DEFAULT_CONFIG, load_stage_config, tiny_stage_config

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_EXIT_CODE = 3  # docs/reliability.md: "3 | WeightsError | ... of another model"


def _train_xray(*args: str | Path) -> subprocess.CompletedProcess:
    """``python -m DiffusionCore train xray ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "DiffusionCore", "train", "xray", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, encoding="utf-8", timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def _write_config(cfg, path: Path, **model) -> Path:
    """``cfg`` with these model settings changed, written as a config file."""
    settings = config_to_dict(cfg)
    settings["model"].update(model)
    path.write_text(json.dumps(settings), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("init_mismatch") / "ct.nii.gz"
    write_volume(Volume(ct_phantom_array((40, 64, 64), seed=3), (0.8, 0.8, 2.5)), path)
    return path


def test_init_from_the_shipped_weights_names_the_model_settings_the_config_changed(ct, tmp_path):
    """The shipped recipe with a narrower network and without the refinement's radiograph input: the same grid, so
    both stages read alike but for the width; the message names both settings with the shipped values."""
    config = _write_config(load_stage_config(DEFAULT_CONFIG), tmp_path / "narrower.json", voxel_channels=96,
                           refine_xray=False)  # fmt: skip
    out = tmp_path / "run"
    done = _train_xray("--config", config, "--data", ct, "--output-dir", out, "--init-from", "xray-default",
                       "--max-steps", "1", "--device", "cpu")  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == WEIGHTS_EXIT_CODE, done.stderr
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    said = errors[0]
    assert "--init-from xray-default" in said and "does not fit stage 1 of this run" in said
    assert "it holds stage 1 at 64^3 from 128-pixel pa DRRs, 350 mm field of view, 128 channels" in said
    assert ("this run built stage 1 at 64^3 from 128-pixel pa DRRs, 350 mm field of view, 96 channels (from this "
            "run's config), with model.voxel_channels 96 (xray-default: 128), model.refine_xray false "
            "(xray-default: true). ") in said  # fmt: skip
    # what to do: the shipped recipe, the settings named, or no --init-from
    assert (f"Give --config the configuration those weights were trained with (the shipped xray-default: --config "
            f"{DEFAULT_CONFIG}), set those model settings as the weights have them, or start without --init-from") in said
    assert not out.exists()


def test_a_stage_one_checkpoint_of_other_model_settings_names_them_and_counts_the_rest(ct, tmp_path):
    """Weights of a tiny stage 1, and a run whose stage-1 config changes six of its model settings: four are named
    (in the order a config file lists them, in its spelling), the other two counted; --stageN-checkpoint's own advice
    stays."""
    from DiffusionCore.xray.cascade import UnifiedHybridViTCascade

    held = tiny_stage_config(1, 16)
    weights = tmp_path / "s1.safetensors"
    UnifiedHybridViTCascade([held]).save_pretrained(weights)
    other = _write_config(held, tmp_path / "s1 other.json", voxel_channels=32, encoder_channels=[8, 32], vit_depth=2,
                          xray_tokens=8, refine_channels=4, mlp_ratio=4.0)  # fmt: skip
    stage2 = _write_config(tiny_stage_config(2, 32), tmp_path / "s2.json")
    out = tmp_path / "run s2"
    done = _train_xray("--config", other, stage2, "--data", ct, "--output-dir", out, "--stage1-checkpoint", weights,
                       "--max-steps", "1", "--device", "cpu")  # fmt: skip
    assert done.returncode == WEIGHTS_EXIT_CODE, done.stderr
    said = done.stderr
    assert ("(from this run's config), with model.voxel_channels 32 (s1.safetensors: 16), model.vit_depth 2 "
            "(s1.safetensors: 1), model.encoder_channels [8, 32] (s1.safetensors: [8, 16]), model.xray_tokens 8 "
            "(s1.safetensors: 4), 2 more. Leave stage 1's config out of --config") in said
    assert "set those model settings" not in said  # not --init-from's advice
    assert not out.exists()


def test_model_differences_spells_settings_as_a_config_file_and_counts_those_not_named():
    held = load_stage_config(DEFAULT_CONFIG).model
    assert model_differences(held, held, "xray-default") == ""
    built = load_stage_config("stage1_cpu").model  # the CPU recipe: the same grid and width, four switches off
    assert model_differences(held, built, "xray-default") == (
        "model.refine_xray false (xray-default: true), model.lifting_profile 0 (xray-default: 64), "
        "model.lifting_mean_prior false (xray-default: true), model.lifting_residual false (xray-default: true)"
    )
    assert model_differences(held, built, "xray-default", most=1) == (
        "model.refine_xray false (xray-default: true), 3 more"
    )
    # dicts as well as dataclasses; lists whole; a setting only the weights have comes last; another section
    assert model_differences({"channels": [8, 16], "old": 1}, {"channels": [8, 32], "new": "pa"}, "run1") == (
        'model.channels [8, 32] (run1: [8, 16]), model.new "pa" (run1: (none)), model.old (none) (run1: 1)'
    )
    assert model_differences({"view": "pa"}, {"view": "lateral"}, "w", prefix="data.") == 'data.view "lateral" (w: "pa")'
