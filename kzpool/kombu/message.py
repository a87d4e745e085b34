"""Messages between kombu and a lease: what kombu publishes, and what it receives.

kombu prepares a message through its channel (``prepare_message``) and hands it back to
``basic_publish``; here that is an :class:`Outgoing`: the body and pika's
``BasicProperties``, the shape a lease publishes.  Of the properties kombu and Celery pass,
the fourteen AMQP ones are kept (``headers`` and py-amqp's ``application_headers`` alike)
and any other key is dropped, as py-amqp does.

A delivery comes as pika's ``(method, properties, body)`` (:class:`Raw`, what a consumer's
callback and ``basic_get`` give kombu), and kombu turns it into a :class:`Message` through
the channel's ``message_to_python``, with ``delivery_info`` and ``properties`` as py-amqp
fills them (``properties`` keyed by py-amqp's names).
"""

from __future__ import annotations

import datetime
from typing import Any, NamedTuple

from kombu.transport import base
from pika import spec

# py-amqp's name of each property -> pika's
PROPERTIES = {name: name for name in (
    "content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
    "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id",
    "cluster_id")} | {"application_headers": "headers"}
STRINGS = frozenset({"expiration", "correlation_id", "message_id", "reply_to", "type",
                     "user_id", "app_id", "cluster_id", "content_type", "content_encoding"})


class Raw(NamedTuple):
    """A delivery as the lease gives it (pika's objects); ``method`` is a
    ``Basic.Deliver``, ``Basic.GetOk`` or ``Basic.Return``."""

    method: Any
    properties: spec.BasicProperties
    body: bytes


class Outgoing(NamedTuple):
    """A prepared message: what ``basic_publish`` takes."""

    body: bytes
    properties: spec.BasicProperties


def prepare(body: bytes | str, priority: int | None = None, content_type: str | None = None,
            content_encoding: str | None = None, headers: dict[str, Any] | None = None,
            properties: dict[str, Any] | None = None) -> Outgoing:
    """kombu's ``prepare_message`` (its arguments in its order)."""
    fields: dict[str, Any] = {"priority": priority, "content_type": content_type,
                              "content_encoding": content_encoding, "headers": headers}
    for key, value in (properties or {}).items():
        name = PROPERTIES.get(key)
        if name is not None and value is not None:
            fields[name] = _amqp_value(name, value)
    if isinstance(body, str):
        body = body.encode(content_encoding or "utf-8")
    return Outgoing(bytes(body), spec.BasicProperties(**fields))


def _amqp_value(name: str, value: Any) -> Any:
    if name == "timestamp" and isinstance(value, datetime.datetime):
        return int(value.timestamp())
    if name in STRINGS and not isinstance(value, str):
        return str(value)  # kombu gives expiration as milliseconds in a str; a number works too
    return value


def amqp_properties(props: spec.BasicProperties) -> dict[str, Any]:
    """The properties that are set, under py-amqp's names."""
    found = {}
    for amqp_name, name in PROPERTIES.items():
        value = getattr(props, name)
        if value is not None:
            found[amqp_name] = value
    return found


def delivery_info(method: Any) -> dict[str, Any]:
    """py-amqp's ``delivery_info`` for a ``Basic.Deliver`` or ``Basic.GetOk``."""
    info = {"delivery_tag": method.delivery_tag, "redelivered": method.redelivered,
            "exchange": method.exchange, "routing_key": method.routing_key}
    if isinstance(method, spec.Basic.GetOk):
        info["message_count"] = method.message_count
    else:
        info["consumer_tag"] = method.consumer_tag
    return info


class Message(base.Message):
    """A message kombu received on a channel of the transport."""

    def __init__(self, raw: Raw, channel: Any = None, **kwargs: Any) -> None:
        props = raw.properties
        method = raw.method
        returned = isinstance(method, spec.Basic.Return)
        super().__init__(  # type: ignore[no-untyped-call]
            body=raw.body, channel=channel,
            delivery_tag=None if returned else method.delivery_tag,
            content_type=props.content_type, content_encoding=props.content_encoding,
            delivery_info={"exchange": method.exchange, "routing_key": method.routing_key}
            if returned else delivery_info(method),
            properties=amqp_properties(props), headers=props.headers or {}, **kwargs)
