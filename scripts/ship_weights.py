"""Put exported weights into the package as bundled defaults (a maintainer step before a commit).

Copies a ``.safetensors`` file written by a training run's export into ``DiffusionCore/weights/NAME.safetensors``
with its metadata completed (name, description, model card), and records its sha256 in the bundled
registry ``DiffusionCore/weights/registry.json``. Refuses files that are not safetensors, hold non-finite
values, or belong to another model family. Both files are written atomically.

Usage::

    python scripts/ship_weights.py runs/tp-B/throughplane.safetensors --name sr-default --family sr \\
        --description "..." --model-card "See docs/model_cards/sr-default.md ..."

Score the file with the benchmark scripts first (``benchmarks/sr_quality.py``) and ship it only when it beats
what is shipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from DiffusionCore.weights.registry import (
    BUNDLED_REGISTRY,
    load_safetensors,
    read_registry,
    read_safetensors_header,
    save_safetensors,
    write_registry,
)

#: The largest finite float16 value.
HALF_MAX = float(torch.finfo(torch.float16).max)


def ship(src: Path, name: str, family: str, description: str, model_card: str, *, half: bool = False,
         registry_file: Path = BUNDLED_REGISTRY) -> tuple[Path, str]:
    """Write the bundled copy and its registry entry (``registry_file``, the weights beside it); returns
    ``(path, sha256)``. ``half``: store the floating-point tensors as float16 (half the size; the networks load
    them into float32), refused where a value would not fit float16's range."""
    _, metadata = read_safetensors_header(src)
    if metadata.get("family") != family:
        raise SystemExit(f"error: {src} records family {metadata.get('family')!r}, not {family!r}")
    tensors, _ = load_safetensors(src)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"error: {src} holds non-finite values in {bad[0]} (and {len(bad) - 1} more): not shipped")
    if half:
        big = [k for k, v in tensors.items() if v.is_floating_point() and float(v.abs().max()) > HALF_MAX]
        if big:
            raise SystemExit(f"error: {big[0]} holds values beyond float16's range: ship it without --half")
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    registry_file = Path(registry_file)
    dest = registry_file.parent / f"{name}.safetensors"
    meta = {**metadata, "name": name, "description": description, "model_card": model_card}
    digest = save_safetensors(dest, tensors, meta)
    entries = read_registry(registry_file)
    entries[name] = {
        "file": dest.name, "sha256": digest, "family": family, "description": description, "model_card": model_card,
    }
    write_registry(registry_file, entries)
    for path in (dest, registry_file):
        path.chmod(0o644)  # package data: readable by everyone
    return dest, digest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", type=Path, help="the exported .safetensors file")
    p.add_argument("--name", required=True, help="registry name, e.g. sr-default")
    p.add_argument("--family", required=True, help="model family the file must record (sr, xray, ...)")
    p.add_argument("--description", required=True, help="one sentence for listings")
    p.add_argument("--model-card", required=True, help="what it was trained on, intended use, where the card is")
    p.add_argument("--half", action="store_true",
                   help="store the tensors as float16 (half the file); score the shipped file again to show that "
                   "nothing measurable changed")  # fmt: skip
    args = p.parse_args(argv)
    dest, digest = ship(args.weights, args.name, args.family, args.description, args.model_card, half=args.half)
    print(f"{dest} ({dest.stat().st_size / 2**20:.2f} MiB) sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
