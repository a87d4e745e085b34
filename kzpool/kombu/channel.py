"""A kombu channel that is a lease: py-amqp's channel methods, names and return shapes.

kombu calls a transport's channel as it calls py-amqp's (``kombu/transport/pyamqp.py``):
keyword ``type`` for an exchange type, ``queue_declare`` returning ``(queue,
message_count, consumer_count)``, ``basic_consume(..., callback=, on_cancel=)`` whose
callback gets a raw message, ``basic_get`` returning one or ``None``, ``no_ack_consumers``,
``events["basic_return"]``.  :class:`Channel` gives it that surface over one
:class:`~kzpool.client.lease.Lease`, which keeps its channel across moves (failover,
fail-back, a worker's death) and replays its topology there; delivery tags stay unique
across moves, and an ack of a tag of a lost channel is dropped, never applied to another
message.  After a channel error (404, 406, ...) the lease is usable again, as py-amqp's
revived channel is, and keeps its consumers.

``confirm_publish`` (a transport option) puts the lease in confirm mode at its first
publish: ``basic_publish`` then waits for the broker (``confirm_timeout or timeout``
seconds, then ``TimeoutError``), and a nack raises ``MessageNacked``.

Hazards: one thread at a time, as py-amqp's; but an ack, nack or reject from another thread
is handed to the thread that drains the connection (as Celery's thread pools do it).  In a
process forked after the channel was made, every call raises
:class:`~kzpool.kombu.errors.Forked` (a recoverable connection error: kombu's retry makes
the child a connection of its own) and nothing is sent on the parent's socket.
"""

from __future__ import annotations

import functools
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

import amqp.exceptions
from amqp.protocol import queue_declare_ok_t
from kombu.transport import base

from ..client.connection import Connection as PoolConnection
from ..client.lease import Lease
from ..common import errors as kz
from . import message
from .errors import MessageNacked, amqp_error, returned_error, translating
from .message import Outgoing, Raw

OnCancel = Callable[[str], Any]


class Connection(Protocol):
    """What a channel needs of the connection it belongs to
    (:class:`kzpool.kombu.connection.Connection`)."""

    client: Any  # the kombu.Connection
    pool: PoolConnection
    confirm_publish: bool
    home: int  # the thread that drains
    dispatched: int  # deliveries, cancels and returns handed to kombu so far

    @property
    def connected(self) -> bool: ...

    @property
    def owned(self) -> bool: ...

    def check_usable(self) -> None: ...

    def forget(self, channel: Channel) -> None: ...


