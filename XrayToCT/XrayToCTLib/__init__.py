"""Logic of the XrayToCT module that needs no Qt: radiograph nodes, the generation job, stage previews."""

from .xray_logic import (
    XrayJob,
    XraySettings,
    check_xray_input,
    photometric_note,
    radiograph_from_node,
    write_radiograph,
)

__all__ = [
    "XrayJob",
    "XraySettings",
    "check_xray_input",
    "photometric_note",
    "radiograph_from_node",
    "write_radiograph",
]
