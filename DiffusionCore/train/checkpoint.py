"""Resumable training checkpoints that a kill never leaves half-written.

Layout of a training output folder::

    out_dir/
      checkpoint-00001000/
        <model>.safetensors            one per model (e.g. vae.safetensors, denoiser.safetensors)
        training_state.safetensors     optimizer, scheduler, grad-scaler and RNG states (+ extra)
        state.json                     step, epoch, config, file sha256s (written last)
      checkpoint-00002000/ ...
      latest.json                      {"step": 2000, "checkpoint": "checkpoint-00002000", ...}
      best.json                        optional, written by mark_best()

A checkpoint is assembled in a hidden temporary folder beside the final one and renamed into place in one
step; ``latest.json`` is then replaced atomically. A crash at any moment leaves the previous checkpoint and
``latest.json`` intact, and :func:`find_latest` only ever returns complete checkpoints. Non-tensor state is
stored as JSON in the safetensors header; nothing is pickled. ``--resume`` goes through
:func:`resumable_checkpoint`, which also checks every file against its sha256 and passes over a damaged latest
checkpoint (a disk that filled up, a copy cut short) for the newest intact one, with a warning.

Resuming restores the torch (CPU and CUDA), NumPy and Python global RNG states, and optionally named
``numpy.random.Generator`` / ``torch.Generator`` objects, so the next optimizer step is bit-identical to
the one an uninterrupted run would have taken.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import config_to_dict
from ..errors import ConfigError, InputError, NumericalError, OutputError, WeightsError
from ..files import ON_WINDOWS, sha256_file, shared_mode, write_json_atomic
from ..nn.architecture import load_state
from ..weights.registry import load_safetensors, read_safetensors_header, save_safetensors
from .logger import METRICS_FILE, TENSORBOARD_DIR
from .numerics import nonfinite_tensors

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "state.json"
TRAINING_STATE_FILE = "training_state.safetensors"
LATEST_FILE = "latest.json"
BEST_FILE = "best.json"
_CKPT_PATTERN = re.compile(r"^checkpoint-(\d{8,})$")
_TMP_PREFIX = ".tmp-checkpoint-"
_TRASH_PREFIX = ".trash-checkpoint-"


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at ``step``: ``checkpoint-{step:08d}``."""
    return f"checkpoint-{step:08d}"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# ------------------------------------------------------------------------------ JSON + tensor encoding


class _Packer:
    """Turns nested state (dicts with any keys, tuples, tensors, arrays) into JSON plus a tensor dict."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def pack(self, obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            self.tensors[key] = obj
            return {"__tensor__": key}
        if isinstance(obj, np.ndarray):
            self.tensors[key] = (
                torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64, copy=False))
                if (obj.dtype.kind in "ui")
                else torch.from_numpy(np.ascontiguousarray(obj))
            )
            return {"__ndarray__": key, "dtype": obj.dtype.str}
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, Mapping):
            return {
                "__dict__": [
                    [self.pack(k, f"{key}.k{i}"), self.pack(v, f"{key}.{i}")]
                    for i, (k, v) in enumerate(obj.items())
                ]
            }
        if isinstance(obj, tuple):
            return {"__tuple__": [self.pack(v, f"{key}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.pack(v, f"{key}.{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, bool | int | float | str):
            return obj
        raise TypeError(
            f"cannot store {type(obj).__name__} at {key!r} in a checkpoint: only tensors, arrays, numbers, "
            "strings, None, lists, tuples and dicts are supported"
        )


def _unpack(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].cpu().numpy().astype(np.dtype(obj["dtype"]))
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["__dict__"]}
    return obj


# ---------------------------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    np.random.set_state(state["numpy"])
    random.setstate(_as_tuples(state["python"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in cuda])
        else:
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this machine has %d: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def _as_tuples(obj: Any) -> Any:
    if isinstance(obj, list | tuple):
        return tuple(_as_tuples(v) for v in obj)
    return obj


def _generator_state(gen: Any) -> Any:
    if isinstance(gen, np.random.Generator):
        return {"numpy_generator": gen.bit_generator.state}
    if isinstance(gen, torch.Generator):
        return {"torch_generator": gen.get_state()}
    raise TypeError(f"generator of type {type(gen).__name__}: use numpy.random.Generator or torch.Generator")


def _set_generator_state(gen: Any, state: Mapping[str, Any]) -> None:
    if isinstance(gen, np.random.Generator):
        gen.bit_generator.state = state["numpy_generator"]
    else:
        gen.set_state(state["torch_generator"].to("cpu", torch.uint8))


# ---------------------------------------------------------------------------------------------- files


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _is_complete(ckpt: Path) -> bool:
    state = _read_json(ckpt / STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
        return False
    return all((ckpt / name).is_file() for name in state["files"])


def _checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = _CKPT_PATTERN.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def has_checkpoint(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a checkpoint folder (intact or not: ``--resume`` names a damaged one), i.e. whether
    ``--resume`` has something to continue from; logs and exported weights alone are not enough."""
    return bool(_checkpoint_dirs(Path(out_dir)))


