"""Which Python packages DiffusionCore needs inside Slicer, what is missing, and how to install it safely.

Qt-free: the Qt glue (``ensureDependencies`` in widgets.py) asks :func:`plan_dependencies` what is
missing, shows ONE confirmation listing all of it (:meth:`DependencyPlan.confirmation_text`), then hands
PyTorchUtils' ``installTorch`` and ``slicer.util.pip_install`` to :func:`run_install`, which runs them in
order, captures their output and turns any failure into one message that says what happened and what to
do (:func:`install_failure_message`) instead of a console traceback.

- torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build matching the GPU driver,
  with the version requirement :data:`TORCH_REQUIREMENT`; an installed torch is checked by its package
  metadata, so nothing here imports torch into Slicer's process.
- The other packages are installed WITH their dependencies (a package installed with ``--no-deps`` may not
  import) but under a pip constraints file (:func:`constraints_text`) that pins the packages Slicer ships
  (numpy, SimpleITK, ...) and torch to the versions installed: pip then either installs without touching
  them, or stops with a conflict that is reported, never replacing Slicer's numpy.
- TensorBoard is not installed by the extension: the training panel plots the loss curve in Slicer, and
  shows the ``tensorboard`` command only where TensorBoard is already installed (:func:`tensorboard_hint`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

try:
    from slicer.i18n import tr as _
except ImportError:  # outside the Slicer application (tests, plain Python): the English text

    def _(text: str) -> str:
        return text


#: torch version requirement (the same bound as DiffusionCore's pyproject.toml), passed to PyTorchUtils.
TORCH_REQUIREMENT = ">=2.1"
#: import name -> pip requirement, for what Slicer does not ship. Bounded above at the next major version:
#: a new major release is tested before the extension accepts it.
REQUIREMENTS = {
    "einops": "einops>=0.7,<1",
    "safetensors": "safetensors>=0.4,<1",
    "tqdm": "tqdm>=4.60,<5",
    "nibabel": "nibabel>=5.0,<6",
    "scipy": "scipy>=1.10,<2",
    "yaml": "pyyaml>=6,<7",
}
#: pydicom, which DiffusionCore also needs, ships with Slicer and is therefore not listed.
#: Extra packages for the training panel (none: the loss curve is a Slicer plot; TensorBoard is optional).
TRAINING_REQUIREMENTS: dict[str, str] = {}
#: Distributions Slicer provides (and torch, which PyTorchUtils installs): never installed or upgraded by
#: pip here, and pinned to their installed versions while other packages are installed.
PROTECTED = ("numpy", "simpleitk", "vtk", "torch", "torchvision", "qt", "ctk")
#: What the Extensions Manager calls the extension that provides PyTorchUtils.
PYTORCH_EXTENSION = "PyTorch"


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[\s]", requirement.strip(), maxsplit=1)[0].strip().lower()


def _specifier(requirement: str) -> str:
    return requirement.strip()[len(_requirement_name(requirement)) :].strip()


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution from its metadata (the package is not imported), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; pre-releases count as their release."""
    numbers = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(v) for v in numbers.group(0).split(".")) if numbers else (0,)


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets a comma-separated specifier such as ``">=2.1"`` or ``">=0.7,<1"``."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(version) in SpecifierSet(specifier, prereleases=True)
    except ImportError:  # no ``packaging``: compare release numbers
        pass
    except Exception:  # an unparsable local version: compare release numbers
        pass
    have = _release(version)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        op, bound = re.match(r"(>=|<=|==|!=|>|<|~=)\s*(.+)", clause).groups()
        want = _release(bound)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b, "~=": a >= b}[op]
        if not ok:
            return False
    return True


def is_installed(import_name: str) -> bool:
    """Whether a top-level package can be found (it is not imported)."""
    return importlib.util.find_spec(import_name) is not None


