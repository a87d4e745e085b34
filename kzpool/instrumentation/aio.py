"""Tracing for asyncio channels (:mod:`kzpool.aio`), wrapped from outside.

* ``Exchange.publish``: a ``PRODUCER`` span around the publish (and its confirm), the trace
  context injected into the message's headers (the caller's message gets them, as
  aio-pika's instrumentation does);
* ``Queue.consume``: each message's callback runs in a ``CONSUMER`` span, the child of the
  context the message carries;
* a queue iterator: each message it gives has a ``CONSUMER`` span, current while the
  ``async for`` body handles it and ended when the loop asks for the next one (or leaves);
* ``Queue.get``: a ``CONSUMER`` span for the message got, ended as it returns.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

import wrapt
from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer

from ..aio.exchange import Exchange
from ..aio.iterator import QueueIterator
from ..aio.queue import Queue
from . import spans

WRAPPED = ((Exchange, "publish"), (Queue, "consume"), (Queue, "get"),
           (QueueIterator, "__anext__"), (QueueIterator, "close"))


def instrument(tracer: Tracer) -> None:
    current: weakref.WeakKeyDictionary[Any, tuple[Span, Context, Context]] = \
        weakref.WeakKeyDictionary()  # each iterator's message being handled
    wrapt.wrap_function_wrapper(Exchange, "publish", _publish(tracer))
    wrapt.wrap_function_wrapper(Queue, "consume", _consume(tracer))
    wrapt.wrap_function_wrapper(Queue, "get", _get(tracer))
    wrapt.wrap_function_wrapper(QueueIterator, "__anext__", _next(tracer, current))
    wrapt.wrap_function_wrapper(QueueIterator, "close", _close(current))


def uninstrument() -> None:
    for cls, name in WRAPPED:
        spans.unwrap(cls, name)


def _receive(tracer: Tracer, channel: Any, message: Any) -> Span:
    return spans.receive_span(
        tracer, message.headers, message.exchange, message.routing_key, message.message_id,
        message.correlation_id, message.delivery_tag, getattr(channel, "broker", None),
        getattr(channel, "lease_id", None))


def _publish(tracer: Tracer) -> Callable[..., Any]:
    async def publish(wrapped: Callable[..., Any], exchange: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
        if not spans.enabled():
            return await wrapped(*args, **kwargs)
        message, routing_key = _publish_args(*args, **kwargs)
        channel = exchange.channel
        span = spans.send_span(tracer, exchange.name, routing_key,
                               getattr(message, "message_id", None),
                               getattr(message, "correlation_id", None),
                               getattr(channel, "broker", None),
                               getattr(channel, "lease_id", None))
        with spans.in_span(span):
            if getattr(message, "headers", None) is None:
                message.headers = {}
            spans.inject(message.headers)
            return await wrapped(*args, **kwargs)
    return publish


def _publish_args(message: Any, routing_key: str, *_more: Any, **_rest: Any
                  ) -> tuple[Any, str]:
    return message, routing_key


def _consume(tracer: Tracer) -> Callable[..., Any]:
    async def consume(wrapped: Callable[..., Any], queue: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
        callback, more, rest = _consume_args(*args, **kwargs)

        async def traced(message: Any) -> Any:
            if not spans.enabled():
                result = callback(message)
                return await result if inspect.isawaitable(result) else result
            with spans.in_span(_receive(tracer, queue.channel, message)):
                result = callback(message)
                return await result if inspect.isawaitable(result) else result
        return await wrapped(traced, *more, **rest)
    return consume


def _consume_args(callback: Callable[..., Any], *more: Any, **rest: Any
                  ) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    return callback, more, rest


def _get(tracer: Tracer) -> Callable[..., Any]:
    async def get(wrapped: Callable[..., Any], queue: Any, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
        message = await wrapped(*args, **kwargs)
        if message is not None and spans.enabled():
            _receive(tracer, queue.channel, message).end()
        return message
    return get


def _done(current: weakref.WeakKeyDictionary[Any, tuple[Span, Context, Context]],
          iterator: Any) -> None:
    """The iterator's message before is handled: end its span, leave its context."""
    held = current.pop(iterator, None)
    if held is None:
        return
    span, before, mine = held
    span.end()
    if context.get_current() is mine:  # not if the loop went on in another context
        context.attach(before)


def _next(tracer: Tracer, current: weakref.WeakKeyDictionary[Any, tuple[Span, Context, Context]]
          ) -> Callable[..., Any]:
    async def anext_(wrapped: Callable[..., Any], iterator: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
        _done(current, iterator)
        message = await wrapped(*args, **kwargs)
        if spans.enabled():
            span = _receive(tracer, iterator.queue.channel, message)
            before = context.get_current()
            mine = trace.set_span_in_context(span, before)
            context.attach(mine)
            current[iterator] = (span, before, mine)
        return message
    return anext_


def _close(current: weakref.WeakKeyDictionary[Any, tuple[Span, Context, Context]]
           ) -> Callable[..., Any]:
    async def close(wrapped: Callable[..., Any], iterator: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        _done(current, iterator)
        return await wrapped(*args, **kwargs)
    return close
