import os
import sys

#: Below this address-space limit (``ulimit -v``) loading PyTorch fails: an ImportError ("failed to map segment"), a
#: MemoryError, or, just under 1 GiB, a loop that never ends (measured with torch 2.x on x86_64 Linux). No run fits in
#: it anyway, so the command says so before it tries.
MIN_ADDRESS_SPACE = 1_100_000_000
_NO_MEMORY = (b"error: not enough memory to start: this session's address-space limit (ulimit -v) is %d MiB, and "
              b"loading PyTorch alone needs about 1 GiB of it (a run needs several GiB more): raise the limit "
              b"(ulimit -v, or the job scheduler's memory request)\n")  # fmt: skip


def _address_space_limit() -> int | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError, AttributeError):  # Windows has no resource module
        return None
    return None if soft == resource.RLIM_INFINITY or soft < 0 else int(soft)


_limit = _address_space_limit()
if _limit is not None and _limit < MIN_ADDRESS_SPACE:
    os.write(2, _NO_MEMORY % (_limit >> 20))
    sys.exit(5)
try:
    from .cli.main import main
except MemoryError:  # PyTorch could not be loaded all the same (the machine itself is out of memory)
    os.write(2, b"error: not enough memory to start: loading PyTorch failed; free memory, or raise ulimit -v\n")
    os._exit(5)  # a normal exit would run Python's shutdown, which fails again for want of memory

sys.exit(main())
