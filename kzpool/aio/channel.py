"""aio-pika's ``Channel`` (as ``aio_pika.connect`` gives it) on a kzpool lease.

``connection.channel()`` returns a channel not opened yet: ``await`` it, or ``async with``
it.  Opening it leases a channel from the pool (float by default: the zone's primary broker;
``kind="sticky", broker=URI`` to stay on one broker).  From then on the worker that owns the
channel keeps its heartbeats, and the channel survives its broker: when it is lost the lease
gets another (failing over, or back to the primary), declares again what the channel
declared, consumes again with the same tags, and sends again what was not confirmed.

A channel error (the broker closing the channel because of a call) closes this channel as
aio-pika's plain channel closes: calls raise :class:`ChannelInvalidStateError`, the close
callbacks hear the error, ``closed()`` completes, and ``reopen()`` gives it a bare channel
again.  :class:`~kzpool.aio.robust.RobustChannel` (``connect_robust``) recovers instead.
``reopen()`` after ``close()`` leases a channel again.

Server-named queues (``declare_queue()`` without a name) are named here, ``amq_<hex>``, as
aio-pika's robust channel names them, so the name holds across moves.  Not thread-safe: the
loop's thread only.
"""

from __future__ import annotations

import asyncio
import uuid
import warnings
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, ClassVar, Protocol, Unpack

from ..common.options import LeaseOptions, OptionFields
from ..lease.state import MoveEvent
from .callbacks import CallbackCollection, Ending
from .compat import ExchangeType
from .core import ChannelCore
from .errors import ChannelClosed, ChannelInvalidStateError
from .exchange import Exchange
from .link import Phase
from .pool import PoolClient
from .queue import Queue
from .transaction import Transaction

_ENDED = (Phase.CLOSED, Phase.FAILED)


class ConnectionSide(Protocol):
    """What a channel tells the connection that made it."""

    @property
    def is_closed(self) -> bool: ...

    def _track(self, channel: Channel) -> None: ...

    def _forget(self, channel: Channel) -> None: ...

    def _channel_moved(self, channel: Channel) -> None: ...


