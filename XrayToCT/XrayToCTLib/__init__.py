"""Logic of the XrayToCT module that needs no Qt: radiograph nodes, the generation job, stage previews.

The names below are loaded on first use (PEP 562), as in CTDiffusionSRLib: the module file imports this
package's Qt panel (``xray_widget``) when Slicer starts, which must import neither DiffusionCore, nor torch,
nor the packages that are installed only when Apply is first pressed.
"""

from __future__ import annotations

from CTDiffusionSRLib import lazy_exports

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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
