"""The connection kombu holds for the transport (``kombu.Connection.connection``).

One kombu ``Connection`` is one pool client (:class:`kzpool.Connection`, the blocking
client's ``PoolClient`` with pika's connection surface), and each of its channels one lease
of that client, so whatever the pool ties to a client connection (its exclusive queues,
say) is tied to the kombu connection.  The client holds no broker connection and sends no
heartbeats: the pool's worker does, so a task may hold the GIL for as long as it likes.

:meth:`Connection.drain_events` is kombu's: it dispatches at least one delivery, broker
cancel or return of any of the connection's channels, or raises ``socket.timeout`` when
``timeout`` passes.  Acks other threads hand over (:mod:`.channel`) run in it too.
:meth:`Connection.fileno` is the one descriptor an event loop polls (kombu's hub, Celery's
worker): a :class:`~kzpool.client.readiness.Readiness`, readable while a lease of the
draining thread has something to read or to dispatch, refreshed before each of the hub's
polls and after each drain, so it follows leases across their moves.

Fork: the connection belongs to the process that made it.  In a child it reads as not
connected (kombu then makes the child a connection of its own), its channels refuse to be
used (:class:`~kzpool.kombu.errors.Forked`), and :meth:`Connection.close` and
:meth:`Connection.collect` only drop it: nothing is ever sent on the parent's sockets, and
the inherited epoll instance is never changed.

Hazards: one thread drains (the one that last called :meth:`drain_events`); the others
only settle.  Every method may block up to a lease's ``timeout`` (a lease getting a channel
again after its broker went).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ..client.connection import Connection as PoolConnection
from ..client.connection import connect
from ..client.readiness import Readiness
from ..common import errors as kz
from ..common.options import LeaseOptions
from ..lease.state import MoveEvent
from .channel import Channel
from .errors import Forked, amqp_error, translating


class Connection:
    """A pool client at ``socket_path`` whose leases have ``options``."""

    def __init__(self, socket_path: str, options: LeaseOptions,
                 confirm_publish: bool = False) -> None:
        self.pool: PoolConnection = translating(connect)(socket_path)
        self.socket_path = socket_path
        self.options = options
        self.confirm_publish = confirm_publish
        self.client: Any = None  # the kombu.Connection (kombu walks channel.connection.client)
        self.pid = os.getpid()
        self.home = threading.get_ident()  # the thread that drains
        self.channels: list[Channel] = []
        self.dispatched = 0  # deliveries, broker cancels and returns handed to kombu so far
        self.closed = False
        self._readiness: Readiness | None = None
        self._more = False  # a drain dispatched something since the loop last polled
        self._loop: Any = None  # the event loop it is registered with

    def __repr__(self) -> str:
        state = " closed" if self.closed else "" if self.owned else " forked"
        return f"<kzpool.kombu.Connection {self.socket_path}{state}>"

    # ----- state ---------------------------------------------------------------------------

    @property
    def owned(self) -> bool:
        """This process made it (not a child forked since)."""
        return os.getpid() == self.pid

    @property
    def connected(self) -> bool:
        return not self.closed and self.owned

    def check_usable(self) -> None:
        if self.closed:
            raise amqp_error(kz.ClientClosed("the connection is closed"))
        if not self.owned:
            raise Forked(f"this connection to {self.socket_path} was made by process"
                         f" {self.pid}, before a fork: it is that process's (reconnect)")

    # ----- channels ------------------------------------------------------------------------

    def channel(self) -> Channel:
        """A new channel: a lease with the transport's lease options."""
        self.check_usable()
        lease = translating(self.pool.channel)(options=self.options, on_move=self._moved)
        channel = Channel(self, lease)
        self.channels.append(channel)
        return channel

    def forget(self, channel: Channel) -> None:
        with contextlib.suppress(ValueError):
            self.channels.remove(channel)

    def _moved(self, _event: MoveEvent) -> None:
        """A lease moved: what kombu remembers having declared may not exist on the new
        broker unless the moved lease declared it itself (it replays only its own)."""
        if self.client is not None:
            self.client.declared_entities.clear()

    # ----- events --------------------------------------------------------------------------

    def drain_events(self, timeout: float | None = None) -> None:
        """Dispatch at least one event of the connection's channels, waiting up to
        ``timeout`` seconds (``None``: as long as it takes), else ``socket.timeout``."""
        self.check_usable()
        self.home = threading.get_ident()
        before = self.dispatched
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self.pool.process_data_events(left)
                if self.dispatched != before:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("timed out")
        except kz.KzpoolError as exc:
            raise amqp_error(exc) from exc
        finally:
            if self.dispatched != before and self._loop is not None:
                self._more = True
            if self._readiness is not None and self.connected:
                self._readiness.refresh(self._more)

    def fileno(self) -> int:
        """A descriptor readable while the draining thread has something to drain."""
        self.check_usable()
        if self._readiness is None:
            self._readiness = Readiness(self.pool.dispatcher)
        self._readiness.refresh()
        return self._readiness.fileno()

    def register_with(self, loop: Any, on_readable: Callable[..., Any]) -> None:
        """Have ``loop`` (kombu's hub) call ``on_readable(self, loop)`` when there is
        something to drain, and refresh what it watches before each of its polls."""
        self.home = threading.get_ident()
        loop.add_reader(self.fileno(), on_readable, self, loop)
        on_tick = getattr(loop, "on_tick", None)
        if on_tick is not None:
            on_tick.add(self._tick)
        self._loop = loop

    def unregister(self) -> None:
        """Leave the event loop (in a forked child, only forget it: its poller's epoll is
        the parent's too)."""
        loop, self._loop = self._loop, None
        if loop is None or not self.owned:
            return
        getattr(loop, "on_tick", set()).discard(self._tick)
        if self._readiness is not None and not self._readiness.closed:
            with contextlib.suppress(KeyError, OSError, ValueError):  # a loop reset since
                loop.remove_reader(self._readiness.fileno())

    def _tick(self) -> None:
        """Before each of the loop's polls.  After a drain that dispatched something, the
        poll does not wait, once: what the callbacks asked of the loop meanwhile (Celery's
        acks, through ``call_soon``) runs first, though kombu's hub only wakes for another
        thread's ``call_soon``; else every delivery the broker allows could be waiting on
        its ack while the poll waits for the broker."""
        if self.connected and self._readiness is not None:
            self._readiness.refresh(self._more)
            self._more = False
        else:
            self.unregister()

    # ----- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Close every channel and the pool client; in a forked child, only drop them."""
        if self.closed:
            return
        self.unregister()
        self.closed = True
        for channel in self.channels:
            channel.connection = None
        self.channels = []
        try:
            if self.owned and self.pool.is_open:
                self.pool.close()
        except kz.KzpoolError as exc:
            raise amqp_error(exc) from exc
        finally:
            if self._readiness is not None:
                self._readiness.close()  # (in a child: its copies only)

    collect = close  # kombu's after-fork and reconnect path: nothing waits on the pool
