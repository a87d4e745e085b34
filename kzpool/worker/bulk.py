"""The worker's second connection to its broker, for the publishes of leases that publish
flat out, so that RabbitMQ's credit flow on them never holds back the other leases' frames.

RabbitMQ puts a connection whose publishers outrun it into ``flow``: it stops reading that
connection's socket for a while, and every frame queued behind theirs (another lease's
confirmed publish, an ack) waits in the kernel's buffers, out of the worker's reach.  As
RabbitMQ's own guidance and Spring AMQP do (publishers and consumers on connections of their
own), a lease whose share of the way to the broker is full (:mod:`.turns`), with no confirm
or transaction mode and no mandatory publish, has its publishes moved to a channel of its
own on this connection, opened on demand.  Its publishes stay in order: it moves only once
the broker has answered a passive declare sent on its channel behind everything it
published there, and back (before any call of the lease, or a mandatory publish) once the
same came back on its bulk channel.  Everything else of the lease (its calls, consumers,
acks, exclusive queues) stays on its own channel.

If the broker closes the bulk channel (a publish to a missing exchange), the lease hears of
it as of its own channel closing; if the bulk connection is lost, so are the leases that
published on it (they resume as on any lost connection).  Not thread-safe: the loop only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pika.adapters.select_connection import IOLoop

from .connection import BatchedConnection, parameters
from .spec import WorkerSpec
from .turns import Budget

log = logging.getLogger("kzpool.worker")

OnReady = Callable[[Any], None]  # a bulk channel, or None: none to be had now
OnClosed = Callable[[Any, BaseException], None]
BARRIER = "amq.direct"  # passively declared: answered once what went before is done


class Bulk:
    def __init__(self, ioloop: IOLoop, spec: WorkerSpec, budget: Budget) -> None:
        self.ioloop, self.spec, self.budget = ioloop, spec, budget
        self.connection: BatchedConnection | None = None
        self.asking: list[tuple[OnReady, OnClosed]] = []  # waiting for the connection
        self.stopping = False
        self.channels = 0  # open now, for the status

    def channel(self, on_ready: OnReady, on_closed: OnClosed) -> None:
        """A channel of its own on the bulk connection (opened first if need be)."""
        connection = self.connection
        if self.stopping:
            on_ready(None)
        elif connection is not None and connection.is_open:
            self._open_channel(connection, on_ready, on_closed)
        else:
            self.asking.append((on_ready, on_closed))
            if connection is None:
                self._connect()

    def stop(self) -> None:
        self.stopping = True
        connection = self.connection
        if connection is not None and connection.is_open:
            connection.close()

    def _connect(self) -> None:
        try:
            params = parameters(self.spec)
        except Exception as exc:  # TLS files, the file limit: the leases stay where they are
            self._failed(exc)
            return
        params.client_properties = {**(params.client_properties or {}),
                                    "connection_name": self.spec.title(False)[8:] + " bulk"}
        self.connection = BatchedConnection(
            params, on_open_callback=self._on_open, on_open_error_callback=self._on_error,
            on_close_callback=self._on_closed, custom_ioloop=self.ioloop, budget=self.budget)

    def _on_open(self, connection: BatchedConnection) -> None:
        log.info("bulk connection to %s open", self.spec.broker.uri.masked)
        asking, self.asking = self.asking, []
        for on_ready, on_closed in asking:
            self._open_channel(connection, on_ready, on_closed)

    def _open_channel(self, connection: BatchedConnection, on_ready: OnReady,
                      on_closed: OnClosed) -> None:
        def opened(channel: Any) -> None:
            self.channels += 1
            channel.add_on_close_callback(closed)
            on_ready(channel)

        def closed(channel: Any, reason: BaseException) -> None:
            self.channels -= 1
            on_closed(channel, reason)
        try:
            connection.channel(on_open_callback=opened)
        except Exception as exc:  # no channel number left, or the connection closing
            log.warning("bulk connection: no channel: %r", exc)
            on_ready(None)

    def _on_error(self, _connection: Any, exc: BaseException) -> None:
        self.connection = None
        self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        if self.asking:
            log.warning("bulk connection to %s: %r; its leases publish on their own channels",
                        self.spec.broker.uri.masked, exc)
        asking, self.asking = self.asking, []
        for on_ready, _on_closed in asking:
            on_ready(None)

    def _on_closed(self, _connection: Any, exc: BaseException) -> None:
        self.connection = None
        if not self.stopping:
            log.warning("bulk connection to %s closed: %r", self.spec.broker.uri.masked, exc)
        self._failed(exc)


def barrier(channel: Any, done: Callable[[], None]) -> None:
    """``done()`` once the broker has handled everything sent on ``channel`` before."""
    channel.exchange_declare(BARRIER, passive=True, callback=lambda _frame: done())
