"""X-ray cascade training: two-process DDP through the command line, AMP on CPU, the refinement head, logs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from DiffusionCore.errors import ConfigError
from DiffusionCore.train.precision import resolve_amp
from DiffusionCore.xray.cascade import UnifiedHybridViTCascade
from DiffusionCore.xray.config import tiny_stage_config
from DiffusionCore.xray.train import (
    CascadeObjective,
    XrayTrainOptions,
    earlier_stages_estimate,
    previous_stage_volume,
    train_step,
    train_xray,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

# Runs ``python -m DiffusionCore train xray ...`` in each torchrun process and records, per rank: the exit
# code, a digest of the final cascade weights, a digest of the first radiograph batch, and every checkpoint
# write (the command's own code path; only the recording is added). Rank 0 alone sees a stop request after
# two steps, as when a STOP file appears between the ranks' checks.
DDP_SCRIPT = """
import hashlib, json, os, sys
import torch
torch.set_num_threads(1)
import DiffusionCore.train.checkpoint as ckpt
import DiffusionCore.xray.train as T
from DiffusionCore.cli.main import main

record, rank = sys.argv[1], int(os.environ["RANK"])
made, batches = [], []


class Recorded(T.UnifiedHybridViTCascade):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        made.append(self)


def digest(tensors):
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


sample = T.XrayCubeDataset.sample


def recorded_sample(self, *a, **k):
    vols, xray = sample(self, *a, **k)
    batches.append(digest({"x": xray}))
    return vols, xray


save = ckpt.save_training_state


def recorded_save(*a, **k):
    with open(os.path.join(record, f"saves_rank{rank}.txt"), "a") as f:
        f.write(f"{k['step']}\\n")
    return save(*a, **k)


if rank == 0:  # only rank 0 is asked to stop, at its third check (after step 2)
    import DiffusionCore.train.stop as stop_module

    checks = []
    requested = stop_module.StopFlag.requested

    def rank0_stop(self):
        checks.append(1)
        if len(checks) >= 3:
            self.request("test stop on rank 0")
        return requested.fget(self)

    stop_module.StopFlag.requested = property(rank0_stop)

T.UnifiedHybridViTCascade = Recorded
T.XrayCubeDataset.sample = recorded_sample
ckpt.save_training_state = recorded_save
code = main(sys.argv[2:])
with open(os.path.join(record, f"rank{rank}.json"), "w") as f:
    json.dump({"code": code, "weights": digest(made[0].state_dict()), "first_batch": batches[0]}, f)
sys.exit(code)
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _digest_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(load_file(path).items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def _parse(argv: list[str]) -> argparse.Namespace:
    from DiffusionCore.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", "xray", *argv])


def test_two_process_ddp_training_through_the_command_line(ct_file, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    record, out = tmp_path / "record", tmp_path / "out"
    record.mkdir()
    common = ["--config", "stage1", "--data", str(ct_file), "--tiny-test-model", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
           str(record), "train", "xray", "--out-dir", str(out), "--max-steps", "4", *common]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in ranks] == [0, 0]
    assert '"stopped": "test stop on rank 0"' in proc.stdout  # both ranks stopped after step 2
    # the ranks drew different batches, yet hold the same weights: gradients were averaged
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]
    assert ranks[0]["weights"] == ranks[1]["weights"] == _digest_file(out / "xray_cascade.safetensors")
    # only rank 0 writes checkpoints and logs, each step once
    assert (record / "saves_rank0.txt").read_text().split() == ["2"]
    assert not (record / "saves_rank1.txt").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(m["step"], m["tag"]) for m in records]
    assert len(keys) == len(set(keys)) and {s for s, t in keys if t == "loss/stage1/total"} == {1, 2}
    assert proc.stdout.count('"trained_stages"') == 1  # one summary, from rank 0
    # the DDP checkpoint resumes in a single process
    args = _parse(["--output-dir", str(out), "--max-steps", "3", "--resume", *common])
    assert args.func(args) == 0
    assert json.loads((out / "latest.json").read_text())["step"] == 3
    assert (out / "checkpoint-00000003" / "cascade.safetensors").is_file()


def test_out_dir_is_an_alias_of_output_dir(tmp_path):
    common = ["--config", "stage1", "--data", "x"]
    assert _parse([*common, "--out-dir", str(tmp_path)]).output_dir == str(tmp_path)
    assert _parse([*common, "--output-dir", str(tmp_path)]).output_dir == str(tmp_path)
    args = _parse(common)
    with pytest.raises(ConfigError, match="--output-dir"):
        args.func(args)


def _tiny_run_config(**training):
    cfg = tiny_stage_config(1, 16, refine_channels=4)
    for k, v in training.items():
        setattr(cfg.training, k, v)
    return cfg


def test_amp_on_cpu_is_ignored_with_a_note_and_the_refinement_head_trains(ct_file, tmp_path, caplog):
    cfg = _tiny_run_config(amp=True, weight_decay=0.0, checkpoint_every=1, max_steps=2, batch_size=1)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="DiffusionCore"):
        summary = train_xray(XrayTrainOptions(configs=[cfg], data=str(ct_file), output_dir=out, device="cpu"))
    assert summary["steps"] == 2
    assert any(
        "mixed precision" in r.getMessage() and "float32 on cpu" in r.getMessage() for r in caplog.records
    )
    first = load_file(out / "checkpoint-00000001" / "cascade.safetensors")
    second = load_file(out / "checkpoint-00000002" / "cascade.safetensors")
    # the head's output layer starts at zero: step 1 moves it, and from step 2 gradients reach its first layer
    # (no weight decay here, so any change is a gradient step)
    assert first["stages.0.refine.4.weight"].abs().sum() > 0
    assert not torch.equal(first["stages.0.refine.0.weight"], second["stages.0.refine.0.weight"])
    # TensorBoard holds the losses, the re-projection error and coronal slices
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"loss/stage1/drr_loss", "val/stage1/lifting_projection_l1"} <= set(events.Tags()["scalars"])
    slices = {f"val/stage1/{n}_coronal" for n in ("target", "lifting", "one_step_t0.5")}
    assert slices <= set(events.Tags()["images"])
    exported = UnifiedHybridViTCascade.from_pretrained(out / "xray_cascade.safetensors")
    assert exported.stages[0].refine is not None
    torch.testing.assert_close(exported.stages[0].refine[0].weight, second["stages.0.refine.0.weight"])


