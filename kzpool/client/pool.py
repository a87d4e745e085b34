"""The blocking client of the pool: its sockets, its route cache, and the leases it hands out.

Any Python process can use it; nothing in it runs in the background.  A :class:`PoolClient`
may be shared by threads (it opens sockets; each thread's dispatchers run only that thread's
leases, :mod:`.dispatch`); each :class:`~kzpool.client.lease.Lease` belongs to one thread at
a time.  ``kzpool.connect()`` returns its pika-shaped subclass,
:class:`~kzpool.client.connection.Connection`.

Every socket it opens goes through its :class:`Backend`, the one seam to the OS: the pool's
lease socket, or the socket of the worker that served the same kind of lease last (its
*route*, by the lease options' ``route_key``).  :class:`UnixBackend` is the real one; a test
gives a client a backend that returns one end of a socket pair, with a scripted worker at
the other end.  The asyncio twin is :class:`kzpool.aio.pool.PoolClient`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol, Unpack

from ..common import messages, wire
from ..common.errors import ClientClosed
from ..common.messages import Message
from ..common.options import ConnectionId, LeaseOptions, OptionFields
from ..lease import forks
from ..lease.asking import not_running, read_answer
from ..lease.state import MoveEvent, RouteKey
from .dispatch import Dispatcher
from .lease import Lease


class Backend(Protocol):
    def connect(self, path: str) -> socket.socket:
        """A connected stream socket to ``path``; :class:`OSError` if nothing answers."""
        ...


class UnixBackend:
    def connect(self, path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return sock


class PoolClient:
    """A handle on the pool at ``socket_path``."""

    def __init__(self, socket_path: str, backend: Backend | None = None,
                 wakeable: bool = False) -> None:
        self.socket_path = socket_path
        self.backend: Backend = backend or UnixBackend()
        # (kind, zone or broker) -> the lease socket of the worker that served it last
        self.routes: dict[RouteKey, str] = {}
        self.identity = ConnectionId()  # its leases' connection_id: their exclusive queues'
        self.dispatcher = Dispatcher(wakeable)
        self.pid = os.getpid()  # the process it was made in (a child of fork() has a copy)
        forks.watch(self)

    def __repr__(self) -> str:
        return f"<PoolClient {self.socket_path}>"

    def after_fork(self) -> None:
        """In a child of ``fork()`` (run by :mod:`kzpool.lease.forks`): the parent's sockets
        are closed here without a word on them, and each lease gets a channel of its own on
        its next use, replaying its topology; the parent's leases stay the parent's."""
        parent, self.pid = self.pid, os.getpid()
        self.dispatcher.after_fork(parent, self.identity.value)  # the child's own identity

    def open_pool(self) -> socket.socket:
        """A new connection to the pool's lease socket; a clear error if no pool answers."""
        try:
            return self.backend.connect(self.socket_path)
        except OSError as exc:
            raise not_running(self.socket_path, exc) from exc

    def open_route(self, path: str) -> socket.socket | None:
        """A new connection to a worker's socket; ``None`` (and the route forgotten) if that
        worker is gone."""
        try:
            return self.backend.connect(path)
        except OSError:
            self.routes = {k: v for k, v in self.routes.items() if v != path}
            return None

    def ping(self) -> dict[str, Any]:
        return self._call(messages.Ping())

    def status(self) -> dict[str, Any]:
        return self._call(messages.StatusRequest())

    def brokers(self) -> dict[str, Any]:
        """``{"local_zone": ..., "brokers": [{"broker", "zone", "hidden", "available"}]}``,
        brokers in config order, URIs with their password masked (a sticky lease takes them)."""
        return self._call(messages.BrokersRequest())

    def lease(self, options: LeaseOptions | str | None = None, /, *,
              on_move: Callable[[MoveEvent], None] | None = None,
              handed: socket.socket | None = None, abort: Callable[[], bool] | None = None,
              **fields: Unpack[OptionFields]) -> Lease:
        """A channel: ``float`` follows the zone's primary, ``sticky`` stays on ``broker``.

        ``options``: a :class:`~kzpool.common.options.LeaseOptions`, or a kind; keywords
        (``kind``, ``zone``, ``broker``, ``timeout``, ...) set or override its fields.
        Blocks up to the lease's ``timeout`` seconds for a broker to serve it, then raises
        :class:`~kzpool.common.errors.BrokerUnavailable` naming what it waited for.
        ``on_move(MoveEvent)`` hears of each move.  ``handed``: a socket on which the master
        already asked for this lease (an in-service consumer's, from a socket pair); the
        lease waits for its answer there.  ``abort``: asked every quarter second while the
        lease waits for a channel or a reply; when it returns true the lease gives up and is
        closed (:class:`~kzpool.common.errors.LeaseClosed`).
        """
        if self.dispatcher.closed:
            raise ClientClosed("the connection is closed")
        options = LeaseOptions.of(options, **fields).for_connection(self.identity.value)
        return Lease(self, options, on_move, handed, abort)

    def _call(self, request: Message, timeout: float = 5.0) -> dict[str, Any]:
        return call(self.backend, self.socket_path, request, timeout)


def call(backend: Backend, path: str, request: Message, timeout: float = 5.0) -> dict[str, Any]:
    """One request to the pool at ``path`` and its answer, a document.

    :class:`PoolNotRunning` if nothing answers; the error a refusal names if refused;
    ``TimeoutError`` or ``ConnectionError`` if the pool does not answer in time.
    """
    try:
        sock = backend.connect(path)
    except OSError as exc:
        raise not_running(path, exc) from exc
    with sock:
        sock.settimeout(timeout)
        # the pool may have answered (a refusal) and hung up before reading: read on
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(messages.encode(request))
        reader = wire.FrameReader()
        while (answer := read_answer(reader, sock.recv(65536))) is None:
            pass
    return answer
