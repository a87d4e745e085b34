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
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..common import wire
from ..common.errors import (
    ChannelClosedByBroker,
    LeaseRequestError,
    NackError,
    TransactionLost,
    UnroutableError,
)
from ..common.messages import Reason
from ..common.options import LeaseOptions
from ..common.wire import Flag
from ..lease.confirms import Unconfirmed
from ..lease.state import MoveEvent
from ..lease.topology import Step
from . import compat
from .callbacks import CallbackCollection
from .consumers import CallbackConsumer, Cancelled, Consumer
from .errors import ChannelClosed, DeliveryError, DuplicateConsumerTag, PublishError, channel_error
from .incoming import IncomingMessage, ReturnedMessage
from .link import LeaseLink, Phase
from .message import body_of, encode_properties
from .pool import PoolClient

log = logging.getLogger("kzpool.aio")

MAX_BODY = wire.MAX_DATA_FRAME - (1 << 20)  # room for the frame's other fields
_REQUEUE = Flag.SETTLE_NACK | Flag.REQUEUE


class Side(Protocol):
    """The channel users hold, as its core sees it."""

    return_callbacks: CallbackCollection
    reopen_callbacks: CallbackCollection

    def _closed_by_broker(self, error: ChannelClosed) -> Awaitable[Any]:
        """The broker closed the channel: its close callbacks (awaited before recovery)."""

    def _moved(self) -> None:
        """The channel has a channel again after a move."""


