"""Pieces every command shares: progress reporting, device choice, logging, option types, and the final
check of every volume a command writes."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from ..seeds import MAX_SEED

if TYPE_CHECKING:
    from ..volume import Volume

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.levelname_lower = record.levelname.lower()
        return super().format(record)


class _AboveTheBarHandler(logging.StreamHandler):
    """Writes each message above the terminal's progress bar (``tqdm.write``: the bar is cleared, the line
    written, the bar drawn again), so that a message never lands on the end of the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    handler = _AboveTheBarHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter("%(levelname_lower)s: %(message)s"))
    root = logging.getLogger("DiffusionCore")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    # pydicom warns, with its own source path, each time it reads a header value the standard does not allow (a
    # PatientAge of "59Y"): such values are the input's, copied as they are into a DICOM output, and the warning gives
    # the user nothing to act on
    warnings.filterwarnings("ignore", message=r"Invalid value for VR", category=UserWarning)


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        choices=("bar", "slicer", "none"),
        default="bar",
        help="progress display: a terminal bar (default), <filter-progress> lines for 3D Slicer, or none",
    )


class Progress:
    """A ``progress(done, total, message)`` callback drawn as a tqdm bar or as Slicer progress lines.

    Slicer's CLI protocol: ``<filter-progress>F</filter-progress>`` with F in [0, 1], and
    ``<filter-comment>text</filter-comment>``, each on its own line of stdout, flushed.
    """

    #: Seconds between two drawings of the bar when stderr is no terminal (a log file): each drawing is a line there,
    #: and a batch of 400 radiographs wrote 1.4 MB of them. On a terminal it is redrawn at every call.
    FILE_INTERVAL = 5.0

    def __init__(self, style: str = "bar", desc: str = ""):
        self.style = style
        self.desc = desc
        self._bar: tqdm | None = None
        self._lock = threading.Lock()
        self._drawn = -float("inf")
        try:
            self._interval = 0.0 if sys.stderr.isatty() else self.FILE_INTERVAL
        except (AttributeError, ValueError):  # a closed or replaced stderr
            self._interval = self.FILE_INTERVAL

    def __call__(self, done: int, total: int, message: str = "") -> None:
        with self._lock:
            if self.style == "slicer":
                frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
                if message:
                    print(f"<filter-comment>{message}</filter-comment>", flush=True)
                print(f"<filter-progress>{frac:.4f}</filter-progress>", flush=True)
            elif self.style == "bar":
                if self._bar is None or self._bar.total != total:
                    if self._bar is not None:
                        self._bar.close()
                    self._bar = tqdm(
                        total=total, desc=self.desc, file=sys.stderr, leave=False, dynamic_ncols=True
                    )
                self._bar.n = done
                if message:
                    self._bar.set_postfix_str(message, refresh=False)
                now = time.monotonic()
                if now - self._drawn >= self._interval or done >= total:
                    self._bar.refresh()
                    self._drawn = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


#: How torch's CPU side says an allocation failed, in lower case: its own allocator, and oneDNN (the convolutions),
#: which reports a buffer it could not allocate as a primitive it "could not create" (seen under ``ulimit -v``). Its
#: "could not create a primitive descriptor" is another matter (a shape or type it does not support): a bug.
_OUT_OF_MEMORY_TEXT = re.compile(r"can't allocate memory|out of memory|could not create a primitive(?! descriptor)")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's allocation failures: ``torch.OutOfMemoryError`` (CUDA) and the CPU's ``RuntimeError`` (see
    :data:`_OUT_OF_MEMORY_TEXT`); recognised without importing torch."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and _OUT_OF_MEMORY_TEXT.search(str(exc).lower()) is not None


#: The most bytes one name in a path, and a whole path, may have on Linux file systems (NAME_MAX, PATH_MAX).
NAME_MAX_BYTES, PATH_MAX_BYTES = 255, 4096


