"""The Windows and macOS defects of training that portability review 42 found, each pinned by a test run on Linux.

* D6: on Windows a folder cannot be renamed while a file in it is open (an ``sr`` run or Slicer job reading an older
  checkpoint, TensorBoard, an antivirus scan): pruning an old checkpoint ended the run with an internal error,
  though the new checkpoint was written. Now pruning never ends a run, and moving a checkpoint into place is tried
  again before it fails with a message that says what to do.
* M5: off Linux a lock's process could not be told from another one that reused its pid after a crash, so a stale
  ``train.lock`` looked alive, and the refusal gave no way out.
* M7: ``torchrun`` with CUDA asked for NCCL, which the Windows and macOS builds of PyTorch do not have.

Windows is simulated within reach of the code under test: ``checkpoint.ON_WINDOWS``, ``outdir.sys.platform``, a
``os.replace`` that refuses the way Windows does, a faked process creation-time lookup and ``is_nccl_available``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from DiffusionCore.errors import OutputError
from DiffusionCore.train import checkpoint, distributed, outdir
from DiffusionCore.train.checkpoint import checkpoint_name, find_latest, save_training_state


# -- D6: a checkpoint folder in use ------------------------------------------------------------------------------------
def _save(out: Path, step: int) -> Path:
    torch.manual_seed(step)
    model = nn.Linear(2, 2)
    return save_training_state(out, step=step, epoch=0, models={"model": model},
                               optimizers={"opt": torch.optim.SGD(model.parameters(), lr=0.1)}, keep=1)  # fmt: skip


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))


def _hidden(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.fixture
def in_use(monkeypatch):
    """The folders in the returned set cannot be renamed: ``os.replace`` refuses as Windows does while a file in them
    is open."""
    folders: set[Path] = set()
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) in folders:
            raise PermissionError(13, "Access is denied", str(src), None, str(dst))  # WinError 5
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return folders


def test_a_save_whose_old_checkpoint_is_in_use_goes_on_and_prunes_it_at_a_later_save(tmp_path, in_use, caplog):
    out = tmp_path / "run"
    old = _save(out, 100)
    in_use.add(old)  # e.g. `sr --weights run/checkpoint-00000100/...` reading it while training goes on

    with caplog.at_level(logging.WARNING, logger="DiffusionCore.train.checkpoint"):
        new = _save(out, 200)
    assert new == out / checkpoint_name(200) and find_latest(out) == new  # the new checkpoint, and latest.json
    assert json.loads((out / "latest.json").read_text(encoding="utf-8"))["checkpoint"] == new.name
    assert _checkpoints(out) == [old.name, new.name]  # the old one could not go: it stays, whole
    assert f"could not remove old checkpoint {old} (in use?); removed at a later save" in caplog.text

    in_use.clear()  # the reader ended
    third = _save(out, 300)
    assert _checkpoints(out) == [third.name]  # keep=1: both older ones pruned now
    assert not _hidden(out)


def test_overwrite_with_an_old_checkpoint_in_use_changes_nothing_and_says_what_to_do(tmp_path, in_use):
    out = tmp_path / "run"
    _save(out, 100)
    second = _save(out, 200)
    before = sorted(p.name for p in out.iterdir())
    in_use.add(out / "latest.json")  # a file another program holds open (Windows refuses to move it)
    with pytest.raises(OutputError, match=r"--overwrite could not set the previous run's latest\.json in .* aside "
                                          r"\(Access is denied\): a file in it is open in another program .*Close "
                                          r"that program and run again; nothing was changed"):  # fmt: skip
        with outdir.claim_output_dir(out, overwrite=True):
            pytest.fail("the run must not begin")
    assert sorted(p.name for p in out.iterdir()) == before  # the previous run as it was: nothing half set aside
    assert find_latest(out) == second


def test_moving_a_checkpoint_into_place_is_tried_again_on_windows(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _save(out, 100)
    monkeypatch.setattr(checkpoint, "ON_WINDOWS", True)
    waits: list[float] = []
    monkeypatch.setattr(checkpoint, "_sleep", waits.append)
    real_replace = os.replace
    refused: list[str] = []

    def scanned_for_a_moment(src, dst):  # an antivirus scans the files just written: the first two tries fail
        if Path(src).name.startswith(".tmp-checkpoint-") and len(refused) < 2:
            refused.append(Path(src).name)
            raise PermissionError(13, "Access is denied", str(src), None, str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", scanned_for_a_moment)
    saved = _save(out, 200)
    assert len(refused) == 2 and waits == list(checkpoint.REPLACE_RETRY_DELAYS_S[:2])
    assert find_latest(out) == saved and _checkpoints(out) == [saved.name] and not _hidden(out)


def test_a_checkpoint_that_stays_in_use_on_windows_fails_with_what_to_do(tmp_path, monkeypatch, in_use):
    out = tmp_path / "run"
    first = _save(out, 100)
    monkeypatch.setattr(checkpoint, "ON_WINDOWS", True)
    waits: list[float] = []
    monkeypatch.setattr(checkpoint, "_sleep", waits.append)
    in_use.add(first)  # the same step saved again (a resumed run) while its files are open

    with pytest.raises(OutputError) as info:
        _save(out, 100)
    message = str(info.value)
    assert f"could not save the checkpoint {first}" in message and "Access is denied" in message
    assert "open in another program" in message and "Close that program" in message and "--resume" in message
    assert waits == list(checkpoint.REPLACE_RETRY_DELAYS_S)  # a few short tries first
    assert _checkpoints(out) == [first.name] and not _hidden(out)  # the earlier one whole, no half-made folder
    assert find_latest(out) == first


def test_a_step_saved_again_whose_new_folder_stays_in_use_on_windows_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """Before: the old checkpoint of the step was deleted before the new one was renamed into place, and the new one
    was deleted when that rename failed: neither was left, and latest.json named a folder that was gone."""
    out = tmp_path / "run"
    _save(out, 100)
    old = _save(out, 200)
    weights_before = (old / "model.safetensors").read_bytes()
    files_before = sorted(p.name for p in old.iterdir())
    monkeypatch.setattr(checkpoint, "ON_WINDOWS", True)
    waits: list[float] = []
    monkeypatch.setattr(checkpoint, "_sleep", waits.append)
    real_replace = os.replace

    def scanned_all_along(src, dst):  # an antivirus keeps scanning the new files on every try
        if Path(src).name.startswith(".tmp-checkpoint-"):
            raise PermissionError(13, "Access is denied", str(src), None, str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", scanned_all_along)
    with pytest.raises(OutputError, match=r"could not save the checkpoint .*Access is denied.*--resume"):
        _save(out, 200)  # a resumed run saves step 200 again
    assert waits == list(checkpoint.REPLACE_RETRY_DELAYS_S)
    assert sorted(p.name for p in old.iterdir()) == files_before  # the old checkpoint of that step, whole
    assert (old / "model.safetensors").read_bytes() == weights_before
    latest = json.loads((out / "latest.json").read_text(encoding="utf-8"))["checkpoint"]
    assert (out / latest).is_dir() and find_latest(out) == old and not _hidden(out)


# -- M5: a stale train.lock whose pid another process took --------------------------------------------------------------
def _lock(out: Path, pid: int, started: str | None) -> Path:
    out.mkdir(exist_ok=True)
    lock = out / outdir.LOCK_FILE
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": started}), encoding="utf-8")
    return lock


@pytest.fixture
def windows_processes(monkeypatch):
    """outdir on Windows: processes told apart by their creation times (``GetProcessTimes``), here ``created``."""
    monkeypatch.setattr(outdir, "sys", types.SimpleNamespace(platform="win32", argv=sys.argv))
    created: dict[int, int] = {os.getpid(): 133_000_000_000_000_000}
    monkeypatch.setattr(outdir, "_windows_creation_time", created.get)
    monkeypatch.setattr(outdir, "_pid_alive", lambda pid: pid in created)
    return created


def test_a_lock_whose_pid_another_process_took_is_stale_on_windows(tmp_path, windows_processes, ended_pid, caplog):
    out = tmp_path / "run"
    lock = _lock(out, ended_pid, "132000000000000000")
    windows_processes[ended_pid] = 132_000_000_000_000_000  # the very process that wrote it still runs: kept
    with pytest.raises(OutputError, match="is in use by another training run") as info, outdir.claim_output_dir(out):
        pass
    assert "delete the lock file" not in str(info.value) and lock.is_file()  # it is known to run

    windows_processes[ended_pid] = 133_100_000_000_000_000  # it crashed; the pid now names a process started since
    with caplog.at_level(logging.WARNING, logger="DiffusionCore.train.outdir"), outdir.claim_output_dir(out):
        assert f"taking over the lock {lock} of process {ended_pid}, which no longer runs" in caplog.text
        held = json.loads(lock.read_text(encoding="utf-8"))
        assert held["pid"] == os.getpid() and held["started"] == "133000000000000000"  # its own creation time
    assert not lock.exists()


def test_a_lock_whose_process_cannot_be_compared_names_the_lock_file_to_delete(tmp_path, monkeypatch):
    out = tmp_path / "run"
    lock = _lock(out, os.getpid(), "12345")  # the pid runs; whether it is the lock's process cannot be told (macOS)
    monkeypatch.setattr(outdir, "_start_time", lambda pid: None)
    with pytest.raises(OutputError) as info, outdir.claim_output_dir(out):
        pass
    assert str(info.value).endswith(
        f"; if that run is over (it crashed, or the machine was restarted), delete the lock file {lock}"
    )
    assert lock.is_file()  # it is the user's to delete


# -- M7: no NCCL in this PyTorch ----------------------------------------------------------------------------------------
def test_gpus_join_with_gloo_when_pytorch_has_no_nccl(monkeypatch, caplog):
    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed, "resolve_device",
                        lambda device, local_rank, world_size=1: torch.device("cuda", local_rank))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append(backend))
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)  # PyTorch on Windows or macOS

    with caplog.at_level(logging.INFO, logger="DiffusionCore.train.distributed"):
        info = distributed.init_distributed("cuda")
    assert joined == ["gloo"] and info.world_size == 2 and info.device == torch.device("cuda", 0)
    assert [r.getMessage() for r in caplog.records if "NCCL" in r.getMessage()] == [
        "this PyTorch has no NCCL (its Windows and macOS builds do not): the GPUs exchange gradients through Gloo, "
        "which is slower; multi-GPU training is fastest on Linux"
    ]

    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)  # Linux: as before
    assert distributed.process_group_backend(torch.device("cuda", 0)) == "nccl"
    assert distributed.process_group_backend(torch.device("cpu")) == "gloo"
