"""A lease: a channel lent by the pool, with the interface of pika's ``BlockingChannel``.

The lease's socket goes to the worker that owns its channel; AMQP I/O and heartbeats stay in
that worker, so a callback may hold the GIL for minutes without the broker dropping anything.

This module is the pika surface: consumers and their callbacks, the ``consume()``
generator, return shapes.  Its :class:`~kzpool.client.link.LeaseLink` (``_impl``, as pika's
``BlockingChannel`` holds its ``Channel``) keeps the channel across moves: when it is lost
(broker down, worker killed, moved back to the primary) the lease gets a new one, replays
its topology (exchanges, queues, bindings, QoS, consumers, confirm mode) and re-sends
unconfirmed publishes, then the call goes on.

Hazards: a lease is not thread-safe (one lease per thread, as with pika channels); every
method blocks its caller; nothing runs in the background, so confirms and deliveries are read
while the owner is inside a lease call (or a ``Future.result()`` of one).
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pika import frame as pika_frame
from pika import spec

from ..common import props, wire
from ..common.errors import ConnectionBlockedTimeout, KzpoolError, LeaseRequestError, LeaseTimeout
from ..common.messages import Reply
from ..common.wire import Flag
from .backend import Pool
from .confirms import Confirm, Unconfirmed
from .link import Delivery, LeaseLink

__all__ = ["Confirm", "Lease", "MoveEvent"]

METHODS = {cls.NAME: cls for cls in spec.methods.values()}
MAX_BODY = wire.MAX_DATA_FRAME - (1 << 20)  # room for the frame's other fields
DRAIN_INTERVAL = 0.001  # seconds between two reads of confirms and events while publishing
OnMessage = Callable[[Any, Any, Any, bytes], None]


@dataclass(frozen=True)
class MoveEvent:
    """Passed to ``on_move``: the lease now runs on ``new_broker``."""

    lease: str
    old_broker: str | None
    new_broker: str | None
    reason: str
    renamed: dict[str, str]  # server-named queues: old name → new name


class Lease:
    """A float or sticky channel lease.  Create with :meth:`kzpool.PoolClient.lease`."""

    def __init__(self, pool: Pool, kind: str, zone: str | None, broker: str | None,
                 timeout: float, on_move: Callable[[MoveEvent], None] | None,
                 federates: str | None = None, handed: socket.socket | None = None,
                 abort: Callable[[], bool] | None = None) -> None:
        self._deliveries: deque[Delivery] = deque()  # for the basic_consume callbacks
        self._generator: deque[Delivery] = deque()  # for consume()
        self._generator_tag: str | None = None
        self._generator_auto_ack = False
        self._consumers: dict[str, OnMessage | None] = {}
        self._stop_consuming = False
        self._next_drain = 0.0
        self._on_move = on_move
        self._impl = LeaseLink(pool, kind, zone, broker, timeout, self._moved, federates,
                               handed, abort, self._on_delivery, self._on_lost)

    # ----- what the lease is ------------------------------------------------------------------

    @property
    def id(self) -> str | None:
        return self._impl.id

    @property
    def kind(self) -> str:
        return self._impl.kind

    @property
    def broker(self) -> str | None:
        """The broker serving the lease now, password masked."""
        return self._impl.broker

    @property
    def broker_zone(self) -> str | None:
        return self._impl.broker_zone

    @property
    def channel_number(self) -> int:
        return self._impl.channel_number

    @property
    def timeout(self) -> float:
        return self._impl.timeout

    @property
    def is_open(self) -> bool:
        return not self._impl.closed

    @property
    def is_closed(self) -> bool:
        return self._impl.closed

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Lease {self.id} {self.kind} on {self.broker} channel {self.channel_number}>"

    # ----- pika's BlockingChannel surface -----------------------------------------------------

    def exchange_declare(self, exchange: str, exchange_type: str = "direct",
                         passive: bool = False, durable: bool = False,
                         auto_delete: bool = False, internal: bool = False,
                         arguments: dict[str, Any] | None = None) -> Any:
        return self._rpc("exchange_declare", exchange=exchange, exchange_type=str(exchange_type),
                         passive=passive, durable=durable, auto_delete=auto_delete,
                         internal=internal, arguments=arguments)

    def exchange_delete(self, exchange: str | None = None, if_unused: bool = False) -> Any:
        return self._rpc("exchange_delete", exchange=exchange, if_unused=if_unused)

    def exchange_bind(self, destination: str, source: str, routing_key: str = "",
                      arguments: dict[str, Any] | None = None) -> Any:
        return self._rpc("exchange_bind", destination=destination, source=source,
                         routing_key=routing_key, arguments=arguments)

    def exchange_unbind(self, destination: str | None = None, source: str | None = None,
                        routing_key: str = "", arguments: dict[str, Any] | None = None) -> Any:
        return self._rpc("exchange_unbind", destination=destination, source=source,
                         routing_key=routing_key, arguments=arguments)

    def queue_declare(self, queue: str, passive: bool = False, durable: bool = False,
                      exclusive: bool = False, auto_delete: bool = False,
                      arguments: dict[str, Any] | None = None) -> Any:
        return self._rpc("queue_declare", queue=queue, passive=passive, durable=durable,
                         exclusive=exclusive, auto_delete=auto_delete, arguments=arguments)

    def queue_bind(self, queue: str, exchange: str, routing_key: str | None = None,
                   arguments: dict[str, Any] | None = None) -> Any:
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

    def basic_qos(self, prefetch_size: int = 0, prefetch_count: int = 0,
                  global_qos: bool = False) -> None:
        self._rpc("basic_qos", prefetch_size=prefetch_size, prefetch_count=prefetch_count,
                  global_qos=global_qos)

    def basic_recover(self, requeue: bool = False) -> None:
        self._rpc("basic_recover", requeue=requeue)

    def confirm_delivery(self) -> None:
        """Turn on publisher confirms: publishes then wait for the broker, or return Futures."""
        if not self._impl.confirming:
            self._impl.call("confirm", "confirm_delivery", {})
            self._impl.confirming = True

    def basic_publish(self, exchange: str, routing_key: str, body: bytes | str,
                      properties: spec.BasicProperties | None = None, mandatory: bool = False,
                      wait: bool = True) -> Confirm | None:
        """Publish as pika does; with confirms and ``wait=False``, return a Future instead."""
        link = self._impl
        link.ready()
        now = time.monotonic()
        if now >= self._next_drain:  # now and then, read what came: confirms, "blocked"
            self._next_drain = now + DRAIN_INTERVAL
            link.drain()
            link.ready()
        if link.blocked:
            self._wait_unblocked()
        if isinstance(body, str):
            body = body.encode()
        if len(body) > MAX_BODY:
            raise LeaseRequestError(f"message of {len(body):,} bytes is over the {MAX_BODY:,}"
                                    " bytes a message may have (RabbitMQ's own limit is lower"
                                    " by default: max_message_size)")
        data = wire.publish(exchange, routing_key, props.encode(properties), body, mandatory)
        if not link.confirming:
            link.publish(data)
            return None
        future = Confirm(link.wait, link.id)
        link.confirms.add(Unconfirmed(future, data, exchange, routing_key, properties, body))
        link.send(data)
        if wait:
            future.result(None)
            return None
        return future

    def wait_for_confirms(self, timeout: float | None = None) -> None:
        """Wait until every pipelined publish is confirmed (or failed)."""
        confirms = self._impl.confirms
        if not self._impl.wait(lambda: not confirms.pending, timeout):
            raise LeaseTimeout(f"{len(confirms)} publish(es) unconfirmed after {timeout} s",
                               lease=self.id)

    def basic_consume(self, queue: str, on_message_callback: OnMessage, auto_ack: bool = False,
                      exclusive: bool = False, consumer_tag: str | None = None,
                      arguments: dict[str, Any] | None = None) -> str:
        return self._consume(queue, on_message_callback, auto_ack, exclusive, consumer_tag,
                             arguments)

    def basic_cancel(self, consumer_tag: str = "") -> list[Any]:
        if consumer_tag in self._consumers:
            del self._consumers[consumer_tag]
            self._rpc("basic_cancel", consumer_tag=consumer_tag)
        return []

    def start_consuming(self) -> None:
        """Dispatch deliveries to the ``basic_consume`` callbacks until none is left."""
        self._stop_consuming = False
        while not self._stop_consuming and any(self._consumers.values()):
            while self._deliveries and not self._stop_consuming:
                method, properties, body = self._deliveries.popleft()
                callback = self._consumers.get(method.consumer_tag)
                if callback is not None:
                    callback(self, method, properties, body)
            if not self._deliveries and not self._stop_consuming:
                self._impl.ready()
                self._impl.pump(None)

    def stop_consuming(self, consumer_tag: str | None = None) -> None:
        tags = [consumer_tag] if consumer_tag else [t for t, c in self._consumers.items() if c]
        for tag in tags:
            self.basic_cancel(tag)
        self._stop_consuming = True

    def consume(self, queue: str, auto_ack: bool = False, exclusive: bool = False,
                arguments: dict[str, Any] | None = None,
                inactivity_timeout: float | None = None) -> Iterator[Any]:
        """Yield ``(method, properties, body)``; ``(None, None, None)`` after inactivity."""
        if self._generator_tag is None:
            tag = self._consume(queue, None, auto_ack, exclusive, None, arguments)
            self._generator_tag, self._generator_auto_ack = tag, auto_ack
            early = [d for d in self._deliveries if d[0].consumer_tag == tag]  # read with the reply
            self._generator.extend(early)
            self._deliveries = deque(d for d in self._deliveries if d[0].consumer_tag != tag)
        while self._generator_tag is not None:
            if self._generator:
                yield self._generator.popleft()
                continue
            self._impl.ready()
            if not self._impl.wait(lambda: bool(self._generator), inactivity_timeout):
                yield None, None, None

    def cancel(self) -> int:
        """Cancel the ``consume`` generator; requeue what it had not yielded yet."""
        tag, self._generator_tag = self._generator_tag, None
        pending = len(self._generator)
        if tag is not None:
            self.basic_cancel(tag)
            if not self._generator_auto_ack:
                for method, _properties, _body in self._generator:
                    self.basic_nack(method.delivery_tag, requeue=True)
            self._generator.clear()
        return pending

    def basic_get(self, queue: str, auto_ack: bool = False) -> Delivery | tuple[None, None, None]:
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
        self._settle(delivery_tag, Flag.SETTLE_REJECT | (Flag.REQUEUE if requeue else 0))

    def close(self) -> None:
        """Give the channel back: consumers are cancelled, unacked messages requeued."""
        self._impl.close()

    # ----- the link's side --------------------------------------------------------------------

    def _on_delivery(self, delivery: Delivery) -> None:
        if delivery[0].consumer_tag == self._generator_tag:
            self._generator.append(delivery)
        else:
            self._deliveries.append(delivery)

    def _moved(self, old: str | None, reason: str, renamed: dict[str, str]) -> None:
        if self._on_move is not None:
            self._on_move(MoveEvent(str(self.id), old, self.broker, reason, renamed))

    def _on_lost(self) -> None:
        """The deliveries read so far are void: the broker redelivers them."""
        self._deliveries.clear()
        self._generator.clear()

    def _settle(self, delivery_tag: int, flags: int) -> None:
        self._impl.settle(delivery_tag, flags, bool(self._deliveries or self._generator))

    def _rpc(self, method: str, **args: Any) -> Any:
        reply = self._impl.call("call", method, args)
        return pika_frame.Method(self.channel_number, _method(reply))

    def _consume(self, queue: str, callback: OnMessage | None, auto_ack: bool, exclusive: bool,
                 consumer_tag: str | None, arguments: dict[str, Any] | None) -> str:
        reply = self._impl.call("consume", "basic_consume", {
            "queue": queue, "auto_ack": auto_ack, "exclusive": exclusive,
            "consumer_tag": consumer_tag, "arguments": arguments})
        tag = str(reply.fields["consumer_tag"])
        self._consumers[tag] = callback
        self._impl.topology.steps[-1].args["consumer_tag"] = tag  # replay keeps the same tag
        return tag

    def _wait_unblocked(self) -> None:
        link = self._impl
        if not link.wait(lambda: not link.blocked, link.timeout):
            raise ConnectionBlockedTimeout(f"the broker {self.broker} blocked publishing for"
                                           f" over {link.timeout} s", broker=self.broker)


def _method(reply: Reply) -> Any:
    cls = METHODS.get(str(reply.method))
    if cls is None:
        raise KzpoolError(f"unexpected reply {reply.method!r}")
    return cls(**reply.fields)
