"""Model weights: safetensors only, sha256-checked, found by name in the bundled or the user registry.

See :mod:`DiffusionCore.weights.registry` for the registry format and the checks.
"""

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
