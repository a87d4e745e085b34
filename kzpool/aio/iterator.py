"""aio-pika's ``QueueIterator``: ``async with queue.iterator() as it: async for m in it``.

The consumer starts on ``__aenter__`` (or the first ``__anext__``); messages wait in a
buffer, bounded by the channel's prefetch.  Leaving the block cancels the consumer and gives
back (nack, requeue) what was buffered and not yet handed out.  ``timeout=T``: no message
within T seconds closes the iterator and raises ``TimeoutError``; cancelling the task that
waits closes it too.  Closing the channel ends the loop (``StopAsyncIteration``).  Across a
move the consumer comes back with the same tag on the new channel; messages buffered from
the lost channel are dropped, since the broker gives them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from types import TracebackType
from typing import Any

from .core import ChannelCore
from .errors import ChannelInvalidStateError
from .incoming import IncomingMessage

log = logging.getLogger("kzpool.aio")


class QueueIterator:
    def __init__(self, queue: Any, **kwargs: Any) -> None:
        self._core: ChannelCore | None = None  # the channel's core it consumes on
        self.queue = queue
        self.no_ack = bool(kwargs.get("no_ack", False))
        self._exclusive = bool(kwargs.get("exclusive", False))
        self._arguments = kwargs.get("arguments")
        self._tag = kwargs.get("consumer_tag")
        self._timeout: float | None = kwargs.get("timeout")
        self.consumer_tag: str | None = None
        self._buffer: deque[IncomingMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._ended = False  # the channel closed under it

    # ----- the consumer's side ------------------------------------------------------------------

    def deliver(self, message: IncomingMessage) -> None:
        self._buffer.append(message)
        self._wake()

    def lost(self) -> None:
        self._buffer.clear()

    def closed(self) -> None:
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ----- the user's side ----------------------------------------------------------------------

    async def consume(self) -> None:
        core = self._core = self.queue.channel._live()
        self.consumer_tag = await core.consume(
            self.queue.name, self, self._exclusive, self._arguments, self._tag, None, True)

    def __aiter__(self) -> QueueIterator:
        return self

    async def __aenter__(self) -> QueueIterator:
        if self.consumer_tag is None and not self._closed:
            await self.consume()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def __anext__(self) -> IncomingMessage:
        if self._closed:
            raise StopAsyncIteration
        if self.consumer_tag is None:
            await self.consume()
        try:
            if self._timeout is None:
                return await self._next()
            async with asyncio.timeout(self._timeout):
                return await self._next()
        except (TimeoutError, asyncio.CancelledError):
            await asyncio.shield(self.close())
            raise

    async def _next(self) -> IncomingMessage:
        while not self._buffer:
            if self._ended or self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._buffer.popleft()

    async def close(self) -> None:
        """Cancel the consumer; give back the messages buffered and not handed out."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        tag, buffered, core = self.consumer_tag, list(self._buffer), self._core
        self._buffer.clear()
        if tag is None or core is None or core.is_closed:
            return
        with contextlib.suppress(ChannelInvalidStateError):
            await core.cancel(tag, None)
        if self.no_ack:
            if buffered:
                log.warning("%d no_ack messages buffered by the iterator are lost",
                            len(buffered))
            return
        for message in buffered:
            if not message.processed:
                await message.nack(requeue=True)

    def __repr__(self) -> str:
        return f"<QueueIterator: queue={self.queue.name!r} consumer_tag={self.consumer_tag!r}>"
