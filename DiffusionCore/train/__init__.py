"""Training infrastructure shared by every model family.

* :mod:`.checkpoint` - atomic, resumable checkpoints (safetensors + JSON) and export to inference weights;
* :mod:`.distributed` - the same loop on CPU, one GPU or ``torchrun`` (DDP);
* :mod:`.logger` - ``metrics.jsonl`` (always) and TensorBoard (when installed);
* :mod:`.stop` - clean stop on Ctrl+C, SIGTERM or a STOP file;
* :mod:`.data` - training volumes from folders (NIfTI/NRRD/MHA, DICOM series), list files or lists;
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
from .data import collect_volumes
from .distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    resolve_device,
    shard_list,
    wrap_model,
)
from .logger import TrainLogger, read_metrics
from .stop import StopFlag

__all__ = [
    "AugmentConfig",
    "Augmenter",
    "DistInfo",
    "StopFlag",
    "TrainLogger",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "collect_volumes",
    "export_weights",
    "find_best",
    "find_latest",
    "init_distributed",
    "load_training_state",
    "mark_best",
    "read_checkpoint_info",
    "read_metrics",
    "resolve_device",
    "save_training_state",
    "shard_list",
    "unwrap_model",
    "wrap_model",
]
