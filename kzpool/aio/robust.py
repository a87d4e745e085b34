"""aio-pika's ``RobustChannel`` (as ``aio_pika.connect_robust`` gives it) on a kzpool lease.

Every kzpool channel survives its broker (it moves, and replays what it declared); a robust
one also survives a channel error, as aio-pika's does: the call that caused it raises, calls
made before its close callbacks are called raise :class:`ChannelInvalidStateError`, the
close callbacks hear the error (all awaited, up to the channel's timeout), then the lease's
new channel gets the topology again, :meth:`RobustChannel.ready` returns, and the reopen
callbacks run.  ``reopen()`` after ``close()`` leases a channel again and declares, binds
and consumes (callback consumers) what the channel had.  ``get_queue`` and ``get_exchange``
(and passive declares) of a name declared on this channel give the object declared.  Not
thread-safe: the loop's thread only.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .channel import Channel
from .exchange import Exchange, RobustExchange
from .link import Phase
from .queue import Queue, RobustQueue

FOREVER = 365 * 24 * 3600.0  # what ready() waits, in seconds: until it is


class RobustChannel(Channel):
    QUEUE_CLASS: ClassVar[type[Queue]] = RobustQueue
    EXCHANGE_CLASS: ClassVar[type[Exchange]] = RobustExchange
    ROBUST: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._exchanges: dict[str, Exchange] = {}
        self._queues: dict[str, Queue] = {}

    async def ready(self) -> None:
        """Until the channel is open with its topology replayed (after a move or a channel
        error); after ``close()``, until it is reopened."""
        while True:
            core = self._core
            if core is None or self._ending.closed or core.link.phase is Phase.CLOSED:
                await self._next_open()
                continue
            link = core.link
            await link.ready(link.loop.time() + FOREVER)
            if core.error is None and self._core is core:
                return

    async def reopen(self) -> None:
        await super().reopen()
        await self.reopen_callbacks()

    async def declare_exchange(self, name: str, type: Any = "direct", *,
                               durable: bool = False, auto_delete: bool = False,
                               internal: bool = False, passive: bool = False,
                               arguments: dict[str, Any] | None = None,
                               timeout: float | None = None, robust: bool = True) -> Exchange:
        if passive and name in self._exchanges:
            return self._exchanges[name]
        exchange = await super().declare_exchange(
            name, type, durable=durable, auto_delete=auto_delete, internal=internal,
            passive=passive, arguments=arguments, timeout=timeout, robust=robust)
        if robust and not internal:
            self._exchanges[name] = exchange
        return exchange

    async def declare_queue(self, name: str | None = None, *, durable: bool = False,
                            exclusive: bool = False, passive: bool = False,
                            auto_delete: bool = False, arguments: dict[str, Any] | None = None,
                            timeout: float | None = None, robust: bool = True) -> Queue:
        if passive and name and name in self._queues:
            return self._queues[name]
        queue = await super().declare_queue(
            name, durable=durable, exclusive=exclusive, passive=passive,
            auto_delete=auto_delete, arguments=arguments, timeout=timeout, robust=robust)
        if robust:
            self._queues.setdefault(queue.name, queue)
        return queue

    async def queue_delete(self, queue_name: str, timeout: float | None = None,
                           if_unused: bool = False, if_empty: bool = False,
                           nowait: bool = False) -> Any:
        result = await super().queue_delete(queue_name, timeout, if_unused, if_empty, nowait)
        self._queues.pop(queue_name, None)
        return result

    async def exchange_delete(self, exchange_name: str, timeout: float | None = None,
                              if_unused: bool = False, nowait: bool = False) -> Any:
        result = await super().exchange_delete(exchange_name, timeout, if_unused, nowait)
        self._exchanges.pop(exchange_name, None)
        return result
