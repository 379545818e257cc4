"""Model weights: safetensors only, sha256-checked, found by name in the bundled or the user registry.

See :mod:`DiffusionCore.weights.registry` for the registry format and the checks, and
:mod:`DiffusionCore.weights.header` for reading a file's header without torch. The names below are loaded from the
registry on first use, so that importing :mod:`DiffusionCore.weights.header` (a Slicer panel judging a chosen file)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "METADATA_KEY",
    "ResolvedWeights",
    "WeightsCheck",
    "cache_dir",
    "first_available",
    "import_weights",
    "list_weights",
    "load_safetensors",
    "read_safetensors_header",
    "remove_weights",
    "resolve_weights",
    "save_safetensors",
    "sha256_file",
    "user_registry_path",
    "verify_weights",
]

if TYPE_CHECKING:
    from .registry import (
        METADATA_KEY,
        ResolvedWeights,
        WeightsCheck,
        cache_dir,
        first_available,
        import_weights,
        list_weights,
        load_safetensors,
        read_safetensors_header,
        remove_weights,
        resolve_weights,
        save_safetensors,
        sha256_file,
        user_registry_path,
        verify_weights,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".registry", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
