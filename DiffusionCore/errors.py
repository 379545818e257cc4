"""The project's own error types.

Every problem a user can cause or fix (bad input, bad weights, bad config, unwritable output) raises a
subclass of :class:`DiffusionCoreError` with a message that names the problem and says what to do. The
command line turns these into one ``error: ...`` line on stderr and the exit code of the class; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import TypeVar

_E = TypeVar("_E", bound=BaseException)


class DiffusionCoreError(Exception):
    """Base class: a problem the user can act on. ``exit_code`` is what the command line returns."""

    exit_code = 2


class InputError(DiffusionCoreError, ValueError):
    """The input image or volume cannot be used (wrong dimensionality, NaNs, unreadable file, ...)."""


class GeometryError(InputError):
    """The input's geometry does not fit the request (isotropic input, factor out of range, ...)."""


class ConfigError(DiffusionCoreError, ValueError):
    """A configuration file or option is invalid (unknown key, wrong type, out of range)."""


class WeightsError(DiffusionCoreError):
    """Weights are missing, corrupt, of another architecture, or fail their sha256 check."""

    exit_code = 3


class OutputError(DiffusionCoreError, OSError):
    """The output cannot be written (unwritable folder, existing file without overwrite, ...)."""

    exit_code = 4


#: What the command line advises for an output that exists (:class:`OutputExistsError`).
OVERWRITE_ADVICE = "pass --overwrite to replace it, or choose another name"


class OutputExistsError(OutputError):
    """An output exists (a file, or a folder holding a DICOM series) and replacing it was not asked for.

    ``path`` and ``what`` are kept so that a front end with no ``--overwrite`` (the Slicer export dialog) can give its
    own advice (:meth:`advising`) instead of the command line's.
    """

    def __init__(self, path, what: str = "already exists", advice: str = OVERWRITE_ADVICE) -> None:
        self.path, self.what, self.advice = str(path), what, advice
        super().__init__(f"{self.path} {what}; {advice}.")

    def advising(self, advice: str) -> OutputExistsError:
        """The same refusal with another front end's advice."""
        return OutputExistsError(self.path, self.what, advice)


class NumericalError(DiffusionCoreError):
    """A result failed its final check (NaN/Inf voxels, a constant volume, values far outside CT's range):
    the computation broke down although the inputs, options and weights passed their checks. Nothing is
    written; exit code 1, as for any other internal failure."""

    exit_code = 1


class ResourceError(DiffusionCoreError):
    """The job does not fit the machine (memory estimate over the limit even with the smallest tiles)."""

    exit_code = 5


class PartialBatchError(DiffusionCoreError):
    """A batch (``sr FOLDER OUT``) ended with some volumes failed and the others written: the closing lines and the
    ``--report`` name each failed volume and why. Exit code 7, apart from 2 (bad input or options: nothing was done),
    so that a script can tell a batch to look into from one to fix and run again."""

    exit_code = 7


class DataUnavailableError(DiffusionCoreError):
    """Sample data could not be fetched (offline, checksum mismatch, registry error)."""

    exit_code = 6


class Cancelled(DiffusionCoreError):
    """The user cancelled the job; nothing partial was written."""

    exit_code = 130


def not_for_this_tool(exc: _E) -> _E:
    """``exc``, marked as saying that its input is not for the command rather than broken (an isotropic volume, a 2D
    image, a single slice, a colour or 4D image, intensities that are not CT): a batch passes such an input over
    instead of counting it failed (``DiffusionCore.cli.batch``)."""
    exc.not_for_this_tool = True  # type: ignore[attr-defined]
    return exc
