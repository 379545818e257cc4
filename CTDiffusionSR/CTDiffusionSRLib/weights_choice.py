"""The weights a module offers, which one is preselected, and whether Apply can run with the choice.

Qt-free and torch-free: the widgets call this when a module is opened, and opening a module must not import
torch into Slicer's process (``DiffusionCore.weights`` does). So the two registries of
:mod:`DiffusionCore.weights.registry` (the bundled one inside the installed DiffusionCore package, the
user's in the cache folder) are read here as the JSON files they are, in the same order and with the same
meaning as ``list_weights``; a test checks that both views agree. Importing a file
(:func:`import_weights_file`) goes through DiffusionCore itself (it checks and hashes the file).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

try:
    from slicer.i18n import tr as _
except ImportError:  # outside the Slicer application (tests, plain Python): the English text

    def _(text: str) -> str:
        return text


logger = logging.getLogger(__name__)

#: What each model family is called in messages.
FAMILY_TITLES = {"sr": "CT super-resolution", "xray": "X-ray to CT", "vae": "SR autoencoder (vae)"}
#: The module that runs each family's weights, as its title reads in Slicer's module list.
FAMILY_MODULES = {"sr": "CT Diffusion SR", "xray": "X-ray to CT"}


@dataclass(frozen=True)
class WeightsEntry:
    """One registered weights entry, as ``DiffusionCore.weights.list_weights`` describes it."""

    name: str
    family: str
    description: str
    source: str  # "bundled" or "user"
    path: Path
    available: bool  # the file is on this machine
    hidden: bool = False  # the user's own, under a name that is now bundled: the name runs the bundled weights


def bundled_registry_path() -> Path | None:
    """``DiffusionCore/weights/registry.json`` of the installed package (found without importing it)."""
    spec = importlib.util.find_spec("DiffusionCore")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "registry.json"


def user_registry_path() -> Path:
    """``<cache>/weights/registry.json``, the cache folder as DiffusionCore tells it (``$DIFFUSIONCORE_CACHE``, else
    its default for this system: :func:`DiffusionCore.files.cache_dir_shown`, which imports no torch)."""
    from DiffusionCore.files import cache_dir_shown

    return cache_dir_shown() / "weights" / "registry.json"


def _entries(path: Path | None) -> dict:
    """The entries of a registry file as DiffusionCore reads them (``weights.entries.read_registry``, which imports
    no torch); an unreadable one is warned of and offers nothing."""
    from DiffusionCore.errors import WeightsError
    from DiffusionCore.weights.entries import read_registry

    if path is None:
        return {}
    try:
        return read_registry(path)
    except WeightsError as exc:
        logger.warning("%s; its weights are not offered", exc)
        return {}


def registered_weights(family: str) -> list[WeightsEntry]:
    """The registered weights of ``family``: bundled first, then the user's. A name in both is the bundled one; the
    user's entry of that name (imported before weights of that name shipped) is listed with ``hidden`` true."""
    from DiffusionCore.weights.entries import registry_rows

    registries = [(source, registry.parent if registry else Path(), _entries(registry))
                  for source, registry in (("bundled", bundled_registry_path()), ("user", user_registry_path()))]  # fmt: skip
    out = []
    for source, folder, name, entry, hidden in registry_rows(registries):
        if entry.get("family") == family:
            file = Path(str(entry.get("file", "")))
            path = file if file.is_absolute() else folder / file
            out.append(WeightsEntry(name, family, str(entry.get("description", "")), source, path, path.is_file(),
                                    hidden))  # fmt: skip
    return out


def default_weights(family: str) -> str | None:
    """The weights used when none are named: the first registered entry whose file is here, else None."""
    return next((e.name for e in registered_weights(family) if e.available and not e.hidden), None)


#: Names whose hidden weights were told of in the log in this process (:func:`weights_items`): once each.
_TOLD_HIDDEN: set[str] = set()


