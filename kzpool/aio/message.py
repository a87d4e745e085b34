"""Outgoing messages: aio-pika's :class:`Message`, and what goes on the wire for any message.

:class:`Message` coerces its fields as aio-pika's does (delivery mode 1 and priority 0 by
default, ids as ``str``, a falsy id as ``None``, a number or ``timedelta`` timestamp as an
aware UTC ``datetime``); a locked message refuses new values.  :func:`encode_properties`
takes any message with aio-pika's attributes, aio-pika's own ``Message`` included, and gives
the content-header properties kzpool's wire carries (pika's encoding,
:mod:`kzpool.common.props`).  Header values pika cannot encode are converted: ``float`` to
``Decimal``, ``bytearray`` and ``memoryview`` to ``bytes``, tuples to lists.  Pure.
"""

from __future__ import annotations

import copy
import decimal
import functools
import operator
from datetime import UTC, datetime, timedelta
from typing import Any

from pika import spec

from ..common import props
from .compat import DeliveryMode

MILLISECONDS = 1000

FIELDS = ("app_id", "content_encoding", "content_type", "correlation_id", "delivery_mode",
          "expiration", "headers", "message_id", "priority", "reply_to", "timestamp", "type",
          "user_id")


_fields = operator.attrgetter(*FIELDS)


def _text(value: Any) -> str | None:
    return str(value) if value else None


def as_timestamp(value: Any) -> datetime | None:
    """aio-pika's reading of a timestamp: a datetime as is, a number as Unix time (UTC),
    a timedelta from now."""
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, timedelta):
        return datetime.now(tz=UTC) + value
    raise ValueError(f"invalid timestamp {value!r}: a datetime, a number or a timedelta")


def expiration_ms(value: Any) -> str | None:
    """The wire's expiration (milliseconds, a string) of seconds, a timedelta or a deadline."""
    if value is None:
        return None
    if isinstance(value, datetime):
        value = (value - datetime.now(tz=value.tzinfo)).total_seconds()
    elif isinstance(value, timedelta):
        value = value.total_seconds()
    elif isinstance(value, str):
        return value
    if not isinstance(value, int | float):
        raise ValueError(f"invalid expiration {value!r}: seconds, a timedelta or a datetime")
    return str(int(value * MILLISECONDS))


class Message:
    """A message to publish, as aio-pika's ``Message`` (same arguments and coercions)."""

    __slots__ = ("_locked", "app_id", "body", "body_size", "content_encoding", "content_type",
                 "correlation_id", "delivery_mode", "expiration", "headers", "message_id",
                 "priority", "reply_to", "timestamp", "type", "user_id")

    def __init__(self, body: bytes, *, headers: dict[str, Any] | None = None,
                 content_type: str | None = None, content_encoding: str | None = None,
                 delivery_mode: int | None = None, priority: int | None = None,
                 correlation_id: Any = None, reply_to: Any = None, expiration: Any = None,
                 message_id: Any = None, timestamp: Any = None, type: Any = None,
                 user_id: Any = None, app_id: Any = None) -> None:
        self._locked = False
        self.body = body if isinstance(body, bytes) else bytes(body)
        self.body_size = len(self.body)
        self.headers = headers or {}
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.delivery_mode = DeliveryMode(int(delivery_mode) if delivery_mode else 1)
        self.priority = int(priority) if priority else 0
        self.correlation_id = _text(correlation_id)
        self.reply_to = _text(reply_to)
        self.expiration = expiration
        self.message_id = _text(message_id)
        self.timestamp = as_timestamp(timestamp)
        self.type = _text(type)
        self.user_id = _text(user_id)
        self.app_id = _text(app_id)

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_") and getattr(self, "_locked", False):
            raise ValueError("Message is locked")
        object.__setattr__(self, name, value)

    @property
    def locked(self) -> bool:
        return bool(self._locked)

    def lock(self) -> None:
        self._locked = True

    def info(self) -> dict[str, Any]:
        """aio-pika's ``MessageInfo``: its 20 keys, the delivery ones ``None`` here."""
        return {"app_id": self.app_id, "body_size": self.body_size, "cluster_id": None,
                "consumer_tag": None, "content_encoding": self.content_encoding,
                "content_type": self.content_type, "correlation_id": self.correlation_id,
                "delivery_mode": self.delivery_mode, "delivery_tag": None, "exchange": None,
                "expiration": self.expiration, "headers": self.headers,
                "message_id": self.message_id, "priority": self.priority,
                "redelivered": None, "reply_to": self.reply_to, "routing_key": None,
                "timestamp": self.timestamp, "type": str(self.type), "user_id": self.user_id}

    def __iter__(self) -> Any:
        return iter(self.body)

    def __copy__(self) -> Message:
        return Message(self.body, headers=copy.copy(self.headers),
                       content_type=self.content_type, content_encoding=self.content_encoding,
                       delivery_mode=self.delivery_mode, priority=self.priority,
                       correlation_id=self.correlation_id, reply_to=self.reply_to,
                       expiration=self.expiration, message_id=self.message_id,
                       timestamp=self.timestamp, type=self.type, user_id=self.user_id,
                       app_id=self.app_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}:{self.info()!r}"


def body_of(message: Any) -> bytes:
    """A message's body as bytes; a clear error for what is not a message."""
    try:
        body = message.body
    except AttributeError:
        raise TypeError(f"{message!r} is not a Message (kzpool.aio's or aio_pika's)") from None
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        raise TypeError("a message body is bytes, not str: encode it")
    return bytes(body)


def encode_properties(message: Any) -> bytes:
    """The content-header properties of ``message`` (any object with aio-pika's attributes),
    as kzpool's wire carries them."""
    try:
        values = _fields(message)
    except AttributeError:  # a message without some of aio-pika's attributes
        values = tuple(getattr(message, name, None) for name in FIELDS)
    if not values[6] and values[5] is None and values[10] is None:
        # no headers, expiration or timestamp: the encoding is cached
        return _encode_plain((*values[:6], None, *values[7:]))
    return _encode(values)


@functools.lru_cache(maxsize=1024)
def _encode_plain(values: tuple[Any, ...]) -> bytes:
    return _encode(values)


def _encode(values: tuple[Any, ...]) -> bytes:
    app_id, encoding, ctype, correlation_id, mode, expiration, headers, message_id, \
        priority, reply_to, timestamp, kind, user_id = values
    return props.encode(spec.BasicProperties(
        content_type=ctype, content_encoding=encoding,
        headers=_table(headers) if headers else None, delivery_mode=int(mode) if mode else 1,
        priority=int(priority) if priority else 0, correlation_id=_text(correlation_id),
        reply_to=_text(reply_to), expiration=expiration_ms(expiration),
        message_id=_text(message_id), timestamp=_seconds(timestamp), type=_text(kind),
        user_id=_text(user_id), app_id=_text(app_id)))


def _seconds(value: Any) -> int | None:
    stamp = as_timestamp(value)
    return None if stamp is None else int(stamp.timestamp())


def _table(headers: Any) -> dict[str, Any]:
    if not isinstance(headers, dict):
        raise TypeError(f"message headers are a dict, not {type(headers).__name__}")
    return {str(k): _field(v) for k, v in headers.items()}


def _field(value: Any) -> Any:
    """A header value pika can encode."""
    if isinstance(value, str | bytes | bool | int | decimal.Decimal | datetime) or value is None:
        return value
    if isinstance(value, float):
        return decimal.Decimal(repr(value))
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return _table(value)
    if isinstance(value, list | tuple):
        return [_field(v) for v in value]
    raise TypeError(f"header value {value!r} of type {type(value).__name__} cannot be sent")
