"""Looks at the broker as a user would, with plain pika: publish, queue counts, drain."""

from __future__ import annotations

import os
import time

import pika
import pika.exceptions

from .nodes import DEFAULT_URI  # the default broker: the machine's, or a 4.x node (nodes.py)


def publish(uri: str, exchange: str, key: str, body: bytes,
            properties: pika.BasicProperties | None = None) -> None:
    """Publish one message to a topic exchange (declared if need be) with plain pika."""
    with pika.BlockingConnection(pika.URLParameters(uri)) as conn:
        channel = conn.channel()
        channel.exchange_declare(exchange, "topic")
        channel.basic_publish(exchange, key, body, properties)


def queue_counts(queue: str, uri: str = DEFAULT_URI) -> tuple[int, int] | None:
    """(ready messages, consumers) of ``queue``; ``None`` if it is not declared."""
    try:
        with pika.BlockingConnection(pika.URLParameters(uri)) as conn:
            method = conn.channel().queue_declare(queue, passive=True).method
            return int(method.message_count), int(method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return None


def queue_depth(queue: str, uri: str = DEFAULT_URI) -> int:
    """Ready messages of ``queue``, which must exist."""
    counts = queue_counts(queue, uri)
    assert counts is not None, f"queue {queue} is not declared"
    return counts[0]


def consumer_count(queue: str, uri: str = DEFAULT_URI) -> int:
    """Consumers of ``queue``; 0 if it is not declared yet."""
    counts = queue_counts(queue, uri)
    return 0 if counts is None else counts[1]


def drain(uri: str, queue: str) -> list[bytes]:
    """Every message left on ``queue``, then the queue deleted."""
    with pika.BlockingConnection(pika.URLParameters(uri)) as conn:
        channel = conn.channel()
        bodies: list[bytes] = []
        while True:
            method, _props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                channel.queue_delete(queue)
                return bodies
            bodies.append(body)


def queue_exists(queue: str, uri: str = DEFAULT_URI) -> bool:
    """Whether ``queue`` is on the broker: declared, or exclusive to another connection (a
    passive declare from here gets 405 ``RESOURCE_LOCKED`` then, and tells no counts)."""
    try:
        with pika.BlockingConnection(pika.URLParameters(uri)) as conn:
            conn.channel().queue_declare(queue, passive=True)
            return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code not in (404, 405):
            raise
        return bool(exc.reply_code == 405)


def fill(queue: str, count: int, size: int, uri: str = DEFAULT_URI,
         timeout: float = 30.0) -> None:
    """``count`` distinct messages of ``size`` bytes (at least 8: a big-endian counter, then
    random bytes) in ``queue``, declared if need be, with plain pika; waits until the broker
    counts them all ready."""
    with pika.BlockingConnection(pika.URLParameters(uri)) as conn:
        channel = conn.channel()
        channel.queue_declare(queue)
        pad = os.urandom(max(size - 8, 0))
        for i in range(count):
            channel.basic_publish("", queue, i.to_bytes(8, "big") + pad)
        deadline = time.monotonic() + timeout
        while channel.queue_declare(queue, passive=True).method.message_count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} messages in {queue} not ready within {timeout} s")
            conn.sleep(0.05)