def previous_run(out_dir: str | os.PathLike) -> list[str]:
    """Names in ``out_dir`` that belong to a run: checkpoint folders, ``latest.json`` / ``best.json``, exported
    weights (``*.safetensors``) and training logs (``metrics.jsonl``, ``tensorboard/``: a run stopped before its
    first checkpoint leaves only these); empty for a new or empty folder."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [
        p.name
        for p in out.iterdir()
        if (p.is_dir() and _CKPT_PATTERN.match(p.name))
        or p.name in (LATEST_FILE, BEST_FILE, METRICS_FILE)
        or (p.is_dir() and p.name == TENSORBOARD_DIR)
        or (p.is_file() and p.suffix == ".safetensors")
    ]
    return sorted(found)


def only_logs(found: list[str]) -> bool:
    """Whether a run's names (:func:`previous_run`) are its training logs alone: a run stopped (killed) before its
    first checkpoint, which ``--resume`` cannot continue."""
    return bool(found) and set(found) <= {METRICS_FILE, TENSORBOARD_DIR}


def _remove_dir(path: Path) -> None:
    """Hide a folder by renaming it, then delete it (a crash mid-delete leaves nothing visible).

    Raises:
        OSError: the folder cannot be renamed; on Windows, while a file in it is open in another program.
    """
    trash = _trash_path(path)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)  # what stays (a file open on Windows) goes at a later save: _clean_stale


def _trash_path(path: Path) -> Path:
    """The hidden name, beside it, that the folder ``path`` is renamed to before it is deleted (:func:`_clean_stale`
    deletes what a crash left under such names)."""
    return path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}")


def _clean_stale(out_dir: Path) -> None:
    """Delete the hidden folders that a killed save (``.tmp-checkpoint-*``) or an unfinished removal
    (``.trash-checkpoint-*``) left. One that cannot be deleted now (a file in it open on Windows) is left for the next
    save: a checkpoint save never fails on what is left of an older one."""
    for p in out_dir.iterdir():
        if p.is_dir() and (p.name.startswith(_TMP_PREFIX) or p.name.startswith(_TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
            if p.exists():
                logger.info("could not remove %s (in use?); removed at a later save", p)


# ---------------------------------------------------------------------------------------------- API


def save_training_state(
    out_dir: str | os.PathLike,
    *,
    step: int,
    epoch: int,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any] | None = None,
    scalers: Mapping[str, Any] | None = None,
    config: Any = None,
    extra: Mapping[str, Any] | None = None,
    generators: Mapping[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write ``out_dir/checkpoint-{step:08d}/`` atomically, update ``latest.json`` and prune old ones.

    Call it on the main process only (``DistInfo.is_main``).

    Args:
        out_dir: the training output folder (created if needed).
        step: optimizer steps done so far.
        epoch: epochs done so far (or the current epoch; stored as given).
        models: name -> module (DDP / compile wrappers are unwrapped); each is saved as ``{name}.safetensors``.
        optimizers: name -> optimizer.
        schedulers: name -> LR scheduler (anything with ``state_dict()``), optional.
        scalers: name -> ``torch.amp.GradScaler`` (or anything with ``state_dict()``), optional.
        config: the run's configuration (dataclass or JSON-ready dict), stored in ``state.json``.
        extra: more state to restore (numbers, strings, lists, dicts, tensors, arrays), e.g. the data
            loader position or the best validation loss.
        generators: name -> ``numpy.random.Generator`` / ``torch.Generator`` whose states are saved too
            (e.g. the augmentation RNG), so that resuming continues their streams.
        keep: how many most recent checkpoints to keep (the one marked best is kept in addition).

    Returns:
        The checkpoint folder.

    Raises:
        OutputError: ``out_dir`` cannot be written.
        NumericalError: a model or the optimizer state holds NaN/Inf (the run diverged): nothing is written.
    """
    out = Path(out_dir)
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    name = checkpoint_name(step)
    model_tensors = {
        model_name: {k: v for k, v in unwrap_model(model).state_dict().items() if isinstance(v, torch.Tensor)}
        for model_name, model in models.items()
    }
    packer = _Packer()
    payload = {
        "optimizers": {k: packer.pack(o.state_dict(), f"optimizers.{k}") for k, o in optimizers.items()},
        "schedulers": {
            k: packer.pack(s.state_dict(), f"schedulers.{k}") for k, s in (schedulers or {}).items()
        },
        "scalers": {k: packer.pack(s.state_dict(), f"scalers.{k}") for k, s in (scalers or {}).items()},
        "generators": {
            k: packer.pack(_generator_state(g), f"generators.{k}") for k, g in (generators or {}).items()
        },
        "rng": packer.pack(_rng_state(), "rng"),
        "extra": packer.pack(dict(extra or {}), "extra"),
    }
    _refuse_nonfinite(out, step, model_tensors, packer.tensors)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _clean_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step:08d}-", dir=out))
    except OSError as exc:
        raise OutputError(
            f"cannot write checkpoints into {out}: {exc.strerror or exc}; choose a writable folder"
        ) from exc
    final = out / name
    try:
        files: dict[str, str] = {}
        for model_name, tensors in model_tensors.items():
            fname = f"{model_name}.safetensors"
            files[fname] = save_safetensors(
                tmp / fname, tensors, {"kind": "model", "model": model_name, "step": step}
            )
        files[TRAINING_STATE_FILE] = save_safetensors(tmp / TRAINING_STATE_FILE, packer.tensors, payload)

        config_dict = config_to_dict(config) if config is not None else {}
        state_json = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "epoch": int(epoch),
            "config": config_dict,
            "models": list(models),
            "files": files,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            json.dumps(config_to_dict(dict(extra or {})))
            state_json["extra"] = config_to_dict(dict(extra or {}))
        except TypeError:
            pass  # extra holds tensors or arrays: restored from training_state only
        write_json_atomic(state_json, tmp / STATE_FILE, durable=True, nonfinite_as_null=False)

        shared_mode(tmp)  # mkdtemp made it owner-only: a checkpoint is as readable as its files (umask)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    write_json_atomic({"step": int(step), "epoch": int(epoch), "checkpoint": name}, out / LATEST_FILE, durable=True,
                      nonfinite_as_null=False)  # fmt: skip
    _prune(out, keep)
    logger.info("saved checkpoint %s", final)
    return final


