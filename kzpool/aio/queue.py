"""aio-pika's ``Queue`` on a kzpool channel.

Defaults are aio-pika's: ``bind``/``unbind`` without a routing key use the queue's name;
``get`` waits 5 s and raises :class:`~kzpool.aio.errors.QueueEmpty` on an empty queue (or
returns ``None`` with ``fail=False``); ``delete`` defaults to ``if_unused=True,
if_empty=True`` (a 406 on a queue in use or not empty).  ``consume`` returns the consumer
tag; the callback gets each message in a task of its own.  Everything a queue declares,
binds and consumes is replayed on a new channel after a move (``robust=False`` leaves a
step out).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .core import CallbackConsumer, ChannelCore
from .errors import QueueEmpty
from .exchange import exchange_name
from .incoming import IncomingMessage
from .iterator import QueueIterator


class Queue:
    def __init__(self, core: ChannelCore, channel: Any, name: str, durable: bool = False,
                 exclusive: bool = False, auto_delete: bool = False,
                 arguments: dict[str, Any] | None = None, passive: bool = False) -> None:
        self._core = core
        self.channel = channel
        self.name = name
        self.durable = durable
        self.exclusive = exclusive
        self.auto_delete = auto_delete
        self.arguments = arguments
        self.passive = passive
        self.declaration_result: Any = None

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return (f"<Queue({self.name}): auto_delete={self.auto_delete}, durable={self.durable},"
                f" exclusive={self.exclusive}, arguments={self.arguments!r}>")

    async def declare(self, timeout: float | None = None, robust: bool = True) -> Any:
        """Declare the queue; its ``Queue.DeclareOk`` (counts at this moment) is also kept as
        ``declaration_result``."""
        self.declaration_result = await self._core.rpc("queue_declare", {
            "queue": self.name, "passive": self.passive, "durable": self.durable,
            "exclusive": self.exclusive, "auto_delete": self.auto_delete,
            "arguments": self.arguments}, timeout, robust)
        return self.declaration_result

    async def bind(self, exchange: Any, routing_key: str | None = None, *,
                   arguments: dict[str, Any] | None = None, timeout: float | None = None,
                   robust: bool = True) -> Any:
        return await self._core.rpc("queue_bind", {
            "queue": self.name, "exchange": exchange_name(exchange),
            "routing_key": self.name if routing_key is None else routing_key,
            "arguments": arguments}, timeout, robust)

    async def unbind(self, exchange: Any, routing_key: str | None = None,
                     arguments: dict[str, Any] | None = None,
                     timeout: float | None = None) -> Any:
        return await self._core.rpc("queue_unbind", {
            "queue": self.name, "exchange": exchange_name(exchange),
            "routing_key": self.name if routing_key is None else routing_key,
            "arguments": arguments}, timeout)

    async def consume(self, callback: Callable[[IncomingMessage], Any], no_ack: bool = False,
                      exclusive: bool = False, arguments: dict[str, Any] | None = None,
                      consumer_tag: str | None = None, timeout: float | None = None,
                      robust: bool = True) -> str:
        """Consume: each message goes to ``callback`` (an ``async def``), in a task of its
        own; the consumer tag."""
        return await self._core.consume(self.name, CallbackConsumer(callback, no_ack),
                                        exclusive, arguments, consumer_tag, timeout, robust)

    async def cancel(self, consumer_tag: str, timeout: float | None = None,
                     nowait: bool = False) -> Any:
        result = await self._core.cancel(consumer_tag, timeout)
        return None if nowait else result

    async def get(self, *, no_ack: bool = False, fail: bool = True,
                  timeout: float | None = 5) -> IncomingMessage | None:
        """One message (``basic.get``); :class:`QueueEmpty` if there is none (``None`` with
        ``fail=False``)."""
        message = await self._core.get(self.name, no_ack, timeout)
        if message is None and fail:
            raise QueueEmpty()
        return message

    async def purge(self, no_wait: bool = False, timeout: float | None = None) -> Any:
        result = await self._core.rpc("queue_purge", {"queue": self.name}, timeout)
        return None if no_wait else result

    async def delete(self, *, if_unused: bool = True, if_empty: bool = True,
                     timeout: float | None = None) -> Any:
        return await self._core.rpc("queue_delete", {"queue": self.name,
                                                     "if_unused": if_unused,
                                                     "if_empty": if_empty}, timeout)

    def iterator(self, **kwargs: Any) -> QueueIterator:
        """An async iterator of the queue's messages (and an async context manager); takes
        ``consume``'s keywords and ``timeout``."""
        return QueueIterator(self._core, self, **kwargs)

    def __aiter__(self) -> QueueIterator:
        return self.iterator()
