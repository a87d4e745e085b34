"""The AMQP 0-9-1 frames of the per-message path, read and written by hand.

pika builds objects for every frame it reads or writes (a method, a ``BasicProperties``
decoded field by field, then encoded again); on the paths every message takes through a
worker (publish, deliver, confirm, ack) the worker needs none of that: kzpool's wire format
carries a message's properties as the very bytes of the AMQP content header's property
section, so they pass through as they are.  Everything else (declares, consumes, closes)
stays pika's.

::

    frame:   type u8 | channel u16 | size u32 | payload (size) | 0xCE
    method:  class u16 | method u16 | arguments
    header:  class u16 (60) | weight u16 (0) | body size u64 | property flags and list
    body:    the message body, cut at frame_max - 8

Pure functions over bytes; a frame that does not parse is a :class:`ValueError`.
"""

from __future__ import annotations

import struct

from pika import data as amqp_data

from ..common import props

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = b"\xce"
FRAME_HEAD = struct.Struct(">BHI")
BASIC = 60
CANCEL, PUBLISH, RETURN, DELIVER, GET_OK, ACK, REJECT, NACK = 30, 40, 50, 60, 71, 80, 90, 120
NO_PROPERTIES = b"\x00\x00"  # property flags, none set

_METHOD_ID = struct.Struct(">HH")
_HEADER = struct.Struct(">HHQ")
_PUBLISH_HEAD = struct.Struct(">BHIHHH")  # frame head, class, method, reserved short
_TAG_BITS = struct.Struct(">QB")
_U64 = struct.Struct(">Q")
_MANDATORY, _NOT_MANDATORY = b"\x01" + FRAME_END, b"\x00" + FRAME_END  # its bits, its end


def frame(kind: int, channel: int, payload: bytes | memoryview) -> bytes:
    return FRAME_HEAD.pack(kind, channel, len(payload)) + payload + FRAME_END


def shortstr(text: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise ValueError(f"{text[:40]!r}... is longer than 255 bytes")
    return bytes((len(data),)) + data


def publish(channel: int, names: bytes, properties: bytes, body: bytes | memoryview,
            mandatory: bool, body_max: int) -> bytes:
    """Basic.Publish, its content header and body frames, as one piece of output.

    ``names``: the exchange and routing key, two short strings (as kzpool's wire format
    carries them); ``properties``: the property flags and list (empty for none);
    ``body_max``: the connection's frame_max minus 8.
    """
    pieces: list[bytes | memoryview] = [publish_head(channel, names, properties, len(body),
                                                     mandatory)]
    for start in range(0, len(body), body_max):
        chunk = body[start:start + body_max]
        pieces += (FRAME_HEAD.pack(FRAME_BODY, channel, len(chunk)), chunk, FRAME_END)
    return b"".join(pieces)


def publish_head(channel: int, names: bytes, properties: bytes, body_size: int,
                 mandatory: bool) -> bytes:
    """Basic.Publish and its content header: what goes before the body frames."""
    method = _PUBLISH_HEAD.pack(FRAME_METHOD, channel, 7 + len(names), BASIC, PUBLISH, 0)
    header_payload = _HEADER.pack(BASIC, 0, body_size) + (properties or NO_PROPERTIES)
    return b"".join((method, names, _MANDATORY if mandatory else _NOT_MANDATORY,
                     frame(FRAME_HEADER, channel, header_payload)))


def settle(channel: int, method: int, tag: int, multiple: bool, requeue: bool) -> bytes:
    """Basic.Ack, Basic.Nack or Basic.Reject of ``tag``."""
    if method == ACK:
        bits = int(multiple)
    elif method == NACK:
        bits = int(multiple) | int(requeue) << 1
    elif method == REJECT:
        bits = int(requeue)
    else:
        raise ValueError(f"method {method} is not a settle")
    return frame(FRAME_METHOD, channel, _METHOD_ID.pack(BASIC, method) + _TAG_BITS.pack(tag, bits))


def cancel(channel: int, consumer_tag: str) -> bytes:
    """Basic.Cancel of ``consumer_tag``, no-wait: for a consumer pika no longer knows (the
    broker cancelled it), which pika would not cancel."""
    return frame(FRAME_METHOD, channel,
                 _METHOD_ID.pack(BASIC, CANCEL) + shortstr(consumer_tag) + b"\x01")


def method_id(payload: bytes) -> tuple[int, int]:
    """(class, method) of a method frame's payload."""
    if len(payload) < 4:
        raise ValueError("method frame too short")
    return _METHOD_ID.unpack_from(payload)


def deliver(payload: bytes) -> tuple[str, int, bool, bytes]:
    """Basic.Deliver's (consumer tag, delivery tag, redelivered, names): ``names`` is its
    exchange and routing key as they are on the wire, two short strings, which kzpool's
    DELIVER frame carries as they are."""
    try:
        end = 5 + payload[4]
        consumer_tag = payload[5:end].decode()
        tag, bits = _TAG_BITS.unpack_from(payload, end)
        names = payload[end + 9:]
        routing_key = 1 + names[0]
        if routing_key + 1 + names[routing_key] != len(names):
            raise ValueError("its exchange and routing key do not fill the frame")
        return consumer_tag, int(tag), bool(bits & 1), names
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"bad Basic.Deliver: {exc}") from None


def confirm(payload: bytes) -> tuple[int, bool]:
    """A publisher confirm's (delivery tag, multiple), of a Basic.Ack or Basic.Nack."""
    try:
        tag, bits = _TAG_BITS.unpack_from(payload, 4)
    except struct.error as exc:
        raise ValueError(f"bad confirm: {exc}") from None
    return int(tag), bool(bits & 1)


def header(payload: bytes) -> tuple[int, bytes]:
    """A content header's (body size, property flags and list)."""
    if len(payload) < 14:
        raise ValueError("content header too short")
    _class, _weight, size = _HEADER.unpack_from(payload)
    properties = payload[12:]
    return int(size), b"" if properties == NO_PROPERTIES else properties



def check_properties(properties: bytes) -> None:
    """Raise :class:`ValueError` unless ``properties`` are a well-formed property section of
    the basic class (what a content header the broker will take carries): flags of known
    properties only, each field whole, nothing left over.  Cheap: only a ``headers`` table is
    decoded (by pika), to check its field types."""
    if not properties:
        return
    if len(properties) < 2:
        raise ValueError("bad message properties: no flags")
    (flags,) = struct.unpack_from(">H", properties)
    if flags & ~props.KNOWN_FLAGS & 0xFFFF:
        raise ValueError(f"bad message properties: unknown flags {flags:#06x}")
    pos = 2
    try:
        for _name, kind, bit in props.BITS:
            if flags & bit:
                pos = _skip(properties, pos, kind)
    except (IndexError, struct.error) as exc:
        raise ValueError(f"bad message properties: {exc}") from None
    if pos != len(properties):
        raise ValueError("bad message properties: their length does not match their flags")


def _skip(properties: bytes, pos: int, kind: str) -> int:
    if kind == "s":
        return pos + 1 + properties[pos]
    if kind == "o":
        return pos + 1
    if kind == "q":
        return pos + 8
    try:
        _table, end = amqp_data.decode_table(properties, pos)
    except Exception as exc:  # pika raises assorted errors on a bad table
        raise ValueError(f"bad message headers: {exc}") from None
    return int(end)
