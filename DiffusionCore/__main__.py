import os
import sys

from .files import soft_limit  # the standard library only: read before PyTorch is loaded

#: Below this address-space limit (``ulimit -v``) loading PyTorch fails: an ImportError ("failed to map segment"), a
#: MemoryError, or, just under 1 GiB, a loop that never ends (measured with torch 2.x on x86_64 Linux). No run fits in
#: it anyway, so the command says so before it tries.
MIN_ADDRESS_SPACE = 1_100_000_000
_NO_MEMORY = (b"error: not enough memory to start: this session's address-space limit (ulimit -v) is %d MiB, and "
              b"loading PyTorch alone needs about 1 GiB of it (a run needs several GiB more): raise the limit "
              b"(ulimit -v, or the job scheduler's memory request)\n")  # fmt: skip

_limit = soft_limit("RLIMIT_AS")
if _limit is not None and _limit < MIN_ADDRESS_SPACE:
    os.write(2, _NO_MEMORY % (_limit >> 20))
    sys.exit(5)
try:
    import torch  # noqa: F401  (every command loads it; loaded here, a failure for want of memory is said as such)

    from .cli.main import main
except (ImportError, OSError, MemoryError) as exc:
    # above the threshold PyTorch may still not fit (another build maps more): "failed to map segment" from the
    # dynamic loader, or a MemoryError; anything else (a broken install) keeps its own traceback
    if not isinstance(exc, MemoryError) and "failed to map segment" not in str(exc):
        raise
    said = f"this session's address-space limit (ulimit -v) is {_limit >> 20} MiB and " if _limit else ""
    os.write(2, f"error: not enough memory to start: {said}loading PyTorch failed ({type(exc).__name__}): raise the "
                "limit (ulimit -v, or the job scheduler's memory request), or free memory\n".encode())  # fmt: skip
    os._exit(5)  # a normal exit would run Python's shutdown, which may fail again for want of memory

sys.exit(main())
