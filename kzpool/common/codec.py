"""The JSON codec of kzpool's messages: dataclass fields to JSON keys and back, checked.

Each field's type says what its JSON value must be (``str``, ``int``, ``float``, ``bool``,
``X | None``, ``tuple[X, ...]`` (an array), ``dict``, an ``Enum`` by value, a ``Literal``, a
nested dataclass); a value of another type is a
:class:`~kzpool.common.errors.ProtocolError` naming the field.  A class that checks itself
as it is made (``__post_init__``) is checked the same on decode.  A field's metadata may
name its JSON key (``{"wire": "class"}``).  The layout of each class is read once.

An object field (``dict``, ``Any``: a call's arguments, an AMQP table) is checked all the way
down, without recursion: at most :data:`MAX_DEPTH` levels of objects and arrays, and whole
numbers that fit AMQP's 64-bit integers; anything deeper or bigger is a ``ProtocolError``
here rather than a ``RecursionError`` or ``struct.error`` in whoever encodes it next.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Literal, TypeVar, Union

from .errors import ProtocolError

T = TypeVar("T")
MAX_DEPTH = 32  # objects and arrays inside an object field
_INT64 = 1 << 63
Check = Callable[[Any, str], Any]
_LAYOUTS: dict[type, tuple[tuple[str, str, Check, bool], ...]] = {}
_OUT_LAYOUTS: dict[type, tuple[tuple[str, str, bool], ...]] = {}


def to_wire(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON object, its ``OP`` (if it has one) as ``op``."""
    out: dict[str, Any] = {"op": obj.OP} if getattr(obj, "OP", "") else {}
    for name, wire_name, nested in _out_layout(type(obj)):
        value = getattr(obj, name)
        if not nested or value is None:
            out[wire_name] = value
        elif isinstance(value, enum.Enum):
            out[wire_name] = value.value
        else:
            out[wire_name] = to_wire(value)
    return out


def _out_layout(cls: type) -> tuple[tuple[str, str, bool], ...]:
    """Each field's name, JSON key, and whether its type is an ``Enum`` or a dataclass
    (optional or not): the only values :func:`to_wire` converts."""
    layout = _OUT_LAYOUTS.get(cls)
    if layout is None:
        hints = typing.get_type_hints(cls)
        layout = tuple(
            (f.name, f.metadata.get("wire", f.name),
             any(isinstance(t, type) and (issubclass(t, enum.Enum) or is_dataclass(t))
                 for t in (hints[f.name], *typing.get_args(hints[f.name]))))
            for f in fields(cls))
        _OUT_LAYOUTS[cls] = layout
    return layout


def build(cls: type[T], obj: dict[str, Any], where: str) -> T:
    """An instance of ``cls`` from a JSON object, every field checked."""
    values = {}
    for name, wire_name, check, required in _layout(cls):
        if wire_name in obj:
            values[name] = check(obj[wire_name], f"{where}.{wire_name}")
        elif required:
            raise ProtocolError(f"malformed {where}: {wire_name} is missing")
    return cls(**values)


def _layout(cls: type) -> tuple[tuple[str, str, Check, bool], ...]:
    layout = _LAYOUTS.get(cls)
    if layout is None:
        hints = typing.get_type_hints(cls)
        layout = tuple(
            (f.name, f.metadata.get("wire", f.name), _checker(hints[f.name]),
             f.default is MISSING and f.default_factory is MISSING)
            for f in fields(cls))
        _LAYOUTS[cls] = layout
    return layout


def _checker(hint: Any) -> Check:
    """A function that checks (and converts) one JSON value against a field's type."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        inner = [_checker(t) for t in options if t is not type(None)]
        nullable = type(None) in options

        def check_union(value: Any, where: str) -> Any:
            if value is None and nullable:
                return None
            return inner[0](value, where)
        return check_union
    if hint is Any:
        return _bounded
    if origin is Literal:
        return _one_of(typing.get_args(hint))
    if origin is tuple:
        items = _checker(typing.get_args(hint)[0])  # tuple[X, ...]: a JSON array of X
        is_array = _of_type(list, "an array")
        return lambda value, where: tuple(items(v, f"{where}[]") for v in is_array(value,
                                                                                   where))
    if origin is dict or hint is dict:
        is_object = _of_type(dict, "an object")
        return lambda value, where: _bounded(is_object(value, where), where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum(hint)
    if isinstance(hint, type) and is_dataclass(hint):
        nested = hint
        return lambda value, where: build(nested, _of_type(dict, "an object")(value, where),
                                          where)
    if hint is bool:
        return _of_type(bool, "true or false")
    if hint is int:
        return _integer
    if hint is float:
        return _number
    if hint is str:
        return _of_type(str, "a string")
    raise TypeError(f"no wire check for {hint!r}")


def _of_type(kind: type, what: str) -> Check:
    def check(value: Any, where: str) -> Any:
        if not isinstance(value, kind):
            raise ProtocolError(f"malformed {where}: not {what}")
        return value
    return check


def _bounded(value: Any, where: str) -> Any:
    """``value`` once every object and array in it is at most :data:`MAX_DEPTH` deep and every
    whole number fits 64 bits (walked with a stack, not recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise ProtocolError(f"malformed {where}: nested over {MAX_DEPTH} levels deep")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                  else item))
        elif isinstance(item, int) and not isinstance(item, bool) and not (
                -_INT64 <= item < _INT64):
            raise ProtocolError(f"malformed {where}: the number {str(item)[:40]} does not fit"
                                " 64 bits")
    return value


def _integer(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"malformed {where}: not a whole number")
    if not -_INT64 <= value < _INT64:
        raise ProtocolError(f"malformed {where}: {str(value)[:40]} does not fit 64 bits")
    return value


def _number(value: Any, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(f"malformed {where}: not a number")
    return float(value)


def _one_of(allowed: tuple[Any, ...]) -> Check:
    def check(value: Any, where: str) -> Any:
        if not isinstance(value, str | int) or isinstance(value, bool) or value not in allowed:
            raise ProtocolError(f"malformed {where}: {str(value)[:40]!r} is not one of"
                                f" {', '.join(map(str, allowed))}")
        return value
    return check


def _enum(kind: type[enum.Enum]) -> Check:
    def check(value: Any, where: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            raise ProtocolError(f"malformed {where}: {str(value)[:40]!r} is not one of"
                                f" {', '.join(str(m.value) for m in kind)}") from None
    return check