#: Seconds to wait before each new try to move a checkpoint into place on Windows, where a folder cannot be renamed
#: while a file in it is open: an antivirus scanning the files just written lets go within moments.
REPLACE_RETRY_DELAYS_S = (0.1, 0.25, 0.5, 1.0, 2.0)

#: The wait between those tries: a name of this module, so that a test replaces it here alone, not ``time.sleep``
#: of every thread.
_sleep = time.sleep


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the checkpoint assembled in ``tmp`` to ``final``, replacing a checkpoint of the same step there.

    On Windows the rename is refused while a file in either folder is open in another program: an antivirus scan of
    the files just written (for a moment), Explorer's preview, an ``sr`` run or Slicer job reading the old weights. It
    is tried again a few times (:data:`REPLACE_RETRY_DELAYS_S`) before the save gives up. The old checkpoint is moved
    aside (once) rather than deleted, and deleted only once the new one is in place: a save that gives up puts it
    back, so the step that ``latest.json`` names is never lost.

    Raises:
        OutputError: (Windows) still refused after the last try: says what is in use and what to do.
    """
    delays = REPLACE_RETRY_DELAYS_S if ON_WINDOWS else ()
    aside: Path | None = None
    try:
        for delay in (*delays, None):
            try:
                if aside is None and final.exists():
                    trash = _trash_path(final)
                    os.replace(final, trash)
                    aside = trash
                os.replace(tmp, final)
                break
            except PermissionError as exc:
                if delay is None:
                    if not ON_WINDOWS:
                        raise
                    raise OutputError(
                        f"could not save the checkpoint {final}: Windows refused to rename its folder "
                        f"({exc.strerror or exc}): a file in {final.name} or in the new checkpoint is open in another "
                        "program (an sr run or Slicer job using these weights, TensorBoard, Explorer's preview, an "
                        "antivirus scan). Close that program, then continue the run with --resume from its last "
                        "checkpoint"
                    ) from exc
                logger.debug("%s is in use (%s); trying again in %.2f s", final, exc.strerror or exc, delay)
                _sleep(delay)
    except BaseException:
        if aside is not None:
            try:
                os.replace(aside, final)
            except OSError as exc:  # whole under its hidden name, which the next save deletes (_clean_stale)
                logger.error("could not put the checkpoint %s back from %s (%s): rename that folder to %s now, "
                             "before the run saves again", final, aside, exc.strerror or exc, final.name)  # fmt: skip
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)  # what stays (a file open on Windows) goes at a later save


def _refuse_nonfinite(
    out: Path, step: int, models: Mapping[str, Mapping[str, torch.Tensor]], state: Mapping[str, torch.Tensor]
) -> None:
    """A checkpoint never holds NaN/Inf: such weights are a diverged run's, and every export and resume reads
    a checkpoint (``load_safetensors`` refuses non-finite tensors)."""
    bad = [f"{name}: {key}" for name, tensors in models.items() for key in nonfinite_tensors(tensors)]
    bad += [f"optimizer state: {key}" for key in nonfinite_tensors(state)]
    if not bad:
        return
    last = find_latest(out)
    kept = (
        f"the last checkpoint, {last.name}, holds finite weights"
        if last
        else "there is no earlier checkpoint"
    )
    raise NumericalError(
        f"training diverged by step {step}: {len(bad)} tensor(s) hold NaN or Inf (e.g. {bad[0]}). The checkpoint "
        f"was not written and nothing was exported; {kept}. Lower the learning rate and train again "
        "(--overwrite replaces this run)"
    )


def _prune(out: Path, keep: int) -> None:
    best = _read_json(out / BEST_FILE)
    best_name = best.get("checkpoint") if isinstance(best, dict) else None
    latest = _read_json(out / LATEST_FILE)
    latest_name = latest.get("checkpoint") if isinstance(latest, dict) else None
    complete = [(s, p) for s, p in _checkpoint_dirs(out) if _is_complete(p)]
    keep_names = {p.name for _, p in complete[-keep:]} | {best_name, latest_name}
    for _, p in complete:
        if p.name not in keep_names:
            try:
                _remove_dir(p)
            except OSError as exc:  # a file in it open (Windows): this prune is tried again at every save
                logger.warning("could not remove old checkpoint %s (in use?); removed at a later save (%s)", p,
                               exc.strerror or exc)  # fmt: skip
                continue
            logger.debug("pruned checkpoint %s", p)


def mark_best(out_dir: str | os.PathLike, step: int, metric: float | None = None) -> Path:
    """Record the checkpoint of ``step`` as the best one (kept by pruning); writes ``best.json``.

    Raises:
        InputError: no complete checkpoint exists for ``step``.
    """
    out = Path(out_dir)
    ckpt = out / checkpoint_name(step)
    if not _is_complete(ckpt):
        raise InputError(f"no complete checkpoint for step {step} in {out}: save it before marking it best")
    data: dict[str, Any] = {"step": int(step), "checkpoint": ckpt.name}
    if metric is not None:
        data["metric"] = float(metric)
    write_json_atomic(data, out / BEST_FILE, durable=True, nonfinite_as_null=False)
    return ckpt


def find_best(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint marked by :func:`mark_best`, if it still exists and is complete."""
    out = Path(out_dir)
    best = _read_json(out / BEST_FILE)
    if isinstance(best, dict) and isinstance(best.get("checkpoint"), str):
        ckpt = out / best["checkpoint"]
        if _is_complete(ckpt):
            return ckpt
    return None


