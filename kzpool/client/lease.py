"""A lease: a channel lent by the pool, with the interface of pika's ``BlockingChannel``.

The lease's socket goes to the worker that owns its channel; AMQP I/O and heartbeats stay in
that worker, so a callback may hold the GIL for minutes without the broker dropping anything.

This module is the pika surface: declarations, QoS, transactions, publishes and confirms,
``basic_get``, settles, ``close``.  A lease holds two objects: its
:class:`~kzpool.client.link.LeaseLink` (``_impl``, as pika's ``BlockingChannel`` holds its
``Channel``), which keeps the channel across moves: when it is lost (broker down, worker
killed, moved back to the primary, the pool restarted) the lease gets a new one, replays
its topology (exchanges, queues, bindings, QoS, consumers, confirm and transaction mode)
and re-sends unconfirmed publishes, then the call goes on; and its
:class:`~kzpool.client.consuming.Consumers` (consumers, the ``consume()`` generator, the
callbacks), to which the consuming methods go.

Where a lease differs from pika on purpose: the broker closing the channel (or, for a call,
the connection) raises pika's error once, then the lease recovers instead of staying closed;
a transaction cut by a move raises :class:`TransactionLost` at ``tx_commit``.

Hazards: a lease is not thread-safe (one lease per thread, as with pika channels); every
method blocks its caller; nothing runs in the background, so confirms and deliveries are read
while the owner is inside a lease call (or a ``Future.result()`` of one) or a dispatcher.
"""

from __future__ import annotations

import enum
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from pika import frame as pika_frame
from pika import spec, validators

from ..common import props, wire
from ..common.errors import (
    KzpoolError,
    LeaseClosed,
    LeaseRequestError,
    LeaseTimeout,
    TransactionLost,
)
from ..common.messages import Reply
from ..common.options import LeaseOptions
from ..common.wire import Flag
from ..lease.confirms import Confirm, Unconfirmed
from ..lease.state import MoveEvent
from .bound import Delivery, Hooks
from .consuming import Consumers, OnCancel, OnMessage, OnReturn
from .dispatch import Dispatcher
from .link import LeaseLink
from .recovery import Sockets

__all__ = ["Confirm", "Lease", "MoveEvent"]

MAX_BODY = wire.MAX_DATA_FRAME - (1 << 20)  # room for the frame's other fields
DRAIN_INTERVAL = 0.001  # seconds between two reads of confirms and events while publishing
METHODS = {cls.NAME: cls for cls in spec.methods.values()}


class Pool(Sockets, Protocol):
    """What a lease needs of its client: sockets, the route cache, the dispatcher."""

    dispatcher: Dispatcher


