"""Logic of the CTDiffusionSR module that needs no Qt: MRML <-> DiffusionCore, background jobs, views, training.

Everything here runs on a bare MRML scene (the slicer-core wheel) as well as inside 3D Slicer, which is how
the test suite exercises it.
"""

from .jobs import CLIJob, find_cli_script, read_return_parameters
from .mrml_io import (
    add_volume_node,
    place_beside,
    provenance,
    set_node_from_volume,
    set_provenance,
    synthetic_name,
    volume_from_node,
)
from .process import JobState, ProcessResult, ProcessRunner, parse_progress_line, python_executable
from .sr_logic import (
    EvaluationJob,
    SRJob,
    SRSettings,
    check_sr_input,
    effective_factor,
    table_from_evaluation,
)

__all__ = [
    "CLIJob",
    "EvaluationJob",
    "JobState",
    "ProcessResult",
    "ProcessRunner",
    "SRJob",
    "SRSettings",
    "add_volume_node",
    "check_sr_input",
    "effective_factor",
    "find_cli_script",
    "parse_progress_line",
    "place_beside",
    "provenance",
    "python_executable",
    "read_return_parameters",
    "set_node_from_volume",
    "set_provenance",
    "synthetic_name",
    "table_from_evaluation",
    "volume_from_node",
]