def find_latest(out_dir: str | os.PathLike) -> Path | None:
    """The most recent complete checkpoint in ``out_dir`` (``None`` when there is none).

    ``latest.json`` is followed when it points to a complete checkpoint; otherwise the folders are
    scanned. Hidden temporary folders and folders without a valid ``state.json`` are never returned.
    """
    out = Path(out_dir)
    latest = _read_json(out / LATEST_FILE)
    if isinstance(latest, dict) and isinstance(latest.get("checkpoint"), str):
        ckpt = out / latest["checkpoint"]
        if _CKPT_PATTERN.match(ckpt.name) and _is_complete(ckpt):
            return ckpt
    for _, p in reversed(_checkpoint_dirs(out)):
        if _is_complete(p):
            return p
    return None


def checkpoint_damage(ckpt: str | os.PathLike) -> str | None:
    """Why the checkpoint folder ``ckpt`` cannot be resumed from, or None when it is intact: its ``state.json`` is
    missing or unreadable, or a file it lists is missing, not a complete safetensors file, or fails its sha256 (a
    disk that filled up, a copy cut short, a file edited by hand). Unpickles nothing.

    A resume asks this up to twice (the recorded settings, then the checkpoint to load): the answer is kept for as
    long as the folder's files keep their sizes and modification times, so this check hashes each file once (loading
    the checkpoint checks its sha256 again)."""
    ckpt = Path(ckpt)
    try:
        stamp = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(ckpt)))
    except OSError:
        stamp = None  # no such folder (its state.json is missing)
    return _checkpoint_damage(str(ckpt), stamp)


