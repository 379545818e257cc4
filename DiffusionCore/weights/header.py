"""Reading a safetensors file's header without torch: what the weights registry checks first, and what a Slicer panel
reads to judge a chosen file before the application has loaded torch.

Nothing here loads a tensor: the header (tensor names, dtypes, shapes, offsets) and DiffusionCore's metadata are
read and checked (a regular file, not another format, not truncated, a header of sane size, valid JSON without a key
given twice). :mod:`DiffusionCore.weights.registry` hashes, registers and loads.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import WeightsError

#: Key of the safetensors header metadata that holds DiffusionCore's JSON-encoded description.
METADATA_KEY = "diffusioncore"
#: safetensors refuses headers larger than this; a larger size field means "not a safetensors file".
_SAFETENSORS_MAX_HEADER_BYTES = 100 * 1024 * 1024
#: The largest header read: a DiffusionCore file's is a few KiB (a checkpoint's tens of KiB); a JSON header of
#: tens of MiB (a million empty tensor entries) costs gigabytes to parse, so it is refused before it is read.
_MAX_HEADER_BYTES = 8 * 1024 * 1024


def _describe_foreign_format(head: bytes) -> str | None:
    """Name the format of a file that is not safetensors, from its first bytes (None if unknown)."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (e.g. a legacy torch.save .pt/.ckpt file)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (e.g. a torch.save .pt/.pth/.ckpt file, which contains a pickle)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    return None


def open_regular_file(p: Path) -> tuple[BinaryIO, int]:
    """Open ``p`` for reading, refusing anything that is not a regular file (after symlinks) before reading.

    A FIFO, a socket or a device (``/dev/zero``, ``/dev/stdin``) would block or never end; it is opened
    non-blocking and checked on the open descriptor, so a file swapped in after the check cannot slip through.

    Returns:
        ``(file object, size in bytes)``.
    """
    try:
        mode = p.stat().st_mode  # Windows has no O_NONBLOCK: check the path first there too
        if not stat.S_ISREG(mode):
            raise WeightsError(_not_regular(p, mode))
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {p}: {exc.strerror or exc}; check the path") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise WeightsError(_not_regular(p, st.st_mode))
    return os.fdopen(fd, "rb"), st.st_size


