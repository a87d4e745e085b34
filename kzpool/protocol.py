"""kzpool's wire format, version 1: length-prefixed frames over AF_UNIX stream sockets.

Used between the master and its workers, and between clients and the pool.  Nothing a peer
sends is unpickled or evaluated: a frame is a fixed header and a payload whose kind says how
to read it (``JSON``: one UTF-8 JSON object).

::

     0       1       2       3       4               8
    +-------+-------+-------+-------+---------------+---------------------+
    |  'K'  |  ver  | kind  | flags |  length (u32) |  payload (length)   |
    +-------+-------+-------+-------+---------------+---------------------+
     magic    = 1     Kind    0       big-endian        at most max_frame

A frame with another magic or version, an unknown kind, or a length above the reader's
limit is a :class:`~kzpool.errors.ProtocolError`: the connection is dropped, nothing more is
read from it.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

from .errors import ProtocolError

MAGIC = ord("K")
VERSION = 1
HEADER = struct.Struct("!BBBBI")
MAX_FRAME = 16 << 20


class Kind(enum.IntEnum):
    JSON = 1


def encode(obj: dict[str, Any]) -> bytes:
    """One JSON frame."""
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, VERSION, Kind.JSON, 0, len(payload)) + payload


class FrameReader:
    """Incremental decoder: ``feed`` bytes, iterate the complete messages."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            magic, version, kind, _flags, length = HEADER.unpack_from(self._buffer)
            if magic != MAGIC or version != VERSION:
                raise ProtocolError(f"bad frame header (magic {magic}, version {version})")
            if kind != Kind.JSON:
                raise ProtocolError(f"unknown frame kind {kind}")
            if length > self._max:
                raise ProtocolError(f"frame of {length} bytes is over the {self._max} limit")
            end = HEADER.size + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[HEADER.size:end])
            del self._buffer[:end]
            yield _decode(payload)


def _decode(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame payload is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("frame payload is not a JSON object")
    return obj


def request(sock: socket.socket, obj: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one message on a blocking socket and wait for one reply.

    Blocks up to ``timeout`` seconds; raises ``TimeoutError`` or ``ConnectionError``.
    """
    sock.settimeout(timeout)
    sock.sendall(encode(obj))
    reader = FrameReader()
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the pool closed the connection")
        for reply in reader.feed(data):
            return reply