@functools.lru_cache(maxsize=16)
def _checkpoint_damage(folder: str, stamp: tuple | None) -> str | None:
    """:func:`checkpoint_damage` of ``folder`` whose files are as ``stamp`` says (names, sizes, times)."""
    ckpt = Path(folder)
    state = _read_json(ckpt / STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or not isinstance(state.get("step"), int):
        what = "is unreadable" if (ckpt / STATE_FILE).is_file() else "is missing"
        return f"{ckpt / STATE_FILE} {what}"
    for name, expected in state["files"].items():
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        try:
            read_safetensors_header(path)
        except WeightsError as exc:  # "<path> is truncated (...): the download ..." -> "<path> is truncated (...)"
            return f"{path} {str(exc).removeprefix(str(path)).split(':')[0].strip()}"
        if sha256_file(path) != str(expected).lower():
            return f"{path} fails its sha256 check (it changed after it was written)"
    return None


def resumable_checkpoint(out_dir: str | os.PathLike, *, warn: bool = True) -> Path | None:
    """The checkpoint ``--resume`` continues from: the newest intact one in ``out_dir`` (:func:`checkpoint_damage`).

    Newer checkpoints that are damaged are passed over; with ``warn`` a warning names each damaged file and the
    checkpoint used instead (every family resumes through this function, so they all say the same).

    Returns:
        The checkpoint folder, or None when ``out_dir`` holds no checkpoint at all.

    Raises:
        WeightsError: ``out_dir`` holds checkpoints but none of them is intact.
    """
    out = Path(out_dir)
    damaged: list[str] = []
    for _, ckpt in reversed(_checkpoint_dirs(out)):
        problem = checkpoint_damage(ckpt)
        if problem is None:
            if damaged and warn:
                logger.warning("--resume: the latest checkpoint is damaged (%s); resuming from %s (step %d) "
                               "instead: the steps after it are trained again", "; ".join(damaged), ckpt,
                               int(_read_json(ckpt / STATE_FILE)["step"]))  # fmt: skip
            return ckpt
        damaged.append(problem)
    if damaged:
        raise WeightsError(
            f"--resume: no intact checkpoint in {out} ({'; '.join(damaged)}): the run cannot be continued; start it "
            "again with --overwrite, or train into another --out-dir"
        )
    return None


def _resolve_checkpoint(ckpt_dir: str | os.PathLike) -> Path:
    p = Path(ckpt_dir)
    if (p / STATE_FILE).is_file():
        if not _is_complete(p):
            raise WeightsError(f"checkpoint {p} is incomplete (files listed in state.json are missing)")
        return p
    found = find_latest(p) if p.is_dir() else None
    if found is None:
        raise InputError(
            f"no checkpoint found in {p}: give a checkpoint-XXXXXXXX folder or a training output folder "
            "that holds one (start without --resume to train from scratch)"
        )
    return found


def read_checkpoint_info(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint (or of the latest one in a training folder), plus ``path``."""
    ckpt = _resolve_checkpoint(ckpt_dir)
    state = _read_json(ckpt / STATE_FILE)
    assert isinstance(state, dict)
    return {**state, "path": ckpt}


def load_training_state(
    ckpt_dir: str | os.PathLike,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    scalers: Mapping[str, Any] | None = None,
    generators: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore models, optimizers, schedulers, scalers and RNG states from a checkpoint.

    Args:
        ckpt_dir: a ``checkpoint-XXXXXXXX`` folder, or a training output folder (its latest checkpoint).
        models: name -> module to load into (same names as when saved; wrappers are unwrapped).
        optimizers: name -> optimizer built over the models' parameters, optional.
        schedulers: name -> LR scheduler, optional.
        scalers: name -> grad scaler, optional.
        generators: name -> ``numpy.random.Generator`` / ``torch.Generator`` whose saved states are restored.
        map_location: device for the loaded tensors (models and optimizers then move them where they live).
        restore_rng: restore the global torch / CUDA / NumPy / Python RNG states (needed for an exact resume).

    Returns:
        ``{"step", "epoch", "config", "extra", "path"}``.

    Raises:
        InputError: no checkpoint found.
        WeightsError: a file is corrupt, or the checkpoint does not match the given models / optimizers
            (e.g. another configuration).
    """
    ckpt = _resolve_checkpoint(ckpt_dir)
    state = _read_json(ckpt / STATE_FILE)
    assert isinstance(state, dict)
    files: dict[str, str] = state["files"]
    for model_name, model in models.items():
        fname = f"{model_name}.safetensors"
        if fname not in files:
            raise WeightsError(
                f"checkpoint {ckpt} has no model {model_name!r} (it has {', '.join(state.get('models', []))}): "
                "resume with the configuration it was trained with"
            )
        tensors, _ = load_safetensors(ckpt / fname, expected_sha256=files[fname], device=map_location)
        load_state(unwrap_model(model), tensors, f"checkpoint {ckpt}", plural=False,
                   against=f"model {model_name!r} of this configuration",
                   advice="Resume with the configuration it was trained with")  # fmt: skip

    tensors, payload = load_safetensors(
        ckpt / TRAINING_STATE_FILE, expected_sha256=files[TRAINING_STATE_FILE], device=map_location
    )

    def restore(kind: str, objects: Mapping[str, Any] | None) -> None:
        saved = payload.get(kind, {})
        for key, obj in (objects or {}).items():
            if key not in saved:
                raise WeightsError(
                    f"checkpoint {ckpt} has no {kind[:-1]} state {key!r}: resume with the same setup"
                )
            value = _unpack(saved[key], tensors)
            try:
                if kind == "generators":
                    _set_generator_state(obj, value)
                else:
                    obj.load_state_dict(value)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise WeightsError(f"checkpoint {ckpt}: cannot restore {kind[:-1]} {key!r} ({exc})") from exc

    restore("optimizers", optimizers)
    restore("schedulers", schedulers)
    restore("scalers", scalers)
    restore("generators", generators)
    if restore_rng:
        rng = _unpack(payload["rng"], {k: v.to("cpu") for k, v in tensors.items()})
        _set_rng_state(rng)
    extra = _unpack(payload.get("extra", {}), tensors)
    logger.info("resumed from %s (step %d)", ckpt, state["step"])
    return {
        "step": int(state["step"]),
        "epoch": int(state["epoch"]),
        "config": state.get("config", {}),
        "extra": extra,
        "path": ckpt,
    }


def export_weights(
    ckpt_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    model_name: str,
    family: str,
    extra_metadata: Mapping[str, Any] | None = None,
) -> str:
    """Write one model of a checkpoint as an inference weights file.

    Args:
        ckpt_dir: a checkpoint folder or a training output folder (its latest checkpoint).
        out_file: destination ``.safetensors`` file (written atomically).
        model_name: which model of the checkpoint (e.g. ``"denoiser"``).
        family: model family recorded in the metadata (``"sr"``, ``"vae"``, ``"xray"``, ...).
        extra_metadata: more JSON-ready metadata (description, model_card, a model-only ``config``, ...);
            its keys override the defaults.

    Returns:
        The sha256 of the written file (register it with ``import_weights`` or in the bundled registry).

    Raises:
        InputError: no checkpoint found.
        WeightsError: the checkpoint has no such model or its file is corrupt.
    """
    ckpt = _resolve_checkpoint(ckpt_dir)
    state = _read_json(ckpt / STATE_FILE)
    assert isinstance(state, dict)
    fname = f"{model_name}.safetensors"
    if fname not in state["files"]:
        raise WeightsError(
            f"checkpoint {ckpt} has no model {model_name!r}; it has: {', '.join(state.get('models', []))}"
        )
    tensors, _ = load_safetensors(ckpt / fname, expected_sha256=state["files"][fname])
    metadata: dict[str, Any] = {
        "family": family,
        "model": model_name,
        "config": state.get("config", {}),
        "step": state["step"],
        "epoch": state["epoch"],
        "source_checkpoint": ckpt.name,
        "source_sha256": state["files"][fname],
    }
    metadata.update(config_to_dict(dict(extra_metadata or {})))
    digest = save_safetensors(out_file, tensors, metadata)
    logger.info("exported %s of %s to %s (sha256 %s)", model_name, ckpt, out_file, digest)
    return digest


#: Settings a resumed run may change without a word: how long it runs, where, how often it logs and saves, and the
#: seed (the random streams come back from the checkpoint).
RESUME_FREE_SETTINGS = frozenset({
    "max_steps", "max_minutes", "epochs", "threads", "device", "num_workers", "log_every", "val_every",
    "checkpoint_every", "keep_checkpoints", "seed",
})  # fmt: skip


def config_differences(saved: Any, current: Any, prefix: str = "", added: list[str] | None = None) -> list[str]:
    """``"key: saved -> current"`` for each setting that differs between two JSON-ready configs (nested keys dotted),
    except those of :data:`RESUME_FREE_SETTINGS`.

    Args:
        added: when given, the settings that ``saved`` lacks (options added since the run recorded its settings)
            are appended to it as ``"key = current"`` instead of being returned as differences.
    """
    differing = _differing_settings(saved, current, prefix, RESUME_FREE_SETTINGS, added)
    return [f"{name}: {_python_spelling(old)} -> {_python_spelling(new)}" for name, old, new in differing]


def model_differences(held: Any, built: Any, held_name: str, most: int = 4, prefix: str = "model.") -> str:
    """The model settings in which a configuration differs from the one that weights record, in a config file's
    spelling: ``"model.voxel_channels 96 (xray-default: 128), model.refine_xray true (xray-default: false)"``, in the
    order ``built`` declares them, the first ``most`` named and the others counted (``", 3 more"``); "" when none
    differ.

    Args:
        held: the model config the weights ``held_name`` were trained with (a dataclass or a dict).
        built: the model config of the run (or panel) that is to load them.
        held_name: the weights in words (a registered name, a file or folder name).
        most: how many settings to name.
        prefix: the section the settings are in, as a config file spells it.
    """
    current = config_to_dict(built)
    differing = _differing_settings(config_to_dict(held), current, prefix, lists_whole=True)
    declared = {key: i for i, key in enumerate(current)} if isinstance(current, dict) else {}
    # as the config lists its settings (the walk gives them alphabetically), those only ``held`` has last
    differing.sort(key=lambda d: declared.get(d[0].removeprefix(prefix).partition(".")[0], len(declared)))
    said = [f"{name} {_json_spelling(new)} ({held_name}: {_json_spelling(old)})" for name, old, new in differing[:most]]
    if len(differing) > most:
        said.append(f"{len(differing) - most} more")
    return ", ".join(said)


#: The value of a setting that one of two compared configs lacks (:func:`_differing_settings`).
_UNSET = object()


def _python_spelling(value: Any) -> str:
    return repr("(none)" if value is _UNSET else value)


def _json_spelling(value: Any) -> str:
    return "(none)" if value is _UNSET else json.dumps(value)


def _differing_settings(
    saved: Any, current: Any, prefix: str = "", free: frozenset[str] = frozenset(), added: list[str] | None = None,
    lists_whole: bool = False,
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for each setting in which two JSON-ready configs differ, keys in
    alphabetical order at each level; a value that one side lacks is ``_UNSET``.

    Args:
        free: keys passed over at every level.
        added: when given, the settings that ``saved`` lacks are appended to it as ``"key = current"`` instead.
        lists_whole: compare lists as one value each (``model.encoder_channels``), not item by item
            (``model.encoder_channels.1``).
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(saved) | set(current), key=str):
            if key in free:
                continue
            name = f"{prefix}{key}"
            if key not in saved and added is not None:
                added.append(f"{name} = {current[key]!r}")
            elif key not in saved or key not in current:
                out.append((name, saved.get(key, _UNSET), current.get(key, _UNSET)))
            else:
                out += _differing_settings(saved[key], current[key], name + ".", free, added, lists_whole)
        return out
    if not lists_whole and isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current))
                for d in _differing_settings(a, b, f"{prefix}{i}.", free, added, lists_whole)]  # fmt: skip
    return [] if saved == current else [(prefix.rstrip("."), saved, current)]