class Channel(base.StdChannel):
    """One lease, as kombu's channel (``connection.channel()``)."""

    Message = message.Message

    def __init__(self, connection: Connection, lease: Lease) -> None:
        self.connection: Connection | None = connection  # None once closed (kombu checks)
        self.lease = lease
        self.no_ack_consumers: set[str] = set()  # type: ignore[assignment]
        self.events: defaultdict[str, set[Callable[..., Any]]] = defaultdict(set)
        self._on_cancel: dict[str, OnCancel | None] = {}
        self._raised_returns: set[int] = set()  # id()s of returns a publish raised already
        lease.add_on_cancel_callback(self._cancelled)
        lease.add_on_return_callback(self._returned)

    def __repr__(self) -> str:
        return f"<kzpool.kombu.Channel {self.lease!r}>"

    @property
    def channel_id(self) -> int:
        return self.lease.channel_number

    @property
    def is_open(self) -> bool:
        return self.connection is not None and self.lease.is_open

    def _live(self) -> Connection:
        """The connection, if this channel may be used here and now."""
        conn = self.connection
        if conn is None:
            raise amqp_error(kz.LeaseClosed("channel is closed", lease=self.lease.id))
        conn.check_usable()
        return conn

    # ----- declarations ------------------------------------------------------------------

    @translating
    def exchange_declare(self, exchange: str, type: str, passive: bool = False,
                         durable: bool = False, auto_delete: bool = True, nowait: bool = False,
                         arguments: dict[str, Any] | None = None) -> None:
        self._live()
        self.lease.exchange_declare(exchange, type, passive=passive, durable=durable,
                                    auto_delete=auto_delete, arguments=arguments)

    @translating
    def exchange_delete(self, exchange: str, if_unused: bool = False,
                        nowait: bool = False) -> None:
        self._live()
        self.lease.exchange_delete(exchange, if_unused=if_unused)

    @translating
    def exchange_bind(self, destination: str, source: str = "", routing_key: str = "",
                      nowait: bool = False, arguments: dict[str, Any] | None = None) -> None:
        self._live()
        self.lease.exchange_bind(destination, source, routing_key, arguments)

    @translating
    def exchange_unbind(self, destination: str, source: str = "", routing_key: str = "",
                        nowait: bool = False, arguments: dict[str, Any] | None = None) -> None:
        self._live()
        self.lease.exchange_unbind(destination, source, routing_key, arguments)

    @translating
    def queue_declare(self, queue: str = "", passive: bool = False, durable: bool = False,
                      exclusive: bool = False, auto_delete: bool = True, nowait: bool = False,
                      arguments: dict[str, Any] | None = None) -> Any:
        self._live()
        ok = self.lease.queue_declare(queue, passive=passive, durable=durable,
                                      exclusive=exclusive, auto_delete=auto_delete,
                                      arguments=arguments).method
        return queue_declare_ok_t(ok.queue, ok.message_count, ok.consumer_count)

    @translating
    def queue_bind(self, queue: str, exchange: str = "", routing_key: str = "",
                   nowait: bool = False, arguments: dict[str, Any] | None = None) -> None:
        self._live()
        self.lease.queue_bind(queue, exchange, routing_key, arguments)

    @translating
    def queue_unbind(self, queue: str, exchange: str, routing_key: str = "",
                     nowait: bool = False, arguments: dict[str, Any] | None = None) -> None:
        self._live()
        self.lease.queue_unbind(queue, exchange, routing_key, arguments)

    @translating
    def queue_purge(self, queue: str = "", nowait: bool = False) -> int:
        self._live()
        return int(self.lease.queue_purge(queue).method.message_count)

    @translating
    def queue_delete(self, queue: str = "", if_unused: bool = False, if_empty: bool = False,
                     nowait: bool = False) -> int:
        self._live()
        return int(self.lease.queue_delete(queue, if_unused, if_empty).method.message_count)

    def prepare_queue_arguments(self, arguments: dict[str, Any],
                                **kwargs: Any) -> dict[str, Any]:
        return base.to_rabbitmq_queue_arguments(arguments, **kwargs)  # type: ignore[no-any-return]

    # ----- QoS ---------------------------------------------------------------------------

    @translating
    def basic_qos(self, prefetch_size: int, prefetch_count: int, a_global: bool) -> None:
        self._live()
        self.lease.basic_qos(prefetch_size, prefetch_count, bool(a_global))

    @translating
    def basic_recover(self, requeue: bool = False) -> None:
        self._live()
        self.lease.basic_recover(requeue)

    @translating
    def flow(self, active: bool) -> None:
        """RabbitMQ answers ``flow(False)`` by closing the connection (540), as for
        py-amqp's channel."""
        self._live()
        self.lease.flow(active)

    # ----- publishing --------------------------------------------------------------------

    def prepare_message(self, body: bytes | str, priority: int | None = None,
                        content_type: str | None = None, content_encoding: str | None = None,
                        headers: dict[str, Any] | None = None,
                        properties: dict[str, Any] | None = None) -> Outgoing:
        return message.prepare(body, priority, content_type, content_encoding, headers,
                               properties)

    def basic_publish(self, msg: Outgoing, exchange: str = "", routing_key: str = "",
                      mandatory: bool = False, immediate: bool = False,
                      timeout: float | None = None,
                      confirm_timeout: float | None = None) -> None:
        if immediate:
            raise NotImplementedError("basic_publish(immediate=True): RabbitMQ has not"
                                      " supported 'immediate' since 3.0")
        conn = self._live()
        lease = self.lease
        try:
            if not conn.confirm_publish:
                lease.basic_publish(exchange, routing_key, msg.body, msg.properties, mandatory)
                return
            lease.confirm_delivery()  # once: then a no-op
            confirm = lease.basic_publish(exchange, routing_key, msg.body, msg.properties,
                                          mandatory, wait=False)
            if confirm is not None:
                confirm.result(confirm_timeout or timeout)  # LeaseTimeout: a TimeoutError
        except kz.UnroutableError as exc:
            self._unroutable(exc)
        except kz.NackError as exc:
            raise MessageNacked(f"the broker nacked a publish to {exchange!r} with routing"
                                f" key {routing_key!r}", lease=lease.id) from exc
        except kz.LeaseTimeout:
            raise
        except kz.KzpoolError as exc:
            raise amqp_error(exc) from exc

    def _unroutable(self, exc: kz.UnroutableError) -> None:
        """A confirmed mandatory publish came back: its ``basic_return`` handlers run at the
        next drain (as for unconfirmed ones); with none, py-amqp's error is raised now."""
        if self.events["basic_return"]:
            return
        self._raised_returns.update(id(m.method) for m in exc.messages)
        method = exc.messages[0].method
        raise returned_error(method.reply_code, method.reply_text) from exc

    # ----- consuming ---------------------------------------------------------------------

    @translating
    def basic_consume(self, queue: str = "", consumer_tag: str = "", no_local: bool = False,
                      no_ack: bool = False, exclusive: bool = False, nowait: bool = False,
                      callback: Callable[[Raw], Any] | None = None,
                      arguments: dict[str, Any] | None = None,
                      on_cancel: OnCancel | None = None) -> str:
        """Start a consumer (always waiting for the broker's answer, ``nowait`` or not);
        ``callback(raw)`` for each delivery, while the connection drains events."""
        self._live()
        deliver = functools.partial(self._delivered, callback)
        tag: str = self.lease.basic_consume(queue, deliver, auto_ack=no_ack,
                                            exclusive=exclusive,
                                            consumer_tag=consumer_tag or None,
                                            arguments=arguments)
        if no_ack:
            self.no_ack_consumers.add(tag)
        self._on_cancel[tag] = on_cancel
        return tag

    @translating
    def basic_cancel(self, consumer_tag: str, nowait: bool = False) -> None:
        """Cancel a consumer; on a closed channel (or the parent's, after a fork) nothing
        is left to cancel, as with py-amqp's."""
        conn = self.connection
        if conn is None or not conn.connected:
            return
        self.no_ack_consumers.discard(consumer_tag)
        self._on_cancel.pop(consumer_tag, None)
        self.lease.basic_cancel(consumer_tag)

    @translating
    def basic_get(self, queue: str = "", no_ack: bool = False) -> Raw | None:
        self._live()
        method, properties, body = self.lease.basic_get(queue, auto_ack=no_ack)
        return None if method is None or body is None else Raw(method, properties, body)

    def message_to_python(self, raw: Raw) -> message.Message:
        return self.Message(raw, channel=self)

    # ----- settling ----------------------------------------------------------------------

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._settle(self.lease.basic_ack, delivery_tag, multiple)

    def basic_reject(self, delivery_tag: int, requeue: bool) -> None:
        self._settle(self.lease.basic_reject, delivery_tag, requeue)

    def basic_nack(self, delivery_tag: int, multiple: bool = False,
                   requeue: bool = True) -> None:
        self._settle(self.lease.basic_nack, delivery_tag, multiple, requeue)

    def _settle(self, settle: Callable[..., None], *args: Any) -> None:
        """Settle now, or in the thread that drains the connection if this one does not."""
        conn = self._live()
        try:
            if threading.get_ident() == conn.home:
                settle(*args)
            else:
                conn.pool.add_callback_threadsafe(functools.partial(self._settle, settle,
                                                                    *args))
        except kz.KzpoolError as exc:
            raise amqp_error(exc) from exc

    # ----- what the lease tells ----------------------------------------------------------

    def _delivered(self, callback: Callable[[Raw], Any] | None, _lease: Any, method: Any,
                   properties: Any, body: bytes) -> None:
        if self.connection is not None:
            self.connection.dispatched += 1
        if callback is not None:
            callback(Raw(method, properties, body))

    def _cancelled(self, frame: Any) -> None:
        """The broker cancelled a consumer (its queue deleted): ``on_cancel(tag)``, else
        py-amqp's ``ConsumerCancelled`` (kombu reconnects)."""
        tag = frame.method.consumer_tag
        self.no_ack_consumers.discard(tag)
        on_cancel = self._on_cancel.pop(tag, None)
        if self.connection is not None:
            self.connection.dispatched += 1
        if on_cancel is None:
            raise amqp.exceptions.ConsumerCancelled(tag, (60, 30))
        on_cancel(tag)

    def _returned(self, _lease: Any, method: Any, properties: Any, body: bytes) -> None:
        """A ``basic.return``: each ``events["basic_return"]`` handler gets ``(exc,
        exchange, routing_key, message)``; with none, py-amqp's error is raised."""
        if self.connection is not None:
            self.connection.dispatched += 1
        if id(method) in self._raised_returns:
            self._raised_returns.discard(id(method))
            return
        raw = Raw(method, properties, body)
        exc = returned_error(method.reply_code, method.reply_text)
        handlers = list(self.events["basic_return"])
        if not handlers:
            raise exc
        for handler in handlers:
            handler(exc, method.exchange, method.routing_key, self.message_to_python(raw))

    # ----- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Give the lease back (its consumers are cancelled, unacked deliveries requeued);
        in a forked child, only forget it.  Closing twice does nothing."""
        conn, self.connection = self.connection, None
        if conn is None:
            return
        conn.forget(self)
        if conn.owned and self.lease.is_open:
            try:
                self.lease.close()
            except kz.KzpoolError as exc:
                raise amqp_error(exc) from exc
