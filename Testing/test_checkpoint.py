"""Training checkpoints: exact resume, crash safety, pruning, export to inference weights."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from DiffusionCore.errors import InputError, WeightsError
from DiffusionCore.train import checkpoint as ckpt_module
from DiffusionCore.train.checkpoint import (
    export_weights,
    find_best,
    find_latest,
    load_training_state,
    mark_best,
    save_training_state,
)
from DiffusionCore.weights import load_safetensors, resolve_weights


def _setup(init_seed: int):
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _step(model, opt, sched, gen: np.random.Generator) -> None:
    """One step whose data and dropout draw from every RNG that a checkpoint must restore."""
    x = torch.from_numpy(np.random.randn(8, 4).astype(np.float32)) + random.random() + float(gen.normal())
    y = torch.randn(8, 1)
    loss = ((model(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resume_gives_bit_identical_next_steps(tmp_path):
    model, opt, sched = _setup(0)
    _seed_all(1)
    gen = np.random.default_rng(2)
    for _ in range(4):
        _step(model, opt, sched, gen)
    expected = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = _setup(0)
    _seed_all(1)
    gen = np.random.default_rng(2)
    for _ in range(2):
        _step(model, opt, sched, gen)
    save_training_state(
        tmp_path,
        step=2,
        epoch=0,
        models={"net": model},
        optimizers={"adamw": opt},
        schedulers={"lr": sched},
        config={"lr": 1e-2},
        extra={"best_loss": 0.5, "history": np.arange(3)},
        generators={"augment": gen},
    )

    # A fresh process would start from other weights and other RNG states.
    model, opt, sched = _setup(123)
    _seed_all(99)
    gen = np.random.default_rng(99)
    info = load_training_state(
        tmp_path,
        models={"net": model},
        optimizers={"adamw": opt},
        schedulers={"lr": sched},
        generators={"augment": gen},
    )
    assert info["step"] == 2 and info["epoch"] == 0 and info["config"] == {"lr": 1e-2}
    assert info["extra"]["best_loss"] == 0.5 and np.array_equal(info["extra"]["history"], np.arange(3))
    for _ in range(2):
        _step(model, opt, sched, gen)
    for got, want in zip(model.parameters(), expected, strict=True):
        assert torch.equal(got, want)
    assert sched.get_last_lr() == [2.5e-3]


def _save(out, step, model, opt, keep=3):
    return save_training_state(
        out, step=step, epoch=step // 2, models={"net": model}, optimizers={"o": opt}, keep=keep
    )


def test_failed_save_leaves_previous_checkpoint_and_latest_intact(tmp_path, monkeypatch):
    model, opt, _ = _setup(0)
    _save(tmp_path, 1, model, opt)
    second = _save(tmp_path, 2, model, opt)
    latest_before = (tmp_path / "latest.json").read_text()

    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(src).startswith(".tmp-checkpoint-"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_module.os, "replace", failing_replace)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(OSError):
        _save(tmp_path, 3, model, opt)
    monkeypatch.undo()

    assert find_latest(tmp_path) == second
    assert (tmp_path / "latest.json").read_text() == latest_before
    assert not (tmp_path / "checkpoint-00000003").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    fresh, fresh_opt, _ = _setup(5)
    assert load_training_state(tmp_path, models={"net": fresh}, optimizers={"o": fresh_opt})["step"] == 2


def test_process_killed_mid_save_leaves_no_visible_half_checkpoint(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal
        import torch
        from torch import nn
        from DiffusionCore.train import checkpoint as ck
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ck.save_training_state({str(tmp_path)!r}, step=1, epoch=0, models={{"net": model}}, optimizers={{"o": opt}})
        real = ck.save_safetensors
        def killing(path, tensors, metadata):
            digest = real(path, tensors, metadata)
            os.kill(os.getpid(), signal.SIGKILL)  # dies after the first file of checkpoint 2
            return digest
        ck.save_safetensors = killing
        ck.save_training_state({str(tmp_path)!r}, step=2, epoch=0, models={{"net": model}}, optimizers={{"o": opt}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-checkpoint-")]
    assert leftovers, "the kill should have left the temporary folder behind"
    assert find_latest(tmp_path) == tmp_path / "checkpoint-00000001"
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 1
    # A folder that looks like a checkpoint but lacks state.json (copied by hand, say) is not used either.
    (tmp_path / "checkpoint-00000009").mkdir()
    (tmp_path / "checkpoint-00000009" / "net.safetensors").write_bytes(b"")
    assert find_latest(tmp_path) == tmp_path / "checkpoint-00000001"
    # The next save cleans up the leftovers.
    model, opt, _ = _setup(0)
    save_training_state(tmp_path, step=3, epoch=0, models={"net": model}, optimizers={"o": opt})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-checkpoint-")]


def test_keep_last_n_plus_best(tmp_path):
    model, opt, _ = _setup(0)
    for step in (1, 2):
        _save(tmp_path, step, model, opt, keep=2)
    mark_best(tmp_path, 1, metric=0.1)
    for step in (3, 4, 5):
        _save(tmp_path, step, model, opt, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-00000001", "checkpoint-00000004", "checkpoint-00000005"]
    assert find_best(tmp_path) == tmp_path / "checkpoint-00000001"
    assert find_latest(tmp_path) == tmp_path / "checkpoint-00000005"
    with pytest.raises(InputError):
        mark_best(tmp_path, 2)  # pruned


def test_same_step_saved_twice_replaces_it(tmp_path):
    model, opt, _ = _setup(0)
    _save(tmp_path, 7, model, opt)
    with torch.no_grad():
        model[0].bias.fill_(3.0)
    path = _save(tmp_path, 7, model, opt)
    tensors, _ = load_safetensors(path / "net.safetensors")
    assert torch.all(tensors["0.bias"] == 3.0)


def test_mismatched_model_or_missing_checkpoint(tmp_path):
    model, opt, _ = _setup(0)
    with pytest.raises(InputError, match="no checkpoint found"):
        load_training_state(tmp_path, models={"net": model})
    _save(tmp_path, 1, model, opt)
    other = nn.Linear(4, 1)
    with pytest.raises(WeightsError, match="does not fit model 'net'"):
        load_training_state(tmp_path, models={"net": other})
    with pytest.raises(WeightsError, match="no model 'vae'"):
        load_training_state(tmp_path, models={"vae": model})


def test_export_weights_for_inference(tmp_path):
    model, opt, _ = _setup(0)
    ckpt = save_training_state(
        tmp_path / "run", step=10, epoch=1, models={"net": model}, optimizers={"o": opt}, config={"width": 16}
    )
    out = tmp_path / "net.safetensors"
    sha = export_weights(ckpt, out, "net", "sr", {"description": "tiny test model"})
    resolved = resolve_weights(out, family="sr", allow_unregistered=True)
    assert resolved.sha256 == sha
    assert resolved.metadata["family"] == "sr" and resolved.metadata["config"] == {"width": 16}
    assert resolved.metadata["description"] == "tiny test model" and resolved.metadata["step"] == 10
    fresh, _, _ = _setup(7)
    fresh.load_state_dict(resolved.load())
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
