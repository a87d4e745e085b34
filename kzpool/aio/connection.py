"""``await kzpool.aio.connect()``: aio-pika's connection, on the pool.

A :class:`Connection` is a handle on the pool's lease socket, not a broker connection: the
pool's connection workers hold those (and their heartbeats).  Each ``channel()`` is a lease
of its own.  Closing the connection closes its channels.  Nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any, Unpack

from ..common.errors import LeaseRequestError
from ..common.options import LeaseOptions, OptionFields
from ..common.settings import BY_NAME
from ..lease.state import MoveEvent
from .callbacks import Ending
from .channel import Channel
from .pool import PoolClient
from .stream import AioBackend


class Connection:
    def __init__(self, client: PoolClient) -> None:
        self.client = client
        self._ending = Ending(self)
        self.close_callbacks = self._ending.callbacks
        self._channels: list[Channel] = []

    @property
    def socket(self) -> str:
        return self.client.socket_path

    @property
    def is_closed(self) -> bool:
        return self._ending.closed

    @property
    def close_called(self) -> bool:
        return self._ending.closed

    def __repr__(self) -> str:
        return f"<kzpool.aio.Connection {self.socket}>"

    def channel(self, channel_number: int | None = None, publisher_confirms: bool = True,
                on_return_raises: bool = False, *, options: LeaseOptions | None = None,
                on_move: Callable[[MoveEvent], Any] | None = None,
                **fields: Unpack[OptionFields]) -> Channel:
        """A channel to ``await`` (or ``async with``): a float lease by default, following
        the zone's primary; ``kind="sticky", broker=URI`` stays on that broker.  Its options
        are ``options`` (a :class:`~kzpool.common.options.LeaseOptions`) and keywords over
        them.  Calls wait up to the lease's ``timeout`` seconds for a channel across a
        move."""
        if self._ending.closed:
            raise RuntimeError("Connection was not opened")
        channel = Channel(self.client, channel_number, publisher_confirms, on_return_raises,
                          options=options, on_move=on_move, **fields)
        self._channels = [c for c in self._channels if not c.is_closed or not c.is_initialized]
        self._channels.append(channel)
        return channel

    async def close(self, exc: BaseException | None = None) -> None:
        """Close every channel of this connection (idempotent)."""
        if not self._ending.begin():
            return
        channels, self._channels = self._channels, []
        for channel in channels:
            await channel.close()
        self._ending.finish(exc)

    def closed(self) -> asyncio.Future[bool]:
        return self._ending.future()

    async def ready(self) -> None:
        """aio-pika's: the connection is up.  The pool's is, once ``connect`` returned."""

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


async def connect(socket: str | None = None, *, timeout: float = 5.0,
                  backend: AioBackend | None = None) -> Connection:
    """The pool at ``socket``, else ``$KZPOOL_SOCKET``, else the default socket path.

    Raises :class:`~kzpool.PoolNotRunning` if no pool answers there.
    """
    if socket is not None and "://" in str(socket):
        raise LeaseRequestError(
            f"kzpool.aio.connect() takes the pool's socket path, not a broker URL"
            f" ({str(socket).split('@')[-1]}): the pool's config names its brokers; a"
            " channel on one broker is connection.channel(kind='sticky', broker=URL)")
    path = socket or os.environ.get("KZPOOL_SOCKET") or str(BY_NAME["socket"].default)
    client = PoolClient(path, backend)
    await client.ping(timeout)
    return Connection(client)


connect_robust = connect  # kzpool's channels are robust: they fail over and back
