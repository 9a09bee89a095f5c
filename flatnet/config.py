"""Typed, validated configuration: one frozen dataclass per process, loaded in one place.

Each process (node, lighthouse, gateway) declares its configuration as nested dataclasses with
defaults beside the fields. :func:`load` reads a TOML file and converts it with :func:`from_dict`,
which checks every value against the field's annotation. Any problem raises :class:`ConfigError`
naming the file and the dotted key, e.g.::

    /etc/flatnet/node.toml: key 'tunnel.listen_port': expected an integer in 1..65535, got 'abc'

Supported annotations: ``str``, ``int``, ``float``, ``bool``, ``ipaddress`` address/network types,
``pathlib.Path``, ``list[T]``, ``dict[str, T]``, ``T | None``, ``Literal[...]`` and nested
dataclasses. Unknown keys are errors too (a typo must not be silently ignored). A field may carry
``metadata={"check": fn}`` where ``fn(value)`` returns an error string or ``None``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")

_IP_TYPES = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
)


class ConfigError(ValueError):
    """A configuration value is missing or invalid. ``str()`` names the file and the key."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: " if source else ""
        super().__init__(f"{where}key '{key}': {message}" if key else f"{where}{message}")


def load(path: str | Path, cls: type[T]) -> T:
    """Read TOML at *path* and build a validated *cls*; errors name the file and key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None
    return from_dict(data, cls, source=str(path))


def from_dict(data: Any, cls: type[T], source: str = "", prefix: str = "") -> T:
    """Convert a parsed mapping into dataclass *cls*, validating every field."""
    return _convert(data, cls, source, prefix)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value: Any, annotation: Any, source: str, key: str) -> Any:
    origin = get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _convert_dataclass(value, annotation, source, key)
    if origin in (typing.Union, types.UnionType):
        args = get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, source, key)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(source, key, " or ".join(errors))
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(source, key, f"expected one of {list(choices)}, got {_describe(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {_describe(value)}")
        (item_type, *_) = get_args(annotation) or (Any,)
        items = [_convert(v, item_type, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a table, got {_describe(value)}")
        _, value_type = get_args(annotation) or (str, Any)
        return {str(k): _convert(v, value_type, source, f"{key}.{k}") for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {_describe(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(source, key, f"expected a number, got {_describe(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {_describe(value)}")
        return value
    if annotation is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(source, key, f"expected a path string, got {_describe(value)}")
        return Path(value)
    if annotation in _IP_TYPES:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected an address string, got {_describe(value)}")
        try:
            return annotation(value)
        except ValueError as exc:
            raise ConfigError(source, key, str(exc)) from None
    raise TypeError(f"config annotation {annotation!r} at {key!r} is not supported")


def _convert_dataclass(value: Any, cls: type, source: str, prefix: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(source, prefix, f"expected a table, got {_describe(value)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(source, key, f"unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in value:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(source, key, "required key is missing")
            continue
        converted = _convert(value[name], hints[name], source, key)
        check = field.metadata.get("check")
        if check is not None:
            problem = check(converted)
            if problem:
                raise ConfigError(source, key, problem)
        kwargs[name] = converted
    return cls(**kwargs)


def port_check(value: int) -> str | None:
    """``metadata={"check": port_check}`` for TCP/UDP port fields (0 means 'pick one')."""
    return None if 0 <= value <= 65535 else f"expected a port in 0..65535, got {value}"


def positive_check(value: float) -> str | None:
    return None if value > 0 else f"expected a positive number, got {value}"
