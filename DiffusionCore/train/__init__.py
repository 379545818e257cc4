"""Training infrastructure shared by every model family.

* :mod:`.checkpoint` - atomic, resumable checkpoints (safetensors + JSON) and export to inference weights;
* :mod:`.distributed` - the same loop on CPU, one GPU or ``torchrun`` (DDP); the device and the process's
  place in a launch are :mod:`DiffusionCore.devices`, the training volumes :mod:`DiffusionCore.inputs`;
* :mod:`.logger` - ``metrics.jsonl`` (always) and TensorBoard (when installed);
* :mod:`.stop` - clean stop on Ctrl+C, SIGTERM or a STOP file;
* :mod:`.starting_weights` - ``--init-from`` refuses weights of another model, naming what they hold;
* :mod:`.augment` - reproducible 3D augmentation (crop, flip, rotation/zoom, elastic, HU jitter).
"""

from .augment import AugmentConfig, Augmenter
from .checkpoint import (
    export_weights,
    find_best,
    find_latest,
    load_training_state,
    mark_best,
    read_checkpoint_info,
    save_training_state,
    unwrap_model,
)
from .distributed import (
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    wrap_model,
)
from .logger import TrainLogger, read_metrics
from .stop import StopFlag

__all__ = [
    "AugmentConfig",
    "Augmenter",
    "StopFlag",
    "TrainLogger",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "export_weights",
    "find_best",
    "find_latest",
    "init_distributed",
    "load_training_state",
    "mark_best",
    "read_checkpoint_info",
    "read_metrics",
    "save_training_state",
    "unwrap_model",
    "wrap_model",
]