def environment_problem(exc: BaseException) -> tuple[str, int] | None:
    """The message and exit code for an error of the machine's set-up rather than of the program, which no
    DiffusionCore error type carries (it can come from any library, e.g. torch asking for a temporary folder):

    - no writable temporary folder at all (``tempfile``'s FileNotFoundError "No usable temporary directory"):
      exit 4, as for an output that cannot be written;
    - a path with a name over 255 bytes, or over 4096 bytes in all (ENAMETOOLONG, which ``Path.exists()`` raises
      from Python 3.11 on), or over Windows' 259 characters (``winerror`` 206): exit 2, as for an input or option
      the user can correct.

    None for any other exception.
    """
    import errno

    if isinstance(exc, FileNotFoundError) and "no usable temporary directory" in str(exc).lower():
        tried = str(exc.strerror or exc).partition(" found in ")[2].strip("[] ").replace("'", "") or "none"
        return (f"no writable temporary folder (tried {tried}): set TMPDIR to a folder you can write", 4)
    if isinstance(exc, OSError) and getattr(exc, "winerror", None) == 206:  # Windows: ERROR_FILENAME_EXCED_RANGE
        path = os.fsdecode(exc.filename) if exc.filename is not None else ""
        what = f"the path {path} ({len(path)} characters)" if path else "a path"
        return (f"{what} is too long for Windows: a path there may have at most 259 characters unless long paths are "
                "turned on (the system setting LongPathsEnabled): use a shorter name or folder", 2)  # fmt: skip
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        path = os.fsdecode(exc.filename) if exc.filename is not None else ""
        longest = max((len(os.fsencode(part)) for part in path.split(os.sep)), default=0)
        what = (f"the path {path} ({len(os.fsencode(path))} bytes; its longest name has {longest})" if path
                else "a path")  # fmt: skip
        return (f"{what} is too long for the file system: a name there may have at most {NAME_MAX_BYTES} bytes; "
                f"a path at most {PATH_MAX_BYTES}: use a shorter name or folder", 2)  # fmt: skip
    return None


def one_line(text: str, limit: int | None = None) -> str:
    """A message as one line: its lines joined by "; " (an error is one line on stderr, whatever raised it), cut
    to ``limit`` characters when given."""
    text = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return text if limit is None or len(text) <= limit else text[: limit - 3].rstrip() + "..."


#: What the internal-error line of ``python -m DiffusionCore`` advises: it has --debug.
DEBUG_BUG_HINT = "Run again with --debug for the traceback and report it."
#: What the internal-error line of the Slicer scripted CLI modules advises: they have no --debug, and Slicer shows
#: their output in the module's panel and in its Error Log (View > Error Log).
SLICER_BUG_HINT = ("Please report it with this line and the output above it (in 3D Slicer: the module's message and "
                   "View > Error Log).")


#: CUDA errors of the machine's set-up (a GPU this PyTorch build has no kernels for, a driver too old, no usable
#: device), in lower case; others, such as a device-side assert or an illegal memory access, are bugs to report.
_GPU_SETUP_ERROR = re.compile(r"cuda error: (no kernel image|.*(not supported|unsupported)|.*driver|no cuda-capable)")


def out_of_memory_message(exc: BaseException | None, memory_hint: str) -> str:
    """The ``error:`` line of an allocation failure ``exc`` (None: Python's MemoryError, the host's memory). On a GPU
    (torch's ``OutOfMemoryError``, or a message naming CUDA) it also offers the CPU, whose memory is usually larger."""
    on_gpu = exc is not None and (type(exc).__name__ == "OutOfMemoryError" or "cuda" in str(exc).lower())
    if on_gpu:
        return (f"error: out of memory on the GPU: {memory_hint}, run on the CPU (--device cpu: slower, with the "
                "machine's memory), or use a GPU with more memory.")  # fmt: skip
    return f"error: out of memory: {memory_hint}, or use a machine with more memory."


def run_guarded(
    fn: Callable[[], int | None],
    *,
    debug: bool = False,
    memory_hint: str = "use smaller patches",
    install_hint: str | None = None,
    bug_hint: str = DEBUG_BUG_HINT,
) -> int:
    """Run a command body with the project's error convention.

    Errors of the project's types print one ``error: ...`` line on stderr and return their exit code;
    an interrupt returns 130, out of memory 5, a package DiffusionCore needs that is not installed 1 with
    ``install_hint`` (default: :data:`.missing.PIP_INSTALL_HINT`), and any other exception (a bug) 1 with
    ``bug_hint``, the front end's way to report it (default :data:`DEBUG_BUG_HINT`; the Slicer CLIs, which have no
    --debug, give :data:`SLICER_BUG_HINT`). ``debug`` re-raises instead, for the traceback. Used by
    ``python -m DiffusionCore`` and by the Slicer scripted CLI modules alike.
    """
    from ..errors import DiffusionCoreError
    from .missing import PIP_INSTALL_HINT, missing_package_message

    try:
        return int(fn() or 0)
    except DiffusionCoreError as exc:
        if debug:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; no partial output was kept.", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print(out_of_memory_message(None, memory_hint), file=sys.stderr)
        return 5
    except ModuleNotFoundError as exc:  # imported where it is first used: torch, safetensors, nibabel, ...
        if debug:
            raise
        print(f"error: {missing_package_message(exc, install_hint or PIP_INSTALL_HINT)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: say so plainly, keep the traceback behind --debug
        if debug:
            raise
        if is_out_of_memory(exc):
            print(out_of_memory_message(exc, memory_hint), file=sys.stderr)
            return 5
        if isinstance(exc, RuntimeError) and _GPU_SETUP_ERROR.search(str(exc).lower()):
            print(f"error: the GPU failed ({one_line(str(exc), 300)}). Run again on the CPU (--device cpu), or update "
                  "the GPU driver or install a PyTorch build made for this GPU.", file=sys.stderr)  # fmt: skip
            return 5
        environment = environment_problem(exc)
        if environment is not None:
            print(f"error: {one_line(environment[0])}", file=sys.stderr)
            return environment[1]
        print(
            f"error: internal error ({type(exc).__name__}: {one_line(str(exc), 300)}). {bug_hint}",
            file=sys.stderr,
        )
        return 1


def write_return_parameters(path: str, values: dict) -> None:
    """Slicer's return-parameter file (``--returnparameterfile``): one ``name = value`` line per output."""
    if not path:
        return
    with open(path, "w", encoding="utf-8") as f:
        for key, value in values.items():
            f.write(f"{key} = {value}\n")


#: The environment variable through which an application that starts a command as its job (the Slicer modules) names
#: its own process: the command stops, as on SIGTERM, once that process has ended (:func:`sigterm_cancels`).
PARENT_PID_VARIABLE = "DIFFUSIONCORE_PARENT_PID"
#: How often (seconds) a command started as a job checks that the application that started it still runs.
PARENT_CHECK_SECONDS = 1.0


def _watch_parent(stop: threading.Event, ended: list[int]) -> None:
    """Until ``stop``: when the process named by :data:`PARENT_PID_VARIABLE` has ended (Slicer killed or crashed),
    record it in ``ended`` and deliver SIGTERM to the main thread, which stops the command as a cancel does."""
    import _thread

    from ..files import pid_running

    text = os.environ.get(PARENT_PID_VARIABLE, "")
    if not text.isdigit() or not pid_running(int(text)):  # not a job, or its application is already gone
        return
    while not stop.wait(PARENT_CHECK_SECONDS):
        if not pid_running(int(text)):
            ended.append(int(text))
            if hasattr(signal, "pthread_kill"):  # a real signal: it also ends a wait the main thread is blocked in
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            else:  # Windows
                _thread.interrupt_main(signal.SIGTERM)
            return


@contextmanager
def sigterm_cancels(cancel: threading.Event | None = None, what: str = "the run",
                    outcome: str = "; no output was written.") -> Iterator[None]:
    """While active, SIGTERM (Slicer's Cancel button, ``kill``) sets ``cancel`` and raises Cancelled (exit
    130) with the message ``"{what} was stopped by signal SIGTERM{outcome}"``.

    A command started as an application's job (:data:`PARENT_PID_VARIABLE` set) stops the same way when that
    application's process ends: a Slicer that was killed or crashed leaves no command computing on for minutes or
    hours, a training run included (it saves what SIGTERM saves).

    Outputs are written atomically after the work, so a terminated command leaves no output file. Only
    the main thread can install signal handlers; elsewhere this does nothing.
    """
    from ..errors import Cancelled

    ended: list[int] = []

    def on_signal(signum, frame):
        if cancel is not None:
            cancel.set()
        if ended:
            raise Cancelled(f"{what} was stopped: the application that started it (process {ended[0]}) has "
                            f"ended{outcome}")  # fmt: skip
        raise Cancelled(f"{what} was stopped by signal {signal.Signals(signum).name}{outcome}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, on_signal)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_parent, args=(stop, ended), name="parent-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, old)


# -- option types: every number is checked when the command line is parsed, before any work ---------
def _range_text(low: float | None, high: float | None, low_open: bool) -> str:
    def num(v: float) -> str:  # an int as it is written (4294967295, not 4.29497e+09)
        return str(v) if isinstance(v, int) else f"{v:g}"

    if low is not None and high is not None:
        return f"above {num(low)} and at most {num(high)}" if low_open else f"from {num(low)} to {num(high)}"
    if low is not None:
        return f"{'>' if low_open else '>='} {num(low)}"
    return f"<= {num(high)}" if high is not None else ""


def finite_float(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` for a float option: NaN, infinities and values outside ``[low, high]`` (``low``
    excluded when ``low_open``) are refused when the command line is parsed, with
    ``error: argument --NAME: must be a finite number >= 0; got nan`` and exit code 2.

    ``float()`` accepts ``nan``, ``inf`` and ``1e999``; a NaN option would flow into the model and come out
    as an all-NaN volume, so no float option of the commands uses plain ``type=float``.
    """
    rule = " ".join(("a finite number", _range_text(low, high, low_open))).strip()

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}; got {text!r}") from None
        below = low is not None and (value < low or (low_open and value == low))
        if not math.isfinite(value) or below or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {rule}; got {text}")
        return value

    parse.__name__ = "finite number"
    return parse


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for an integer option in ``[low, high]``, checked when the command line is parsed
    (``error: argument --steps: must be an integer >= 1; got 0``, exit code 2)."""
    rule = f"an integer {_range_text(low, high, False)}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}; got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {rule}; got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def series_number_type(text: str) -> int:
    """The argparse ``type`` of ``--series-number``: a whole number from 1 to
    :data:`~DiffusionCore.dicom_out.SERIES_NUMBER_MAX` (DICOM's IS range), else exit 2 saying so."""
    from ..dicom_out import SERIES_NUMBER_MAX

    try:
        return bounded_int(1, SERIES_NUMBER_MAX)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {SERIES_NUMBER_MAX}, the range of a DICOM "
                                         f"SeriesNumber; got {text!r}") from None  # fmt: skip


#: The help of --series-number (sr and xray2ct).
SERIES_NUMBER_HELP = ("SeriesNumber of a DICOM output series, 1 to 2147483647 (default: the input's plus 1000, or the "
                      "next number no series of the study in the input folder, in the folders beside OUTPUT or "
                      "written before by this run has); in a batch every series gets it")


# -- the patient of a DICOM series: taken from a DICOM input, named for any other ------------------------------------
#: The most characters a PatientID (LO) and a PatientName (PN) hold in DICOM.
PATIENT_TEXT_MAX = 64
#: Components of a PatientName: Family^Given^Middle^Prefix^Suffix.
PATIENT_NAME_COMPONENTS = 5


def _patient_text_problem(text: str) -> str:
    """What makes ``text`` no value of a DICOM PatientID or PatientName, in words ("" when nothing does)."""
    import unicodedata

    if not text.strip():
        return "is empty"
    if len(text) > PATIENT_TEXT_MAX:
        return f"has {len(text)} characters, and DICOM holds at most {PATIENT_TEXT_MAX}"
    if "\\" in text:
        return "holds a backslash, which DICOM reads as the end of one value and the start of another"
    control = next((c for c in text if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"holds the control character {control!r}, which a DICOM text value may not"
    return ""


def patient_value_problem(text: str, *, name: bool = False) -> str:
    """What makes ``text`` no DICOM PatientID (``name`` False: at most 64 characters, no backslash or control
    character, not empty) or PatientName (``name`` True: also in its form ``Family^Given``, at most five
    ``^``-separated parts: family, given, middle, prefix, suffix), with what to give instead; ``""`` when nothing
    does. What ``--patient-id`` / ``--patient-name`` and the Slicer export's patient prompt say."""
    problem = _patient_text_problem(text)
    if not name:
        return f"{problem}; give the patient's ID as the PACS knows it; got {text!r}" if problem else ""
    parts = max((len(group.split("^")) for group in text.split("=")), default=1)
    if not problem and parts > PATIENT_NAME_COMPONENTS:
        problem = (f"has {parts} parts separated by ^, and a DICOM name has at most {PATIENT_NAME_COMPONENTS} "
                   "(Family^Given^Middle^Prefix^Suffix)")  # fmt: skip
    return f"{problem}; give the name in DICOM's form Family^Given (e.g. Doe^Jane); got {text!r}" if problem else ""


def patient_id_type(text: str) -> str:
    """The argparse ``type`` of ``--patient-id`` (:func:`patient_value_problem`): exit 2 saying what is wrong."""
    problem = patient_value_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text.strip()


def patient_name_type(text: str) -> str:
    """The argparse ``type`` of ``--patient-name`` (:func:`patient_value_problem`): exit 2 saying what is wrong."""
    problem = patient_value_problem(text, name=True)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text.strip()


patient_id_type.__name__ = "patient ID"
patient_name_type.__name__ = "patient name"


def add_patient_arguments(parser: argparse.ArgumentParser, inputs: str) -> None:
    """``--patient-id`` and ``--patient-name`` (``sr``, ``xray2ct``): the patient of a DICOM output series made from an
    input that holds none (``inputs``: which, in the command's words)."""
    parser.add_argument(
        "--patient-id", type=patient_id_type, default=None, metavar="ID",
        help=f"the PatientID of a DICOM output series made from {inputs}, which holds no patient: without it such a "
        "series is refused (a PACS would file it under an unknown patient). The series forms a new study of its own. "
        "Refused with a DICOM input, whose own patient and study the series joins, and without a DICOM output; at "
        f"most {PATIENT_TEXT_MAX} characters, no backslash. In a batch every series gets it",
    )  # fmt: skip
    parser.add_argument(
        "--patient-name", type=patient_name_type, default=None, metavar="NAME",
        help="the PatientName of that series, in DICOM's form Family^Given (e.g. Doe^Jane); with --patient-id",
    )  # fmt: skip


#: What a non-DICOM input is, by its file name's suffix, for the refusal of a DICOM output made from it.
_INPUT_KINDS = ((".nii.gz", "a NIfTI file"), (".nii", "a NIfTI file"), (".nrrd", "an NRRD file"),
                (".nhdr", "an NRRD file"), (".mha", "a MetaImage file"), (".mhd", "a MetaImage file"),
                (".png", "a PNG image"), (".jpg", "a JPEG image"), (".jpeg", "a JPEG image"), (".tif", "a TIFF image"),
                (".tiff", "a TIFF image"), (".bmp", "a BMP image"))  # fmt: skip


def input_kind(path: Path) -> str:
    """What an input that is no DICOM is, in words (``"a NIfTI file"``), by its name's suffix."""
    name = path.name.lower()
    kind = next((kind for suffix, kind in _INPUT_KINDS if name.endswith(suffix)), None)
    return kind or ("a folder that holds no DICOM file" if path.is_dir() else "a file that is no DICOM")


def _names(paths: list[Path], limit: int = 3) -> str:
    """Up to ``limit`` paths, each with what it is, and how many more."""
    shown = ", ".join(f"{p} ({input_kind(p).split(' ', 1)[1]})" for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_dicom_patient(jobs: list, args: argparse.Namespace, *, what: str = "series", noun: str = "volume") -> None:
    """Before any work: refuse a DICOM output series made from an input that holds no patient or study (NIfTI, NRRD,
    MetaImage, PNG, JPEG), unless ``--patient-id`` names its patient: such a series had an empty PatientID and
    PatientName in a study of its own, which a PACS files under an unknown patient or quarantines. ``--patient-id``
    and ``--patient-name`` are refused with a DICOM input (the series joins that input's patient and study; another
    patient named here would mis-file it) and without a DICOM output. In a batch every input is checked, and one that
    fails the rule refuses the whole run, naming them (nothing is done: the batch would otherwise stop, or leave
    inputs undone, hours later for what is known now). ``jobs``: the run's :class:`~.batch.Job` list; ``what``: what
    a DICOM input is (``"series"``, ``"radiograph"``); ``noun``: what the batch's inputs are.

    Raises:
        ConfigError: exit 2, naming the inputs and the options that resolve it.
    """
    from ..errors import ConfigError
    from ..results import is_dicom_input

    patient_id, patient_name = getattr(args, "patient_id", None), getattr(args, "patient_name", None)
    named = patient_id is not None or patient_name is not None
    if patient_name is not None and patient_id is None:
        raise ConfigError("--patient-name needs --patient-id: a PACS files a series by its PatientID, and one without "
                          "it goes under an unknown patient; give --patient-id ID too")  # fmt: skip
    dicom_jobs = [job for job in jobs if job.as_dicom]
    if named and not dicom_jobs:
        output = jobs[0].output if len(jobs) == 1 else Path(args.output)
        written = "a volume file" if len(jobs) == 1 else "volume files"
        raise ConfigError(f"--patient-id and --patient-name name the patient of a DICOM series, and this run writes "
                          f"{output} as {written}, which hold no patient: give --output-format dicom (and a folder as "
                          "OUTPUT) to write a DICOM series, or leave them out")  # fmt: skip
    dicom, other = [], []
    for job in dicom_jobs:
        (dicom if is_dicom_input(job.source) else other).append(job.source)
    batch = len(jobs) > 1
    if named and dicom:
        if not batch:
            raise ConfigError(
                f"--patient-id and --patient-name are for an input that holds no patient (NIfTI, NRRD, MetaImage, "
                f"PNG, JPEG), and {dicom[0]} is DICOM: the series is written in the input's own patient and study, and "
                "another patient named here would file it under the wrong one. Leave them out (to change a series' "
                "patient, correct the input's own headers)"
            )  # fmt: skip
        raise ConfigError(
            f"--patient-id and --patient-name are for inputs that hold no patient (NIfTI, NRRD, MetaImage, PNG, JPEG), "
            f"and {len(dicom)} of the {len(jobs)} {noun}s of this batch are DICOM ({', '.join(map(str, dicom[:3]))}"
            f"{f' and {len(dicom) - 3} more' if len(dicom) > 3 else ''}): each of their series is written in its "
            "input's own patient and study, and another patient named here would file it under the wrong one. Nothing "
            "was done. Leave the options out, or run the DICOM inputs and the others as separate batches"
        )  # fmt: skip
    if other and not named:
        also = ("give the DICOM " + what + " itself as INPUT (the result then joins its patient and study), "
                "write NIfTI/NRRD instead (OUTPUT ending .nii.gz / .nrrd, without --output-format dicom), or name "
                "the patient: --patient-id ID --patient-name NAME")  # fmt: skip
        if not batch:
            raise ConfigError(
                f"{other[0]} is {input_kind(other[0])}: it holds no patient or study, so a DICOM series written from "
                "it would have no patient name or ID and a study of its own, which a PACS files under an unknown "
                f"patient. {also[0].upper()}{also[1:]}"
            )  # fmt: skip
        advice = ("run them as a batch of their own with --patient-id ID --patient-name NAME if they are one "
                  "patient's" if dicom else "name their patient, if they are one patient's: --patient-id ID "
                  "--patient-name NAME")  # fmt: skip
        raise ConfigError(
            f"{len(other)} of the {len(jobs)} {noun}s of this batch are not DICOM: {_names(other)}. They hold no "
            "patient or study, so the DICOM series written from them would have no patient name or ID and studies of "
            "their own, which a PACS files under an unknown patient. Nothing was done. Give DICOM "
            f"{what if what.endswith('s') else what + 's'} only (move the others out of INPUT), write NIfTI files "
            f"instead (without --output-format dicom), or {advice}"
        )  # fmt: skip
    if named and other:
        name = f", name {patient_name!r}" if patient_name else ", no name"
        if not batch:
            logger.info("the DICOM series from %s is filed under patient ID %r%s, in a new study of its own (%s "
                        "holds no study)", other[0], patient_id, name, input_kind(other[0]))  # fmt: skip
        else:
            logger.warning("all %d DICOM series of this batch are filed under the one patient ID %r%s, each in a new "
                           "study of its own: give --patient-id only to a batch of one patient's %ss", len(other),
                           patient_id, name, noun)  # fmt: skip


def warn_taken_series_number(jobs: list, number: int | None) -> None:
    """Before any work: warn when ``--series-number`` (``number``) is the SeriesNumber of another series of a DICOM
    output's study known here (one in the input folder, one in the folders beside the output, or one this run gives
    the number to before: two inputs of one study in a batch), as the writer
    (:func:`~DiffusionCore.dicom_out.derived_series_number`) finds it, which writes the number as asked and said so
    only once the work was done. ``jobs``: the run's :class:`~.batch.Job` list (those to skip left out)."""
    if number is None:
        return
    from ..dicom_out import DicomSource, sibling_series_numbers
    from ..errors import DiffusionCoreError
    from ..results import is_dicom_input

    first: dict[str, Path] = {}  # study -> the output this run gives the number first
    for job in jobs:
        if not job.as_dicom or job.skip is not None or not is_dicom_input(job.source):
            continue
        try:
            source = DicomSource.from_path(job.source)
        except (DiffusionCoreError, OSError):  # the run says what is wrong with this input
            continue
        study = str(source.header.get("StudyInstanceUID", ""))
        if not study:
            continue
        where = []
        if number in source.study_series_numbers:
            where.append(f"in {job.source}")
        elif number in sibling_series_numbers(job.output, study):  # (the input folder may lie beside OUTPUT too)
            where.append(f"in a folder beside {job.output}")
        if study in first:
            where.append(f"{first[study]}, written before it in this run")
        first.setdefault(study, job.output)
        if where:
            logger.warning("series number %d is taken by another series of the study of %s known here (%s); it will "
                           "be written as asked (--series-number), and a PACS then lists two series %d in that study: "
                           "give another --series-number to keep them apart", number, job.source, "; ".join(where),
                           number)  # fmt: skip


#: The help of --threads (sr and xray2ct; evaluate says it of its figures).
THREADS_HELP = ("CPU threads of torch (default 0: torch's default, from OMP_NUM_THREADS or the cores); the output "
                "depends on it: the same seed, device and thread count give the same output; recorded in the "
                "provenance (torch_threads)")


def seed_number(text: str) -> int:
    """The argparse ``type`` of --seed: a whole number from 0 to :data:`MAX_SEED`, else exit 2 with
    ``error: argument --seed: must be a whole number from 0 to 4294967295 ...``."""
    try:
        return bounded_int(0, MAX_SEED)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 0 to {MAX_SEED} (2**32 - 1: a larger seed would repeat a smaller one's "
            f"output); got {text!r}"
        ) from None


seed_number.__name__ = "seed"


def set_torch_threads(threads: int) -> None:
    """--threads of a command, applied before any work: torch's CPU threads (0: torch's default, left as it is)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def name_list(choices: tuple[str, ...] | None = None) -> Callable[[str], tuple[str, ...]]:
    """An argparse ``type`` for a comma-separated list of names (``--methods cubic,sr``), checked when the command
    line is parsed (exit code 2): at least one name, no empty entry (``a,,b``, a trailing comma), no name twice,
    and each one of ``choices`` when given."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(","))
        if not any(names):
            raise argparse.ArgumentTypeError(f"must name at least one, comma-separated; got {text!r}")
        if not all(names):
            raise argparse.ArgumentTypeError(f"has an empty entry (two commas, or one at an end): {text!r}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"names {', '.join(twice)} more than once: {text!r}")
        unknown = [n for n in names if choices is not None and n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}: choose from {', '.join(choices or ())}")
        return names

    parse.__name__ = "list"
    return parse


class NameList(argparse.Action):
    """An option that takes names comma-separated, space-separated or both (``--methods cubic,sr`` or
    ``--methods cubic sr``), checked as one list by :func:`name_list` when the command line is parsed."""

    def __init__(self, option_strings, dest, names: tuple[str, ...] | None = None, **kwargs) -> None:
        kwargs.setdefault("nargs", "+")
        kwargs.setdefault("metavar", "NAME")
        super().__init__(option_strings, dest, **kwargs)
        self._parse = name_list(names)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            setattr(namespace, self.dest, self._parse(",".join(values)))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument {option_string}: {exc}")


# -- the final check of every result before it is written ---------------------------------------------
#: Range (HU) outside which a result voxel is not tissue but a numerical failure: below the padding values
#: scanners use (-2048 HU; air is -1000) or above what an int16 CT file can hold (32767 HU). A result of an input
#: whose own values reach further (an extended-HU scale: metal up to ~31,000 HU) gets :func:`result_range`'s bounds.
RESULT_HU_RANGE = (-2048.0, 32767.0)
#: How far beyond its input's own values (a fraction of their span, max - min) a super-resolved result may reach
#: before it counts as a numerical failure: cubic interpolation and the through-plane predictor overshoot next to
#: dense metal. Measured on an extended-HU series (metal 28,000-31,000 HU in 5 mm slices, -1024..30,970 HU, x2):
#: the result reached 36,361 HU, 0.17 of the span above the input's maximum (the cubic B-spline alone 34,307 HU, 0.10);
#: 0.5 leaves three times that, and a blow-up (values of 1e5 HU and more) still fails.
RESULT_OVERSHOOT_MARGIN = 0.5


class ResultRange(tuple):
    """``(low, high)`` HU that :func:`check_result` accepts (a plain 2-tuple wherever a range is taken), with what
    its message says beyond the numbers: ``basis``, where the bounds come from (the input's own values), and
    ``advice``, the likely causes of a result beyond them and the options that test each."""

    basis: str
    advice: str

    def __new__(cls, low: float, high: float, basis: str = "", advice: str = "") -> ResultRange:
        self = super().__new__(cls, (float(low), float(high)))
        self.basis, self.advice = basis, advice
        return self


#: What a super-resolved result out of :func:`result_range` says to do: the likely causes, each with the option that
#: tests it (an overshoot that large is none of the interpolation's, so it is not the input's values).
SR_OUT_OF_RANGE_ADVICE = (
    "Likely causes: weights that do not fit this input (a file of one's own trained on other units or intensities: "
    "run again without --weights, with the default weights) or a numerical fault of the device (run again with "
    "--device cpu); an input that is not CT in HU needs --allow-non-ct, which also accepts values below -2048. If the "
    "default weights on the CPU give the same, report it"
)


def result_range(source: Volume | None = None, allow_non_ct: bool = False) -> tuple[float, float]:
    """The range :func:`check_result` accepts for a super-resolved ``source``: :data:`RESULT_HU_RANGE`, its top
    raised to the input's own maximum plus :data:`RESULT_OVERSHOOT_MARGIN` of the input's span (max - min): an
    extended-HU series whose metal reaches 31,000 HU gives a result up to about 36,000 HU, which is overshoot, not a
    numerical failure; an ordinary CT's top stays 32,767 HU. The bottom is widened the same way below the input's
    minimum when that lies below -2048 HU (values that low inside the image, e.g. a metal artefact's streaks at the
    scanner's floor, are kept as read) or with ``allow_non_ct`` (``--allow-non-ct``: an MR volume of values up to
    35,000 gives a result up to about that). The range (a :class:`ResultRange`) carries the words its refusal says: where the bounds come from, the
    likely causes and the options that test them (:data:`SR_OUT_OF_RANGE_ADVICE`)."""
    if source is None:
        return RESULT_HU_RANGE
    import numpy as np

    lo, hi = float(np.nanmin(source.array)), float(np.nanmax(source.array))
    margin = RESULT_OVERSHOOT_MARGIN * (hi - lo)
    # the bottom follows the input too: values below -2048 HU inside the image (a metal artefact's streaks at the
    # scanner's floor, kept as read since only padding reaching the image's edge becomes air) are the input's own
    low = min(RESULT_HU_RANGE[0], lo - margin) if (allow_non_ct or lo < RESULT_HU_RANGE[0]) else RESULT_HU_RANGE[0]
    high = max(RESULT_HU_RANGE[1], hi + margin)
    if (low, high) == RESULT_HU_RANGE:
        basis = f"the input holds {lo:.6g}..{hi:.6g} HU"
    else:
        basis = (f"the input's own {lo:.6g}..{hi:.6g} HU widened by {RESULT_OVERSHOOT_MARGIN:g} of that span, more "
                 "than cubic interpolation or the predictor overshoot next to dense metal")  # fmt: skip
    return ResultRange(low, high, basis, SR_OUT_OF_RANGE_ADVICE)


def check_result(
    vol: Volume, what: str, *, hu_range: tuple[float, float] = RESULT_HU_RANGE, allow_constant: bool = False
) -> None:
    """Refuse a result that cannot be a CT: NaN or infinite voxels, values outside ``hu_range``, or one value
    everywhere (unless ``allow_constant``). Run on the float32 HU array, before any integer cast (which would
    turn NaN into 0 HU and hide the failure).

    Args:
        vol: the result, HU.
        what: what it is, for the message (e.g. ``"the sr result for ct.nii.gz"``).
        hu_range: the plausible range; e.g. ``(0, 32767)`` for a standard-deviation map; :func:`result_range` for a
            super-resolved CT (bounds that follow the input's values; the message then says so, and what to try).
        allow_constant: accept a constant volume (a standard deviation of 0 everywhere is an answer).

    Raises:
        NumericalError: the result failed; the message says how. Exit code 1.
    """

    from ..errors import NumericalError
    from ..volume import require_finite_voxels

    arr = vol.array
    debug = "(on the command line, --debug shows the traceback)"
    tail = f"; nothing was written. Check the weights and options; if they are right, report it {debug}."
    require_finite_voxels(arr, what, tail)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < hu_range[0] or hi > hu_range[1]:
        basis, advice = getattr(hu_range, "basis", ""), getattr(hu_range, "advice", "")
        where = f" ({basis})" if basis else ""
        end = f"; nothing was written. {advice} {debug}." if advice else tail
        raise NumericalError(f"{what} holds values from {lo:.6g} to {hi:.6g} HU, far outside the plausible "
                             f"{hu_range[0]:g}..{hu_range[1]:g} HU{where}: the computation failed numerically{end}")  # fmt: skip
    if lo == hi and not allow_constant:
        raise NumericalError(f"{what} is constant ({lo:g} HU everywhere): an empty result{tail}")


#: What ``--device`` takes; anything else is refused when the command line is parsed.
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_name(text: str) -> str:
    """An argparse ``type`` for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``error: argument --device:
    must be auto, cpu, cuda or cuda:N; got 'gpu'``, exit code 2). Whether the machine has that GPU is checked before
    the command starts working (:func:`~DiffusionCore.devices.resolve_device`)."""
    name = text.strip().lower()
    if not _DEVICE.fullmatch(name):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N; got {text!r}")
    return name


device_name.__name__ = "device"


def add_adapt_arguments(parser: argparse.ArgumentParser) -> None:
    """``--adapt [SECONDS]``, ``--adapt-steps N`` and ``--no-adapt``: test-time adaptation of the through-plane
    predictor, on by default (:data:`~DiffusionCore.sr.adapt.DEFAULT_ADAPT_STEPS` steps)."""
    from ..sr.adapt import DEFAULT_ADAPT_SECONDS, DEFAULT_ADAPT_STEPS

    number = finite_float(0.0)

    def seconds(text: str) -> float:  # its value is optional, so `sr --adapt in.nii.gz out.nii.gz` takes the input
        try:
            float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"takes an optional number of seconds, and the word after it, {text!r}, is none: write --adapt after "
                "INPUT OUTPUT, or give it a number (--adapt 120)"
            ) from None
        return number(text)

    seconds.__name__ = number.__name__
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--adapt", type=seconds, nargs="?", const=DEFAULT_ADAPT_SECONDS, default=None, metavar="SECONDS",
        help="adapt for at most SECONDS instead of the default step count (the number of steps then depends on "
        f"the machine's speed; {DEFAULT_ADAPT_SECONDS:g} s when given without a value; 0: no adaptation)",
    )
    group.add_argument(
        "--adapt-steps", type=bounded_int(1), default=None, metavar="N",
        help=f"adapt for exactly N steps (default {DEFAULT_ADAPT_STEPS}, about 40 s on 2 idle CPU cores): before "
        "super-resolving, a copy of the model is fine-tuned on pairs made from this scan's own in-plane slices; "
        "the same output for the same seed, device and thread count; the installed weights are not changed",
    )
    group.add_argument(
        "--no-adapt", action="store_true",
        help="no adaptation: the installed weights as they are (faster; less gain on scans unlike the training data)",
    )


def adapt_settings(args: argparse.Namespace):
    """The :class:`~DiffusionCore.sr.adapt.AdaptSettings` that ``--adapt`` / ``--adapt-steps`` / ``--no-adapt``
    ask for, or None (no adaptation). Without any of them: the default adaptation, skipped when the weights
    have no through-plane predictor to adapt.

    Raises:
        ConfigError: a non-finite or negative time, or steps below 1.
    """
    from ..sr.adapt import AdaptSettings

    seconds, steps = getattr(args, "adapt", None), getattr(args, "adapt_steps", None)
    if getattr(args, "no_adapt", False) or (seconds is not None and seconds == 0):
        return None
    if seconds is None and steps is None:
        return AdaptSettings(optional=True)
    return AdaptSettings(seconds=0.0 if seconds is None else float(seconds), steps=steps)
