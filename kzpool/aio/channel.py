"""aio-pika's ``Channel`` (as ``connect_robust`` gives it) on a kzpool lease.

``connection.channel()`` returns a channel not opened yet: ``await`` it, or ``async with``
it.  Opening it leases a channel from the pool (float by default: the zone's primary broker;
``kind="sticky", broker=URI`` to stay on one broker).  From then on the worker that owns the
channel keeps its heartbeats, and the channel survives its broker: when it is lost the lease
gets another (failing over, or back to the primary), declares again what the channel
declared, consumes again with the same tags, and sends again what was not confirmed.

Server-named queues (``declare_queue()`` without a name) are named here, ``amq_<hex>``, as
aio-pika's robust channel names them, so the name holds across moves.  Not thread-safe: the
loop's thread only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, Unpack

from ..common.options import LeaseOptions, OptionFields
from ..lease.state import MoveEvent
from .callbacks import CallbackCollection, Ending
from .compat import ExchangeType
from .core import ChannelCore
from .errors import ChannelInvalidStateError
from .exchange import Exchange
from .pool import PoolClient
from .queue import Queue


class Channel:
    def __init__(self, pool: PoolClient, channel_number: int | None = None,
                 publisher_confirms: bool = True, on_return_raises: bool = False, *,
                 options: LeaseOptions | None = None,
                 on_move: Callable[[MoveEvent], Any] | None = None,
                 **fields: Unpack[OptionFields]) -> None:
        if on_return_raises and not publisher_confirms:
            raise RuntimeError("on_return_raises must be passed with publisher_confirms")
        self.options = LeaseOptions.of(options, **fields).for_connection(pool.identity.value)
        self._pool = pool
        self._requested_number = channel_number
        self.publisher_confirms = publisher_confirms
        self.on_return_raises = on_return_raises
        self._on_move = on_move
        self._core: ChannelCore | None = None
        self._ending = Ending(self)
        self.close_callbacks = self._ending.callbacks
        self.default_exchange: Exchange

    # ----- life -----------------------------------------------------------------------------

    async def initialize(self, timeout: float | None = None) -> None:
        """Lease the channel (and turn confirms on); raises what kept it from the pool."""
        if self._core is not None or self._ending.closed:
            raise RuntimeError("Already initialized")
        core = ChannelCore(self, self._pool, self.publisher_confirms, self.on_return_raises,
                           self.options, self._on_move)
        self._core = core
        try:
            if timeout is None:
                await core.open()
            else:
                async with asyncio.timeout(timeout):
                    await core.open()
        except BaseException:
            self._core = None  # not opened: it may be awaited again
            await core.close()
            raise
        self.default_exchange = Exchange(core, self, "", "direct")

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
        """Give the lease back: its consumers are cancelled, unacked messages requeued.
        Returns once the broker has confirmed it (within the lease's timeout); a close
        called while another is under way returns when that one does."""
        if not self._ending.begin():
            if self._core is not None:
                await asyncio.shield(self._ending.future())
            return
        try:
            if self._core is not None:
                await self._core.close()
        finally:
            self._ending.finish(exc)

    def closed(self) -> asyncio.Future[bool]:
        """A future that completes when the channel is closed."""
        return self._ending.future()

    @property
    def is_initialized(self) -> bool:
        return self._core is not None

    @property
    def is_closed(self) -> bool:
        return self._ending.closed or self._core is None or self._core.is_closed

    @property
    def number(self) -> int | None:
        return self._core.link.state.channel_number if self._core else self._requested_number

    @property
    def return_callbacks(self) -> CallbackCollection:
        return self._live().return_callbacks

    @property
    def reopen_callbacks(self) -> CallbackCollection:
        """Called with the channel after each move, once its topology is replayed."""
        return self._live().reopen_callbacks

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
        return f"<Channel #{self.number} lease {self.lease_id} on {self.broker}>"

    def _live(self) -> ChannelCore:
        if self._core is None:
            raise ChannelInvalidStateError("Channel was not opened")
        if self.is_closed:
            raise ChannelInvalidStateError(f"{self!r} closed")
        return self._core

    # ----- aio-pika's calls -------------------------------------------------------------------

    async def declare_exchange(self, name: str, type: Any = ExchangeType.DIRECT, *,
                               durable: bool = False, auto_delete: bool = False,
                               internal: bool = False, passive: bool = False,
                               arguments: dict[str, Any] | None = None,
                               timeout: float | None = None, robust: bool = True) -> Exchange:
        exchange = Exchange(self._live(), self, name, type, durable=durable,
                            auto_delete=auto_delete, internal=internal, passive=passive,
                            arguments=arguments)
        await exchange.declare(timeout, robust)
        return exchange

    async def get_exchange(self, name: str, *, ensure: bool = True) -> Exchange:
        """With ``ensure``, a passive declare (404 if it does not exist)."""
        if ensure:
            return await self.declare_exchange(name, passive=True)
        return Exchange(self._live(), self, name, passive=True)

    async def declare_queue(self, name: str | None = None, *, durable: bool = False,
                            exclusive: bool = False, passive: bool = False,
                            auto_delete: bool = False, arguments: dict[str, Any] | None = None,
                            timeout: float | None = None, robust: bool = True) -> Queue:
        queue = Queue(self._live(), self, name or f"amq_{uuid.uuid4().hex}", durable,
                      exclusive, auto_delete, arguments, passive)
        await queue.declare(timeout, robust)
        return queue

    async def get_queue(self, name: str, *, ensure: bool = True) -> Queue:
        """With ``ensure``, a passive declare (404 if it does not exist)."""
        if ensure:
            return await self.declare_queue(name, passive=True)
        return Queue(self._live(), self, name, passive=True)

    async def set_qos(self, prefetch_count: int = 0, prefetch_size: int = 0,
                      global_: bool = False, timeout: float | None = None,
                      all_channels: bool | None = None) -> Any:
        if all_channels is not None:
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

    def transaction(self) -> Any:
        raise NotImplementedError("kzpool leases do not offer AMQP transactions: use"
                                  " publisher confirms (the default)")

    async def flow(self, active: bool = True) -> Any:
        raise NotImplementedError("channel.flow is not offered by kzpool leases")

    async def get_underlay_channel(self) -> Any:
        raise NotImplementedError("a kzpool channel has no aiormq channel under it: its AMQP"
                                  " channel lives in the pool's connection worker")