class Owner(Protocol):
    """What an exchange, a queue, an iterator or a transaction needs of its channel."""

    @property
    def is_closed(self) -> bool: ...

    def _live(self) -> ChannelCore:
        """The channel's core now; :class:`ChannelInvalidStateError` if it is closed."""
        ...

    async def queue_delete(self, queue_name: str, timeout: float | None = None,
                           if_unused: bool = False, if_empty: bool = False,
                           nowait: bool = False) -> Any: ...

    async def exchange_delete(self, exchange_name: str, timeout: float | None = None,
                              if_unused: bool = False, nowait: bool = False) -> Any: ...


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
    def __init__(self, side: Side, pool: PoolClient, publisher_confirms: bool,
                 on_return_raises: bool, options: LeaseOptions,
                 on_move: Callable[[MoveEvent], Any] | None, robust: bool) -> None:
        self.public = side  # the Channel users hold: what callbacks and messages get
        self.side = side
        self.publisher_confirms = publisher_confirms
        self.on_return_raises = on_return_raises
        self.robust = robust
        self.consumers: dict[str, Consumer | Cancelled] = {}
        self.error: ChannelClosed | None = None  # the broker closed the channel: why
        self.refusing = False  # calls raise ChannelInvalidStateError (see the module)
        self._tx: int | None = None  # in transaction mode: the channel its work began on
        self._on_move = on_move
        self._tasks: set[asyncio.Future[Any]] = set()  # on_move coroutines running
        self.link = LeaseLink(pool, self, options)

    async def open(self, carried: ChannelCore | None = None) -> None:
        """Lease a channel; with ``carried`` (the core of a robust channel its owner closed),
        declare and consume again what that one had, as aio-pika's robust channel does."""
        await self.link.open()
        if carried is not None:
            for step, consumer in carried.replayable():
                if consumer is not None:
                    self.consumers[step.args["consumer_tag"]] = consumer
                await self.link.call(step.op, step.method, step.args)
        if self.publisher_confirms:
            await self.link.call("confirm", "confirm_delivery", {})

    def replayable(self) -> list[tuple[Step, Consumer | None]]:
        """The steps a reopened robust channel replays: declarations, bindings and QoS, and
        its callback consumers (an iterator ended when the channel closed)."""
        found: list[tuple[Step, Consumer | None]] = []
        for step in self.link.state.topology.steps:
            if step.op == "confirm" or step.method == "tx_select":
                continue
            if step.op != "consume":
                found.append((step, None))
                continue
            consumer = self.consumers.get(step.args.get("consumer_tag", ""))
            if isinstance(consumer, CallbackConsumer):
                found.append((step, consumer))
        return found

    @property
    def is_closed(self) -> bool:
        return self.link.phase in (Phase.CLOSED, Phase.FAILED) or self.error is not None

    async def close(self) -> None:
        await self.link.close()
        if self.link.forked is not None:
            return  # the consumers are the parent's, on the parent's loop
        for consumer in list(self.consumers.values()):
            if not isinstance(consumer, Cancelled):
                consumer.closed()

    async def recovered(self) -> None:
        """Until the link has its channel again after a channel error; the error cleared."""
        await self.link.ready()
        self.error, self.refusing = None, False

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
        if tag in self.consumers and not isinstance(self.consumers[tag], Cancelled):
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
        marker = self.consumers[consumer_tag] = Cancelled(consumer.no_ack)
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
        while link.phase is not Phase.READY or state.blocked or link.paused:
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
        self._tx_touch()
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
        self._tx_touch()
        self.link.settle(delivery_tag, flags)

    async def read_up(self) -> None:
        await self.link.read_up()

    def taken_back(self, delivery_tag: int, flags: int) -> BaseException | None:
        return self.link.taken_back(delivery_tag, flags)

    # ----- transactions, as a blocking lease has them -----------------------------------------

    async def tx_select(self, timeout: float | None) -> Any:
        frame = await self.rpc("tx_select", {}, timeout)
        self._tx = 0
        return frame

    async def tx_commit(self, timeout: float | None) -> Any:
        """Commit; :class:`TransactionLost` (after rolling back what reached the new
        channel) if the lease moved since the transaction's first publish or settle."""
        since, generation = self._tx, self.link.generation
        if since and since != generation:
            await self.tx_rollback(timeout)
            raise TransactionLost("the lease lost its channel inside a transaction: its"
                                  " publishes and settles were rolled back; publish again,"
                                  " then commit", lease=self.link.id)
        frame = await self.rpc("tx_commit", {}, timeout)
        self._tx = 0 if self._tx is not None else None
        if since and self.link.generation != generation:
            raise TransactionLost("the lease moved while committing: the transaction was"
                                  " rolled back", lease=self.link.id)
        return frame

    async def tx_rollback(self, timeout: float | None) -> Any:
        frame = await self.rpc("tx_rollback", {}, timeout)
        self._tx = 0 if self._tx is not None else None
        return frame

    def _tx_touch(self) -> None:
        if self._tx == 0:
            self._tx = self.link.generation

    # ----- what the link tells ----------------------------------------------------------------

    def on_delivery(self, tag: int, redelivered: bool, consumer_tag: str, exchange: str,
                    routing_key: str, encoded: bytes, body: bytes) -> None:
        consumer = self.consumers.get(consumer_tag)
        if consumer is None:
            log.warning("lease %s: a delivery for unknown consumer %r", self.link.id,
                        consumer_tag)
        elif isinstance(consumer, Cancelled):
            if not consumer.no_ack:  # it came before the cancel's reply: give it back
                self.link.settle(tag, _REQUEUE)
        else:
            consumer.deliver(IncomingMessage(self, body, encoded, tag, redelivered,
                                             consumer_tag, exchange, routing_key,
                                             consumer.no_ack))

    def on_return(self, code: int, text: str, exchange: str, routing_key: str,
                  encoded: bytes, body: bytes) -> Any:
        """A returned message: the return callbacks get it as an IncomingMessage (not with
        ``on_return_raises``, nor without confirms: aiormq's rules); a waiting publish gets
        aiormq's ``DeliveredMessage``."""
        delivery = compat.returned(code, text, exchange, routing_key)
        if self.publisher_confirms and not self.on_return_raises:
            message = ReturnedMessage(self, body, encoded, None, False, None, exchange,
                                      routing_key, True)
            message.delivery = delivery
            self.side.return_callbacks(message)
        return compat.delivered(delivery, encoded, body, self.public)

    def on_cancelled(self, consumer_tag: str) -> None:
        """The broker's cancel: a callback consumer gets no more, an iterator ends once it
        has given what it buffered (as kzpool's blocking ``consume()`` generator does)."""
        consumer = self.consumers.pop(consumer_tag, None)
        if consumer is None or isinstance(consumer, Cancelled):
            return
        log.warning("lease %s: consumer %r cancelled by the broker", self.link.id, consumer_tag)
        consumer.closed()

    def on_lost(self, reason: Reason) -> None:
        for consumer in list(self.consumers.values()):
            if not isinstance(consumer, Cancelled):
                consumer.lost()
        if reason.channel_error:
            self.error = channel_error(reason.code, reason.text)
            self.refusing = True

    async def recovering(self, reason: Reason) -> None:
        """Before the link gets a channel again: a channel error's close callbacks, all of
        them awaited (up to the lease's timeout).  A plain channel keeps nothing for its
        next channel but confirm mode; a robust one takes calls again (they wait for the
        replay)."""
        error = self.error
        if error is None:
            return
        if not self.robust:
            self.cut()
        started = self.side._closed_by_broker(error)  # the callbacks are called here
        if self.robust and self.error is error:
            self.refusing = False
        if not isinstance(started, asyncio.Future):
            return  # no coroutine to wait for
        try:  # a callback that never returns holds the channel up to its timeout, no more
            await asyncio.wait_for(asyncio.shield(started), self.link.state.timeout)
        except TimeoutError:
            log.warning("lease %s: close callbacks still running after %s s; recovering all"
                        " the same", self.link.id, self.link.state.timeout)

    def cut(self) -> None:
        """A plain channel the broker closed: its consumers end, and nothing it declared is
        declared again on its next channel (as aio-pika's ``reopen()`` gives a bare one)."""
        topology = self.link.state.topology
        topology.steps = [s for s in topology.steps if s.op == "confirm"]
        consumers, self.consumers = self.consumers, {}
        for consumer in consumers.values():
            if not isinstance(consumer, Cancelled):
                consumer.closed()
        self._tx = None

    def on_move(self, old_broker: str | None, reason: str, renamed: dict[str, str]) -> None:
        after_error = self.error is not None
        if after_error and not self.robust:
            return  # closed until reopen()
        self.error, self.refusing = None, False
        self.side.reopen_callbacks()
        if not after_error:
            self.side._moved()
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