def recorded_config(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The settings the run in ``out_dir`` was checkpointed with (the ``state.json`` of the checkpoint ``--resume``
    continues from, :func:`resumable_checkpoint`), or None when it holds no intact checkpoint: what ``--resume``
    without ``--config`` continues with."""
    try:
        latest = resumable_checkpoint(out_dir, warn=False)
    except WeightsError:  # none intact: the resume itself says so
        return None
    return None if latest is None else _recorded_in(latest)


def _recorded_in(checkpoint: Path) -> dict[str, Any] | None:
    config = read_checkpoint_info(checkpoint).get("config")
    return config if isinstance(config, dict) and config else None


def resumed_settings(resume: bool, out_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """For ``--resume`` without ``--config``: the run's recorded settings (:func:`recorded_config`), said in the log;
    None otherwise (then the family's defaults apply, as for a new run)."""
    latest = resumable_checkpoint(out_dir, warn=False) if resume and out_dir else None  # the resume warns of damage
    config = None if latest is None else _recorded_in(latest)
    if config is not None:
        logger.info("--resume without --config: continuing with the settings the run recorded (%s)",
                    latest / STATE_FILE)  # fmt: skip
    return config


#: A recorded setting that looks like a file or folder path (not a weights or sample name): it has a folder part or a
#: file suffix of what runs read.
_PATH_SUFFIXES = (".safetensors", ".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".txt", ".list")


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.lower().endswith(_PATH_SUFFIXES)


def refuse_unreachable_recorded_paths(out_dir: str | os.PathLike, settings: Mapping[str, Any],
                                      options: Mapping[str, tuple[str, str]]) -> None:  # fmt: skip
    """Refuse ``--resume`` when a file or folder the run recorded (in its checkpoint's ``state.json``) and still uses
    cannot be found from here: a relative path is relative to the folder the run was started from. Says where the
    path was read from and which option gives it again, instead of the plain "does not exist" of reading it.

    Args:
        out_dir: the run's folder (nothing is checked when it holds no checkpoint: the resume says so).
        settings: the settings the resumed run uses (JSON-ready, nested), recorded ones and those given now.
        options: dotted setting (``"train.vae_weights"``) -> (what it is, e.g. ``"its VAE weights"``, the option
            that gives it, e.g. ``"--vae"``). A list setting is checked entry by entry.

    Raises:
        InputError: naming each such path, the ``state.json`` it was recorded in, and its option.
    """
    latest = resumable_checkpoint(out_dir, warn=False)
    recorded = _recorded_in(latest) if latest is not None else None
    if not recorded:
        return

    def value(config: Any, dotted: str) -> Any:
        for part in dotted.split("."):
            config = config.get(part) if isinstance(config, Mapping) else None
        return config

    relative, gone = [], []
    for dotted, (what, option) in options.items():
        was, now = value(recorded, dotted), value(settings, dotted)
        was_list = [str(v) for v in (was if isinstance(was, list) else [was]) if v]
        now_list = [str(v) for v in (now if isinstance(now, list) else [now]) if v]
        for entry in (v for v in now_list if v in was_list and _looks_like_path(v)):  # from the record
            path = Path(entry).expanduser()
            if not path.exists():
                (gone if path.is_absolute() else relative).append(f"{what} {entry} (give it again with {option})")
    said = []
    if relative:
        said.append(f"paths relative to the folder the run was started from, which do not exist from here "
                    f"({Path.cwd()}): {', '.join(relative)}; resume from the folder the run was started from, or give "
                    "them again with these options")  # fmt: skip
    if gone:
        said.append(f"files that do not exist any more: {', '.join(gone)}")
    if said:
        raise InputError(f"--resume: the run in {out_dir} recorded (in {latest / STATE_FILE}) " + "; and ".join(said))


def nothing_to_resume(out_dir: str | os.PathLike) -> InputError:
    """The refusal of ``--resume`` on a folder that holds no checkpoint (a mistyped folder would otherwise start a new
    run in it, as if the earlier training had gone on). A folder holding only a run's logs (a run killed before its
    first checkpoint) is told to start again with ``--overwrite``: without ``--resume`` it is refused too."""
    found = previous_run(out_dir)
    if only_logs(found):
        return InputError(f"--resume: the run in {out_dir} stopped before its first checkpoint (it left only "
                          f"{', '.join(found)}): nothing to resume; pass --overwrite instead of --resume to start it "
                          "again (or choose another --out-dir)")  # fmt: skip
    return InputError(f"--resume: no checkpoint in {out_dir}; check the folder's name, or start without --resume")


def refuse_nothing_to_train(out_dir: str | os.PathLike, max_steps: int, limit: str = "") -> None:
    """Refuse ``--resume`` of a run already at or past ``max_steps`` (0: no limit, nothing refused) before anything is
    read or written: a run that trained no step would still rewrite its checkpoint and export its weights again
    with a new sha256 (an imported copy would no longer match). ``limit`` says where ``max_steps`` came from
    (default ``max_steps N``). Does nothing when the folder holds no checkpoint (the resume itself says so).

    Raises:
        ConfigError: exit code 2, naming the step reached and a larger ``--max-steps``.
    """
    latest = resumable_checkpoint(out_dir, warn=False) if max_steps > 0 else None
    if latest is None:
        return
    done = int(read_checkpoint_info(latest).get("step", 0))
    if done >= max_steps:
        raise ConfigError(
            f"nothing to train: the run in {out_dir} is at step {done}, at or past {limit or f'max_steps {max_steps}'}; "
            f"give a larger --max-steps (e.g. --max-steps {done + max(1, done)}) to train it further. Its checkpoint "
            "and exported weights are left unchanged"
        )


def volume_record(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The training volumes as a checkpoint records them (``extra["data"]``): absolute paths, in order, once each."""
    return list(dict.fromkeys(str(Path(p).expanduser().resolve()) for p in paths))


def volume_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Short names of training volumes, for summaries, exported weights and logs: each one's file or folder name, or
    as many of its last path parts as tell it from the others (cohort trees repeat series folder names: ``p1/ct``,
    ``p2/ct``)."""
    parts = [Path(p).parts for p in paths]
    names = []
    for mine in parts:
        k = 1
        while k < len(mine) and any(other != mine and other[-k:] == mine[-k:] for other in parts):
            k += 1
        names.append(str(Path(*mine[-k:])))
    return names


def passed_over_record(passed_over: Sequence[tuple[str | os.PathLike, str]] | None) -> list[dict[str, str]]:
    """The volumes a run found but did not use, as its ``summary.json`` lists them: ``{"volume": path, "why": reason}``
    each. The paths are the user's (a folder may name a patient): they stay in the run folder, and exported weights say
    only how many (:func:`public_config`)."""
    return [{"volume": str(p), "why": str(why)} for p, why in passed_over or ()]


def public_config(config: Mapping[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """``config`` (a config as a dict) as an exported weights file records it: the settings ``paths`` names
    (``"train.data"``: a section and a key) that hold the user's files and folders emptied, as their type has it (a
    list ``[]``, a path ``""``), so that the file still loads as the config and names no patient's folder. The run
    folder's ``summary.json`` and checkpoints keep them."""
    out = json.loads(json.dumps(config, default=str))
    for dotted in paths:
        section, _, key = dotted.rpartition(".")
        where = out.get(section) if section else out
        if isinstance(where, dict) and where.get(key):
            where[key] = [] if isinstance(where[key], list) else ""
    return out


def log_volumes_used(found: Sequence[str | os.PathLike], used: Sequence[str | os.PathLike]) -> None:
    """Say in one line how many of the volumes ``found`` a run trains on (``used``: those read and kept) and which it
    passed over (each was warned of with its reason as it was read); nothing when it uses them all."""
    kept = {Path(p) for p in used}
    passed = [name for p, name in zip(found, volume_names(found)) if Path(p) not in kept]
    if passed:
        logger.info("training on %d of the %d DICOM series or volume file(s) found (passed over: %s)", len(used), len(found),
                    ", ".join(passed))  # fmt: skip


def warn_resumed_data(recorded: Sequence[str] | None, current: Sequence[str], checkpoint: str | os.PathLike
                      ) -> tuple[list[str], list[str]]:  # fmt: skip
    """Warn when a run is resumed on other training volumes than those it recorded (``recorded``; None: a checkpoint
    that recorded none, so nothing to compare): the volumes added and those dropped. Training goes on with
    ``current`` from this step on, which may be meant (more data) or not (a mistyped folder, another cohort).

    Returns:
        ``(added, dropped)``.
    """
    if recorded is None:
        return [], []
    added = [v for v in current if v not in set(recorded)]
    dropped = [v for v in recorded if v not in set(current)]

    def listed(volumes: list[str]) -> str:
        return ", ".join(volumes[:8]) + (f" and {len(volumes) - 8} more" if len(volumes) > 8 else "")

    if added or dropped:
        said = [f"added {listed(added)}"] if added else []
        said += [f"dropped {listed(dropped)}"] if dropped else []
        logger.warning("resuming with other training data than the run recorded (%s): %s; from this step on it "
                       "trains on the %d volume(s) given", checkpoint, "; ".join(said), len(current))  # fmt: skip
    return added, dropped


def _data_entry(entry: Any) -> str:
    """A ``data`` entry of a config (a path, a folder, a list file or a sample's name) as :func:`volume_record` keeps
    a path, so that ``a.nii.gz`` and ``./a.nii.gz`` are the same volume."""
    path = Path(str(entry)).expanduser()
    return str(path.resolve()) if path.exists() else str(entry)


def _pop_data(config: dict) -> list[str] | None:
    """Take the training-data list out of a JSON-ready config (``data`` or ``train.data``; None when it has none):
    resuming compares it volume by volume (:func:`warn_resumed_data`), not as one setting."""
    for section in (config, config.get("train")):
        if isinstance(section, dict) and isinstance(section.get("data"), list):
            return [_data_entry(e) for e in section.pop("data")]
    return None


def warn_resumed_config(state: dict, current: Any, checkpoint: str | os.PathLike) -> list[str]:
    """Warn when a run is resumed with settings other than those it was checkpointed with (``state["config"]``,
    from :func:`load_training_state`): they apply from here on, which may be meant (a lower learning rate) or not
    (another config file by mistake). Training data listed in the config (``train.data``) is compared volume by
    volume (:func:`warn_resumed_data`). Returns the differences."""
    saved = config_to_dict(state.get("config") or {})  # a copy: the data list is taken out of it
    if not saved:
        return []
    now = config_to_dict(current)
    saved_data, current_data = _pop_data(saved), _pop_data(now)
    if saved_data is not None and current_data is not None:
        warn_resumed_data(saved_data, current_data, checkpoint)
    added: list[str] = []
    differences = config_differences(saved, now, added=added)
    if differences:
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        logger.warning(
            "resuming with settings that differ from the run's (%s keeps them in state.json), from this step on: %s",
            checkpoint, shown,
        )
    if added:  # options that did not exist when the run started (a run of an older version): not a change of the user's
        logger.info("%d option(s) added since this run started are not in its record (%s) and take their defaults "
                    "(or the values --config gives) from this step on: %s", len(added), Path(checkpoint) / STATE_FILE,
                    "; ".join(added))  # fmt: skip
    return differences


def weights_label(init_from: str) -> str:
    """How the description names the weights a run started from: a registered name as it is, a file by its name (its
    folders may name a patient or a user; the full path stays in ``training.init_from``)."""
    text = str(init_from)
    return Path(text).name if ("/" in text or "\\" in text or text.endswith(".safetensors")) else text


def public_data_record(names: list[str], sources: list[str] | None = None) -> dict[str, Any]:
    """What a shared weights file says of the volumes it was trained on: how many, naming only the project's own
    samples (:data:`~DiffusionCore.sampledata.SAMPLES`, by name or by their fetched file among ``sources``); a
    user's file and folder names (often a patient's name, MRN or accession number) stay in the run folder's
    ``summary.json``. ``{"count", "names", "description"}``."""
    from ..sampledata import CT_SAMPLES, sample_dir

    folders = {n: sample_dir(n).resolve() for n in CT_SAMPLES}

    def sample(name: str, source: str | None) -> str | None:
        if name in folders:
            return name
        where = Path(source).resolve() if source else None
        return next((n for n, f in folders.items() if where is not None and where.is_relative_to(f)), None)

    paired = sources if sources is not None and len(sources) == len(names) else [None] * len(names)
    samples = [n for n in (sample(name, src) for name, src in zip(names, paired, strict=True)) if n]
    if not names:
        return {"count": 0, "names": [], "description": "unrecorded data"}
    text = f"{len(names)} CT volume{'s' if len(names) != 1 else ''}"
    if samples:
        text += f" ({', '.join(samples)}{', ...' if len(samples) < len(names) else ''})"
    return {"count": len(names), "names": samples, "description": text}
