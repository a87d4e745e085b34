"""AMQP content-header properties as the wire format carries them: pika's encoding.

The worker decodes what a client publishes and encodes what the broker delivers; the client
does the reverse.  An empty string stands for "no properties" (pika's encoding of an empty
``BasicProperties`` is two zero bytes of flags).

:func:`decode` makes the same ``BasicProperties`` as pika's own decoder (a test compares
them), in one pass over the fields: every delivery a consumer gets is decoded here, and
pika's generic decoder took about 7 µs for a message with five properties.  Only a
``headers`` table goes to pika's table decoder; flags beyond the basic class's (which no
broker sends) go to pika's whole decoder.

Header values that are floats travel as AMQP doubles (``d``), as py-amqp and aiormq send
them (Celery's remote control stamps each message with a float ``expires``): pika cannot
encode a float, and decodes a double as an ``int``; here a table holding one is encoded and
decoded by :func:`encode_table` and :func:`decode_table`, which leave every other type to
pika's codec.
"""

from __future__ import annotations

import copy
import struct
from typing import Any

from pika import data as amqp_data
from pika import spec
from pika.exceptions import UnsupportedAMQPFieldException

from .errors import ProtocolError

_NONE = b"\x00\x00"
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")
_F32 = struct.Struct(">f")
_DOUBLE = struct.Struct(">cd")
# the basic class's properties in flag order (bit 15 first): each one's wire type
_FIELDS = (("content_type", "s"), ("content_encoding", "s"), ("headers", "t"),
           ("delivery_mode", "o"), ("priority", "o"), ("correlation_id", "s"),
           ("reply_to", "s"), ("expiration", "s"), ("message_id", "s"), ("timestamp", "q"),
           ("type", "s"), ("user_id", "s"), ("app_id", "s"), ("cluster_id", "s"))
# (name, kind, flag bit): "s" short string, "t" table, "o" octet, "q" 64-bit timestamp
BITS = tuple((name, kind, 1 << (15 - i)) for i, (name, kind) in enumerate(_FIELDS))
KNOWN_FLAGS = sum(bit for _name, _kind, bit in BITS)
_EMPTY = dict.fromkeys(name for name, _kind in _FIELDS)


def encode(properties: spec.BasicProperties | None) -> bytes:
    if properties is None:
        return b""
    try:
        data = b"".join(properties.encode())
    except UnsupportedAMQPFieldException:  # a float, say: pika has no double
        return _with_table(properties, properties.headers)
    return b"" if data == _NONE else data


def _with_table(properties: spec.BasicProperties, headers: dict[str, Any]) -> bytes:
    """pika's encoding of the other properties, with ``headers`` put in by ours."""
    bare = copy.copy(properties)
    bare.headers = None
    data = b"".join(bare.encode())
    (flags,) = _U16.unpack_from(data)
    pos = 2
    for _name, _kind, bit in BITS[:2]:  # content_type, content_encoding: short strings
        if flags & bit:
            pos += 1 + data[pos]
    pieces: list[bytes] = []
    encode_table(pieces, headers)
    return _U16.pack(flags | BITS[2][2]) + data[2:pos] + b"".join(pieces) + data[pos:]


def encode_table(pieces: list[bytes], table: dict[str, Any]) -> int:
    """pika's ``encode_table``, with floats as doubles (at any depth)."""
    length_index = len(pieces)
    pieces.append(b"")
    size = 0
    for key, value in table.items():
        size += amqp_data.encode_short_string(pieces, key)
        size += _encode_value(pieces, value)
    pieces[length_index] = _U32.pack(size)
    return size + 4


def _encode_value(pieces: list[bytes], value: Any) -> int:
    if isinstance(value, float):
        pieces.append(_DOUBLE.pack(b"d", value))
        return 9
    if isinstance(value, dict):
        pieces.append(b"F")
        return 1 + encode_table(pieces, value)
    if isinstance(value, list):
        items: list[bytes] = []
        for item in value:
            _encode_value(items, item)
        body = b"".join(items)
        pieces.append(b"A" + _U32.pack(len(body)))
        pieces.append(body)
        return 5 + len(body)
    return int(amqp_data.encode_value(pieces, value))


def decode_table(data: bytes, pos: int) -> tuple[dict[Any, Any], int]:
    """pika's ``decode_table``, with doubles and floats as floats (at any depth)."""
    (size,) = _U32.unpack_from(data, pos)
    pos += 4
    end = pos + size
    table = {}
    while pos < end:
        key, pos = amqp_data.decode_short_string(data, pos)
        table[key], pos = _decode_value(data, pos)
    return table, pos


def _decode_value(data: bytes, pos: int) -> tuple[Any, int]:
    kind = data[pos:pos + 1]
    if kind == b"d":
        return _F64.unpack_from(data, pos + 1)[0], pos + 9
    if kind == b"f":
        return _F32.unpack_from(data, pos + 1)[0], pos + 5
    if kind == b"F":
        return decode_table(data, pos + 1)
    if kind == b"A":
        (size,) = _U32.unpack_from(data, pos + 1)
        pos += 5
        end = pos + size
        items = []
        while pos < end:
            item, pos = _decode_value(data, pos)
            items.append(item)
        return items, pos
    value, pos = amqp_data.decode_value(data, pos)
    return value, int(pos)


def decode(data: bytes) -> spec.BasicProperties:
    """The properties ``data`` encodes; a :class:`ProtocolError` if they do not parse."""
    properties = spec.BasicProperties.__new__(spec.BasicProperties)
    fields = properties.__dict__
    fields.update(_EMPTY)
    if not data:
        return properties
    try:
        (flags,) = _U16.unpack_from(data)
        if flags & ~KNOWN_FLAGS:  # a continuation flag word: pika's decoder knows them
            properties.decode(data)
            return properties
        pos = 2
        for name, kind, bit in BITS:
            if not flags & bit:
                continue
            if kind == "s":
                end = pos + 1 + data[pos]
                if end > len(data):
                    raise ProtocolError("bad message properties: a field runs past the end")
                fields[name] = _text(data[pos + 1:end])
                pos = end
            elif kind == "o":
                fields[name] = data[pos]
                pos += 1
            elif kind == "q":
                (fields[name],) = _U64.unpack_from(data, pos)
                pos += 8
            else:
                fields[name], pos = decode_table(data, pos)
    except ProtocolError:
        raise
    except Exception as exc:  # pika raises assorted errors on bad bytes
        raise ProtocolError(f"bad message properties: {exc}") from exc
    return properties


def _text(raw: bytes) -> Any:
    """A short string as pika reads one: text, or the bytes when they are not UTF-8."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw
