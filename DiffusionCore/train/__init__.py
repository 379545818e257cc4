"""Training infrastructure shared by every model family: checkpoints, distributed helpers, logging,
clean stopping, data discovery and 3D augmentation."""

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

__all__ = [
    "export_weights",
    "find_best",
    "find_latest",
    "load_training_state",
    "mark_best",
    "read_checkpoint_info",
    "save_training_state",
    "unwrap_model",
]
