"""aio-pika's ``Queue`` on a kzpool channel.

Defaults are aio-pika's: ``bind``/``unbind`` without a routing key use the queue's name;
``get`` waits 5 s and raises :class:`~kzpool.aio.errors.QueueEmpty` on an empty queue (or
returns ``None`` with ``fail=False``); ``delete`` defaults to ``if_unused=True,
if_empty=True`` (a 406 on a queue in use or not empty).  ``consume`` returns the consumer
tag; the callback gets each message in a task of its own.  Everything a queue declares,
binds and consumes is replayed on a new channel after a move (``robust=False`` leaves a
step out).  A queue works through its ``channel`` at each call, so it works again once a
closed channel is reopened.

Where aio-pika is installed :class:`Queue` subclasses ``aio_pika.Queue`` (and
:class:`RobustQueue` ``aio_pika.RobustQueue``): aio-pika's ``Queue`` is no ABC, so
``isinstance(queue, aio_pika.Queue)`` needs a subclass.  Every method aio-pika's has is
kzpool's own here; only the class is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import compat
from .callbacks import CallbackCollection
from .consumers import CallbackConsumer
from .core import Owner
from .errors import QueueEmpty
from .exchange import exchange_name
from .incoming import IncomingMessage
from .iterator import QueueIterator

if TYPE_CHECKING:
    _QueueBase = object
    _RobustQueueBase = object
else:
    _QueueBase = compat.base("aio_pika.queue", "Queue")
    _RobustQueueBase = compat.base("aio_pika.robust_queue", "RobustQueue")


class Queue(_QueueBase):
    def __init__(self, channel: Owner, name: str, durable: bool = False,
                 exclusive: bool = False, auto_delete: bool = False,
                 arguments: dict[str, Any] | None = None, passive: bool = False) -> None:
        self.channel = channel
        self.name = name
        self.durable = durable
        self.exclusive = exclusive
        self.auto_delete = auto_delete
        self.arguments = arguments
        self.passive = passive
        self.declaration_result: Any = None
        self.close_callbacks = CallbackCollection(self)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return (f"<Queue({self.name}): auto_delete={self.auto_delete}, durable={self.durable},"
                f" exclusive={self.exclusive}, arguments={self.arguments!r}>")

    async def declare(self, timeout: float | None = None, robust: bool = True) -> Any:
        """Declare the queue; its ``Queue.DeclareOk`` (counts at this moment) is also kept as
        ``declaration_result``."""
        self.declaration_result = await self.channel._live().rpc("queue_declare", {
            "queue": self.name, "passive": self.passive, "durable": self.durable,
            "exclusive": self.exclusive, "auto_delete": self.auto_delete,
            "arguments": self.arguments}, timeout, robust)
        return self.declaration_result

    async def bind(self, exchange: Any, routing_key: str | None = None, *,
                   arguments: dict[str, Any] | None = None, timeout: float | None = None,
                   robust: bool = True) -> Any:
        return await self.channel._live().rpc("queue_bind", {
            "queue": self.name, "exchange": exchange_name(exchange),
            "routing_key": self.name if routing_key is None else routing_key,
            "arguments": arguments}, timeout, robust)

    async def unbind(self, exchange: Any, routing_key: str | None = None,
                     arguments: dict[str, Any] | None = None,
                     timeout: float | None = None) -> Any:
        return await self.channel._live().rpc("queue_unbind", {
            "queue": self.name, "exchange": exchange_name(exchange),
            "routing_key": self.name if routing_key is None else routing_key,
            "arguments": arguments}, timeout)

    async def consume(self, callback: Callable[[IncomingMessage], Any], no_ack: bool = False,
                      exclusive: bool = False, arguments: dict[str, Any] | None = None,
                      consumer_tag: str | None = None, timeout: float | None = None,
                      robust: bool = True) -> str:
        """Consume: each message goes to ``callback`` (an ``async def``), in a task of its
        own; the consumer tag."""
        return await self.channel._live().consume(
            self.name, CallbackConsumer(callback, no_ack), exclusive, arguments, consumer_tag,
            timeout, robust)

    async def cancel(self, consumer_tag: str, timeout: float | None = None,
                     nowait: bool = False) -> Any:
        result = await self.channel._live().cancel(consumer_tag, timeout)
        return None if nowait else result

    async def get(self, *, no_ack: bool = False, fail: bool = True,
                  timeout: float | None = 5) -> IncomingMessage | None:
        """One message (``basic.get``); :class:`QueueEmpty` if there is none (``None`` with
        ``fail=False``)."""
        message = await self.channel._live().get(self.name, no_ack, timeout)
        if message is None and fail:
            raise QueueEmpty()
        return message

    async def purge(self, no_wait: bool = False, timeout: float | None = None) -> Any:
        result = await self.channel._live().rpc("queue_purge", {"queue": self.name}, timeout)
        return None if no_wait else result

    async def delete(self, *, if_unused: bool = True, if_empty: bool = True,
                     timeout: float | None = None) -> Any:
        return await self.channel.queue_delete(self.name, timeout=timeout,
                                               if_unused=if_unused, if_empty=if_empty)

    def iterator(self, **kwargs: Any) -> QueueIterator:
        """An async iterator of the queue's messages (and an async context manager); takes
        ``consume``'s keywords and ``timeout``."""
        return QueueIterator(self, **kwargs)

    def __aiter__(self) -> QueueIterator:
        return self.iterator()


class RobustQueue(Queue, _RobustQueueBase):
    """A queue of a robust channel (the same calls: every channel replays what it declared,
    bound and consumed after a move)."""
