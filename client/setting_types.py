"""Field types of a settings class: parsing an environment variable's string into a field's
type, checking (and normalising) a value given as an argument, and naming a type in messages.

Used by :class:`headrace.client.config.Settings`. Accepted: ``bool``, ``int``, ``float``,
``str``, ``Literal[...]``, ``X | None``, unions, ``tuple[X, ...]`` and mappings; an ``int``
is accepted for a ``float`` and a list for a tuple, a ``bool`` is never a number.
"""

from __future__ import annotations

import numbers
import typing
from collections.abc import Mapping
from typing import Any, Literal

from headrace.client.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_env_value(raw: str, typ: Any, env_name: str) -> Any:
    """The value of type ``typ`` that the environment variable ``env_name`` holds as ``raw``
    (tuples as comma-separated items; "", "none" or "null" for an optional field's None).

    Raises:
        ConfigError: ``raw`` is not a valid ``typ``, naming the variable and how to fix it.
    """
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        if raw.strip().lower() in {"", "none", "null"}:
            return None
        return parse_env_value(raw, inner[0], env_name)
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        if typ is str:
            return raw
        if origin in (tuple, list):
            items = [x.strip() for x in raw.split(",") if x.strip()]
            conv = args[0] if args else str
            return tuple(parse_env_value(x, conv, env_name) for x in items)
    except ValueError as e:
        raise ConfigError(
            f"{env_name}={raw!r} is not a valid {getattr(typ, '__name__', typ)}; "
            f"set it to a {getattr(typ, '__name__', typ)} or unset it"
        ) from e
    return raw


_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, computed once per class."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def type_name(typ: Any) -> str:
    """``typ`` as messages name it (``'a' or 'b'`` for a Literal)."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(typ))
    if origin is not None:
        return str(typ).replace("typing.", "")
    return getattr(typ, "__name__", str(typ))


def _coerce_union(value: Any, args: tuple[Any, ...]) -> tuple[bool, Any]:
    if value is None:
        return type(None) in args, value
    for inner in (a for a in args if a is not type(None)):
        ok, out = coerce(value, inner)
        if ok:
            return True, out
    return False, value


def _coerce_tuple(value: Any, args: tuple[Any, ...]) -> tuple[bool, Any]:
    if not isinstance(value, (tuple, list)):
        return False, value
    inner = args[0] if args else Any
    out = []
    for item in value:
        ok, conv = coerce(item, inner)
        if not ok:
            return False, value
        out.append(conv)
    return True, tuple(out)


def _coerce_scalar(value: Any, typ: Any) -> tuple[bool, Any]:
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool), value
    if typ is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if isinstance(typ, type):
        return isinstance(value, typ), value
    return True, value


def coerce(value: Any, typ: Any) -> tuple[bool, Any]:
    """``(ok, value)``: whether ``value`` is of the documented type ``typ``, and the value
    to store (an int for a float field becomes a float, a list for a tuple field a tuple)."""
    if typ is Any:
        return True, value
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union or (origin is not None and type(None) in args and len(args) > 1):
        return _coerce_union(value, args)
    if origin is Literal:
        return value in args, value
    if origin is tuple:
        return _coerce_tuple(value, args)
    if origin in (dict, Mapping) or typ in (dict, Mapping):
        return isinstance(value, Mapping), value
    return _coerce_scalar(value, typ)
