"""Radiograph to CT: differentiable DRR, radiograph reading, the hybrid-ViT cascade and its pipeline.

* ``XrayToCTGenerator`` (:mod:`DiffusionCore.xray.pipeline`) - a radiograph in, a CT out, with progress and cancel
  (``XrayToCTGenerator.default()`` loads the shipped weights, ``from_pretrained(NAME_OR_FILE)`` others);
* :mod:`DiffusionCore.xray.train` - ``train xray``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["XrayToCTGenerator"]


def __getattr__(name: str) -> Any:
    if name == "XrayToCTGenerator":  # imported when asked for: the subpackage's modules stay light to import
        from .pipeline import XrayToCTGenerator

        return XrayToCTGenerator
    raise AttributeError(name)


def __dir__() -> list[str]:
    """List the lazily imported ``XrayToCTGenerator`` too, so ``dir()`` and tab completion show it."""
    return sorted(set(globals()) | set(__all__))
