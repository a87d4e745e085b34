"""Kazoo's gen_listener in Python: a queue, its bindings, and responders by routing key.

A :class:`Listener` runs on one lease, so it inherits everything a lease does across moves:
on a new channel the exchange, queue, bindings, QoS and consumer are declared again.  Use it
from any process (``listener.run(kzpool.connect())``) or let the pool run it in its own
consumer processes (``[consumer:NAME]`` sections).

A handler gets a :class:`Message`.  Returning acks it; raising nacks it (requeued only with
``requeue_on_error``) and logs the traceback.  ``run`` returns after ``max_messages`` (0:
never), when ``stop()`` was called (checked between messages), or when its lease is closed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .client import PoolClient
from .lease import Lease

log = logging.getLogger("kzpool.listener")

Handler = Callable[["Message"], Any]


@dataclass
class Message:
    """One delivery, as a handler sees it."""

    body: bytes
    routing_key: str
    exchange: str
    properties: Any
    redelivered: bool
    delivery_tag: int
    broker: str | None = None  # password masked
    zone: str | None = None

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more words."""
    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])
    return match(pattern.split("."), routing_key.split("."))


@dataclass
class Listener:
    """A queue, bindings and responders.  Subclass and override :meth:`handle`, or register
    responders: ``listener.responders["billing.*"] = fn`` or ``@listener.responder(...)``."""

    queue: str = ""
    exchange: str = ""
    exchange_type: str = "topic"
    bindings: Iterable[str] = ()
    responders: dict[str, Handler] = field(default_factory=dict)
    prefetch: int = 10
    auto_ack: bool = False
    confirms: bool = False
    durable: bool = False
    requeue_on_error: bool = False
    queue_arguments: dict[str, Any] | None = None
    kind: str = "float"
    broker: str | None = None  # for a sticky listener
    zone: str | None = None
    lease: Lease | None = field(default=None, init=False)
    handled: int = field(default=0, init=False)
    _stopping: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        """Override to register responders in a subclass."""

    def responder(self, pattern: str) -> Callable[[Handler], Handler]:
        def register(function: Handler) -> Handler:
            self.responders[pattern] = function
            return function
        return register

    def handle(self, message: Message) -> Any:
        """Call every responder whose pattern matches the routing key."""
        for pattern, responder in self.responders.items():
            if topic_matches(pattern, message.routing_key):
                responder(message)

    def start(self, pool: PoolClient) -> Lease:
        """Take a lease and declare exchange, queue, bindings, QoS (replayed on every move)."""
        lease = pool.lease(self.kind, zone=self.zone, broker=self.broker)
        self.lease = lease
        if self.exchange:
            lease.exchange_declare(self.exchange, self.exchange_type, durable=self.durable)
        declared = lease.queue_declare(self.queue, durable=self.durable,
                                       auto_delete=not self.queue and not self.durable,
                                       arguments=self.queue_arguments)
        self.queue = declared.method.queue
        for key in self.bindings:
            lease.queue_bind(self.queue, self.exchange, key)
        if self.prefetch:
            lease.basic_qos(prefetch_count=self.prefetch)
        if self.confirms:
            lease.confirm_delivery()
        return lease

    def run(self, pool: PoolClient, max_messages: int = 0,
            inactivity: float = 1.0) -> int:
        """Consume until stopped or ``max_messages``; returns how many were handled."""
        lease = self.lease or self.start(pool)
        self._stopping = False
        for method, properties, body in lease.consume(self.queue, auto_ack=self.auto_ack,
                                                      inactivity_timeout=inactivity):
            if method is not None:
                self._dispatch(lease, method, properties, body)
            if self._stopping or (max_messages and self.handled >= max_messages):
                break
        return self.handled

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Leave ``run`` after the message in hand; safe to call from a signal handler."""
        self._stopping = True

    def close(self) -> None:
        """Cancel the consumer (what was not handled goes back to the queue), end the lease."""
        if self.lease is not None and self.lease.is_open:
            self.lease.cancel()
            self.lease.close()

    def _dispatch(self, lease: Lease, method: Any, properties: Any, body: bytes) -> None:
        message = Message(body, method.routing_key, method.exchange, properties,
                          method.redelivered, method.delivery_tag, lease.broker, self.zone)
        try:
            self.handle(message)
        except Exception:
            log.exception("handler failed on %s (%s)", method.routing_key,
                          "requeued" if self.requeue_on_error else "dropped")
            if not self.auto_ack:
                lease.basic_nack(method.delivery_tag, requeue=self.requeue_on_error)
        else:
            if not self.auto_ack:
                lease.basic_ack(method.delivery_tag)
        self.handled += 1
