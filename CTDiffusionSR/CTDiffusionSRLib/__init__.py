"""Logic of the CTDiffusionSR module that needs no Qt: MRML <-> DiffusionCore, background jobs, views, training.

Everything here runs on a bare MRML scene (the slicer-core wheel) as well as inside 3D Slicer, which is how
the test suite exercises it.

The names below are loaded on first use (PEP 562): importing a light submodule (``dependencies``,
``weights_choice``, ``slicer_version``) when a module is opened imports neither DiffusionCore, nor torch,
nor the packages that are installed only when Apply is first pressed.

The Qt glue beside them (``widgets``, ``module_widget``, ``sr_widget``: what the module panels are made
of) runs only inside Slicer and is imported by its module path, never through this table.
"""

from __future__ import annotations

import importlib
import sys

#: public name -> submodule that defines it
_EXPORTS = {
    "CLIJob": "jobs",
    "find_cli_script": "jobs",
    "read_return_parameters": "jobs",
    "add_volume_node": "mrml_io",
    "place_beside": "mrml_io",
    "provenance": "mrml_io",
    "set_node_from_volume": "mrml_io",
    "set_provenance": "mrml_io",
    "export_result": "mrml_io",
    "provenance_record": "mrml_io",
    "synthetic_name": "mrml_io",
    "volume_from_node": "mrml_io",
    "JobState": "process",
    "ProcessResult": "process",
    "ProcessRunner": "process",
    "parse_progress_line": "process",
    "python_executable": "process",
    "EvaluationJob": "sr_logic",
    "SRJob": "sr_logic",
    "SRSettings": "sr_logic",
    "check_sr_input": "sr_logic",
    "effective_factor": "sr_logic",
    "table_from_evaluation": "sr_logic",
}

__all__ = sorted(_EXPORTS)


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for a package whose names ``exports`` (name -> submodule) load on first
    use (PEP 562); XrayToCTLib uses it too."""
    namespace = sys.modules[package].__dict__

    def getattr_(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted({*namespace, *exports})

    return getattr_, dir_


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
