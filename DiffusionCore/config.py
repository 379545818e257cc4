"""Configuration files (JSON or YAML) read into typed, documented dataclasses.

Every training and model configuration in DiffusionCore is a dataclass whose fields all have a default and
document themselves::

    @dataclass
    class OptimConfig:
        lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})

    @dataclass
    class TrainConfig:
        steps: int = field(default=1000, metadata={"help": "Number of optimizer steps."})
        optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer settings."})

    cfg = load_config("train.yaml", TrainConfig)      # or a .json file, or a dict
    config_to_dict(cfg)                                # plain JSON-ready dict
    print(config_help(TrainConfig))                    # one line per field: type, default, help

A file only needs the keys it changes; an unknown key or a value of the wrong type raises
:class:`~DiffusionCore.errors.ConfigError` naming the key, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, OutputError
from .files import partial_file, publish, remove_stale_partials

T = TypeVar("T")

_YAML_SUFFIXES = (".yaml", ".yml")
_MISSING = dataclasses.MISSING


def load_config(source: str | os.PathLike | Mapping | None, cls: type[T], *, where: str | None = None) -> T:
    """Read a configuration into the dataclass ``cls``.

    Args:
        source: a ``.json`` / ``.yaml`` / ``.yml`` file, a dict (e.g. already parsed), ``None`` (all
            defaults) or an instance of ``cls`` (returned as is).
        cls: the (possibly nested) dataclass type.
        where: what messages call a dict ``source`` (the file it was read from, e.g. with overrides merged);
            default ``config``.

    Returns:
        An instance of ``cls``; fields absent from ``source`` take their defaults.

    Raises:
        ConfigError: unreadable file, unknown key, wrong value type, missing required field, or a value
            the dataclass itself rejects in ``__post_init__``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    if isinstance(source, cls):
        return source
    if source is None:
        data: Any = {}
        where = "defaults"
    elif isinstance(source, Mapping):
        data = source
        where = where or "config"
    elif isinstance(source, str | os.PathLike):
        data = read_config_file(source)
        where = str(source)
    else:
        raise ConfigError(
            f"cannot read a configuration from {type(source).__name__}: give a JSON/YAML file or a dict"
        )
    return _build(data, cls, prefix="", where=where)


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse a JSON or YAML file into a dict (the suffix decides; other suffixes try JSON, then YAML).

    Raises:
        ConfigError: missing file, syntax error, or a top level that is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist: check the path (JSON or YAML file expected)")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows Notepad's "UTF-8") is ignored
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p} is not a text file (byte {exc.start} is not UTF-8): a JSON or YAML config saved as UTF-8 is "
            "expected"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text) if text.strip() else {}
        elif suffix in _YAML_SUFFIXES:
            data = _yaml_load(text, p)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = _yaml_load(text, p)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{p} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{p} must hold a mapping of keys to values at the top level, not {type(data).__name__}"
        )
    return dict(data)


def _yaml_load(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is a dependency of the train extra
        raise ConfigError(
            f"reading {path} needs PyYAML: `pip install pyyaml`, or use a .json config"
        ) from exc
    try:
        return yaml.load(text, Loader=_yaml_loader(yaml))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc


#: A float in exponent form without a dot (``1e-3``, ``5E+2``): YAML 1.2 and every programming language read it as
#: a number, PyYAML (YAML 1.1) as a string; ``--help`` prints defaults in this form.
_YAML_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _yaml_loader(yaml: Any) -> type:
    """PyYAML's SafeLoader that also reads :data:`_YAML_EXPONENT_FLOAT` as a float, so that
    ``learning_rate: 1e-3`` is the number it looks like."""

    class _ConfigLoader(yaml.SafeLoader):
        pass

    _ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_EXPONENT_FLOAT, list("-+0123456789"))
    return _ConfigLoader


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write a dataclass config (or dict) as JSON or YAML (by suffix), atomically.

    Raises:
        OutputError: the folder cannot be written.
    """
    p = Path(path)
    data = config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    if p.suffix.lower() in _YAML_SUFFIXES:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(p)
        tmp = partial_file(p)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        publish(tmp, p)
    except OSError as exc:
        raise OutputError(
            f"cannot write config {p}: {exc.strerror or exc}; choose a writable folder"
        ) from exc
    return p


def config_to_dict(cfg: Any) -> Any:
    """A dataclass config as plain JSON-ready values (dicts, lists, str, numbers, bools, None).

    Tuples become lists, paths strings and enums their values; nested dataclasses become nested dicts.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    if isinstance(cfg, enum.Enum):
        return cfg.value
    return cfg


def config_help(cls: type, prefix: str = "") -> str:
    """One line per field: ``name (type, default value): help``; nested dataclasses as ``outer.inner``."""
    lines: list[str] = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints.get(f.name, Any)
        name = prefix + f.name
        help_text = f.metadata.get("help", "")
        if _is_dataclass_type(tp):
            lines.append(f"{name}: {help_text}".rstrip(": ").rstrip())
            lines.append(config_help(tp, prefix=name + "."))
            continue
        lines.append(
            f"{name} ({_type_name(tp)}, default {_default_text(f)}): {help_text}".rstrip(": ").rstrip()
        )
    return "\n".join(line for line in lines if line)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not _MISSING:
        return json.dumps(config_to_dict(f.default))
    if f.default_factory is not _MISSING:
        return json.dumps(config_to_dict(f.default_factory()))
    return "required"


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("pathlib.", "")


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _build(data: Any, cls: type, *, prefix: str, where: str) -> Any:
    section = prefix.rstrip(".") or "the top level"
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config {'key ' + repr(prefix.rstrip('.')) if prefix else 'top level'} in {where} must be a "
            f"mapping of keys to values, got {_got(data)}"
        )
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r} in {where}{hint}; valid keys in {section}: "
                f"{', '.join(fields)}"
            )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints.get(name, Any), prefix + name, where)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(
                f"config key {prefix + name!r} is required in {where} and has no default; add it"
            )
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid config {section} in {where}: {exc}") from exc


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    def wrong(expected: str | None = None) -> ConfigError:
        return ConfigError(
            f"config key {key!r} in {where}: expected {expected or _type_name(tp)}, got {_got(value)}"
        )

    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        return _build(value, tp, prefix=key + ".", where=where)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise wrong()
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise wrong("one of " + ", ".join(repr(a) for a in args))
    if tp is type(None):
        if value is None:
            return None
        raise wrong("null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong("bool (true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong("int")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise wrong("float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong("str")
    if tp in (Path, os.PathLike):
        if isinstance(value, str | os.PathLike):
            return Path(value)
        raise wrong("path (str)")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        raise wrong("one of " + ", ".join(repr(m.value) for m in tp))
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, list | tuple):
            raise wrong()
        item = args[0] if args else Any
        return [_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, list | tuple):
            raise wrong()
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong(f"{_type_name(tp)} with {len(args)} values")
        return tuple(_convert(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        kt, vt = args if args else (Any, Any)
        return {
            _convert(k, kt, f"{key}.{k}", where): _convert(v, vt, f"{key}.{k}", where)
            for k, v in value.items()
        }
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise wrong()
    return value
