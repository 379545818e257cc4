"""Reading a weights registry file (``registry.json``) without torch: what the registry checks and resolves with, and
what a Slicer panel lists the weights of before the application has loaded torch."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import WeightsError


def read_registry(path: Path) -> dict[str, dict[str, Any]]:
    """The entries (name -> entry) of the registry file ``path``; empty when there is none."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (an editor's) is fine
    except (OSError, ValueError) as exc:  # ValueError: JSON syntax, or bytes that are not UTF-8
        raise WeightsError(
            f"weights registry {path} is unreadable ({exc}); fix or delete it (deleting it unregisters every "
            "weights file imported: fix its JSON to keep them)"
        ) from exc
    entries = data.get("weights", {}) if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise WeightsError(
            f'weights registry {path} must be {{"weights": {{name: entry}}}}; fix or delete it'
        )
    bad = [name for name, entry in entries.items() if not isinstance(entry, dict)]
    if bad:
        raise WeightsError(
            f"weights registry {path} is unreadable (its entry {bad[0]!r} is not a JSON object with 'file', "
            "'sha256' and 'family'); fix or delete it"
        )
    return entries


def find_sha256(registries: Iterable[dict[str, dict[str, Any]]], sha: str) -> tuple[str, dict[str, Any]] | None:
    """``(name, entry)`` of the first registered weights whose sha256 is ``sha``, the registries' entries searched in
    the order given (the bundled registry first, then the user's); None when none holds it."""
    for entries in registries:
        for name, entry in entries.items():
            if str(entry.get("sha256", "")).lower() == sha:
                return str(name), entry
    return None


def registry_rows(
    registries: Iterable[tuple[str, Path, dict[str, dict[str, Any]]]],
) -> Iterator[tuple[str, Path, str, dict[str, Any], bool]]:
    """``(source, folder, name, entry, hidden)`` for every entry of ``registries`` (``(source, folder, entries)``, the
    bundled registry first): ``hidden`` when a user entry has the name of a bundled one, which that name runs (weights
    a user imported under it before weights of that name shipped)."""
    bundled: set[str] = set()
    for source, folder, entries in registries:
        for name, entry in entries.items():
            yield source, folder, str(name), entry, source != "bundled" and name in bundled
        if source == "bundled":
            bundled.update(entries)
