"""Kazoo's gen_listener in Python: a queue, its bindings, and responders by routing key.

A :class:`Listener` runs on one lease, so it inherits everything a lease does across moves:
on a new channel the exchange, queue, bindings, QoS and consumer are declared again.  Use it
from any process (``listener.run(kzpool.connect())``) or let the pool run it in its own
consumer processes (``[consumer:NAME]`` sections).

A handler gets a :class:`Message`.  Returning acks it; raising nacks it (requeued only with
``requeue_on_error``) and logs the traceback.  ``run`` returns after ``max_messages`` (0:
never), when ``stop()`` was called (checked between messages), or when its lease is closed.

Federated bindings are consumed on every other zone's brokers too, by the listener's
:mod:`~kzpool.consumer.federator` threads; their messages reach the same handler (one at a time:
``dispatch`` holds a lock) with the remote broker and zone on them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pika import spec

from ..client.lease import Lease
from ..client.pool import PoolClient
from ..common.errors import ConfigError, ConnectionClosedByBroker, LeaseRequestError
from .federator import Federator

log = logging.getLogger("kzpool.listener")

Handler = Callable[["Message"], Any]
STOP_POLL = 0.1  # seconds: how soon a federator waiting to retry sees stop()
DENIED_TRANSIENT = "transient_nonexcl_queues"  # named in the broker's 541 close, when denied


@dataclass
class Message:
    """One delivery, as a handler sees it: where it came from (``broker``, password masked,
    and ``zone``) included.  :meth:`reply` answers it through the lease that received it."""

    body: bytes
    routing_key: str
    exchange: str
    properties: Any
    redelivered: bool
    delivery_tag: int
    broker: str | None = None  # password masked
    zone: str | None = None
    lease: Lease | None = field(default=None, repr=False, compare=False)

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    def reply(self, body: bytes | str, properties: spec.BasicProperties | None = None) -> None:
        """Publish ``body`` to the ``reply_to`` queue, with the request's ``correlation_id``,
        on the broker the request came from (a federated event's reply stays in its zone).
        Call it from the handler: a lease belongs to the thread that consumes on it."""
        reply_to = self.properties.reply_to
        if not reply_to or self.lease is None:
            raise LeaseRequestError(f"message {self.routing_key!r} has no reply_to to answer")
        properties = properties or spec.BasicProperties()
        if properties.correlation_id is None:
            properties.correlation_id = self.properties.correlation_id
        self.lease.basic_publish("", reply_to, body, properties)


@dataclass(frozen=True)
class Binding:
    """A routing key; ``federate`` also consumes it on every remote zone's brokers."""

    key: str
    federate: bool = False


def _binding(binding: str | Binding) -> Binding:
    return binding if isinstance(binding, Binding) else Binding(binding)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more words."""
    if pattern == "#":
        return True
    if "*" not in pattern and "#" not in pattern:
        return pattern == routing_key
    return _wild_matches(pattern, routing_key)


@functools.lru_cache(maxsize=4096)
def _wild_matches(pattern: str, routing_key: str) -> bool:
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
    responders: ``listener.responders["billing.*"] = fn`` or ``@listener.responder(...)``.

    ``federate=True`` federates every binding; a :class:`Binding` with ``federate=True``
    federates just that one.  Federated bindings are also consumed on the brokers of every
    other zone, by one :class:`~kzpool.consumer.federator.Federator` per broker, started and stopped
    with the listener.  Handlers run one at a time, whichever broker a message came from.
    """

    queue: str = ""
    exchange: str = ""
    exchange_type: str = "topic"
    bindings: Iterable[str | Binding] = ()
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
    federate: bool = False
    federators: list[Federator] = field(default_factory=list, init=False)
    handled: int = field(default=0, init=False)
    _stopping: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _lease: Lease | None = field(default=None, init=False, repr=False)
    _local: threading.local = field(default_factory=threading.local, init=False, repr=False)

    def __post_init__(self) -> None:
        """Override to register responders in a subclass."""

    @property
    def lease(self) -> Lease | None:
        """The listener's lease; inside a handler, the lease that received the message: for
        a federated event, its federator's (a lease belongs to the thread that consumes on
        it, and a reply then goes back through the broker the event came from)."""
        return getattr(self._local, "lease", None) or self._lease

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

    @property
    def keys(self) -> list[str]:
        return [_binding(b).key for b in self.bindings]

    @property
    def federated_keys(self) -> list[str]:
        return [b.key for b in map(_binding, self.bindings) if self.federate or b.federate]

    def start(self, pool: PoolClient, handed: socket.socket | None = None) -> Lease:
        """Take a lease, declare exchange, queue, bindings, QoS (replayed on every move), and
        start a federator per remote broker if any binding is federated.  ``handed``: see
        :meth:`kzpool.PoolClient.lease`."""
        named = self.queue
        lease = pool.lease(self.kind, zone=self.zone, broker=self.broker, handed=handed)
        self._lease = lease
        self.queue = self.declare(lease, self.queue, self.keys)
        if self.federated_keys:
            self._start_federators(pool, named)
        return lease

    def declare(self, lease: Lease, queue: str, keys: list[str]) -> str:
        """Exchange, queue, ``keys`` bound, QoS and confirms on ``lease``; the queue's name.

        A server-named queue that is not durable is exclusive (and auto-deleted): the
        listener's alone, and never a transient non-exclusive queue, which RabbitMQ 4.x
        deprecates and a broker may deny.  A named one is declared as configured; a broker
        that denies it gets a :class:`ConfigError` saying to make it durable."""
        if self.exchange:
            lease.exchange_declare(self.exchange, self.exchange_type, durable=self.durable)
        private = not queue and not self.durable
        try:
            declared = lease.queue_declare(queue, durable=self.durable, exclusive=private,
                                           auto_delete=private, arguments=self.queue_arguments)
        except ConnectionClosedByBroker as exc:
            if DENIED_TRANSIENT not in exc.reply_text:
                raise
            raise ConfigError([f"queue {queue!r}: the broker denies transient non-exclusive"
                               f" queues (RabbitMQ's deprecated feature {DENIED_TRANSIENT}):"
                               " declare it durable (durable = true)"]) from exc
        name = str(declared.method.queue)
        for key in keys:
            lease.queue_bind(name, self.exchange, key)
        if self.prefetch:
            lease.basic_qos(prefetch_count=self.prefetch)
        if self.confirms:
            lease.confirm_delivery()
        return name

    def _start_federators(self, pool: PoolClient, named: str) -> None:
        found = pool.brokers()
        local = self.zone or str(found["local_zone"])
        queue = f"{named}-{local}" if named else ""  # server-named here: there too
        remote = [b for b in found["brokers"] if b["zone"] != local and not b["hidden"]]
        if not remote:
            log.info("listener %s: no other zone to federate from", self.queue)
        self.federators = [Federator(self, pool, b["broker"], b["zone"], queue).start()
                           for b in remote]

    def run(self, pool: PoolClient, max_messages: int = 0,
            inactivity: float = 1.0) -> int:
        """Consume until stopped or ``max_messages``; returns how many were handled."""
        lease = self._lease or self.start(pool)
        for method, properties, body in lease.consume(self.queue, auto_ack=self.auto_ack,
                                                      inactivity_timeout=inactivity):
            if method is not None:
                self.dispatch(lease, method, properties, body)
            if self._stopping or (max_messages and self.handled >= max_messages):
                break
        return self.handled

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Start no new handler: ``run`` and the federators return after the message in
        hand.  Safe to call from a signal handler, and final: a stopped listener stays
        stopped (make a new one to consume again)."""
        self._stopping = True  # only a flag: a lock taken here could deadlock a signal handler

    def wait_stopped(self, timeout: float) -> bool:
        """Sleep up to ``timeout``, waking within :data:`STOP_POLL` of :meth:`stop`."""
        deadline = time.monotonic() + timeout
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(STOP_POLL, left))
        return self._stopping

    def close(self, timeout: float = 5.0) -> None:
        """Stop; cancel the consumer (what was not handled goes back to the queue) and end
        the lease; wait up to ``timeout`` for the federators, all at once."""
        self.stop()
        deadline = time.monotonic() + timeout
        try:
            if self._lease is not None and self._lease.is_open:
                with contextlib.closing(self._lease):
                    self._lease.cancel()
        finally:
            busy = [f for f in self.federators if not f.join(deadline - time.monotonic())]
            if busy:
                log.warning("listener %s: %d federator(s) still busy after %g s: %s",
                            self.queue, len(busy), timeout, ", ".join(map(repr, busy)))
            self.federators = []

    def dispatch(self, lease: Lease, method: Any, properties: Any, body: bytes) -> None:
        """Run the handler on one delivery of ``lease`` (the listener's or a federator's):
        ack on return, nack on an exception; after :meth:`stop`, requeue it unhandled."""
        with self._lock:
            if self._stopping and not self.auto_ack:  # (with auto_ack it is ours: handle it)
                lease.basic_nack(method.delivery_tag, requeue=True)
                return
            self._local.lease = lease
            message = Message(body, method.routing_key, method.exchange, properties,
                              method.redelivered, method.delivery_tag, lease.broker,
                              lease.broker_zone, lease)
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
