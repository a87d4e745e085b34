"""What every object of an asyncio channel shares: its link, its consumers, publishing.

A :class:`ChannelCore` turns aio-pika's calls into the link's: a reply into pamqp's frame
(:mod:`.compat`), a publish into a frame and, with confirms, a future that resolves as
aio-pika's does (``Basic.Ack``; the returned message, or :class:`PublishError` with
``on_return_raises``; :class:`DeliveryError` on a nack).  It hands each delivery to its
consumer: a callback runs in a task of its own, as in aio-pika, so callbacks run side by
side up to the prefetch count; an iterator buffers it.

Not thread-safe: the loop's thread only.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from ..common import wire
from ..common.errors import ChannelClosedByBroker, LeaseRequestError, NackError, UnroutableError
from ..common.options import LeaseOptions
from ..common.wire import Flag
from ..lease.confirms import Unconfirmed
from ..lease.state import MoveEvent
from . import compat
from .callbacks import CallbackCollection
from .errors import DeliveryError, DuplicateConsumerTag, PublishError, channel_error
from .incoming import IncomingMessage, ReturnedMessage
from .link import LeaseLink, Phase
from .message import body_of, encode_properties
from .pool import PoolClient

log = logging.getLogger("kzpool.aio")

MAX_BODY = wire.MAX_DATA_FRAME - (1 << 20)  # room for the frame's other fields
_REQUEUE = Flag.SETTLE_NACK | Flag.REQUEUE


class Consumer(Protocol):
    no_ack: bool

    def deliver(self, message: IncomingMessage) -> None: ...

    def lost(self) -> None:
        """The messages delivered so far are void: the broker gives them again."""

    def closed(self) -> None:
        """The channel is closed: no more messages."""


class CallbackConsumer:
    """``queue.consume(callback)``: each message in a task of its own."""

    def __init__(self, callback: Callable[[IncomingMessage], Any], no_ack: bool) -> None:
        self.callback = callback
        self.no_ack = no_ack
        self.tasks: set[asyncio.Task[Any]] = set()

    def deliver(self, message: IncomingMessage) -> None:
        try:
            result = self.callback(message)
        except Exception:
            log.exception("consumer callback failed")
            return
        if isinstance(result, Coroutine) or inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self.tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("consumer callback failed", exc_info=task.exception())

    def lost(self) -> None:
        pass

    def closed(self) -> None:
        pass


class _Cancelled:
    """A cancelled consumer: its late deliveries go back to the queue."""

    def __init__(self, no_ack: bool) -> None:
        self.no_ack = no_ack


class _Confirm:
    """What the ConfirmBook resolves for one publish: aio-pika's outcome on its future."""

    __slots__ = ("core", "future", "tag")

    def __init__(self, core: ChannelCore, future: asyncio.Future[Any], tag: int) -> None:
        self.core = core
        self.future = future
        self.tag = tag

    def set_result(self, _value: object) -> None:
        if not self.future.done():
            self.future.set_result(compat.ack(self.tag))

    def set_exception(self, exc: BaseException) -> None:
        if self.future.done():
            return
        if isinstance(exc, UnroutableError):
            returned = exc.messages[0]
            if not self.core.on_return_raises:
                self.future.set_result(returned)
                return
            exc = PublishError(returned, returned.delivery)
        elif isinstance(exc, NackError):
            exc = DeliveryError(None, compat.nack(self.tag))
        elif isinstance(exc, ChannelClosedByBroker):
            exc = channel_error(exc.reply_code, exc.reply_text)
        self.future.set_exception(exc)