def test_a_training_step_runs_under_cpu_bfloat16_autocast():
    assert resolve_amp(False, torch.device("cpu")) is None
    assert resolve_amp(True, torch.device("cpu")) is None
    torch.manual_seed(0)
    cascade = UnifiedHybridViTCascade([_tiny_run_config()])
    objective = CascadeObjective(cascade, [1])
    params = list(cascade.parameters())
    before = [p.detach().clone() for p in params]
    dtypes = []
    hook = cascade.stages[0].final.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    opt = torch.optim.AdamW(params, lr=1e-3)
    vols = {16: torch.rand(1, 1, 16, 16, 16) * 2 - 1}
    loss, parts = train_step(objective, opt, params, vols, torch.rand(1, 1, 32, 32), 0.1,
                             amp_dtype=torch.bfloat16, gradient_clip=1.0)  # fmt: skip
    hook.remove()
    assert dtypes == [torch.bfloat16]  # the token head ran in bfloat16
    assert torch.isfinite(loss) and set(parts) >= {"stage1/v_loss", "stage1/drr_loss", "stage1/total"}
    assert all(
        p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params if p.grad is not None
    )
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def _two_stage_cascade(prev_from_model: float) -> UnifiedHybridViTCascade:
    from dataclasses import replace

    torch.manual_seed(0)
    s1 = tiny_stage_config(1, 16)
    s2 = tiny_stage_config(2, 32)
    s2 = replace(s2, data=replace(s2.data, prev_from_model=prev_from_model, prev_noise=0.0))
    return UnifiedHybridViTCascade([s1, s2])


def test_stage_two_is_conditioned_on_stage_ones_own_estimate_for_its_share_of_samples():
    """Generation hands stage 2 stage 1's output, not the truth: training does the same for a share of samples."""
    from DiffusionCore.xray.consistency import drr_consistency

    xray = torch.rand(3, 1, 32, 32)
    vols = {16: torch.rand(3, 1, 16, 16, 16) * 2 - 1, 32: torch.rand(3, 1, 32, 32, 32) * 2 - 1}
    assert torch.equal(previous_stage_volume(_two_stage_cascade(0.0), 2, vols, xray, 0.0), vols[16])

    cascade = _two_stage_cascade(1.0)
    prev = previous_stage_volume(cascade, 2, vols, xray, 0.0)
    assert prev.shape == vols[16].shape and not torch.allclose(prev, vols[16])
    # it is stage 1's one-pass estimate after the consistency step: it re-projects onto the input
    torch.manual_seed(1)
    est = cascade.stages[0].quick_estimate(xray)
    again, _ = drr_consistency(est, xray, cascade.configs[0].data.fov_mm)
    torch.manual_seed(1)
    torch.testing.assert_close(earlier_stages_estimate(cascade, 1, xray), again)
    assert cascade.stages[0].training  # left as it was

    torch.manual_seed(3)
    mixed = previous_stage_volume(_two_stage_cascade(0.5), 2, {16: vols[16].repeat(4, 1, 1, 1, 1), 32: vols[32].repeat(4, 1, 1, 1, 1)},
                                 xray.repeat(4, 1, 1, 1), 0.0)  # fmt: skip
    from_truth = [torch.equal(m, v) for m, v in zip(mixed, vols[16].repeat(4, 1, 1, 1, 1))]
    assert 0 < sum(from_truth) < 12  # some samples from the truth, some from the model


def test_stages_after_the_first_train_only_at_the_times_they_are_sampled_at():
    from DiffusionCore.xray.losses import stage_loss

    cascade = _two_stage_cascade(0.0)
    seen: list[torch.Tensor] = []
    stage2 = cascade.stages[1]
    real = stage2.forward

    def spy(x_t, t, *a, **k):
        seen.append(t.detach().clone())
        return real(x_t, t, *a, **k)

    stage2.forward = spy  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    vols = torch.rand(8, 1, 32, 32, 32) * 2 - 1
    for _ in range(4):
        stage_loss(stage2, vols, torch.rand(8, 1, 32, 32), torch.rand(8, 1, 16, 16, 16) * 2 - 1,
                   cascade.configs[1].loss_weights, generator=g)  # fmt: skip
    t = torch.cat(seen)
    assert t.max() <= cascade.configs[1].diffusion.prev_stage_t and t.min() >= cascade.configs[1].diffusion.min_t
    assert t.max() > 0.5 * cascade.configs[1].diffusion.prev_stage_t  # the whole range, not a corner of it


def test_prev_from_model_outside_zero_one_is_refused():
    from dataclasses import replace

    cfg = tiny_stage_config(2, 32)
    with pytest.raises(ConfigError, match="prev_from_model"):
        replace(cfg, data=replace(cfg.data, prev_from_model=1.5))
