"""The seeds every front end takes: 0 to 2**32 - 1, in a module that imports no torch (the command line checks them
when it is parsed).

Adaptation's pair generator (numpy) and the tiles' seeds keep 32 bits of a seed, so a larger seed, or a negative one,
gave exactly the output of a smaller one (``--seed 4294967296`` that of ``--seed 0``) while the provenance recorded
two different seeds; such seeds are refused instead.
"""

from __future__ import annotations

import operator

from .errors import ConfigError

#: The largest seed: 2**32 - 1.
MAX_SEED = 2**32 - 1


def check_seed(seed: int) -> int:
    """``seed`` as an int, when it is a whole number from 0 to :data:`MAX_SEED` (numpy's integers too).

    Raises:
        ConfigError: anything else (a float, a bool, a negative or larger number); the message gives the range.
    """
    try:
        if isinstance(seed, bool):
            raise TypeError
        value = operator.index(seed)
    except TypeError:
        raise ConfigError(f"the seed must be a whole number from 0 to {MAX_SEED}; got {seed!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"the seed must be from 0 to {MAX_SEED} (2**32 - 1); got {value}: the random streams take "
                          "32-bit seeds, so outside that range two seeds would give the same output (2**32 the same "
                          f"as 0): give a seed from 0 to {MAX_SEED}")
    return int(value)