class ChannelCore:
    def __init__(self, public: Any, pool: PoolClient, publisher_confirms: bool,
                 on_return_raises: bool, options: LeaseOptions,
                 on_move: Callable[[MoveEvent], Any] | None) -> None:
        self.public = public  # the Channel users hold: what callbacks and messages get
        self.publisher_confirms = publisher_confirms
        self.on_return_raises = on_return_raises
        self.return_callbacks = CallbackCollection(public)
        self.reopen_callbacks = CallbackCollection(public)
        self.consumers: dict[str, Consumer | _Cancelled] = {}
        self._on_move = on_move
        self._tasks: set[asyncio.Future[Any]] = set()  # on_move coroutines running
        self.link = LeaseLink(pool, self, options)

    async def open(self) -> None:
        await self.link.open()
        if self.publisher_confirms:
            await self.link.call("confirm", "confirm_delivery", {})

    @property
    def is_closed(self) -> bool:
        return self.link.phase in (Phase.CLOSED, Phase.FAILED)

    async def close(self) -> None:
        await self.link.close()
        if self.link.forked is not None:
            return  # the consumers are the parent's, on the parent's loop
        for consumer in list(self.consumers.values()):
            if not isinstance(consumer, _Cancelled):
                consumer.closed()

    # ----- calls ----------------------------------------------------------------------------

    async def rpc(self, method: str, args: dict[str, Any], timeout: float | None = None,
                  record: bool = True, op: str = "call") -> Any:
        """A channel method and its reply frame (pamqp's, where installed)."""
        reply = await within(self.link.call(op, method, args, record), timeout)
        return compat.frame(str(reply.method), reply.fields)

    async def consume(self, queue: str, consumer: Consumer, exclusive: bool,
                      arguments: dict[str, Any] | None, consumer_tag: str | None,
                      timeout: float | None, record: bool) -> str:
        tag = consumer_tag or f"ctag{self.link.state.channel_number}.{uuid.uuid4().hex}"
        if tag in self.consumers and not isinstance(self.consumers[tag], _Cancelled):
            raise DuplicateConsumerTag(f"consumer tag {tag!r} is already used on this channel")
        self.consumers[tag] = consumer  # before the call: deliveries may come with its reply
        try:
            await within(self.link.call("consume", "basic_consume", {
                "queue": queue, "auto_ack": consumer.no_ack, "exclusive": exclusive,
                "consumer_tag": tag, "arguments": arguments}, record), timeout)
        except BaseException:
            self.consumers.pop(tag, None)
            raise
        return tag

    async def cancel(self, consumer_tag: str, timeout: float | None) -> Any:
        consumer = self.consumers.get(consumer_tag)
        if consumer is None:
            return await self.rpc("basic_cancel", {"consumer_tag": consumer_tag}, timeout)
        marker = self.consumers[consumer_tag] = _Cancelled(consumer.no_ack)
        try:
            return await self.rpc("basic_cancel", {"consumer_tag": consumer_tag}, timeout)
        finally:  # nothing comes for it after the broker's CancelOk
            if self.consumers.get(consumer_tag) is marker:
                del self.consumers[consumer_tag]

    async def get(self, queue: str, no_ack: bool, timeout: float | None
                  ) -> IncomingMessage | None:
        reply = await within(self.link.call("get", "basic_get",
                                            {"queue": queue, "auto_ack": no_ack}), timeout)
        got = self.link.take_get(reply) if reply.method == "Basic.GetOk" else None
        if got is None:
            return None
        tag, redelivered, exchange, routing_key, encoded, body, count = got
        return IncomingMessage(self, body, encoded, tag, redelivered, None, exchange,
                               routing_key, no_ack, count)

    async def publish(self, exchange: str, routing_key: str, message: Any, mandatory: bool,
                      timeout: float | None) -> Any:
        link = self.link
        state = link.state
        while link.phase is not Phase.READY or state.blocked or link.unreported is not None \
                or link.paused:
            await link.ready()
            if state.blocked:
                await link.wait_unblocked()
            await link.writable()
        body = body_of(message)
        if len(body) > MAX_BODY:
            raise LeaseRequestError(f"message of {len(body):,} bytes is over the {MAX_BODY:,}"
                                    " bytes a message may have (RabbitMQ's own limit is lower"
                                    " by default: max_message_size)")
        data = wire.publish(exchange, routing_key, encode_properties(message), body, mandatory)
        if not self.publisher_confirms:
            link.send(data)
            return None
        future: asyncio.Future[Any] = link.loop.create_future()
        confirm = _Confirm(self, future, state.confirms.seq + 1)
        state.confirms.add(Unconfirmed(confirm, data, exchange, routing_key, None, body))
        link.send(data)
        if timeout is None:
            return await future
        async with asyncio.timeout(timeout):
            return await future

    def settle(self, delivery_tag: int, flags: int) -> None:
        self.link.settle(delivery_tag, flags)

    # ----- what the link tells ----------------------------------------------------------------

    def on_delivery(self, tag: int, redelivered: bool, consumer_tag: str, exchange: str,
                    routing_key: str, encoded: bytes, body: bytes) -> None:
        consumer = self.consumers.get(consumer_tag)
        if consumer is None:
            log.warning("lease %s: a delivery for unknown consumer %r", self.link.id,
                        consumer_tag)
        elif isinstance(consumer, _Cancelled):
            if not consumer.no_ack:  # it came before the cancel's reply: give it back
                self.link.settle(tag, _REQUEUE)
        else:
            consumer.deliver(IncomingMessage(self, body, encoded, tag, redelivered,
                                             consumer_tag, exchange, routing_key,
                                             consumer.no_ack))

    def on_return(self, code: int, text: str, exchange: str, routing_key: str,
                  encoded: bytes, body: bytes) -> Any:
        message = ReturnedMessage(self, body, encoded, None, False, None, exchange,
                                  routing_key, True)
        message.delivery = compat.returned(code, text, exchange, routing_key)
        if self.publisher_confirms and not self.on_return_raises:
            self.return_callbacks(message)
        return message

    def on_cancelled(self, consumer_tag: str) -> None:
        """The broker's cancel: a callback consumer gets no more, an iterator ends once it
        has given what it buffered (as kzpool's blocking ``consume()`` generator does)."""
        consumer = self.consumers.pop(consumer_tag, None)
        if consumer is None or isinstance(consumer, _Cancelled):
            return
        log.warning("lease %s: consumer %r cancelled by the broker", self.link.id, consumer_tag)
        consumer.closed()

    def on_lost(self) -> None:
        for consumer in list(self.consumers.values()):
            if not isinstance(consumer, _Cancelled):
                consumer.lost()

    def on_move(self, old_broker: str | None, reason: str, renamed: dict[str, str]) -> None:
        self.reopen_callbacks()
        if self._on_move is not None:
            result = self._on_move(MoveEvent(str(self.link.id), old_broker, self.link.broker,
                                             reason, renamed))
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)


async def within(awaitable: Awaitable[Any], timeout: float | None) -> Any:
    """``await awaitable``, bounded by ``timeout`` seconds if given (``TimeoutError``)."""
    if timeout is None:
        return await awaitable
    async with asyncio.timeout(timeout):
        return await awaitable
