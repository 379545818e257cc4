"""Checks that stand between a configuration and a network: one place for every model family.

A network is built from a configuration, which comes from a training config file or from the metadata of a
weights file. A bad value there (an empty channel list, a zero stride, zero attention heads, a hundred
thousand channels) would otherwise surface as a ``ZeroDivisionError`` deep in a constructor, an
``IndexError``, or an attempt to allocate terabytes. Three checks turn every such value into an error of the
right kind, before any memory is allocated:

* :func:`require_sizes`, :func:`require_positive` and :func:`require_heads`: readable rules that name the
  config key (``vae.channels must list at least one size; got []``), called by each family's config check;
* :func:`build_checked`: builds the network first with its parameters on PyTorch's ``meta`` device (shapes
  only, no memory), so any other error of the configuration becomes a :class:`ConfigError`, and refuses a
  network of more than :data:`MAX_PARAMETERS` parameters or :data:`MAX_TENSORS` tensors before anything is
  allocated;
* :func:`build_from_weights`: the same for a weights file, whose errors are :class:`WeightsError` (exit code
  3): the architecture in its metadata is built on the meta device and compared, tensor by tensor, with the
  tensors in the file, and any difference is reported in one line before the real network is allocated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError, WeightsError

M = TypeVar("M", bound=nn.Module)

#: Largest network (parameters and buffers) built from a configuration: 2e9 values are 8 GB of float32, far
#: beyond any CT model here (the shipped ones have tens of millions); more means a wrong number in a config.
MAX_PARAMETERS = 2_000_000_000

#: Most tensors (parameters and buffers) a network built from a configuration may hold: the models here have a
#: few hundred; tens of thousands means a depth or a level count off by orders of magnitude.
MAX_TENSORS = 20_000

#: Tensor constructors that layers use for their parameters and buffers; on the meta device they allocate
#: nothing. Tensors made from data (``torch.tensor``, ``arange``, ``from_numpy``) stay real, so a
#: constructor may still compute with them.
_CONSTRUCTORS = frozenset({
    torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
    torch.randint, torch.eye,
})  # fmt: skip


# -- readable rules ---------------------------------------------------------------------------------------
def require_positive(key: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum`` (e.g. a channel count), else ConfigError naming ``key``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)  # int() of NaN or infinity raises ValueError / OverflowError, not ConfigError
        or value != int(value)
        or value < minimum
    ):
        raise ConfigError(f"{key} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def require_sizes(
    key: str, values: Any, *, length: int | None = None, minimum: int = 1, allow_empty: bool = False
) -> tuple:
    """A list of sizes (channel counts, strides; an entry may itself be a list, e.g. ``(z, y, x)`` strides):
    every number an integer of at least ``minimum``; non-empty unless ``allow_empty``; ``length`` entries
    when given.

    Raises:
        ConfigError: naming ``key`` and the value found.
    """
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ConfigError(f"{key} must be a list of sizes; got {values!r}")
    if not values and not allow_empty:
        raise ConfigError(f"{key} must list at least one size; got {list(values)}")
    if length is not None and len(values) != length:
        raise ConfigError(f"{key} must list {length} entries; got {len(values)}: {list(values)}")
    for i, v in enumerate(values):
        if isinstance(v, Sequence) and not isinstance(v, str):
            for j, x in enumerate(v):
                require_positive(f"{key}[{i}][{j}]", x, minimum=minimum)
        else:
            require_positive(f"{key}[{i}]", v, minimum=minimum)
    return tuple(values)


def require_heads(width_key: str, width: int, heads_key: str, heads: Any) -> int:
    """Attention heads: at least one, and dividing the width they split."""
    heads = require_positive(heads_key, heads)
    if width % heads:
        raise ConfigError(f"{heads_key} ({heads}) must divide {width_key} ({width})")
    return heads


# -- building on the meta device ---------------------------------------------------------------------------
class _TooLarge(Exception):
    pass


class _ShapesOnly(TorchFunctionMode):
    """Tensor constructors called without a device make meta tensors (shape and dtype, no storage). Counts
    what they would have allocated and stops the construction past :data:`MAX_PARAMETERS` values or
    :data:`MAX_TENSORS` tensors (a config asking for a million layers would otherwise take hours to build even
    on the meta device)."""

    def __init__(self) -> None:
        super().__init__()
        self.values = 0
        self.tensors = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _CONSTRUCTORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
            out = func(*args, **kwargs)
            self.values += out.numel()
            self.tensors += 1
            if self.values > MAX_PARAMETERS or self.tensors > MAX_TENSORS:
                raise _TooLarge
            return out
        return func(*args, **kwargs)


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def build_on_meta(factory: Callable[[], M], what: str) -> M:
    """``factory()`` with its parameters and buffers on the meta device: no memory, only shapes.

    Raises:
        ConfigError: the configuration cannot be built (the constructor failed: the message says how).
        OSError, MemoryError: unchanged: the machine's, not the configuration's (torch asks for a temporary folder
            while some layers are built; with none writable it raises FileNotFoundError, which must not be
            reported as weights that are "damaged or edited").
    """
    mode = _ShapesOnly()
    try:
        with mode:
            return factory()
    except (ConfigError, WeightsError, OSError, MemoryError):
        raise
    except _TooLarge:
        if mode.tensors > MAX_TENSORS:
            size = f"more than {MAX_TENSORS} weight tensors (layers)"
        else:
            size = f"more than {MAX_PARAMETERS:.0e} parameters ({MAX_PARAMETERS * 4 / 1e9:.0f} GB as float32)"
        raise ConfigError(f"{what} would have {size}, more than any model here can use: check the channel counts "
                          "and depths of its configuration") from None  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - any failure of a constructor is a configuration it cannot build
        raise ConfigError(f"{what} cannot be built from its configuration ({_one_line(exc)})") from exc


def build_checked(factory: Callable[[], M], what: str) -> M:
    """Build a network after building it on the meta device: any error of its configuration, and a size over
    :data:`MAX_PARAMETERS` values or :data:`MAX_TENSORS` tensors, is a :class:`ConfigError` raised before
    anything is allocated.

    Args:
        factory: builds the network (called twice: once on the meta device, once for real).
        what: the network, for messages (``"the SR denoiser"``).
    """
    build_on_meta(factory, what)
    return factory()


# -- weights ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def weights_architecture(source: str) -> Iterator[None]:
    """Inside, a :class:`ConfigError` (an architecture that cannot be built) is the weights file's fault: it is
    raised as a :class:`WeightsError` (exit code 3) naming ``source``."""
    try:
        yield
    except ConfigError as exc:
        raise WeightsError(
            f"{source} record an architecture that cannot be built ({exc}): the file is damaged or was edited; "
            "use other weights, or export them again"
        ) from exc


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def check_state_fits(
    expected: Mapping[str, Any],
    tensors: Mapping[str, Any],
    source: str,
    *,
    against: str = "the architecture recorded in their own metadata",
    plural: bool = True,
    advice: str = "The file was changed after export or written for another configuration: use "
    "other weights, or export them again",
) -> None:
    """Compare a network's tensors (name -> tensor or shape holder) with those of a weights file.

    Raises:
        WeightsError: one line: how many tensors differ in shape, are missing or are unexpected, with an
            example of each.
    """
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    reshaped = [k for k in expected if k in tensors and _shape(expected[k]) != _shape(tensors[k])]
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} tensor(s) of another shape (e.g. {k}: {_shape(tensors[k])} in the file, "
                     f"{_shape(expected[k])} in the architecture)")  # fmt: skip
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    raise WeightsError(
        f"{source} {'do' if plural else 'does'} not fit {against}: {'; '.join(parts)}. {advice}"
    )


def load_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, **message: Any) -> None:
    """``module.load_state_dict(tensors, strict=True)`` with a one-line :class:`WeightsError` when they do not
    fit (instead of PyTorch's message of one line per tensor); ``message``: ``against``, ``plural`` and
    ``advice`` of :func:`check_state_fits`."""
    check_state_fits(module.state_dict(), tensors, source, **message)
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{source} cannot be loaded ({_one_line(exc)}); use other weights") from None


def build_from_weights(
    factory: Callable[[], M], tensors: Mapping[str, torch.Tensor], source: str, what: str
) -> M:
    """Build the network that a weights file's metadata describes and load the file's tensors into it.

    The architecture is built on the meta device first: one that cannot be built, is over
    :data:`MAX_PARAMETERS`, or whose tensors differ from the file's in name or shape is refused before the
    network is allocated.

    Raises:
        WeightsError: naming ``source``, in one line.
    """
    with weights_architecture(source):
        probe = build_on_meta(factory, what)
    check_state_fits(probe.state_dict(), tensors, source)
    del probe
    model = factory()
    load_state(model, tensors, source)
    return model


def finite_positive(key: str, value: Any) -> float:
    """A float config value that must be finite and > 0 (e.g. an MLP width ratio)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{key} must be a finite number > 0; got {value!r}")
    return float(value)