def weights_items(family: str, current: str = "") -> tuple[list[str], str]:
    """The names the weights selector lists (those whose file is here) and the one to show selected.

    ``current`` is the parameter node's choice ("" = the default); a chosen file path or a name not in the
    list is kept as the selection (the selector is editable) and judged by :func:`weights_problem`. The user's own
    weights under a name that is now bundled (imported before weights of that name shipped) are listed by their
    file, which runs them (the name runs the shipped ones), and the log says so once.
    """
    entries = [e for e in registered_weights(family) if e.available]
    names = [e.name for e in entries if not e.hidden] + [str(e.path) for e in entries if e.hidden]
    for e in entries:
        if e.hidden and e.name not in _TOLD_HIDDEN:
            _TOLD_HIDDEN.add(e.name)
            logger.warning(hidden_weights_notice(e))
    selected = current or default_weights(family) or ""
    return names, selected


def hidden_weights_status(family: str) -> str:
    """What the panel's status line says when the user's own weights of ``family`` are hidden by shipped weights of
    their name ("" when none are): :func:`hidden_weights_notice` of each whose file is here."""
    return " ".join(hidden_weights_notice(e) for e in registered_weights(family) if e.hidden and e.available)


def hidden_weights_notice(entry: WeightsEntry) -> str:
    """What the panel says of the user's own weights hidden by the shipped weights of their name."""
    return _(
        "Your imported weights '{name}' are hidden by the weights of that name that now ship with the extension: "
        "choosing '{name}' runs the shipped ones. Your weights are listed by their file, {path}; choose that, or "
        "press 'Import weights...' and import that file under a new name."
    ).format(name=entry.name, path=entry.path)


def weights_problem(family: str, chosen: str = "") -> str:
    """Why Apply cannot run with the chosen weights ("" when it can): the Apply button's tooltip.

    Args:
        family: "sr" or "xray".
        chosen: a registered name, a .safetensors path, or "" for the default.
    """
    title = FAMILY_TITLES.get(family, family)
    entries = {e.name: e for e in registered_weights(family) if not e.hidden}
    if not chosen:
        if default_weights(family) is not None:
            return ""
        if entries:
            return _(
                "The registered {title} weights ({names}) have no file on this computer. Press 'Import "
                "weights...' to add a .safetensors weights file, or reinstall the extension."
            ).format(title=title, names=", ".join(entries))
        return _(
            "No {title} weights are installed. Press 'Import weights...' to add a .safetensors weights "
            "file (trained with the Training section or 'python -m DiffusionCore train'), or reinstall the "
            "extension to get the shipped default."
        ).format(title=title)
    if chosen in entries:
        if entries[chosen].available:
            return ""
        return _(
            "The file of the weights '{name}' is missing ({path}). Import the weights again or choose others."
        ).format(name=chosen, path=entries[chosen].path)
    path = Path(chosen).expanduser()
    if path.is_file():
        return weights_file_problem(family, path)
    return _(
        "'{chosen}' is neither registered {title} weights nor an existing file. Choose weights from the "
        "list or press 'Import weights...'."
    ).format(chosen=chosen, title=title)


def weights_file_problem(family: str, path: str | os.PathLike, *, allow_unregistered: bool = False) -> str:
    """Why Apply cannot run with the weights file ``path`` (``""`` when it can): it holds weights of another model
    family, or it is not registered (Apply refuses a file whose sha256 no registry holds: the module's 'Import
    weights...' registers it; ``allow_unregistered``, a script's setting, accepts it). Decided as ``DiffusionCore.weights.resolve_weights`` decides, without importing torch:
    the family is the one the file's metadata records, else the one it is registered under; its sha256 is looked up in
    the registries that :func:`registered_weights` reads. A file whose header cannot be read is left to Apply, whose
    check names what is wrong with it.
    """
    title = FAMILY_TITLES.get(family, family)
    path = Path(path)
    sha = _file_sha256(path)
    registered = _registered_by_sha256(sha) if sha else None
    found = _file_family(path)
    if found is None and registered is not None:
        found = registered[1]
    if found is not None and found != family:
        other = FAMILY_TITLES.get(found, found)
        module = FAMILY_MODULES.get(found)
        where = (_(" (the {module} module runs them)").format(module=module) if module else "")
        return _(
            "'{file}' holds {other} weights{where}, not {title} weights. Choose {title} weights from the list, or "
            "add a file of them with 'Import weights...'."
        ).format(file=path.name, other=other, where=where, title=title)
    if registered is not None or sha is None or allow_unregistered:
        return ""
    return _(
        "'{file}' is not a registered weights file ({path}). Press 'Import weights...' and choose this file to "
        "register it under a name; then choose that name in the list."
    ).format(file=path.name, path=path)


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str | None:
    """The sha256 of a file, remembered while its size and time stay the same (Apply's state is recomputed on every
    change of the panel); None when it cannot be read."""
    from DiffusionCore.files import sha256_file

    try:
        info = path.stat()
        key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
        if key not in _SHA256_CACHE:
            _SHA256_CACHE[key] = sha256_file(path)
    except OSError:
        return None
    return _SHA256_CACHE[key]