class Lease:
    """A float or sticky channel lease.  Create with ``connection.channel()`` or
    :meth:`kzpool.PoolClient.lease`."""

    def __init__(self, pool: Pool, options: LeaseOptions,
                 on_move: Callable[[MoveEvent], None] | None = None,
                 handed: socket.socket | None = None,
                 abort: Callable[[], bool] | None = None) -> None:
        self._pool = pool
        self._next_drain = 0.0
        self._on_move = on_move
        self._tx = False  # in transaction mode
        self._tx_since: int | None = None  # the channel the open transaction began on
        link = self._impl = LeaseLink(pool, options, handed, abort)
        self._dispatcher = pool.dispatcher
        consumers = self._consumers = Consumers(link, self._dispatcher, self, self._requeue)
        link.open(Hooks(self._moved, consumers.on_delivery, consumers.on_cancelled,
                        consumers.on_returned, consumers.on_lost))
        self._dispatcher.add(consumers)

    # ----- what the lease is ------------------------------------------------------------------

    @property
    def id(self) -> str | None:
        return self._impl.id

    @property
    def options(self) -> LeaseOptions:
        """What the lease asked for, whole (:class:`~kzpool.common.options.LeaseOptions`)."""
        return self._impl.state.options

    @property
    def kind(self) -> str:
        return self._impl.state.options.kind

    @property
    def broker(self) -> str | None:
        """The broker serving the lease now, password masked."""
        return self._impl.broker

    @property
    def broker_zone(self) -> str | None:
        return self._impl.state.broker_zone

    @property
    def timeout(self) -> float:
        return self._impl.state.timeout

    @property
    def connection(self) -> Pool:
        """The pool client (``kzpool.connect()``'s connection) that made this lease."""
        return self._pool

    @property
    def is_open(self) -> bool:
        """Until closed by its owner (a lease that lost its channel stays open: it
        recovers)."""
        return not self._impl.closed

    @property
    def is_closed(self) -> bool:
        return self._impl.closed

    @property
    def channel_number(self) -> int:
        return self._impl.state.channel_number

    def __int__(self) -> int:
        return self.channel_number

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.is_open:
            self.close()

    def __repr__(self) -> str:
        return f"<Lease {self.id} {self.kind} on {self.broker} channel {self.channel_number}>"

    # ----- declarations -----------------------------------------------------------------------

    def exchange_declare(self, exchange: str, exchange_type: str | enum.Enum = "direct",
                         passive: bool = False, durable: bool = False,
                         auto_delete: bool = False, internal: bool = False,
                         arguments: dict[str, Any] | None = None) -> Any:
        validators.require_string(exchange, "exchange")
        if isinstance(exchange_type, enum.Enum):  # pika's ExchangeType: sent by value
            exchange_type = exchange_type.value
        return self._rpc("exchange_declare", exchange=exchange, exchange_type=exchange_type,
                         passive=passive, durable=durable, auto_delete=auto_delete,
                         internal=internal, arguments=arguments)

    def exchange_delete(self, exchange: str | None = None, if_unused: bool = False) -> Any:
        return self._rpc("exchange_delete", exchange=exchange, if_unused=if_unused)

    def exchange_bind(self, destination: str, source: str, routing_key: str = "",
                      arguments: dict[str, Any] | None = None) -> Any:
        validators.require_string(destination, "destination")
        validators.require_string(source, "source")
        return self._rpc("exchange_bind", destination=destination, source=source,
                         routing_key=routing_key, arguments=arguments)

    def exchange_unbind(self, destination: str | None = None, source: str | None = None,
                        routing_key: str = "", arguments: dict[str, Any] | None = None) -> Any:
        return self._rpc("exchange_unbind", destination=destination, source=source,
                         routing_key=routing_key, arguments=arguments)

    def queue_declare(self, queue: str, passive: bool = False, durable: bool = False,
                      exclusive: bool = False, auto_delete: bool = False,
                      arguments: dict[str, Any] | None = None) -> Any:
        """``queue=""``: a server-named queue (``frame.method.queue``), renamed on a move."""
        validators.require_string(queue, "queue")
        return self._rpc("queue_declare", queue=queue, passive=passive, durable=durable,
                         exclusive=exclusive, auto_delete=auto_delete, arguments=arguments)

    def queue_bind(self, queue: str, exchange: str, routing_key: str | None = None,
                   arguments: dict[str, Any] | None = None) -> Any:
        validators.require_string(queue, "queue")
        validators.require_string(exchange, "exchange")
        return self._rpc("queue_bind", queue=queue, exchange=exchange,
                         routing_key=routing_key if routing_key is not None else queue,
                         arguments=arguments)

    def queue_unbind(self, queue: str, exchange: str | None = None,
                     routing_key: str | None = None,
                     arguments: dict[str, Any] | None = None) -> Any:
        return self._rpc("queue_unbind", queue=queue, exchange=exchange,
                         routing_key=routing_key if routing_key is not None else queue,
                         arguments=arguments)

    def queue_purge(self, queue: str) -> Any:
        return self._rpc("queue_purge", queue=queue)

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False) -> Any:
        return self._rpc("queue_delete", queue=queue, if_unused=if_unused, if_empty=if_empty)

    # ----- channel modes ----------------------------------------------------------------------

    def basic_qos(self, prefetch_size: int = 0, prefetch_count: int = 0,
                  global_qos: bool = False) -> None:
        validators.zero_or_greater("prefetch_size", prefetch_size)
        validators.zero_or_greater("prefetch_count", prefetch_count)
        self._rpc("basic_qos", prefetch_size=prefetch_size, prefetch_count=prefetch_count,
                  global_qos=global_qos)

    def basic_recover(self, requeue: bool = False) -> None:
        self._rpc("basic_recover", requeue=requeue)

    def flow(self, active: bool) -> bool:
        """Ask the broker to stop or resume deliveries; whether it will send.  (RabbitMQ
        answers ``flow(False)`` by closing the connection: 540, raised here once.)"""
        return bool(self._rpc("flow", active=bool(active)).method.active)

    def tx_select(self) -> Any:
        """Transaction mode: publishes and settles take effect at :meth:`tx_commit`."""
        frame = self._rpc("tx_select")
        self._tx, self._tx_since = True, None
        return frame

    def tx_commit(self) -> Any:
        """Commit; :class:`TransactionLost` (after rolling back what reached the new
        channel) if the lease moved since the transaction's first publish or settle."""
        link = self._impl
        link.ready()
        link.drain()
        since, channel = self._tx_since, link.generation
        if since is not None and since != channel:
            self._tx_lost()
        frame = self._rpc("tx_commit")
        self._tx_since = None
        if since is not None and link.generation != channel:
            raise TransactionLost("the lease moved while committing: the transaction was"
                                  " rolled back", lease=self.id)
        return frame

    def tx_rollback(self) -> Any:
        frame = self._rpc("tx_rollback")
        self._tx_since = None
        return frame

    def _tx_lost(self) -> None:
        self._tx_since = None
        self._rpc("tx_rollback")  # all or nothing: what came after the move goes too
        raise TransactionLost("the lease lost its channel inside a transaction: its publishes"
                              " and settles were rolled back; publish again, then commit",
                              lease=self.id)

    def _tx_touch(self) -> None:
        if self._tx and self._tx_since is None:
            self._tx_since = self._impl.generation

    # ----- publishing -------------------------------------------------------------------------

    def confirm_delivery(self) -> None:
        """Turn on publisher confirms: publishes then wait for the broker, or return Futures."""
        if not self._impl.confirming:
            self._impl.call("confirm", "confirm_delivery", {})
            self._impl.confirming = True

    def basic_publish(self, exchange: str, routing_key: str, body: bytes | str,
                      properties: spec.BasicProperties | None = None, mandatory: bool = False,
                      wait: bool = True) -> Confirm | None:
        """Publish as pika does; with confirms and ``wait=False``, return a Future instead.

        While the broker blocks the connection, waits up to the lease's ``timeout`` for it
        to lift (for the confirm, too), then raises :class:`ConnectionBlockedTimeout`."""
        link = self._impl
        link.ready()
        now = time.monotonic()
        if now >= self._next_drain:  # now and then, read what came: confirms, "blocked"
            self._next_drain = now + DRAIN_INTERVAL
            link.drain()
            link.ready()
        state = link.state
        if state.blocked:
            link.wait(lambda: not state.blocked, None, "basic_publish")
        body = body.encode() if isinstance(body, str) else bytes(body)
        if len(body) > MAX_BODY:
            raise LeaseRequestError(f"message of {len(body):,} bytes is over the {MAX_BODY:,}"
                                    " bytes a message may have (RabbitMQ's own limit is lower"
                                    " by default: max_message_size)")
        data = wire.publish(exchange, routing_key, props.encode(properties), body, mandatory)
        self._tx_touch()
        if not link.confirming:
            link.publish(data)
            return None
        future = Confirm(link.wait_confirm, link.id)
        state.confirms.add(Unconfirmed(future, data, exchange, routing_key, properties, body))
        link.send(data)
        if wait:
            future.result(None)
            return None
        return future

    def wait_for_confirms(self, timeout: float | None = None) -> None:
        """Wait until every pipelined publish is confirmed (or failed)."""
        confirms = self._impl.state.confirms
        if not self._impl.wait(lambda: not confirms.pending, timeout, "wait_for_confirms"):
            raise LeaseTimeout(f"{len(confirms)} publish(es) unconfirmed after {timeout} s",
                               lease=self.id)

    # ----- consuming (the lease's Consumers) ------------------------------------------------

    def basic_consume(self, queue: str, on_message_callback: OnMessage, auto_ack: bool = False,
                      exclusive: bool = False, consumer_tag: str | None = None,
                      arguments: dict[str, Any] | None = None) -> str:
        """Start a consumer; its deliveries go to ``on_message_callback(lease, method,
        properties, body)`` in a dispatcher.  Blocks until the broker's ``ConsumeOk``."""
        return self._consumers.basic_consume(queue, on_message_callback, auto_ack, exclusive,
                                             consumer_tag, arguments)

    def basic_cancel(self, consumer_tag: str) -> list[Delivery]:
        """Cancel a consumer: see :meth:`Consumers.basic_cancel`."""
        return self._consumers.basic_cancel(consumer_tag)

    def start_consuming(self) -> None:
        """Run the dispatcher until no ``basic_consume`` consumer is left: see
        :meth:`Consumers.start_consuming`."""
        self._consumers.start_consuming()

    def stop_consuming(self, consumer_tag: str | None = None) -> None:
        """Cancel one consumer, or every one (the generator's first)."""
        self._consumers.stop_consuming(consumer_tag)

    def consume(self, queue: str, auto_ack: bool = False, exclusive: bool = False,
                arguments: dict[str, Any] | None = None,
                inactivity_timeout: float | None = None,
                consumer_tag: str | None = None) -> Iterator[Any]:
        """Yield ``(method, properties, body)``: see :meth:`Consumers.consume`."""
        return self._consumers.consume(queue, auto_ack, exclusive, arguments,
                                       inactivity_timeout, consumer_tag)

    def cancel(self) -> int:
        """Cancel the ``consume()`` generator; what it had not yielded is requeued."""
        return self._consumers.cancel()

    def add_on_cancel_callback(self, callback: OnCancel) -> None:
        """``callback(method_frame)`` when the broker cancels a ``basic_consume`` consumer."""
        self._consumers.add_on_cancel_callback(callback)

    def add_on_return_callback(self, callback: OnReturn) -> None:
        """``callback(lease, method, properties, body)`` for each returned message."""
        self._consumers.add_on_return_callback(callback)

    @property
    def consumer_tags(self) -> list[str]:
        """The tags of the consumers of this lease, the generator's included."""
        return self._consumers.consumer_tags

    def get_waiting_message_count(self) -> int:
        """Deliveries the ``consume()`` generator has read but not yielded yet."""
        return self._consumers.get_waiting_message_count()

    # ----- getting and settling ---------------------------------------------------------------

    def basic_get(self, queue: str, auto_ack: bool = False) -> Delivery | tuple[None, None, None]:
        validators.require_string(queue, "queue")
        reply = self._impl.call("get", "basic_get", {"queue": queue, "auto_ack": auto_ack})
        got = self._impl.take_get()
        if reply.method == "Basic.GetOk" and got is not None:
            return got
        return None, None, None

    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None:
        self._settle(delivery_tag, Flag.MULTIPLE if multiple else 0)

    def basic_nack(self, delivery_tag: int = 0, multiple: bool = False,
                   requeue: bool = True) -> None:
        self._settle(delivery_tag, Flag.SETTLE_NACK | (Flag.MULTIPLE if multiple else 0)
                     | (Flag.REQUEUE if requeue else 0))

    def basic_reject(self, delivery_tag: int = 0, requeue: bool = True) -> None:
        if not isinstance(delivery_tag, int):
            raise TypeError(f"delivery_tag must be an int, but got {delivery_tag!r}")
        self._settle(delivery_tag, Flag.SETTLE_REJECT | (Flag.REQUEUE if requeue else 0))

    def close(self, reply_code: int = 0, reply_text: str = "Normal shutdown") -> None:
        """Give the channel back: consumers cancelled, unacked messages requeued; returns
        once the broker confirmed it (within the lease's ``timeout``), as pika's does.  A
        second close raises :class:`LeaseClosed` (pika's ``ChannelWrongStateError``)."""
        link = self._impl
        if link.closed and not link.aborted:
            raise LeaseClosed("the lease is closed", lease=self.id)
        self._consumers.clear()
        self._dispatcher.discard(self._consumers)
        link.close(reply_code, reply_text)

    # ----- the link's side --------------------------------------------------------------------

    def _moved(self, old: str | None, reason: str, renamed: dict[str, str]) -> None:
        if self._on_move is not None:
            self._on_move(MoveEvent(str(self.id), old, self.broker, reason, renamed))

    def _settle(self, delivery_tag: int, flags: int) -> None:
        if self._tx:
            self._tx_touch()
        self._impl.settle(delivery_tag, flags, self._consumers.more_waiting)

    def _requeue(self, delivery_tag: int) -> None:  # a nack: RabbitMQ 4.3 counts a reject
        self.basic_nack(delivery_tag, requeue=True)  # toward a delivery limit, not a nack

    def _rpc(self, method: str, **args: Any) -> Any:
        reply: Reply = self._impl.call("call", method, args)
        return pika_frame.Method(self.channel_number, method_of(reply))


def method_of(reply: Reply) -> Any:
    """The ``pika.spec`` method instance a reply names, with its fields."""
    cls = METHODS.get(str(reply.method))
    if cls is None:
        raise KzpoolError(f"unexpected reply {reply.method!r}")
    return cls(**reply.fields)
