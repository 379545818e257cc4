"""Training metrics for people and for the Slicer training panel.

:class:`TrainLogger` writes every scalar to ``out_dir/metrics.jsonl`` (always; one JSON object per line:
``{"step": 10, "tag": "loss/train", "value": 0.12, "time": 1712345678.9}``), which the Slicer panel
reads to plot the loss curve, and also to TensorBoard event files when ``tensorboard`` is installed
(``tensorboard --logdir out_dir``). Only the main process should log: pass ``enabled=info.is_main``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import OutputError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
#: The folder of the TensorBoard event files, inside the run's folder.
TENSORBOARD_DIR = "tensorboard"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of ``folder/metrics.jsonl``); a torn last line is skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    records = []
    if not p.is_file():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written while we read
    return records


def _to_image(array: Any) -> np.ndarray:
    """(H, W) or (C, H, W) with C in {1, 3} -> float32 (C, H, W) scaled to [0, 1] by its own min/max."""
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise ValueError(f"image must be (H, W) or (C, H, W) with C = 1 or 3, got shape {a.shape}")
    a = np.nan_to_num(a)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


class TrainLogger:
    """Scalars and images of a training run.

    Args:
        out_dir: the training output folder (created).
        enabled: ``False`` makes every call a no-op (non-main processes).
        resume_step: when resuming from the checkpoint of this step, records logged after it by the
            interrupted run are dropped (from ``metrics.jsonl`` and TensorBoard), so curves do not fork.

    ``metrics.jsonl`` and ``tensorboard/`` are created at the first record, so a run refused before its
    first step leaves neither.

    Raises:
        OutputError: ``out_dir`` cannot be written.
    """

    def __init__(
        self, out_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None
    ) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._writer = None
        self._file = None
        self._resume_step = resume_step
        self._opened = False
        self._tensorboard = False
        if not enabled:
            return
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.out_dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise OutputError(
                f"cannot write training logs into {self.out_dir}: {exc.strerror or exc}"
            ) from exc
        try:
            import torch.utils.tensorboard  # noqa: F401

            self._tensorboard = True
        except ImportError:
            logger.info("tensorboard is not installed: metrics go to %s only", self.out_dir / METRICS_FILE)

    def _open(self) -> None:
        """Open ``metrics.jsonl`` and the TensorBoard writer at the first record: a run refused while it is set
        up (bad data, a config error) leaves neither behind."""
        if self._opened:
            return
        self._opened = True
        try:
            if self._resume_step is not None:
                self._drop_after(self._resume_step)
            self._file = open(self.out_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise OutputError(
                f"cannot write training logs into {self.out_dir}: {exc.strerror or exc}"
            ) from exc
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = self._resume_step + 1 if self._resume_step is not None else None
            self._writer = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR), purge_step=purge)

    def _drop_after(self, step: int) -> None:
        path = self.out_dir / METRICS_FILE
        if not path.is_file():
            return
        kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
        fd, tmp = tempfile.mkstemp(prefix=f".{METRICS_FILE}.", suffix=".partial", dir=self.out_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)

    @property
    def tensorboard(self) -> bool:
        """True when TensorBoard event files are written too."""
        return self.enabled and self._tensorboard

    def scalar(self, tag: str, value: float | torch.Tensor, step: int) -> None:
        """Record one value (e.g. ``"loss/train"``) at an optimizer step."""
        if not self.enabled:
            return
        v = float(value.detach().item() if isinstance(value, torch.Tensor) else value)
        record = {
            "step": int(step),
            "tag": tag,
            "value": v if math.isfinite(v) else str(v),
            "time": time.time(),
        }
        self._open()
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            self._writer.add_scalar(tag, v, int(step))

    def scalars(self, values: dict[str, float | torch.Tensor], step: int) -> None:
        """Record several scalars at one step."""
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def image(self, tag: str, array: Any, step: int) -> None:
        """Record an image: ``(H, W)`` or ``(C, H, W)`` (C = 1 or 3), any range (min/max scaled to [0, 1]).

        Images go to TensorBoard only (nothing is written when it is not installed).
        """
        if not self.enabled:
            return
        img = _to_image(array)
        self._open()
        if self._writer is not None:
            self._writer.add_image(tag, img, int(step), dataformats="CHW")

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TrainLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