def _registered_by_sha256(sha: str) -> tuple[str, str] | None:
    """``(name, family)`` of the registered weights whose sha256 is ``sha`` (bundled registry first, then the user's,
    as the registry looks a file up), or None."""
    from DiffusionCore.weights.entries import find_sha256

    found = find_sha256((_entries(registry) for registry in (bundled_registry_path(), user_registry_path())), sha)
    return (found[0], str(found[1].get("family", ""))) if found else None


def _file_family(path: Path) -> str | None:
    """The model family a safetensors file's DiffusionCore metadata records; None when it records none or the file
    is not a readable safetensors file (the registry's own header check, which imports no torch, refuses FIFOs,
    devices, other formats and oversized headers before reading them)."""
    from DiffusionCore.errors import WeightsError
    from DiffusionCore.weights.header import read_safetensors_header

    try:
        _, metadata = read_safetensors_header(path)
    except WeightsError:
        return None
    family = metadata.get("family")
    return family if isinstance(family, str) else None


def import_weights_file(path: str | os.PathLike, name: str, family: str, *, replace: bool = False) -> tuple[str, str]:
    """Copy a .safetensors file into the user registry under ``name`` (checked to be ``family`` weights).

    Args:
        replace: replace other weights registered under ``name`` (the user agreed to it).

    Returns:
        ``(name, sha256)`` of the imported weights.

    Raises:
        WeightsError: not safetensors, wrong family, bundled name, ...
        OutputExistsError: ``name`` is registered for other weights and ``replace`` is not set (the dialog then
            asks whether to replace them).
    """
    import DiffusionCore.sr.pipeline  # noqa: F401  (registers the architecture check that import compares with)
    import DiffusionCore.xray.cascade  # noqa: F401  (the same for X-ray weights)
    from DiffusionCore.errors import OutputExistsError
    from DiffusionCore.weights import import_weights

    title = FAMILY_TITLES.get(family, family)
    try:
        resolved = import_weights(path, name.strip(), family=family, overwrite=replace,
                                  description=_("{title} weights imported in 3D Slicer").format(title=title))
    except OutputExistsError as exc:  # the command line's advice (--overwrite) means nothing in the dialog
        raise exc.advising(_("replace them, or import these under another name")) from None
    return str(resolved.name), str(resolved.sha256)


@dataclass(frozen=True)
class ApplyState:
    """How the Apply button looks: its text, whether it is enabled, its tooltip, and whether the
    'Import weights' button should be pointed out (no usable weights)."""

    text: str
    enabled: bool
    tooltip: str
    needs_weights: bool = False


def apply_state(*, running: bool, input_problem: str, weights_problem: str, action: str, cancel: str) -> ApplyState:
    """The Apply button for the module's state.

    Args:
        running: a job is running (Apply turns into Cancel).
        input_problem: why the input cannot be used ("" when it can).
        weights_problem: from :func:`weights_problem`.
        action: the tooltip when Apply can run.
        cancel: the tooltip of the Cancel button.
    """
    if running:
        return ApplyState(_("Cancel"), True, cancel)
    reason = input_problem or weights_problem
    return ApplyState(_("Apply"), not reason, reason or action, needs_weights=bool(weights_problem))
