"""kzpool's wire format, version 1: length-prefixed frames over AF_UNIX stream sockets.

Used between the master and its workers, between clients and the master, and between a
lease and the worker that owns its channel.  Nothing a peer sends is unpickled or evaluated:
a frame is a fixed header and a payload whose kind says exactly how to read it.

::

     0       1       2       3       4               8
    +-------+-------+-------+-------+---------------+---------------------+
    |  'K'  |  ver  | kind  | flags |  length (u32) |  payload (length)   |
    +-------+-------+-------+-------+---------------+---------------------+
     magic    = 1     Kind    per kind  big-endian      at most max_frame

Payloads (integers big-endian; ``str8`` is a u8 length and UTF-8 bytes, AMQP's shortstr;
``props`` is a u16 length and AMQP 0-9-1 content-header properties, as pika encodes them):

=========  ==========  =====================================================  ==============
kind       direction   payload                                                flags
=========  ==========  =====================================================  ==============
JSON       any         one UTF-8 JSON object: a message (:mod:`.messages`)    -
                       or a document (an answer to status, ping, brokers)
PUBLISH    client→wkr  str8 exchange, str8 routing key, props, body           1 mandatory
DELIVER    wkr→client  u64 tag, u32 message count, str8 consumer tag,         1 redelivered,
                       str8 exchange, str8 routing key, props, body           2 basic.get
CONFIRM    wkr→client  u64 tag                                                1 multiple,
                                                                              2 nack
RETURN     wkr→client  u16 reply code, str8 reply text, str8 exchange,        -
                       str8 routing key, props, body
SETTLE     client→wkr  u64 tag                                                1 multiple,
                                                                              2 requeue,
                                                                              4 nack, 8 reject
=========  ==========  =====================================================  ==============

A frame with another magic or version, an unknown kind, a length above the reader's limit (a
JSON frame has a limit of its own, :data:`MAX_JSON` unless the reader says less) or a payload
that does not parse is a :class:`~kzpool.common.errors.ProtocolError`: the connection is
dropped and nothing more is read from it.

Bounds on what a client may send, on every socket that faces one: a request to the pool's or
a worker's socket is one JSON frame of at most :data:`MAX_REQUEST` bytes; a lease id is
:data:`LEASE_ID` (at most :data:`MAX_LEASE_ID` characters); a zone, a queue name or a
federator's label at most :data:`MAX_NAME`; a broker URI at most :data:`MAX_URI`.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections.abc import Iterator
from typing import Any

from .errors import ProtocolError

MAGIC = ord("K")
VERSION = 1
HEADER = struct.Struct("!BBBBI")
MAX_FRAME = 16 << 20
MAX_DATA_FRAME = 129 << 20  # RabbitMQ's largest message (128 MiB) and its envelope
MAX_JSON = 16 << 20  # a JSON frame (the status of many thousand leases fits)
MAX_REQUEST = 64 << 10  # what a client sends the pool's or a worker's socket first
MAX_NAME = 255  # AMQP's limit on a queue or exchange name (short string)
MAX_URI = 2048
MAX_LEASE_ID = 64
LEASE_ID = re.compile(rf"[0-9A-Za-z_-]{{1,{MAX_LEASE_ID}}}")

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_DELIVER = struct.Struct("!QI")
_U64 = struct.Struct("!Q")


class Kind(enum.IntEnum):
    JSON = 1
    PUBLISH = 2
    DELIVER = 3
    CONFIRM = 4
    RETURN = 5
    SETTLE = 6


class Flag:
    """Flag bits by frame kind (plain ints: they are tested on every message)."""

    MANDATORY = 1
    REDELIVERED = 1
    GET = 2
    MULTIPLE = 1
    NACK = 2
    REQUEUE = 2
    SETTLE_NACK = 4
    SETTLE_REJECT = 8


Frame = tuple[int, int, bytes]  # kind, flags, payload


def frame(kind: Kind, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, flags, len(payload)) + payload


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps would build one a call


def document(obj: dict[str, Any]) -> bytes:
    """A JSON frame of a document (an answer to ``status``, ``ping``, ``brokers``); messages
    between processes are :func:`kzpool.common.messages.encode`'s."""
    return frame(Kind.JSON, _COMPACT.encode(obj).encode())