@dataclass
class DependencyPlan:
    """What must be installed before DiffusionCore can run in this Slicer.

    Attributes:
        pytorch_extension: PyTorchUtils (the PyTorch extension) can be imported.
        torch_version: the installed torch version, or None.
        packages: pip requirements to install (missing, or installed at a version outside the bounds).
        outdated: for packages in ``packages`` that are installed: requirement -> installed version.
        torch_imported: torch is already imported in this process (an upgrade then needs a restart).
    """

    pytorch_extension: bool
    torch_version: str | None
    packages: list[str] = field(default_factory=list)
    outdated: dict[str, str] = field(default_factory=dict)
    torch_imported: bool = False

    @property
    def torch_ok(self) -> bool:
        return self.torch_version is not None and satisfies(self.torch_version, TORCH_REQUIREMENT)

    @property
    def install_torch(self) -> bool:
        """torch is missing or too old, and PyTorchUtils can install it."""
        return self.pytorch_extension and not self.torch_ok

    @property
    def blocking_problem(self) -> str:
        """Why nothing can be installed from here ("" when everything missing can be installed)."""
        if self.torch_ok or self.pytorch_extension:
            return ""
        return _(
            "CT Diffusion needs PyTorch, which Slicer installs through the '{extension}' extension. Open the "
            "Extensions Manager, install '{extension}', restart Slicer, then press Apply again: it installs "
            "the PyTorch build that fits this computer's GPU."
        ).format(extension=PYTORCH_EXTENSION)

    @property
    def missing(self) -> list[str]:
        """One line per thing to install (the list in the confirmation), empty when all is in place."""
        items = []
        if self.install_torch:
            if self.torch_version is None:
                items.append(_("PyTorch (torch{requirement}) through the PyTorch extension").format(requirement=TORCH_REQUIREMENT))
            else:
                items.append(
                    _("PyTorch: upgrade torch {version} to torch{requirement} through the PyTorch extension").format(
                        version=self.torch_version, requirement=TORCH_REQUIREMENT
                    )
                )
        for req in self.packages:
            if req in self.outdated:
                items.append(_("{requirement} (installed: {version})").format(requirement=req, version=self.outdated[req]))
            else:
                items.append(req)
        return items

    @property
    def restart_needed(self) -> bool:
        """An older torch is already loaded in this process: the new one is used after a restart."""
        return self.install_torch and self.torch_imported and self.torch_version is not None

    def confirmation_text(self) -> str:
        """The one question asked before anything is installed."""
        text = _(
            "CT Diffusion needs these Python packages, which will be downloaded and installed now "
            "(a network connection is needed, and it may take minutes):"
        )
        text += "\n\n" + "\n".join(f"- {item}" for item in self.missing) + "\n\n"
        if self.install_torch:
            text += _(
                "The PyTorch extension installs torch with torchvision and picks the build for this computer: a CUDA "
                "build of a few GB where an NVIDIA GPU driver is found, otherwise a CPU build of several hundred MB."
            ) + "\n\n"
        text += _("Slicer's own numpy and SimpleITK are kept as they are.")
        return text


def plan_dependencies(
    pytorch_extension: bool,
    training: bool = False,
    version_of: Callable[[str], str | None] = installed_version,
) -> DependencyPlan:
    """What is missing for DiffusionCore (and, with ``training``, for the training panel).

    Args:
        pytorch_extension: whether ``import PyTorchUtils`` works in this Slicer.
        training: include the training panel's packages.
        version_of: distribution name -> installed version or None (the metadata by default).
    """
    wanted = dict(REQUIREMENTS)
    if training:
        wanted.update(TRAINING_REQUIREMENTS)
    packages, outdated = [], {}
    for req in wanted.values():
        version = version_of(_requirement_name(req))
        if version is None or not satisfies(version, _specifier(req)):
            packages.append(req)
            if version is not None:
                outdated[req] = version
    return DependencyPlan(
        pytorch_extension=pytorch_extension,
        torch_version=version_of("torch"),
        packages=packages,
        outdated=outdated,
        torch_imported="torch" in sys.modules,
    )


