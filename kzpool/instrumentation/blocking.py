"""Tracing for blocking leases (:class:`kzpool.client.lease.Lease`), wrapped from outside.

* ``basic_publish``: a ``PRODUCER`` span around the publish (and its confirm, when it
  waits), the trace context injected into the message's headers (the caller's
  ``BasicProperties`` gets them, as pika's instrumentation does);
* ``basic_consume``: each delivery's callback runs in a ``CONSUMER`` span, the child of the
  context the message carries;
* ``consume()``: each message it yields has a ``CONSUMER`` span, current while the loop's
  body handles it and ended when the loop asks for the next one (or leaves);
* ``basic_get``: a ``CONSUMER`` span for the message got, ended as it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import wrapt
from opentelemetry import context, trace
from opentelemetry.trace import Span, Tracer
from pika import spec

from ..client.lease import Lease
from . import spans

METHODS = ("basic_publish", "basic_consume", "consume", "basic_get")


def instrument(tracer: Tracer) -> None:
    wrapt.wrap_function_wrapper(Lease, "basic_publish", _publish(tracer))
    wrapt.wrap_function_wrapper(Lease, "basic_consume", _basic_consume(tracer))
    wrapt.wrap_function_wrapper(Lease, "consume", _consume(tracer))
    wrapt.wrap_function_wrapper(Lease, "basic_get", _basic_get(tracer))


def uninstrument() -> None:
    for name in METHODS:
        spans.unwrap(Lease, name)


def _receive(tracer: Tracer, lease: Any, method: Any, properties: Any) -> Span:
    return spans.receive_span(
        tracer, getattr(properties, "headers", None), method.exchange, method.routing_key,
        getattr(properties, "message_id", None), getattr(properties, "correlation_id", None),
        method.delivery_tag, lease.broker, lease.id)


def _publish(tracer: Tracer) -> Callable[..., Any]:
    def publish(wrapped: Callable[..., Any], lease: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
        if not spans.enabled():
            return wrapped(*args, **kwargs)
        exchange, routing_key, body, properties, more, rest = _publish_args(*args, **kwargs)
        if properties is None:
            properties = spec.BasicProperties()
        if properties.headers is None:
            properties.headers = {}
        span = spans.send_span(tracer, exchange, routing_key, properties.message_id,
                               properties.correlation_id, lease.broker, lease.id)
        with spans.in_span(span):
            spans.inject(properties.headers)
            return wrapped(exchange, routing_key, body, properties, *more, **rest)
    return publish


def _publish_args(exchange: str, routing_key: str, body: Any, properties: Any = None,
                  *more: Any, **rest: Any
                  ) -> tuple[str, str, Any, Any, tuple[Any, ...], dict[str, Any]]:
    return exchange, routing_key, body, properties, more, rest


def _basic_consume(tracer: Tracer) -> Callable[..., Any]:
    def basic_consume(wrapped: Callable[..., Any], lease: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
        queue, callback, more, rest = _consume_args(*args, **kwargs)

        def traced(channel: Any, method: Any, properties: Any, body: bytes) -> Any:
            if not spans.enabled():
                return callback(channel, method, properties, body)
            with spans.in_span(_receive(tracer, lease, method, properties)):
                return callback(channel, method, properties, body)
        return wrapped(queue, traced, *more, **rest)
    return basic_consume


def _consume_args(queue: str, on_message_callback: Callable[..., Any], *more: Any,
                  **rest: Any) -> tuple[str, Callable[..., Any], tuple[Any, ...],
                                        dict[str, Any]]:
    return queue, on_message_callback, more, rest


def _consume(tracer: Tracer) -> Callable[..., Any]:
    def consume(wrapped: Callable[..., Any], lease: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Iterator[Any]:
        return _traced_generator(tracer, lease, wrapped(*args, **kwargs))
    return consume


def _traced_generator(tracer: Tracer, lease: Any, messages: Iterator[Any]) -> Iterator[Any]:
    """Each message yielded in a span of its own, current while the loop's body runs."""
    for item in messages:
        method, properties, _body = item
        if method is None or not spans.enabled():
            yield item
            continue
        span = _receive(tracer, lease, method, properties)
        before = context.get_current()
        current = trace.set_span_in_context(span, before)
        context.attach(current)
        try:
            yield item
        finally:
            span.end()
            if context.get_current() is current:  # not if the loop moved to another context
                context.attach(before)


def _basic_get(tracer: Tracer) -> Callable[..., Any]:
    def basic_get(wrapped: Callable[..., Any], lease: Any, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
        got = wrapped(*args, **kwargs)
        method, properties, _body = got
        if method is not None and spans.enabled():
            _receive(tracer, lease, method, properties).end()
        return got
    return basic_get