def read_document(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame payload is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame payload is not a JSON object")
    return obj


def text_field(value: str | None, where: str, limit: int, show: bool = True) -> str | None:
    """``value`` if it is at most ``limit`` characters; else a :class:`ProtocolError`
    naming ``where`` (showing the start of the value if ``show``: never for a URI, which
    may hold a password)."""
    if value is not None and len(value) > limit:
        start = f" ({value[:40]!r}...)" if show else ""
        raise ProtocolError(f"malformed {where}: {len(value)} characters, over the limit of"
                            f" {limit}{start}")
    return value


def lease_id(value: str | None, where: str = "lease.lease") -> str | None:
    """A lease id as a client may send it: :data:`LEASE_ID`, else a :class:`ProtocolError`."""
    if value is not None and not LEASE_ID.fullmatch(value):
        raise ProtocolError(f"malformed {where}: {value[:40]!r} is not a lease id (at most"
                            f" {MAX_LEASE_ID} letters, digits, '-' or '_')")
    return value


def str8(text: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise ValueError(f"{text[:40]!r}... is longer than 255 bytes")
    return _U8.pack(len(data)) + data


def props(encoded: bytes) -> bytes:
    if len(encoded) > 0xFFFF:
        raise ValueError("message properties are over 64 KiB")
    return _U16.pack(len(encoded)) + encoded


class Cursor:
    """Reads the fields of one payload in order; any overrun is a :class:`ProtocolError`."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def str8(self) -> str:
        size = self.data[self.pos] if self.pos < len(self.data) else -1
        end = self.pos + 1 + size
        if size < 0 or end > len(self.data):
            raise ProtocolError("truncated frame")
        text = self.data[self.pos + 1:end]
        self.pos = end
        try:
            return text.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("a string field is not UTF-8") from exc

    def props(self) -> bytes:
        if self.pos + 2 > len(self.data):
            raise ProtocolError("truncated frame")
        (size,) = _U16.unpack_from(self.data, self.pos)
        end = self.pos + 2 + size
        if end > len(self.data):
            raise ProtocolError("truncated frame")
        value = self.data[self.pos + 2:end]
        self.pos = end
        return value

    def struct(self, layout: struct.Struct) -> tuple[Any, ...]:
        if self.pos + layout.size > len(self.data):
            raise ProtocolError("truncated frame")
        values = layout.unpack_from(self.data, self.pos)
        self.pos += layout.size
        return values

    def rest(self) -> bytes:
        return self.data[self.pos:]


def publish(exchange: str, routing_key: str, properties: bytes, body: bytes,
            mandatory: bool) -> bytes:
    payload = b"".join((str8(exchange), str8(routing_key), props(properties), body))
    return frame(Kind.PUBLISH, payload, Flag.MANDATORY if mandatory else 0)


def deliver(tag: int, count: int, consumer_tag: str, names: bytes, properties: bytes,
            body: bytes, flags: int) -> bytes:
    """A DELIVER frame; ``names``: the exchange and routing key, two ``str8``
    (:func:`names`, or a Basic.Deliver's own bytes)."""
    payload = b"".join((_DELIVER.pack(tag, count), str8(consumer_tag), names,
                        props(properties), body))
    return frame(Kind.DELIVER, payload, flags)


def names(exchange: str, routing_key: str) -> bytes:
    return str8(exchange) + str8(routing_key)


def returned(code: int, text: str, exchange: str, routing_key: str, properties: bytes,
             body: bytes) -> bytes:
    payload = b"".join((_U16.pack(code), str8(text[:255]), str8(exchange), str8(routing_key),
                        props(properties), body))
    return frame(Kind.RETURN, payload)


def tagged(kind: Kind, tag: int, flags: int) -> bytes:
    """A CONFIRM or SETTLE frame."""
    return frame(kind, _U64.pack(tag), flags)


def read_tag(payload: bytes) -> int:
    return int(Cursor(payload).struct(_U64)[0])


def read_deliver(payload: bytes) -> tuple[int, int, str, str, str, bytes, bytes]:
    """A delivery's fields, read in one pass (every message a consumer gets comes here):
    a field that runs past the end makes a later read fail, which is a ``ProtocolError``."""
    try:
        tag, count = _DELIVER.unpack_from(payload)
        start = _DELIVER.size + 1
        end = start + payload[start - 1]
        consumer_tag = payload[start:end]
        start = end + 1
        end = start + payload[start - 1]
        exchange = payload[start:end]
        start = end + 1
        end = start + payload[start - 1]
        routing_key = payload[start:end]
        (size,) = _U16.unpack_from(payload, end)
        start = end + 2
        end = start + size
        if end > len(payload):
            raise ProtocolError("truncated frame")
        return (tag, count, consumer_tag.decode(), exchange.decode(), routing_key.decode(),
                payload[start:end], payload[end:])
    except (IndexError, struct.error) as exc:
        raise ProtocolError("truncated frame") from exc
    except UnicodeDecodeError as exc:
        raise ProtocolError("a string field is not UTF-8") from exc


def read_publish(payload: bytes) -> tuple[str, str, bytes, bytes]:
    names, properties, start = read_publish_head(payload)
    cursor = Cursor(names)
    return cursor.str8(), cursor.str8(), properties, payload[start:]


def read_publish_head(payload: bytes | bytearray) -> tuple[bytes, bytes, int]:
    """A PUBLISH frame's exchange and routing key as they are (two ``str8``, as AMQP's
    Basic.Publish carries them: checked as UTF-8, nothing decoded and encoded again), its
    properties, and where its body begins; an overrun is a :class:`ProtocolError`."""
    try:
        second = 1 + payload[0]
        end = second + 1 + payload[second]
        payload[1:second].decode()
        payload[second + 1:end].decode()
        (size,) = _U16.unpack_from(payload, end)
    except (IndexError, struct.error) as exc:
        raise ProtocolError("truncated frame") from exc
    except UnicodeDecodeError as exc:
        raise ProtocolError("a string field is not UTF-8") from exc
    start = end + 2 + size
    if start > len(payload):
        raise ProtocolError("truncated frame")
    return bytes(payload[:end]), bytes(payload[end + 2:start]), start


def read_return(payload: bytes) -> tuple[int, str, str, str, bytes, bytes]:
    cursor = Cursor(payload)
    (code,) = cursor.struct(_U16)
    return code, cursor.str8(), cursor.str8(), cursor.str8(), cursor.props(), cursor.rest()


class FrameReader:
    """Incremental decoder: ``feed`` bytes, iterate the complete frames.

    Frames are cut from one buffer with a moving offset; the consumed prefix is dropped once
    per ``feed``, not once per frame.
    """

    def __init__(self, max_frame: int = MAX_FRAME, kinds: frozenset[int] | None = None,
                 max_json: int = MAX_JSON) -> None:
        self._buffer = bytearray()
        self._max = max_frame
        self._max_json = min(max_json, max_frame)
        self._kinds = kinds or frozenset(Kind)

    def feed(self, data: bytes) -> Iterator[Frame]:
        buffer = self._buffer
        buffer += data
        pos = 0
        size = len(buffer)
        try:
            while size - pos >= 8:
                magic, version, kind, flags, length = HEADER.unpack_from(buffer, pos)
                if magic != MAGIC or version != VERSION:
                    raise ProtocolError(f"bad frame header (magic {magic}, version {version})")
                if kind not in self._kinds:
                    raise ProtocolError(f"unexpected frame kind {kind}")
                limit = self._max_json if kind == Kind.JSON else self._max
                if length > limit:
                    raise ProtocolError(f"frame of {length} bytes is over the {limit} limit")
                end = pos + 8 + length
                if end > size:
                    break
                yield kind, flags, bytes(buffer[pos + 8:end])
                pos = end
        finally:
            del buffer[:pos]