def constraints_text(version_of: Callable[[str], str | None] = installed_version) -> str:
    """A pip constraints file pinning every installed protected distribution to its installed version."""
    lines = ["# Written by CT Diffusion: keep Slicer's own packages (and torch) exactly as installed."]
    for name in PROTECTED:
        version = version_of(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def quiet_pip_install(
    util_pip_install: Callable[[list[str]], object], packaging_pip_install: Callable[..., object] | None = None
) -> Callable[[list[str]], object]:
    """The ``pip_install`` that :func:`run_install` calls inside Slicer.

    Slicer 5.12 and later (``slicer.packaging.pip_install``) show their own progress dialog and, when pip fails, a
    "Package installation failed." dialog before raising; :func:`run_install`'s failure then showed a second one.
    There it is called with ``show_progress=False`` (the busy cursor shows the wait), so the one dialog is the one
    that names the cause and what to do. Earlier Slicers' ``slicer.util.pip_install`` shows no dialog of its own.

    Args:
        util_pip_install: ``slicer.util.pip_install``.
        packaging_pip_install: ``slicer.packaging.pip_install`` where it exists (Slicer 5.12+), else None.
    """
    if packaging_pip_install is None:
        return util_pip_install
    return lambda args: packaging_pip_install(args, show_progress=False)


def pip_install_arguments(requirements: list[str], constraints_file: str | Path) -> list[str]:
    """The argument list for ``slicer.util.pip_install`` (each item one pip argument): the constraints file,
    then the requirements. Dependencies are installed; the constraints keep protected packages unchanged.

    Raises:
        ValueError: a requirement names a package Slicer itself provides.
    """
    for req in requirements:
        if _requirement_name(req) in PROTECTED:
            raise ValueError(f"{_requirement_name(req)} is provided by Slicer and must never be installed by this extension")
    return ["--constraint", str(constraints_file), *requirements]


# -- failures --------------------------------------------------------------------------------------------
#: (pattern in the installer's output, what happened, what to do), the first match wins.
_FAILURES: tuple[tuple[str, str, str], ...] = (
    (
        r"No space left on device|Errno 28|not enough space on the disk",
        "the disk is full",
        "free some disk space (the download and install need a few GB for PyTorch), then press Apply again",
    ),
    (
        r"ProxyError|407 Proxy Authentication|Tunnel connection failed|Cannot connect to proxy",
        "the network proxy refused the connection",
        "set the proxy for Slicer (environment variables HTTPS_PROXY and HTTP_PROXY, with the user name and "
        "password if the proxy needs them), restart Slicer, then press Apply again",
    ),
    (
        r"SSLError|CERTIFICATE_VERIFY_FAILED|certificate verify failed",
        "the secure connection to the package index failed (a certificate was not trusted)",
        "if a company proxy inspects HTTPS traffic, ask its administrator for the certificate and set it "
        "with PIP_CERT, restart Slicer, then press Apply again",
    ),
    (
        r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
        r"Name or service not known|nodename nor servname|getaddrinfo failed|Network is unreachable|"
        r"Connection refused|ConnectTimeout|Read timed out|Max retries exceeded|No route to host|"
        r"Could not fetch URL|connection broken",
        "the package index could not be reached (no network connection?)",
        "connect this computer to the internet (or set the proxy Slicer should use), then press Apply "
        "again; nothing was changed",
    ),
    (
        r"Permission denied|Errno 13|Access is denied|PermissionError",
        "Slicer's Python folder is not writable for this user",
        "install Slicer in a folder you can write to (or run it once as the user who installed it), then "
        "press Apply again",
    ),
    (
        r"ResolutionImpossible|conflicting dependencies|Cannot install .* because these package versions",
        "the packages would need a different version of a package Slicer ships (such as numpy), which is "
        "never replaced",
        "update 3D Slicer to its current release, then press Apply again",
    ),
    (
        r"No matching distribution found|Could not find a version that satisfies",
        "no version of a required package exists for this Slicer's Python and operating system",
        "update 3D Slicer to its current release; if that does not help, report the log below to the "
        "extension's issue tracker",
    ),
)


def install_failure_message(what: str, output: str = "", error: BaseException | None = None) -> str:
    """The dialog text for a failed install of ``what``: what happened and what to do (never a traceback).

    Args:
        what: what was being installed ("PyTorch", "the Python packages").
        output: the installer's output (pip's log), searched for the cause.
        error: the exception the installer raised, if any.
    """
    haystack = f"{output}\n{error or ''}"
    for pattern, happened, todo in _FAILURES:
        if re.search(pattern, haystack, flags=re.IGNORECASE):
            return _("Installing {what} failed: {happened}.\n\nWhat to do: {todo}.").format(
                what=what, happened=_(happened), todo=_(todo)
            )
    detail = ""
    if isinstance(error, subprocess.CalledProcessError):
        detail = _(" (the installer stopped with exit code {code})").format(code=error.returncode)
    elif error is not None:
        detail = f" ({type(error).__name__}: {str(error)[:200]})"
    return _(
        "Installing {what} failed{detail}.\n\nWhat to do: check the network connection and the free disk "
        "space, then press Apply again; the installer's log is in the details of this message."
    ).format(what=what, detail=detail)


def last_lines(output: str, count: int = 40) -> str:
    """The end of an installer's output, for the details of the failure dialog."""
    return "\n".join(output.strip().splitlines()[-count:])


class _Tee(io.TextIOBase):
    """Writes to the stream it replaces and keeps a copy."""

    def __init__(self, stream):
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        if self.stream is not None:
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()


@dataclass
class InstallOutcome:
    """How an installation went.

    Attributes:
        ok: everything needed can now be imported.
        message: for the user: the failure (what happened, what to do), or a note (e.g. restart).
        details: the end of the installer's output (for the dialog's details).
        restart_needed: torch was upgraded while an older one is loaded: restart Slicer to use it.
    """

    ok: bool
    message: str = ""
    details: str = ""
    restart_needed: bool = False


def run_install(
    plan: DependencyPlan,
    *,
    install_torch: Callable[[str], object],
    pip_install: Callable[[list[str]], object],
    replan: Callable[[], DependencyPlan],
    constraints_folder: str | Path,
    version_of: Callable[[str], str | None] = installed_version,
) -> InstallOutcome:
    """Install what ``plan`` lists (the user already agreed): torch first, then the other packages.

    Args:
        plan: from :func:`plan_dependencies`.
        install_torch: ``torch_requirement -> torch module or None`` (PyTorchUtils' ``installTorch``).
        pip_install: ``argument list -> None`` that raises on failure (``slicer.util.pip_install``).
        replan: a fresh :func:`plan_dependencies`, to check that everything now imports.
        constraints_folder: where the constraints file is written (a temporary folder).
        version_of: distribution -> installed version (for the constraints).

    Returns:
        The outcome; output printed by the installers is captured (and still printed) for the message.
    """
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        if plan.install_torch:
            try:
                torch = install_torch(TORCH_REQUIREMENT)
            except Exception as exc:  # offline, proxy, disk full, ...: said in a dialog, not a traceback
                output = tee.copy.getvalue()
                return InstallOutcome(False, install_failure_message("PyTorch", output, exc), last_lines(output))
            if torch is None:
                return InstallOutcome(
                    False,
                    _("PyTorch was not installed. CT Diffusion needs it: press Apply again and accept the installation."),
                )
        if plan.packages:
            constraints = Path(constraints_folder) / "ctdiffusion-constraints.txt"
            constraints.write_text(constraints_text(version_of), encoding="utf-8")
            try:
                pip_install(pip_install_arguments(plan.packages, constraints))
            except Exception as exc:
                output = tee.copy.getvalue()
                return InstallOutcome(
                    False, install_failure_message(_("the Python packages"), output, exc), last_lines(output)
                )
    after = replan()
    still = list(after.packages) + ([] if after.torch_ok else [f"torch{TORCH_REQUIREMENT}"])
    if still:
        return InstallOutcome(
            False,
            _(
                "The installation ended, but these packages still cannot be used: {packages}. Restart Slicer "
                "and press Apply again; if they are still missing, install them from Slicer's Python console "
                "with slicer.util.pip_install."
            ).format(packages=", ".join(still)),
            last_lines(tee.copy.getvalue()),
        )
    if plan.restart_needed:
        return InstallOutcome(
            True,
            _("PyTorch was upgraded. Restart Slicer so that the new version is used."),
            restart_needed=True,
        )
    return InstallOutcome(True)


def tensorboard_hint(output_dir: str | Path) -> str:
    """The training panel's TensorBoard line: the command where TensorBoard is installed, else where the
    metrics are (the loss curve is plotted in Slicer either way)."""
    if is_installed("tensorboard"):
        return _('TensorBoard: tensorboard --logdir "{folder}"').format(folder=output_dir)
    return _("Loss curves: plotted in Slicer; all metrics are in {file}").format(file=Path(output_dir) / "metrics.jsonl")


def self_test_skip_reason(version_of: Callable[[str], str | None] = installed_version) -> str:
    """Why a module self-test cannot run its tiny-model check here ("" when it can).

    On the extension build machines torch is not installed: the self-tests then pass with this message
    (logged and displayed) instead of failing, as other PyTorch-based extensions do; where torch and the
    other packages are installed they run the tiny random-weight model on the CPU.
    """
    plan = plan_dependencies(pytorch_extension=True, version_of=version_of)
    if plan.torch_version is None:
        return _(
            "Self-test skipped: PyTorch is not installed in this Slicer. Install the PyTorch extension and "
            "press Apply in the module once (it installs what is missing), then run the self-test again."
        )
    if not plan.torch_ok:
        return _("Self-test skipped: torch {version} is installed; the module needs torch{requirement}.").format(
            version=plan.torch_version, requirement=TORCH_REQUIREMENT
        )
    if plan.packages:
        return _("Self-test skipped: these Python packages are not installed: {packages}.").format(
            packages=", ".join(plan.packages)
        )
    return ""