def _not_regular(p: Path, mode: int) -> str:
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a plain file")
    return f"{p} is {kind}, not a regular file: weights must be a .safetensors file on disk; give its path"


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads`: Python keeps the last of two equal keys while safetensors'
    own (Rust) parser refuses the header, so a header with one would be read differently by the two."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _parse_json(p: Path, text: bytes | str, what: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, _DuplicateKey, RecursionError) as exc:
        reason = exc if isinstance(exc, _DuplicateKey) else "nested too deeply" if isinstance(
            exc, RecursionError) else "not JSON"
        raise WeightsError(
            f"{p} is not a valid safetensors file (corrupt {what}: {reason}): re-download or re-export it"
        ) from None


def parse_header(p: Path, f: BinaryIO, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header of the safetensors file open as ``f`` (``size`` bytes): see :func:`read_safetensors_header`."""
    head = f.read(8)
    foreign = _describe_foreign_format(head)
    if foreign is not None:
        raise WeightsError(
            f"{p} is {foreign}, not safetensors: it is never loaded, because unpickling can run arbitrary "
            "code. Convert it to safetensors in a trusted environment (load it there and save the state "
            "dict with safetensors.torch.save_file), then import the converted file"
        )
    if len(head) < 8:
        raise WeightsError(
            f"{p} is not a safetensors file (only {size} bytes): re-download or re-export it"
        )
    header_len = int.from_bytes(head, "little")
    if header_len > _MAX_HEADER_BYTES:
        if header_len <= _SAFETENSORS_MAX_HEADER_BYTES:
            raise WeightsError(
                f"{p} has a {header_len / 2**20:.0f} MiB safetensors header (at most "
                f"{_MAX_HEADER_BYTES // 2**20} MiB is read): it is not a DiffusionCore weights file; use other weights"
            )
        raise WeightsError(
            f"{p} is not a safetensors file (its first 8 bytes are not a header size): weights must be "
            "safetensors files exported by DiffusionCore or converted with safetensors.torch.save_file"
        )
    raw = f.read(header_len)
    if len(raw) < header_len:
        if raw[:1] == b"{":
            raise WeightsError(
                f"{p} is truncated (header cut after {len(raw)} of {header_len} bytes): the download or copy "
                "was interrupted; fetch or export the file again"
            )
        raise WeightsError(f"{p} is not a safetensors file: weights must be .safetensors files")
    header = _parse_json(p, raw, "header")
    if not isinstance(header, dict):
        raise WeightsError(
            f"{p} is not a valid safetensors file (corrupt header): re-download or re-export it"
        )
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict):
        raise WeightsError(
            f"{p} is not a valid safetensors file (its __metadata__ is not a mapping): re-download or re-export it"
        )
    data_end = 0
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError("offsets must be two non-negative integers in order")
        except (TypeError, KeyError, ValueError) as exc:
            raise WeightsError(
                f"{p} has a corrupt entry for tensor {name!r}: re-download or re-export it"
            ) from exc
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise WeightsError(
            f"{p} is truncated ({size} bytes, its header describes {expected}): the download or copy was "
            "interrupted; fetch or export the file again"
        )
    metadata: dict[str, Any] = {}
    if METADATA_KEY in raw_meta:
        if not isinstance(raw_meta[METADATA_KEY], str):
            raise WeightsError(f"{p} has unreadable '{METADATA_KEY}' metadata: re-export the weights")
        metadata = _parse_json(p, raw_meta[METADATA_KEY], f"'{METADATA_KEY}' metadata")
        if not isinstance(metadata, dict):
            raise WeightsError(f"{p} has '{METADATA_KEY}' metadata that is not a JSON object: re-export it")
    return header, metadata


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check that a file is a complete safetensors file and return its header, reading no tensor data.

    Returns:
        ``(tensor_entries, metadata)``: tensor name -> ``{"dtype", "shape", "data_offsets"}``, and the
        decoded ``"diffusioncore"`` metadata (empty dict when absent).

    Raises:
        WeightsError: missing file, a folder, not a regular file (FIFO, device), another format (pickles are
            named as such and never loaded), truncated file, a header over :data:`_MAX_HEADER_BYTES`, or a corrupt
            header (not JSON, nested too deeply, a key given twice).
    """
    p = existing_weights_file(path)
    f, size = open_regular_file(p)
    with f:
        return parse_header(p, f, size)


def existing_weights_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"weights file {p} does not exist: check the path or the weights name")
    if p.is_dir():
        if _CHECKPOINT_FOLDER.match(p.name) and (p / "state.json").is_file():  # its files are refused as weights
            raise WeightsError(f"{p} is a training checkpoint, kept for --resume, not weights to run or import: "
                               f"{run_export_advice(p.parent)}")  # fmt: skip
        exported = sorted(str(f) for f in p.glob("*.safetensors") if f.is_file())  # a training run's export
        inside = (f"give the weights file inside it: {' or '.join(exported)}" if exported else
                  "it holds no exported .safetensors file (a training run exports its weights when it ends)")
        raise WeightsError(f"{p} is a folder, not a weights file; {inside}")
    return p


#: A training checkpoint's folder (``checkpoint-00000300``, as ``train.checkpoint`` names them).
_CHECKPOINT_FOLDER = re.compile(r"^checkpoint-\d{8,}$")


def run_export_advice(run: Path) -> str:
    """What to give instead of a training run's checkpoint (its folder or a file in it): the weights the run exported,
    or how to get them."""
    exported = sorted(str(f) for f in run.glob("*.safetensors") if f.is_file()) if run.is_dir() else []
    if exported:
        return f"use the run's exported weights instead: {' or '.join(exported)}"
    return (
        f"use the weights the run exports when it ends ({run} holds none yet): continue it with "
        f"`python -m DiffusionCore train FAMILY --resume --out-dir {shell_word(run)} ...`; a train sr / vae run "
        f"is exported with `python -m DiffusionCore train export-sr {shell_word(run)} OUT.safetensors`"
    )


def shell_word(text: str | os.PathLike) -> str:
    """``text`` quoted as one word of a command to paste into this system's shell (a path with spaces, quotes or
    accents): POSIX shell quoting, or the Windows command line's on Windows. A path (``os.PathLike``) that starts
    with ``-`` is written ``./-w.safetensors`` (``.\\-w.safetensors`` on Windows), which the command cannot take for
    an option; a name (``str``) is quoted as it is."""
    word = os.fspath(text)
    if isinstance(text, os.PathLike) and word.startswith("-"):
        word = os.curdir + os.sep + word
    return subprocess.list2cmdline([word]) if sys.platform == "win32" else shlex.quote(word)
