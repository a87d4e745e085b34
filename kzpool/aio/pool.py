"""The asyncio client of the pool: its socket, its route cache, and one-shot requests.

The twin of :class:`kzpool.client.pool.PoolClient` for the event loop: the same socket, the
same requests, the same route cache (a lease asks first at the worker that served the same
kind of lease last), every socket opened without blocking the loop.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from ..common import messages
from ..common.options import ConnectionId
from ..lease import forks
from ..lease.asking import not_running
from ..lease.state import RouteKey
from .stream import AioBackend, UnixBackend, call


class PoolClient:
    """A handle on the pool at ``socket_path``; the channels of one connection share it."""

    def __init__(self, socket_path: str, backend: AioBackend | None = None) -> None:
        self.socket_path = socket_path
        self.backend: AioBackend = backend or UnixBackend()
        # (kind, zone or broker) -> the lease socket of the worker that served it last
        self.routes: dict[RouteKey, str] = {}
        self.identity = ConnectionId()  # its leases' connection_id: their exclusive queues'
        self.pid = os.getpid()  # the process it was made in (a child of fork() has a copy)
        forks.watch(self)

    def __repr__(self) -> str:
        return f"<PoolClient {self.socket_path}>"

    def after_fork(self) -> None:
        """In a child of ``fork()`` (run by :mod:`kzpool.lease.forks`): the client holds no
        socket and no event loop, so it serves the child's own channels on the child's own
        loop; the channels opened before the fork are the parent's (they refuse to be used
        here: :meth:`LeaseLink.after_fork`)."""
        self.pid = os.getpid()

    async def open_pool(self) -> socket.socket:
        """A new connection to the pool's lease socket; a clear error if no pool answers."""
        try:
            return await self.backend.connect(self.socket_path)
        except OSError as exc:
            raise not_running(self.socket_path, exc) from exc

    async def open_route(self, path: str) -> socket.socket | None:
        """A new connection to a worker's socket; ``None`` (and the route forgotten) if that
        worker is gone."""
        try:
            return await self.backend.connect(path)
        except OSError:
            self.routes = {k: v for k, v in self.routes.items() if v != path}
            return None

    async def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        return await call(self.backend, self.socket_path, messages.Ping(), timeout)

    async def status(self) -> dict[str, Any]:
        return await call(self.backend, self.socket_path, messages.StatusRequest())

    async def brokers(self) -> dict[str, Any]:
        return await call(self.backend, self.socket_path, messages.BrokersRequest())
