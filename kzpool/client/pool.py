"""The lease client: the pool's sockets, the route cache, and the leases it hands out.

Any Python process can use it; nothing in it runs in the background.  A :class:`PoolClient`
may be shared by threads (it opens sockets; each thread's dispatchers run only that thread's
leases, :mod:`.dispatch`); each :class:`~kzpool.client.lease.Lease` belongs to one thread at
a time.  ``kzpool.connect()`` returns its pika-shaped subclass,
:class:`~kzpool.client.connection.Connection`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from ..common import messages
from ..common.errors import ClientClosed, LeaseRequestError
from .backend import Backend, RouteKey, UnixBackend, call, not_running
from .dispatch import Dispatcher
from .lease import Lease
from .move import MoveEvent

KINDS = ("float", "sticky")


class PoolClient:
    """A handle on the pool at ``socket_path``."""

    def __init__(self, socket_path: str, backend: Backend | None = None,
                 wakeable: bool = False) -> None:
        self.socket_path = socket_path
        self.backend: Backend = backend or UnixBackend()
        # (kind, zone or broker) -> the lease socket of the worker that served it last
        self.routes: dict[RouteKey, str] = {}
        self.dispatcher = Dispatcher(wakeable)

    def __repr__(self) -> str:
        return f"<PoolClient {self.socket_path}>"

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
        return call(self.backend, self.socket_path, messages.Ping())

    def status(self) -> dict[str, Any]:
        return call(self.backend, self.socket_path, messages.StatusRequest())

    def brokers(self) -> dict[str, Any]:
        """``{"local_zone": ..., "brokers": [{"broker", "zone", "hidden", "available"}]}``,
        brokers in config order, URIs with their password masked (a sticky lease takes them)."""
        return call(self.backend, self.socket_path, messages.BrokersRequest())

    def lease(self, kind: str = "float", *, zone: str | None = None, broker: str | None = None,
              timeout: float = 10.0, on_move: Callable[[MoveEvent], None] | None = None,
              federates: str | None = None, handed: socket.socket | None = None,
              abort: Callable[[], bool] | None = None) -> Lease:
        """A channel: ``float`` follows the zone's primary, ``sticky`` stays on ``broker``.

        Blocks up to ``timeout`` seconds for a broker to serve it, then raises
        :class:`~kzpool.common.errors.BrokerUnavailable` naming what it waited for.
        ``federates`` names the listener queue a federator's lease feeds; ``kzpool status``
        shows it.  ``handed``: a socket on which the master already asked for this lease (an
        in-service consumer's, from a socket pair); the lease waits for its answer there.
        ``abort``: asked every quarter second while the lease waits for a channel or a reply;
        when it returns true the lease gives up and is closed
        (:class:`~kzpool.common.errors.LeaseClosed`).
        """
        if self.dispatcher.closed:
            raise ClientClosed("the connection is closed")
        if kind not in KINDS:
            raise LeaseRequestError(f"unknown lease kind {kind!r} (float or sticky)")
        return Lease(self, kind, zone, broker, timeout, on_move, federates, handed, abort)
