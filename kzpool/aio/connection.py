"""``await kzpool.aio.connect()``: aio-pika's connection, on the pool.

A :class:`Connection` is a handle on the pool's lease socket, not a broker connection: the
pool's connection workers hold those (and their heartbeats).  Each ``channel()`` is a lease
of its own.  Closing the connection closes its channels.  Nothing here blocks the loop.

As in aio-pika, ``connect()`` gives plain channels (a channel error closes the channel until
``reopen()``) and ``connect_robust()`` robust ones (a channel error is recovered from); the
channels of both move to another broker and back with their topology.  The connection's
``reconnect_callbacks`` run once its channels that were moving all have a channel again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar, Unpack

from ..common.errors import LeaseRequestError
from ..common.options import LeaseOptions, OptionFields
from ..common.settings import client_socket
from ..lease.state import MoveEvent
from .callbacks import CallbackCollection, Ending
from .channel import Channel
from .pool import PoolClient
from .robust import RobustChannel
from .stream import AioBackend


class Connection:
    CHANNEL_CLASS: ClassVar[type[Channel]] = Channel

    def __init__(self, client: PoolClient) -> None:
        self.client = client
        self._ending = Ending(self)
        self.close_callbacks = self._ending.callbacks
        self.reconnect_callbacks = CallbackCollection(self)
        self._channels: dict[int, Channel] = {}  # open ones, by id()

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
        return f"<kzpool.aio.{type(self).__name__} {self.socket}>"

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
        return self.CHANNEL_CLASS(self.client, channel_number, publisher_confirms,
                                  on_return_raises, options=options, on_move=on_move,
                                  connection=self, **fields)

    async def close(self, exc: BaseException | None = None) -> None:
        """Close every channel of this connection (idempotent); the connection's close
        callbacks hear ``exc``, then each channel's."""
        if not self._ending.begin():
            return
        self.close_callbacks(exc)
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel._close(exc)
        self._ending.resolve()

    def closed(self) -> asyncio.Future[bool]:
        return self._ending.future()

    async def ready(self) -> None:
        """aio-pika's: the connection is up.  The pool's is, once ``connect`` returned."""

    # ----- what its channels tell -------------------------------------------------------------

    def _track(self, channel: Channel) -> None:
        self._channels[id(channel)] = channel

    def _forget(self, channel: Channel) -> None:
        self._channels.pop(id(channel), None)

    def _channel_moved(self, channel: Channel) -> None:
        if not any(c._moving for c in self._channels.values()):
            self.reconnect_callbacks()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class RobustConnection(Connection):
    """``connect_robust()``'s: its channels recover from channel errors, as aio-pika's."""

    CHANNEL_CLASS: ClassVar[type[Channel]] = RobustChannel


async def connect(socket: str | None = None, *, timeout: float = 5.0,
                  backend: AioBackend | None = None) -> Connection:
    """The pool at ``socket``, else ``$KZPOOL_SOCKET``, else the default socket path; its
    channels are aio-pika's plain ones (a channel error closes the channel).

    Raises :class:`~kzpool.PoolNotRunning` if no pool answers there.
    """
    return Connection(await _client(socket, timeout, backend))


async def connect_robust(socket: str | None = None, *, timeout: float = 5.0,
                         backend: AioBackend | None = None) -> RobustConnection:
    """As :func:`connect`; its channels are aio-pika's robust ones (they recover from a
    channel error)."""
    return RobustConnection(await _client(socket, timeout, backend))


async def _client(socket: str | None, timeout: float, backend: AioBackend | None
                  ) -> PoolClient:
    if socket is not None and "://" in str(socket):
        raise LeaseRequestError(
            f"kzpool.aio.connect() takes the pool's socket path, not a broker URL"
            f" ({str(socket).split('@')[-1]}): the pool's config names its brokers; a"
            " channel on one broker is connection.channel(kind='sticky', broker=URL)")
    path = client_socket(socket)
    client = PoolClient(path, backend)
    await client.ping(timeout)
    return client
