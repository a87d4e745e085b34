"""``kzpool.connect()``: a pool client with pika's ``BlockingConnection`` surface.

Code written for pika changes where it gets its connection, and only there::

    connection = kzpool.connect()              # was: pika.BlockingConnection(parameters)
    channel = connection.channel()             # a float lease
    ...
    connection.process_data_events(time_limit=None)
    connection.close()

A :class:`Connection` holds no broker connection of its own: each ``channel()`` is a lease
on a channel of a pool worker's connection.  What pika does on the connection, it does on
its leases: ``process_data_events`` and ``sleep`` run the callbacks of every lease of the
calling thread, timers and thread-safe callbacks (:mod:`.dispatch`); ``close()`` closes
every lease.  Pika's connection parameters (host, credentials, heartbeat,
``blocked_connection_timeout``) are the pool's: brokers and heartbeats are in its config, a
lease's ``timeout`` bounds its waits under flow control.

Hazards: not thread-safe, but for :meth:`Connection.add_callback_threadsafe` (the way a
worker thread asks for an ack, as with pika); the methods that dispatch block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Unpack

from pika import frame as pika_frame
from pika import spec, validators

from ..common.errors import ClientClosed, LeaseRequestError
from ..common.options import LeaseOptions, OptionFields
from ..common.settings import client_socket
from ..lease.state import MoveEvent
from .dispatch import Callback, Timer
from .lease import Lease
from .pool import Backend, PoolClient

OnBlocked = Callable[[Any, Any], None]


class Connection(PoolClient):
    """The pool at ``socket_path``, shaped as pika's ``BlockingConnection``."""

    def __init__(self, socket_path: str, backend: Backend | None = None) -> None:
        super().__init__(socket_path, backend, wakeable=True)
        self.dispatcher.on_blocked(self._blocked_changed)
        self._on_blocked: list[OnBlocked] = []
        self._on_unblocked: list[OnBlocked] = []

    def __repr__(self) -> str:
        return f"<Connection {self.socket_path}{' closed' if self.is_closed else ''}>"

    # ----- state ----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return not self.dispatcher.closed

    @property
    def is_closed(self) -> bool:
        return self.dispatcher.closed

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.is_open:
            self.close()

    def close(self, reply_code: int = 200, reply_text: str = "Normal shutdown") -> None:
        """Close every lease of this connection (their channels are closed with
        ``reply_code`` and ``reply_text``); a second close raises
        :class:`ClientClosed` (pika's ``ConnectionWrongStateError``)."""
        self._check_open()
        try:
            for member in self.dispatcher.snapshot():
                lease = member.channel
                if isinstance(lease, Lease) and lease.is_open:
                    lease.close(reply_code, reply_text)
        finally:
            self.dispatcher.close()

    # ----- channels ---------------------------------------------------------------------------

    def channel(self, channel_number: int | None = None, *,
                options: LeaseOptions | None = None,
                on_move: Callable[[MoveEvent], None] | None = None,
                **fields: Unpack[OptionFields]) -> Lease:
        """A lease (``float`` unless ``kind="sticky", broker=...``): pika's ``channel()``.
        Its options are ``options`` (a :class:`~kzpool.common.options.LeaseOptions`) and
        keywords over them (``kind``, ``zone``, ``broker``, ``timeout``, ...).  Blocks until
        a worker binds it (up to its ``timeout``)."""
        self._check_open()
        if channel_number is not None:
            raise LeaseRequestError(f"channel({channel_number}): the pool picks a lease's"
                                    " channel number; call channel() without one")
        self._claim()
        return self.lease(options, on_move=on_move, **fields)

    # ----- dispatching ------------------------------------------------------------------------

    def process_data_events(self, time_limit: float | None = 0) -> None:
        """Read every lease of this thread until something can run (or ``time_limit``
        seconds: 0 reads what is there, ``None`` waits for it), then run it: timers,
        thread-safe callbacks, blocked notices, then each lease's deliveries, broker
        cancels and returns, in order.  A consuming lease of this thread that lost its
        channel gets a new one first (which may block up to its ``timeout``)."""
        self._check_open()
        self._claim()
        self.dispatcher.process(time_limit)

    def sleep(self, duration: float) -> None:
        """Sleep ``duration`` seconds, dispatching as ``process_data_events`` does."""
        if duration < 0:
            raise ValueError(f"sleep duration must be >= 0, not {duration!r}")
        deadline = time.monotonic() + duration
        while True:
            self.process_data_events(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                return

    def call_later(self, delay: float, callback: Callback) -> Timer:
        """Run ``callback()`` once, ``delay`` seconds from now, in a dispatcher of the
        connection's thread; the timer goes to :meth:`remove_timeout`."""
        validators.require_callback(callback)
        self._check_open()
        self._claim()
        return self.dispatcher.call_later(delay, callback)

    def remove_timeout(self, timeout_id: Timer) -> None:
        self.dispatcher.remove_timeout(timeout_id)

    def add_callback_threadsafe(self, callback: Callback) -> None:
        """From any thread: run ``callback()`` in the connection's thread, in its next
        dispatch (pika's way for a worker thread to ack).  :class:`ClientClosed` once
        closed."""
        self.dispatcher.add_threadsafe(callback)

    def add_on_connection_blocked_callback(self, callback: OnBlocked) -> None:
        """``callback(connection, frame)`` when a broker serving this thread's leases
        blocks them (flow control); ``frame.method`` is a ``Connection.Blocked``."""
        validators.require_callback(callback)
        self._on_blocked.append(callback)

    def add_on_connection_unblocked_callback(self, callback: OnBlocked) -> None:
        validators.require_callback(callback)
        self._on_unblocked.append(callback)

    def _blocked_changed(self, blocked: bool) -> None:
        method = spec.Connection.Blocked("") if blocked else spec.Connection.Unblocked()
        frame = pika_frame.Method(0, method)
        for callback in list(self._on_blocked if blocked else self._on_unblocked):
            callback(self, frame)

    # ----- what the broker supports (the pool's brokers: RabbitMQ) --------------------------

    @property
    def basic_nack_supported(self) -> bool:
        return True

    @property
    def consumer_cancel_notify_supported(self) -> bool:
        return True

    @property
    def exchange_exchange_bindings_supported(self) -> bool:
        return True

    @property
    def publisher_confirms_supported(self) -> bool:
        return True

    basic_nack = basic_nack_supported
    consumer_cancel_notify = consumer_cancel_notify_supported
    exchange_exchange_bindings = exchange_exchange_bindings_supported
    publisher_confirms = publisher_confirms_supported

    # ----- helpers ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.dispatcher.closed:
            raise ClientClosed("the connection is closed")

    def _claim(self) -> None:
        """This thread uses the connection: its timers and thread-safe callbacks run here."""
        self.dispatcher.home = threading.get_ident()


def connect(socket: str | None = None) -> Connection:
    """The pool at ``socket``, else ``$KZPOOL_SOCKET``, else the default socket path, as a
    pika ``BlockingConnection``; :class:`PoolNotRunning` if no pool answers there."""
    path = client_socket(socket)
    client = Connection(path)
    try:
        client.ping()
    except BaseException:
        client.dispatcher.close()
        raise
    return client
