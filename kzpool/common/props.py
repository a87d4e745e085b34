"""AMQP content-header properties as the wire format carries them: pika's encoding.

The worker decodes what a client publishes and encodes what the broker delivers; the client
does the reverse.  An empty string stands for "no properties" (pika's encoding of an empty
``BasicProperties`` is two zero bytes of flags).
"""

from __future__ import annotations

from pika import spec

from .errors import ProtocolError

_NONE = b"\x00\x00"


def encode(properties: spec.BasicProperties | None) -> bytes:
    if properties is None:
        return b""
    data = b"".join(properties.encode())
    return b"" if data == _NONE else data


def decode(data: bytes) -> spec.BasicProperties:
    """The properties ``data`` encodes; a :class:`ProtocolError` if they do not parse."""
    properties = spec.BasicProperties()
    if data:
        try:
            properties.decode(data)
        except Exception as exc:  # pika raises assorted errors on bad bytes
            raise ProtocolError(f"bad message properties: {exc}") from exc
    return properties
