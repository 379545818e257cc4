"""Logic of the XrayToCT module that needs no Qt: radiograph nodes, the generation job, stage previews.

The names below are loaded on first use (PEP 562), as in CTDiffusionSRLib: the module file imports this
package's Qt panel (``xray_widget``) when Slicer starts, which must import neither DiffusionCore, nor torch,
nor the packages that are installed only when Apply is first pressed.
"""

from __future__ import annotations

import importlib

#: public name -> submodule that defines it
_EXPORTS = {
    "XrayJob": "xray_logic",
    "XraySettings": "xray_logic",
    "check_xray_input": "xray_logic",
    "photometric_note": "xray_logic",
    "radiograph_from_node": "xray_logic",
    "write_radiograph": "xray_logic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
