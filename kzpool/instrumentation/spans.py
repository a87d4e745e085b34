"""The spans kzpool's instrumentation makes, and how trace context rides in headers.

Names, kinds and attributes are those OpenTelemetry's pika and aio-pika instrumentations
give (``"{exchange or routing key} send"`` as a ``PRODUCER`` span, ``"... receive"`` as a
``CONSUMER`` span, ``messaging.system = "rabbitmq"``, ``messaging.destination``,
``messaging.message.id``, ``messaging.conversation_id``, ``net.peer.*``), with the current
conventions' names beside them (``messaging.destination.name``,
``messaging.rabbitmq.destination.routing_key``, ``server.address`` / ``server.port``) and
the lease's own: ``kzpool.lease.id`` and ``kzpool.broker`` (the broker the lease is on at
that moment, its password masked).  Trace context goes into a message's headers with the
global propagator (W3C ``traceparent`` by default) and is taken from them on receipt, so
the receive span is the send span's child.  :func:`unwrap` takes a wrapper off a class
(whatever wrapt's version: OpenTelemetry's own ``unwrap`` knows only some).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Tracer

SYSTEM = "rabbitmq"
SCHEMA_URL = "https://opentelemetry.io/schemas/1.11.0"  # the upstream instrumentations'
AMQP_PORTS = {"amqp": 5672, "amqps": 5671}


def enabled() -> bool:
    """Whether instrumentation is on here (``suppress_instrumentation`` turns it off)."""
    return not (context.get_value("suppress_instrumentation")
                or context.get_value(context._SUPPRESS_INSTRUMENTATION_KEY))


def destination(exchange: str | None, routing_key: str | None) -> str:
    """The span's destination: the exchange, or the routing key on the default exchange."""
    return exchange or routing_key or ""


def broker_attributes(broker: str | None, lease: str | None) -> dict[str, Any]:
    """The broker a lease is on now (a masked URI), as span attributes."""
    found: dict[str, Any] = {}
    if lease:
        found["kzpool.lease.id"] = lease
    if not broker:
        return found
    parts = urlsplit(broker)
    host, port = parts.hostname, parts.port or AMQP_PORTS.get(parts.scheme, 5672)
    found["kzpool.broker"] = broker
    if host:
        found.update({"net.peer.name": host, "net.peer.port": port, "server.address": host,
                      "server.port": port})
    return found


def message_attributes(exchange: str | None, routing_key: str | None,
                       message_id: Any, correlation_id: Any) -> dict[str, Any]:
    found: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.destination": destination(exchange, routing_key),
        "messaging.destination.name": destination(exchange, routing_key),
        "messaging.rabbitmq.destination.routing_key": routing_key or "",
    }
    if message_id:
        found["messaging.message.id"] = str(message_id)
    if correlation_id:
        found["messaging.conversation_id"] = str(correlation_id)
    return found


def send_span(tracer: Tracer, exchange: str, routing_key: str, message_id: Any,
              correlation_id: Any, broker: str | None, lease: str | None) -> Span:
    """A ``PRODUCER`` span for a publish, in the current context."""
    attributes = message_attributes(exchange, routing_key, message_id, correlation_id)
    attributes.update(broker_attributes(broker, lease))
    return tracer.start_span(f"{destination(exchange, routing_key)} send",
                             kind=SpanKind.PRODUCER, attributes=attributes)


def receive_span(tracer: Tracer, headers: Mapping[str, Any] | None, exchange: str | None,
                 routing_key: str | None, message_id: Any, correlation_id: Any,
                 delivery_tag: Any, broker: str | None, lease: str | None) -> Span:
    """A ``CONSUMER`` span for a message received, the child of the context its headers
    carry."""
    attributes = message_attributes(exchange, routing_key, message_id, correlation_id)
    attributes["messaging.operation"] = "receive"
    if delivery_tag is not None:
        attributes["messaging.rabbitmq.message.delivery_tag"] = int(delivery_tag)
    attributes.update(broker_attributes(broker, lease))
    return tracer.start_span(f"{destination(exchange, routing_key)} receive",
                             context=extract(headers), kind=SpanKind.CONSUMER,
                             attributes=attributes)


def inject(headers: dict[str, Any]) -> None:
    """The current trace context into ``headers``, in place."""
    propagate.inject(headers)


class _HeadersGetter(Getter[Mapping[str, Any]]):
    """Header values as text: pika gives a header it could not decode as UTF-8 as bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode("utf-8", "replace")
        return [str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeadersGetter()


def extract(headers: Mapping[str, Any] | None) -> Context:
    """The trace context a message's headers carry, over the current one (so a message
    without one is received in the current trace, as pika's instrumentation has it)."""
    return propagate.extract(headers or {}, getter=_GETTER)


def in_span(span: Span) -> Any:
    """``with in_span(span):`` the span is current; it ends on the way out, an exception
    recorded on it."""
    return trace.use_span(span, end_on_exit=True)


def unwrap(cls: type, name: str) -> None:
    """Take the wrapper off ``cls.name`` (one ``wrapt.wrap_function_wrapper`` put there)."""
    wrapper = vars(cls).get(name)
    wrapped = getattr(wrapper, "__wrapped__", None)
    if wrapped is not None:
        setattr(cls, name, wrapped)
