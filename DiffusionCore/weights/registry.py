"""Model weights: safetensors files only, identified by sha256, found by name in a registry.

Weights are never unpickled: a pickle can run arbitrary code when loaded, so ``.pt`` / ``.ckpt`` / ``.bin``
files are refused (detected by their first bytes, whatever their suffix). A weights file carries its own
description in the safetensors header: the key ``"diffusioncore"`` holds a JSON object with at least
``"family"`` (``"sr"``, ``"vae"``, ``"xray"``, ...) and usually ``"config"`` (the model configuration).

Registries
----------
Two JSON files map names to files; the bundled one ships with the package, the user one collects weights
that the user imported (``diffusioncore`` keeps them in its cache folder)::

    DiffusionCore/weights/registry.json                 bundled, read-only
    $DIFFUSIONCORE_CACHE/weights/registry.json          user (default cache: ~/.cache/diffusioncore;
                                                        %LOCALAPPDATA%\\diffusioncore on Windows)

Both have the same format::

    {"weights": {
        "<name>": {
            "file": "<file name, relative to the folder of this registry.json (or absolute)>",
            "sha256": "<64 hex digits of the whole file>",
            "family": "<model family, e.g. sr>",
            "description": "<one sentence>",
            "model_card": "<what it was trained on, intended use, limits (text or a relative .md path)>"
        }
    }}

A name is looked up in the bundled registry first, then in the user one (a user entry under a bundled name, imported
before weights of that name shipped, is hidden: listed, verified and removable, and told of once per process). A file
path given instead of a name is accepted only when its sha256 is registered (under any name), unless the caller
explicitly allows unregistered weights (``--allow-unregistered-weights`` on the command line).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputError, OutputExistsError, WeightsError
from ..files import (
    CACHE_ENV,
    cache_dir,
    cache_dir_shown,
    check_cache_usable,
    no_room_reason,
    partial_file,
    publish,
    sha256_file,
    writable_cache_folder,
)
from .entries import find_sha256, read_registry, registry_rows
from .header import (  # noqa: F401  (METADATA_KEY and read_safetensors_header stay part of this module's API)
    METADATA_KEY,
    existing_weights_file,
    open_regular_file,
    parse_header,
    read_safetensors_header,
    run_export_advice,
    shell_word,
)

logger = logging.getLogger(__name__)

#: The registry bundled with the package.
BUNDLED_REGISTRY = Path(__file__).with_name("registry.json")
#: The largest weights or checkpoint file read into memory (refused before reading: weights are MB, not GB).
MAX_WEIGHTS_BYTES = 8 * 1024**3
#: The model families a registered weights file may belong to (``family`` in its metadata).
FAMILIES = ("sr", "xray", "vae")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file that passed the registry checks.

    Attributes:
        path: the safetensors file.
        sha256: hex digest of the whole file.
        name: registry name, or ``None`` for an unregistered file that the caller allowed.
        metadata: the decoded ``"diffusioncore"`` header metadata (``family``, ``config``, ...).
    """

    path: Path
    sha256: str
    name: str | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def load(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of the file, re-checked against :attr:`sha256`."""
        tensors, _ = load_safetensors(self.path, expected_sha256=self.sha256, device=device)
        return tensors


def user_registry_path() -> Path:
    """The user registry file, ``cache_dir()/weights/registry.json``. Never fails, so that help texts can name it: on
    an account with no home folder (and ``$DIFFUSIONCORE_CACHE`` unset) it is the path as written,
    ``~/.cache/diffusioncore/weights/registry.json`` (:func:`~DiffusionCore.files.cache_dir_shown`); there is no user
    registry then, and :func:`import_weights` says to set ``$DIFFUSIONCORE_CACHE``."""
    return cache_dir_shown() / "weights" / "registry.json"


def save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> str:
    """Write tensors and JSON metadata to a safetensors file atomically.

    Args:
        path: destination file (its folder is created).
        tensors: name -> tensor (any device and dtype; written from CPU copies).
        metadata: JSON-serialisable dict, stored JSON-encoded under the header key ``"diffusioncore"``.

    Returns:
        The sha256 of the written file.

    Raises:
        OutputError: the folder cannot be written.
    """
    from safetensors.torch import save_file

    p = Path(path)
    prepared: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensor {key!r} is a {type(value).__name__}, not a torch.Tensor")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen_storage:
            t = t.clone()  # safetensors refuses tensors sharing memory (tied weights, views)
        elif ptr is not None:
            seen_storage.add(ptr)
        prepared[key] = t
    header = {METADATA_KEY: json.dumps(dict(metadata or {}))}
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".partial", dir=p.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write {p}: {exc.strerror or exc}; choose a writable folder") from exc
    try:
        save_file(prepared, tmp, metadata=header)
        digest = sha256_file(tmp)
        publish(tmp, p)  # mkstemp made it owner-only; weights are shared like any file the user writes (umask)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def read_weights_bytes(path: str | os.PathLike) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """Read a weights file once, after checking its header, so that what is hashed is what is loaded.

    Returns:
        ``(the file's bytes, tensor_entries, metadata)`` as :func:`read_safetensors_header`.

    Raises:
        WeightsError: as :func:`read_safetensors_header`, or a file over :data:`MAX_WEIGHTS_BYTES`.
    """
    p = existing_weights_file(path)
    f, size = open_regular_file(p)
    with f:
        if size > MAX_WEIGHTS_BYTES:
            raise WeightsError(
                f"{p} is {size / 2**30:.1f} GiB, more than the {MAX_WEIGHTS_BYTES / 2**30:.0f} GiB a weights file "
                "may have: it is not a DiffusionCore weights file; use other weights"
            )
        data = f.read(size + 1)
    if len(data) != size:
        raise WeightsError(f"{p} changed size while it was read: read it again once it is complete")
    header, metadata = parse_header(p, io.BytesIO(data), size)
    return data, header, metadata


def load_safetensors(
    path: str | os.PathLike,
    expected_sha256: str | None = None,
    device: str | torch.device = "cpu",
    *,
    check_finite: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file after checking its format (and its sha256 when given), and refuse one whose
    floating-point tensors hold NaN or Inf (the file of a diverged training: every result would be NaN).

    The file is read once: the bytes that are hashed are the bytes whose tensors are returned.

    Args:
        path: the ``.safetensors`` file.
        expected_sha256: hex digest the whole file must have; ``None`` skips the check.
        device: where the tensors are placed.
        check_finite: refuse non-finite values (on by default, for every weights file and checkpoint;
            turn off only to inspect a broken file).

    Returns:
        ``(tensors, metadata)``: name -> tensor, and the decoded ``"diffusioncore"`` metadata.

    Raises:
        WeightsError: missing, not safetensors (pickles are never loaded), truncated, sha256 mismatch, or
            NaN/Inf values.
    """
    p = Path(path)
    data, _, metadata = read_weights_bytes(p)
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual.lower() != expected_sha256.lower():
            raise WeightsError(
                f"{p} fails its sha256 check (expected {expected_sha256}, file has {actual}): the file is "
                "corrupt or was replaced; delete it and fetch or import the weights again"
            )
    tensors = _tensors_from_bytes(p, data, device)
    del data
    if check_finite:
        _refuse_non_finite(p, tensors)
    return tensors, metadata


def _refuse_non_finite(p: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(
            f"{p} holds non-finite values (NaN/Inf) in {len(bad)} tensor(s), e.g. {bad[0]}: the training "
            "that wrote it diverged; use other weights"
        )


def check_loadable(path: Path, data: bytes, metadata: Mapping[str, Any], family: Any) -> None:
    """Check what loading checks, for weights that are registered or verified rather than run: the tensors
    parse with safetensors' own parser (known dtypes, offsets), are floating point and finite, ``family`` is one
    of :data:`FAMILIES`, and the tensors fit the architecture the metadata records (checked on the meta device:
    nothing the size of the network is allocated).

    Args:
        path: the file, for messages.
        data: its bytes (those hashed: see :func:`read_weights_bytes`).
        metadata: its decoded ``"diffusioncore"`` metadata.
        family: the family it is registered for.

    Raises:
        WeightsError: the first problem, naming ``path``.
    """
    if not isinstance(family, str) or family not in FAMILIES:
        raise WeightsError(
            f"{path} is for the model family {family!r}, which is none of {', '.join(FAMILIES)}: "
            "it cannot be used by any model here; check which file you import"
        )
    tensors = _tensors_from_bytes(path, data, "cpu")
    not_float = [k for k, v in tensors.items() if not v.is_floating_point()]
    if not_float:
        raise WeightsError(
            f"{path} holds {len(not_float)} tensor(s) that are not floating point, e.g. {not_float[0]} "
            f"({tensors[not_float[0]].dtype}): model weights are float16/bfloat16/float32; re-export them"
        )
    _refuse_non_finite(path, tensors)
    check = _ARCHITECTURE_CHECKS.get(family)
    if check is not None:
        check(path, tensors, dict(metadata))
    elif family in ("sr", "xray"):
        logger.warning("the tensors of %s were not compared with the architecture its metadata records: the %s "
                       "models' module, which registers that check, is not imported", path, family)  # fmt: skip
    # no model here loads a lone "vae" file: nothing more to compare with


#: family -> the check that a file's tensors fit the architecture its metadata records, as loading does
#: (:func:`register_architecture_check`). The families register their own, so that this module, which their loaders
#: import, imports none of them.
_ARCHITECTURE_CHECKS: dict[str, Callable[[Path, dict[str, torch.Tensor], dict[str, Any]], None]] = {}


def register_architecture_check(
    family: str, check: Callable[[Path, dict[str, torch.Tensor], dict[str, Any]], None]
) -> None:
    """Make :func:`check_loadable` compare ``family`` files with their recorded architecture by ``check(path,
    tensors, metadata)``, which raises WeightsError (called by the family's module when it is imported)."""
    _ARCHITECTURE_CHECKS[family] = check


def _tensors_from_bytes(p: Path, data: bytes, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes, parsed by safetensors itself (the parser that loads them)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"cannot load {p}: {exc}; re-download or re-export the weights") from exc
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


# ---------------------------------------------------------------------------------------------- registry


def write_registry(path: Path, entries: Mapping[str, Any]) -> None:
    """Write ``entries`` as the registry file ``path``, sorted by name, atomically.

    Raises:
        WeightsError: a text holds characters that UTF-8 cannot store (lone surrogates: bytes a non-UTF-8 locale
            could not decode); nothing is written, so the registry stays readable.
    """
    document = {"weights": dict(sorted(entries.items()))}
    try:
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        bad = next(n for n, e in document["weights"].items() if not _utf8_storable(e))
        raise WeightsError(
            f"the registry entry {bad!r} holds text that cannot be stored as UTF-8 (bytes this locale could not "
            "decode); nothing was written. Run with a UTF-8 locale (PYTHONUTF8=1 or LANG=C.UTF-8)"
        ) from None
    text = json.dumps(document, indent=2) + "\n"
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_file(path)
        Path(tmp).write_text(text, encoding="utf-8")
        publish(tmp, path)  # mkstemp made it owner-only; a lab's shared cache is read by colleagues (umask)
    except OSError as exc:
        raise OutputError(f"cannot update weights registry {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _utf8_storable(value: Any) -> bool:
    """Whether ``value`` (JSON-like) holds only text that UTF-8 can store."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_typed(text: str) -> str:
    """``text`` with the bytes a non-UTF-8 locale kept as lone surrogates read as UTF-8 where they are, else
    escaped: for a message."""
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("ascii")


def _registries() -> list[tuple[str, Path, dict[str, dict[str, Any]]]]:
    """(source, registry folder, entries) for the bundled then the user registry. Without a cache folder (an account
    with no home folder, ``$DIFFUSIONCORE_CACHE`` unset) the user registry is empty: the bundled weights still run."""
    user = user_registry_path()
    try:
        cache_dir()
    except OutputError:  # no home folder: nothing was ever imported here
        user_entries: dict[str, dict[str, Any]] = {}
    else:
        user_entries = read_registry(user)
    return [
        ("bundled", BUNDLED_REGISTRY.parent, read_registry(BUNDLED_REGISTRY)),
        ("user", user.parent, user_entries),
    ]


def _entry_path(folder: Path, entry: Mapping[str, Any]) -> Path:
    file = Path(str(entry.get("file", "")))
    return file if file.is_absolute() else folder / file


def list_weights(family: str | None = None) -> list[dict[str, Any]]:
    """Registered weights, bundled first, then the user's.

    A user entry under a name that is now bundled (imported before weights of that name shipped) is listed too, after
    the bundled one, with ``hidden`` true and a description that says so and how to use it again: the name runs the
    bundled weights (:func:`hidden_user_weights`; the user is told once per process).

    Args:
        family: keep only this family (``None``: all).

    Returns:
        Dicts with ``name``, ``family``, ``sha256``, ``description``, ``model_card``, ``source``
        (``"bundled"`` or ``"user"``), ``path``, ``available`` (the file exists) and ``hidden``.
    """
    out = []
    for source, folder, name, entry, hidden in registry_rows(_registries()):
        if family is None or entry.get("family") == family:
            path = _entry_path(folder, entry)
            description = entry.get("description", "")
            if hidden:
                description = _hidden_description(name, path, description)
                _tell_hidden(name, path, entry)
            out.append(
                {
                    "name": name,
                    "family": entry.get("family"),
                    "sha256": entry.get("sha256"),
                    "description": description,
                    "model_card": entry.get("model_card", ""),
                    "source": source,
                    "path": path,
                    "available": path.is_file(),
                    "hidden": hidden,
                }
            )
    return out


def hidden_user_weights(name: str) -> tuple[Path, dict[str, Any]] | None:
    """``(file, entry)`` of the user's own weights registered as ``name`` when ``name`` is also the name of bundled
    weights, which it runs: weights a user imported under that name before weights of that name shipped (older
    versions allowed it; :func:`import_weights` now refuses bundled names). None otherwise."""
    bundled, (_, folder, user) = read_registry(BUNDLED_REGISTRY), _registries()[1]
    if name not in bundled or name not in user:
        return None
    return _entry_path(folder, user[name]), user[name]


def _reimport_command(path: Path) -> str:
    return f"python -m DiffusionCore weights import {shell_word(path)} --name NEW"


def _hidden_description(name: str, path: Path, description: str) -> str:
    """The listing's description of user weights hidden by the bundled weights of their name."""
    said = (f"HIDDEN: {name!r} runs the shipped weights of that name; to use these, import them under another "
            f"name: `{_reimport_command(path)}`")  # fmt: skip
    return f"{said} ({description})" if description else said


#: Names whose hidden user weights this process has told of (:func:`_tell_hidden`): once each.
_TOLD_HIDDEN: set[str] = set()


def _tell_hidden(name: str, path: Path, entry: Mapping[str, Any]) -> None:
    """Warn, once per process and name, that the user's own weights ``name`` are hidden by the bundled weights of
    that name, and say how to keep using them."""
    sha = str(entry.get("sha256", "")).lower()
    if name in _TOLD_HIDDEN or sha == str(read_registry(BUNDLED_REGISTRY).get(name, {}).get("sha256", "")).lower():
        return  # told already, or the same file as the shipped one: nothing is lost
    _TOLD_HIDDEN.add(name)
    logger.warning(
        "your imported weights %r (sha256 %s..., %s) are hidden by the weights of that name that now ship with the "
        "extension: --weights %s runs the shipped ones. To keep using yours, import them under a new name: `%s`, "
        "then pass --weights NEW; once they are imported, `python -m DiffusionCore weights remove %s` deletes the old "
        "copy (the shipped weights stay)", name, sha[:12] or "unknown", path, name, _reimport_command(path), shell_word(name),
    )


def first_available(family: str) -> str | None:
    """The name of the first registered weights of ``family`` whose file is on this machine (bundled registry
    first, then the user's), or ``None``: the weights used when a command is given none."""
    return next((str(e["name"]) for e in list_weights(family) if e["available"] and not e["hidden"]), None)


def default_weights_name(
    family: str, what: str, how_to_get: str, how_to_reimport: str = "import them again, or pass --weights NAME_OR_FILE."
) -> str:
    """The weights a command uses when given none: :func:`first_available` of ``family``, or a
    :class:`WeightsError` that says what is missing (``what``, e.g. "SR") and ``how_to_get`` it, or, when
    registered weights lost their file, ``how_to_reimport`` them (each caller names its own way: a command-line
    option, or the Slicer module's Import button).
    """
    name = first_available(family)
    if name is not None:
        return name
    entries = [e for e in list_weights(family=family) if not e["hidden"]]
    if entries:
        names = ", ".join(e["name"] for e in entries)
        raise WeightsError(f"the registered {what} weights ({names}) have no file on this machine: {how_to_reimport}")
    raise WeightsError(f"no default {what} weights are installed: {how_to_get}")


def expected_sha256(name_or_path: str | os.PathLike | None, family: str) -> str | None:
    """The sha256 of the weights a command will load, known before it loads them: a registered name's registered
    sha256, a file's own, the default of ``family`` (:func:`first_available`) when ``None``; ``None`` when it cannot be
    told here (no such name or file, no default): loading them then says why."""
    if name_or_path is None:
        name_or_path = first_available(family)
        if name_or_path is None:
            return None
    found = _lookup_name(name_or_path) if isinstance(name_or_path, str) else None
    if found is not None:
        return str(found[1].get("sha256", "")).lower() or None
    path = Path(os.fspath(name_or_path)).expanduser()
    try:
        return sha256_file(path) if path.is_file() else None
    except OSError:
        return None


#: A training checkpoint's folder (``checkpoint-00000300``, as ``train.checkpoint`` names them).
_CHECKPOINT_FOLDER = re.compile(r"^checkpoint-\d{8,}$")


def _refuse_training_checkpoint(path: Path, metadata: Mapping[str, Any], name: str | None = None) -> None:
    """Refuse a file of a training checkpoint given as weights (``RUN/checkpoint-00000300/ema.safetensors``): it
    holds one model's tensors for ``--resume`` and records no model family or architecture. Names the run's exported
    weights, which are what inference and ``weights import`` take; for such a file registered as ``name`` (older
    versions imported them), how to register the run's exported weights under that name instead."""
    in_checkpoint = _CHECKPOINT_FOLDER.match(path.parent.name) and (path.parent / "state.json").is_file()
    if metadata.get("kind") != "model" and not (in_checkpoint and path.name == "training_state.safetensors"):
        return
    what = f"model {metadata['model']!r}, " if metadata.get("model") else ""
    step = f"step {metadata['step']}" if "step" in metadata else "a training step"
    if name is not None:  # the copy in the cache: the run it came from is not recorded
        raise WeightsError(
            f"weights {name!r} ({path}) are a file of a training checkpoint ({what}{step}), kept for --resume, not "
            "weights to run: an older version let it be imported. Register the weights the run exported instead: "
            f"`python -m DiffusionCore weights remove {shell_word(name)}`, then `python -m DiffusionCore weights "
            f"import RUN/EXPORTED.safetensors --name {shell_word(name)}` (RUN: the training run's folder; EXPORTED: "
            "the weights it exported, e.g. sr_model.safetensors of a train sr run, vae.safetensors of a train vae run)"
        )
    run = path.parent.parent if in_checkpoint else path.parent
    use = run_export_advice(run)
    raise WeightsError(f"{path} is a file of a training checkpoint ({what}{step}), kept for --resume, not "
                       f"weights to run or import: {use}")  # fmt: skip


def _lookup_name(name: str) -> tuple[Path, dict[str, Any]] | None:
    for _, folder, entries in _registries():
        if name in entries:
            return folder, entries[name]
    return None


def registered_name(sha: str) -> str | None:
    """The name under which weights with this sha256 are registered (bundled registry first), or None."""
    found = find_sha256((entries for _, _, entries in _registries()), sha)
    return found[0] if found else None


def _check_family(
    path: Path, metadata: Mapping[str, Any], registered: str | None, family: str | None
) -> None:
    if family is None:
        return
    found = metadata.get("family", registered)
    if found is None:
        raise WeightsError(
            f"{path} does not say which model it belongs to (no 'family' in its '{METADATA_KEY}' metadata): "
            f"export it with DiffusionCore (train ... export) so that it records family={family!r}"
        )
    if found != family:
        raise WeightsError(
            f"{path} holds weights of the {found!r} model family, but a {family!r} model was asked for: "
            f"choose weights made for {family!r}: `python -m DiffusionCore weights list --family {shell_word(family)}` lists "
            f"them (in Python: `list_weights(family={family!r})`)"
        )


def _resolve_entry(name: str, folder: Path, entry: Mapping[str, Any], family: str | None) -> ResolvedWeights:
    """The weights of the registry entry ``entry`` (of the registry in ``folder``) registered as ``name``, checked:
    the file is there, matches its sha256, is no training checkpoint's file, and is of ``family``."""
    path = _entry_path(folder, entry)
    if not path.is_file():
        raise WeightsError(
            f"weights {name!r} are registered but their file {path} is missing: import them again "
            "(`python -m DiffusionCore weights import FILE --name NAME`) or reinstall the extension"
        )
    expected = str(entry.get("sha256", "")).lower()
    _, metadata = read_safetensors_header(path)
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(
            f"weights {name!r} ({path}) fail their sha256 check (registered {expected}, file has {actual}): "
            "the file is corrupt or was replaced; import or fetch it again"
        )
    _refuse_training_checkpoint(path, metadata, name)
    _check_family(path, metadata, entry.get("family"), family)
    return ResolvedWeights(path=path, sha256=actual, name=name, metadata=metadata)


def resolve_weights(
    name_or_path: str | os.PathLike, *, family: str | None, allow_unregistered: bool = False
) -> ResolvedWeights:
    """Find and check weights given by registry name or by file path.

    Args:
        name_or_path: a registered name (bundled or user registry) or a ``.safetensors`` file.
        family: the model family the caller builds (``"sr"``, ``"vae"``, ``"xray"``, ...); the file's
            metadata must name the same family. ``None`` skips the family check.
        allow_unregistered: accept a file whose sha256 is in no registry.

    Returns:
        The checked :class:`ResolvedWeights` (sha256 verified for registered names).

    Raises:
        WeightsError: unknown name and no such file, missing registered file, not safetensors, truncated,
            sha256 mismatch, unregistered file (without ``allow_unregistered``), or family mismatch.
    """
    text = os.fspath(name_or_path)
    found = _lookup_name(text) if isinstance(name_or_path, str) else None
    if found is not None:
        hidden = hidden_user_weights(text)
        if hidden is not None:
            _tell_hidden(text, *hidden)
        return _resolve_entry(text, *found, family)

    path = Path(text).expanduser()
    if not path.exists():
        names = [w["name"] for w in list_weights(family)]
        known = ", ".join(names) if names else "none registered yet"
        if "/" in text or os.sep in text or text.lower().endswith(".safetensors"):  # meant as a file: say that
            raise WeightsError(
                f"no such file: {text} does not exist; check the path, or give a registered name instead (one of: "
                f"{known})"
            )
        import difflib

        close = difflib.get_close_matches(text, names, n=1)
        meant = f" (did you mean {close[0]!r}?)" if close else ""
        raise WeightsError(
            f"no weights named {text!r}{meant} and no such file: give a .safetensors file or one of: {known}"
        )
    _, metadata = read_safetensors_header(path)
    _refuse_training_checkpoint(path, metadata)
    sha = sha256_file(path)
    name = registered_name(sha)
    if name is None and not allow_unregistered:
        raise WeightsError(
            f"{path} (sha256 {sha}) is not a registered weights file: register it once with "
            f"`python -m DiffusionCore weights import {shell_word(path)} --name NAME` (in Python: "
            "`DiffusionCore.weights.import_weights(path, name)`), "
            "or pass --allow-unregistered-weights (allow_unregistered=True) if you trust it"
        )
    registered_family = None
    if name is not None:
        entry = (_lookup_name(name) or (None, {}))[1]
        registered_family = entry.get("family")
    _check_family(path, metadata, registered_family, family)
    if name is None:
        logger.warning("using unregistered weights %s (sha256 %s)", path, sha)
    return ResolvedWeights(path=path.resolve(), sha256=sha, name=name, metadata=metadata)


def import_weights(
    path: str | os.PathLike,
    name: str,
    *,
    family: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
) -> ResolvedWeights:
    """Copy a safetensors file into the user cache and register it under ``name``.

    The copy and the user registry get the permissions of any file the user writes (0666 less the umask), so a
    shared cache (``DIFFUSIONCORE_CACHE``) can be read by colleagues.

    Args:
        path: the ``.safetensors`` file to import.
        name: registry name (ASCII letters and digits, ``.``, ``_``, ``-``); must not be a bundled name.
        family: model family; defaults to the file's metadata ``family`` (one of the two is required, and
            they must agree).
        description: one sentence for listings; defaults to the metadata ``description``.
        overwrite: replace weights already registered under ``name`` for another file (importing the same
            file, by sha256, again is allowed without it).

    Returns:
        The registered weights (``path`` inside ``cache_dir()/weights``).

    Raises:
        WeightsError: invalid name, bundled name, not a safetensors file, no family known, family conflict.
        OutputExistsError: ``name`` is registered for another file and ``overwrite`` is not set (nothing is
            copied or changed).
        OutputError: there is no cache folder (no home folder and ``$DIFFUSIONCORE_CACHE`` unset), or it cannot be
            written (read-only, full); the message says what to do.
    """
    if not _NAME_PATTERN.match(name):
        raise WeightsError(
            f"invalid weights name {name!r}: use ASCII letters (a-z, A-Z), digits, '.', '_' and '-', starting "
            "with a letter or digit (at most 128 characters)"
        )
    if description is not None and not _utf8_storable(description):
        shown = _as_typed(description)
        raise WeightsError(
            f"the description {shown!r} holds bytes this locale could not decode, so it cannot be stored as "
            "UTF-8: run with a UTF-8 locale (PYTHONUTF8=1 or LANG=C.UTF-8)"
        )
    if name in read_registry(BUNDLED_REGISTRY):
        raise WeightsError(f"{name!r} is the name of bundled weights: choose another name")
    registry_file = check_cache_usable() / "weights" / "registry.json"  # no cache folder: OutputError, exit code 4
    src = Path(path).expanduser()
    data, _, metadata = read_weights_bytes(src)  # the bytes checked, hashed and copied: read once
    _refuse_training_checkpoint(src, metadata)
    meta_family = metadata.get("family")
    if family is not None and meta_family is not None and family != meta_family:
        raise WeightsError(
            f"{src} records family {meta_family!r}, not {family!r}: check which file you import"
        )
    family = family or meta_family
    if family is None:
        raise WeightsError(
            f"{src} does not say which model it belongs to (no 'family' in its metadata): pass family=..."
        )
    check_loadable(src, data, metadata, family)
    sha = hashlib.sha256(data).hexdigest()
    entries = read_registry(registry_file)
    registered = str(entries.get(name, {}).get("sha256", "")).lower()
    if name in entries and registered != sha and not overwrite:
        raise OutputExistsError(
            f"the name {name!r}",
            f"is already registered for other weights (sha256 {registered[:12] or 'none'}..., "
            f"{_entry_path(registry_file.parent, entries[name])})",
            "pass --overwrite to replace them (in Python: overwrite=True), or choose another name",
        )
    folder = writable_cache_folder(registry_file.parent)  # read-only: OutputError saying to move DIFFUSIONCORE_CACHE
    dest = folder / f"{name}.safetensors"
    try:
        tmp = partial_file(dest)
        try:
            Path(tmp).write_bytes(data)
            publish(tmp, dest)  # mkstemp made it owner-only; weights are shared like any file the user writes
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        why = no_room_reason(folder, len(data), exc) or (
            f"{exc.strerror or exc}; point {CACHE_ENV} to a folder you can write")
        raise OutputError(f"cannot copy {src} into {folder}: {why}") from exc
    if name in entries and registered != sha:
        logger.info("replacing user weights %r (was sha256 %s)", name, registered)
    entries[name] = {
        "file": dest.name,
        "sha256": sha,
        "family": family,
        "description": description if description is not None else str(metadata.get("description", "")),
        "model_card": str(metadata.get("model_card", "")),
    }
    write_registry(registry_file, entries)
    logger.info("imported weights %r (%s, sha256 %s) into %s", name, family, sha, dest)
    return ResolvedWeights(path=dest, sha256=sha, name=name, metadata=metadata)


def remove_weights(name: str) -> Path:
    """Unregister user weights ``name`` and delete the file that :func:`import_weights` copied.

    A bundled name is refused, unless the user registry holds weights of that name too (imported before weights of
    that name shipped, :func:`hidden_user_weights`): then those are removed, and the bundled weights stay.

    Returns:
        The path of the deleted file.

    Raises:
        WeightsError: ``name`` is bundled (it ships with the extension) or registered nowhere.
        OutputError: the user registry or the file cannot be changed.
    """
    shipped = name in read_registry(BUNDLED_REGISTRY)
    if shipped and hidden_user_weights(name) is None:
        raise WeightsError(
            f"{name!r} ships with the extension and cannot be removed; import your own weights under "
            "another name and pass --weights NAME"
        )
    registry = user_registry_path()
    entries = read_registry(registry)
    if name not in entries:
        known = ", ".join(e["name"] for e in list_weights() if e["source"] == "user") or "none"
        raise WeightsError(f"no imported weights named {name!r} (imported: {known})")
    path = _entry_path(registry.parent, entries.pop(name))
    write_registry(registry, entries)
    # import_weights copied the file to NAME.safetensors in the cache folder: that file, and no other, is
    # deleted, whatever the (hand-edited) entry names: never the registry, another name's file, or a file elsewhere.
    own = registry.parent / f"{name}.safetensors"
    if not _NAME_PATTERN.match(name) or os.path.normcase(os.path.abspath(path)) != os.path.normcase(os.path.abspath(own)):
        logger.warning("unregistered %r but kept %s: only %s would be deleted", name, path, own)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"unregistered {name!r} but cannot delete {path}: {exc.strerror or exc}") from exc
    if shipped:
        logger.info("removed your imported weights %r (%s); the shipped weights of that name stay: --weights %s runs "
                    "them", name, path, name)  # fmt: skip
    else:
        logger.info("removed weights %r (%s)", name, path)
    return path


def check_weights(name_or_path: str | os.PathLike, *, family: str, allow_unregistered: bool = False) -> ResolvedWeights:
    """:func:`resolve_weights`, then :func:`check_loadable` on the file's bytes: what a command checks up front,
    before its long work, and what ``weights verify`` checks.

    Raises:
        WeightsError: as :func:`resolve_weights` and :func:`check_loadable`.
    """
    rw = resolve_weights(name_or_path, family=family, allow_unregistered=allow_unregistered)
    data, _, metadata = read_weights_bytes(rw.path)
    if hashlib.sha256(data).hexdigest() != rw.sha256:
        raise WeightsError(f"{rw.path} changed while it was checked: check that nothing writes it, and run again")
    check_loadable(rw.path, data, metadata, family)
    return rw


@dataclass(frozen=True)
class WeightsCheck:
    """The outcome of :func:`verify_weights` for one registered name."""

    name: str
    source: str
    path: Path
    ok: bool
    problem: str = ""


def verify_weights(names: list[str] | None = None) -> list[WeightsCheck]:
    """Check registered weights: the file exists, is safetensors, matches its sha256 and its family, and
    loads (:func:`check_loadable`: dtypes, finite values, tensors that fit the recorded architecture).

    Args:
        names: registered names to check (``None``: every registered name).

    Returns:
        One :class:`WeightsCheck` per name, in registry order; a name that is bundled and also holds the user's own
        weights (:func:`hidden_user_weights`) has one for each.

    Raises:
        WeightsError: a name in ``names`` is registered nowhere.
    """
    listed = list_weights()
    entries = {e["name"]: e for e in listed if not e["hidden"]}
    unknown = [n for n in names or [] if n not in entries]
    if unknown:
        raise WeightsError(
            f"no weights named {', '.join(map(repr, unknown))}; registered: {', '.join(entries) or 'none'}"
        )
    wanted = set(names or entries)
    checks = []
    for entry in listed:  # registry order; the user's weights hidden by a bundled name are checked too
        name = entry["name"]
        if name not in wanted:
            continue
        try:
            if entry["hidden"]:
                hidden = hidden_user_weights(name)
                if hidden is None:  # the registry changed meanwhile
                    continue
                rw = _resolve_entry(name, user_registry_path().parent, hidden[1], entry["family"])
                data, _, metadata = read_weights_bytes(rw.path)
                check_loadable(rw.path, data, metadata, entry["family"])
            else:
                check_weights(name, family=entry["family"])
        except WeightsError as exc:
            checks.append(WeightsCheck(name, entry["source"], entry["path"], False, str(exc)))
        else:
            checks.append(WeightsCheck(name, entry["source"], entry["path"], True))
    return checks