class Channel:
    QUEUE_CLASS: ClassVar[type[Queue]] = Queue
    EXCHANGE_CLASS: ClassVar[type[Exchange]] = Exchange
    ROBUST: ClassVar[bool] = False  # recovers from channel errors

    def __init__(self, pool: PoolClient, channel_number: int | None = None,
                 publisher_confirms: bool = True, on_return_raises: bool = False, *,
                 options: LeaseOptions | None = None,
                 on_move: Callable[[MoveEvent], Any] | None = None,
                 connection: ConnectionSide | None = None,
                 **fields: Unpack[OptionFields]) -> None:
        if on_return_raises and not publisher_confirms:
            raise RuntimeError("on_return_raises must be passed with publisher_confirms")
        self.options = LeaseOptions.of(options, **fields).for_connection(pool.identity.value)
        self._pool = pool
        self._connection = connection
        self._requested_number = channel_number
        self.publisher_confirms = publisher_confirms
        self.on_return_raises = on_return_raises
        self._on_move = on_move
        self._core: ChannelCore | None = None
        self._ending = Ending(self)
        self._opening: asyncio.Future[None] | None = None  # resolved at the next (re)open
        self.close_callbacks = self._ending.callbacks
        self.return_callbacks = CallbackCollection(self)
        self.reopen_callbacks = CallbackCollection(self)
        self.default_exchange = self.EXCHANGE_CLASS(self, "", ExchangeType.DIRECT)

    # ----- life -----------------------------------------------------------------------------

    async def initialize(self, timeout: float | None = None) -> None:
        """Lease the channel (and turn confirms on); raises what kept it from the pool."""
        if self._core is not None or self._ending.closed:
            raise RuntimeError("Already initialized")
        await self._open(None, timeout)

    async def _open(self, carried: ChannelCore | None, timeout: float | None = None) -> None:
        previous = self._core
        core = self._core = ChannelCore(self, self._pool, self.publisher_confirms,
                                        self.on_return_raises, self.options, self._on_move,
                                        self.ROBUST)
        try:
            async with asyncio.timeout(timeout):
                await core.open(carried)
        except BaseException:
            self._core = previous  # not opened: it may be awaited again
            await core.close()
            raise
        self._ending.reopen()
        if self._connection is not None:
            self._connection._track(self)
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.set_result(None)

    def __await__(self) -> Generator[Any, None, Channel]:
        return self._opened().__await__()

    async def _opened(self) -> Channel:
        await self.initialize()
        return self

    async def __aenter__(self) -> Channel:
        if self._core is None:
            await self.initialize()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self, exc: BaseException | None = None) -> None:
        """Give the lease back: its consumers are cancelled, unacked messages requeued;
        returns once the broker has confirmed it (within the lease's timeout), and a close
        called while another is under way returns when that one does.  The close callbacks
        hear ``exc``, else ``ChannelClosed(None, None)`` (aiormq's)."""
        await self._close(exc if exc is not None else ChannelClosed(None, None))

    async def _close(self, exc: BaseException | None) -> None:
        core = self._core
        if not self._ending.begin():
            if core is not None:
                await asyncio.shield(self._ending.future())
            return
        told = core is not None and core.error is not None and not self.ROBUST
        try:
            if core is not None:
                await core.close()
        finally:
            if self._connection is not None:
                self._connection._forget(self)
            if told:  # its close callbacks heard the broker's error already
                self._ending.resolve()
            else:
                self._ending.finish(exc)

    async def reopen(self) -> None:
        """A channel again: after ``close()``, a new lease; after a channel error, the
        lease's new channel.  An open channel stays as it is."""
        if self._connection is not None and self._connection.is_closed:
            raise ChannelInvalidStateError("No active transport in channel")
        core = self._core
        if core is None or self._ending.closed or core.link.phase in _ENDED:
            await self._open(core if self.ROBUST else None)
        elif core.error is not None:
            await core.recovered()
            self._ending.reopen()

    def closed(self) -> asyncio.Future[bool]:
        """A future that completes when the channel is closed (by its owner, or by the
        broker)."""
        future = self._ending.future()
        core = self._core
        if core is not None and core.error is not None and not self.ROBUST:
            self._ending.resolve()
        return future

    async def _next_open(self) -> None:
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._opening)

    def _closed_by_broker(self, error: ChannelClosed) -> Any:
        """The broker closed the channel: the close callbacks hear why."""
        started = self.close_callbacks(error)
        if not self.ROBUST:
            self._ending.resolve()
        return started

    def _moved(self) -> None:
        if self._connection is not None:
            self._connection._channel_moved(self)

    @property
    def _moving(self) -> bool:
        """Getting a channel again after a move."""
        core = self._core
        return core is not None and core.link.phase is Phase.LOST and core.error is None

    @property
    def is_initialized(self) -> bool:
        return self._core is not None

    @property
    def is_closed(self) -> bool:
        return self._ending.closed or self._core is None or self._core.is_closed

    @property
    def number(self) -> int | None:
        return self._core.link.state.channel_number if self._core else self._requested_number

    # ----- kzpool's own ---------------------------------------------------------------------

    @property
    def broker(self) -> str | None:
        """The broker serving the channel now, password masked."""
        return self._core.link.broker if self._core else None

    @property
    def lease_id(self) -> str | None:
        return self._core.link.id if self._core else None

    @property
    def kind(self) -> str:
        return self.options.kind

    def __repr__(self) -> str:
        return f"<{type(self).__name__} #{self.number} lease {self.lease_id} on {self.broker}>"

    def _live(self) -> ChannelCore:
        core = self._core
        if core is None:
            raise ChannelInvalidStateError("Channel was not opened")
        if core.link.forked is not None:  # opened before fork(): this process's copy
            raise core.link.forked
        if self._ending.closed or core.link.phase in _ENDED:
            raise ChannelInvalidStateError(f"{self!r} closed")
        if core.refusing:
            raise ChannelInvalidStateError(f"{self!r} closed: {core.error}") from core.error
        return core

    # ----- aio-pika's calls -------------------------------------------------------------------

    async def declare_exchange(self, name: str, type: Any = ExchangeType.DIRECT, *,
                               durable: bool = False, auto_delete: bool = False,
                               internal: bool = False, passive: bool = False,
                               arguments: dict[str, Any] | None = None,
                               timeout: float | None = None, robust: bool = True) -> Exchange:
        exchange = self.EXCHANGE_CLASS(self, name, type, durable=durable,
                                       auto_delete=auto_delete, internal=internal,
                                       passive=passive, arguments=arguments)
        await exchange.declare(timeout, robust)
        return exchange

    async def get_exchange(self, name: str, *, ensure: bool = True) -> Exchange:
        """With ``ensure``, a passive declare (404 if it does not exist)."""
        if ensure:
            return await self.declare_exchange(name, passive=True)
        self._live()
        return self.EXCHANGE_CLASS(self, name, passive=True)

    async def declare_queue(self, name: str | None = None, *, durable: bool = False,
                            exclusive: bool = False, passive: bool = False,
                            auto_delete: bool = False, arguments: dict[str, Any] | None = None,
                            timeout: float | None = None, robust: bool = True) -> Queue:
        queue = self.QUEUE_CLASS(self, name or f"amq_{uuid.uuid4().hex}", durable, exclusive,
                                 auto_delete, arguments, passive)
        await queue.declare(timeout, robust)
        return queue

    async def get_queue(self, name: str, *, ensure: bool = True) -> Queue:
        """With ``ensure``, a passive declare (404 if it does not exist)."""
        if ensure:
            return await self.declare_queue(name, passive=True)
        self._live()
        return self.QUEUE_CLASS(self, name, passive=True)

    async def set_qos(self, prefetch_count: int = 0, prefetch_size: int = 0,
                      global_: bool = False, timeout: float | None = None,
                      all_channels: bool | None = None) -> Any:
        if all_channels is not None:
            warnings.warn('Use "global_" instead of "all_channels"', DeprecationWarning,
                          stacklevel=2)
            global_ = all_channels
        return await self._live().rpc("basic_qos", {
            "prefetch_count": prefetch_count, "prefetch_size": prefetch_size,
            "global_qos": global_}, timeout)

    async def queue_delete(self, queue_name: str, timeout: float | None = None,
                           if_unused: bool = False, if_empty: bool = False,
                           nowait: bool = False) -> Any:
        result = await self._live().rpc("queue_delete", {
            "queue": queue_name, "if_unused": if_unused, "if_empty": if_empty}, timeout)
        return None if nowait else result

    async def exchange_delete(self, exchange_name: str, timeout: float | None = None,
                              if_unused: bool = False, nowait: bool = False) -> Any:
        result = await self._live().rpc("exchange_delete", {
            "exchange": exchange_name, "if_unused": if_unused}, timeout)
        return None if nowait else result

    def transaction(self) -> Transaction:
        """An AMQP transaction (``async with channel.transaction():``); not on a channel
        with publisher confirms (aio-pika's ``RuntimeError``)."""
        if self.publisher_confirms:
            raise RuntimeError("Cannot create transaction when publisher confirms are enabled")
        return Transaction(self)

    async def flow(self, active: bool = True) -> Any:
        raise NotImplementedError("channel.flow is not offered by kzpool leases")

    async def get_underlay_channel(self) -> Any:
        raise NotImplementedError("a kzpool channel has no aiormq channel under it: its AMQP"
                                  " channel lives in the pool's connection worker")
