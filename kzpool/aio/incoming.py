"""Incoming messages: aio-pika's ``IncomingMessage`` and its ``process()`` context.

A delivery's properties are decoded when first read (most consumers read the body and ack),
into the attributes aio-pika gives: ``headers`` ``{}`` when absent, ``delivery_mode`` a
:class:`DeliveryMode` (1 when absent), ``priority`` 0 when absent, ``expiration`` in
seconds (a float), ``timestamp`` an aware UTC ``datetime``, ``cluster_id`` ``""``.

``ack``, ``nack`` and ``reject`` only queue a frame (sent with the others at the end of the
loop's pass): nothing waits for the broker.  A message of a channel the lease has lost is
settled on no channel: the broker gives it again, on the new one.  Not thread-safe: the
event loop's thread only.
"""

from __future__ import annotations

import logging
import struct
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol

from ..common import props
from ..common.wire import Flag
from .compat import DeliveryMode
from .errors import ChannelInvalidStateError, DeliveryTakenBack, MessageProcessError
from .message import Message

try:
    from pamqp.header import ContentHeader as _PAMQP
except ImportError:  # without aio-pika: pika decodes
    _PAMQP = None  # type: ignore[assignment,misc]

_HEADER = struct.Struct(">HHQ")

log = logging.getLogger("kzpool.aio")

_LAZY = frozenset(("app_id", "cluster_id", "content_encoding", "content_type",
                   "correlation_id", "delivery_mode", "expiration", "headers", "message_id",
                   "priority", "reply_to", "timestamp", "type", "user_id"))


class Settler(Protocol):
    """What a message needs of its channel."""

    @property
    def is_closed(self) -> bool: ...

    @property
    def public(self) -> Any: ...

    def settle(self, delivery_tag: int, flags: int) -> None: ...

    async def read_up(self) -> None: ...

    def taken_back(self, delivery_tag: int, flags: int) -> BaseException | None: ...


class IncomingMessage(Message):
    """A message from ``consume``, ``iterator()``, ``get`` or a return."""

    __slots__ = ("_channel", "_decoded", "_encoded", "_no_ack", "_processed", "cluster_id",
                 "consumer_tag", "delivery_tag", "exchange", "message_count", "redelivered",
                 "routing_key")

    __setattr__ = object.__setattr__  # type: ignore[assignment]

    def __init__(self, channel: Settler, body: bytes, encoded: bytes, delivery_tag: int | None,
                 redelivered: bool, consumer_tag: str | None, exchange: str, routing_key: str,
                 no_ack: bool = False, message_count: int | None = None) -> None:
        self._channel = channel
        self._encoded = encoded
        self._decoded = False
        self.body = body
        self.body_size = len(body)
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.consumer_tag = consumer_tag
        self.exchange = exchange
        self.routing_key = routing_key
        self.message_count = message_count
        self._no_ack = no_ack
        self._processed = no_ack or not delivery_tag
        self._locked = self._processed

    def __getattr__(self, name: str) -> Any:
        """The properties, decoded on first use."""
        if name in _LAZY and not self._decoded:
            self._decode()
            return object.__getattribute__(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _decode(self) -> None:
        self._decoded = True
        p = _properties(self._encoded)
        self.headers = p.headers or {}
        self.content_type = p.content_type
        self.content_encoding = p.content_encoding
        self.delivery_mode = DeliveryMode(p.delivery_mode or 1)
        self.priority = p.priority or 0
        self.correlation_id = p.correlation_id
        self.reply_to = p.reply_to
        self.expiration = None if p.expiration is None else float(p.expiration) / 1000
        self.message_id = p.message_id
        self.timestamp = (None if p.timestamp is None
                          else datetime.fromtimestamp(p.timestamp, tz=UTC))
        self.type = p.type
        self.user_id = p.user_id
        self.app_id = p.app_id
        self.cluster_id = p.cluster_id or ""

    def lock(self) -> None:
        self._locked = True

    @property
    def processed(self) -> bool:
        return self._processed

    @property
    def channel(self) -> Any:
        """The channel it came on; :class:`ChannelInvalidStateError` if that is closed."""
        if self._channel.is_closed:
            raise ChannelInvalidStateError("the message's channel is closed")
        return self._channel.public

    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update(cluster_id=self.cluster_id, consumer_tag=self.consumer_tag,
                    delivery_tag=self.delivery_tag, exchange=self.exchange,
                    redelivered=self.redelivered, routing_key=self.routing_key)
        return info

    async def ack(self, multiple: bool = False) -> None:
        """:class:`DeliveryTakenBack` if the broker took the message back (and so for
        ``reject`` and ``nack``)."""
        await self._channel.read_up()
        self._settle("ack", Flag.MULTIPLE if multiple else 0)

    async def reject(self, requeue: bool = False) -> None:
        """Note aio-pika's default: not requeued (dropped, or dead-lettered)."""
        await self._channel.read_up()
        self._settle("reject", Flag.SETTLE_REJECT | (Flag.REQUEUE if requeue else 0))

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        await self._channel.read_up()
        self._settle("nack", Flag.SETTLE_NACK | (Flag.MULTIPLE if multiple else 0)
                     | (Flag.REQUEUE if requeue else 0))

    def _settle(self, what: str, flags: int) -> None:
        if self._no_ack:
            raise TypeError(f"Can't {what} message with \"no_ack\" flag")
        if self._processed:
            raise MessageProcessError("Message already processed", self)
        if self.delivery_tag is not None:
            try:
                if self._channel.is_closed:  # by the broker, if it took this one back
                    raise self._channel.taken_back(self.delivery_tag, flags) or \
                        ChannelInvalidStateError("the message's channel is closed")
                self._channel.settle(self.delivery_tag, flags)
            except DeliveryTakenBack:
                self._processed = self._locked = True  # the broker has it: nothing to settle
                raise
        self._processed = True
        self._locked = True

    def process(self, requeue: bool = False, reject_on_redelivered: bool = False,
                ignore_processed: bool = False) -> ProcessContext:
        """``async with message.process():`` acks on a normal exit; on an exception, rejects
        (requeued if ``requeue``) and lets the exception go on."""
        return ProcessContext(self, requeue, reject_on_redelivered, ignore_processed)

    def __repr__(self) -> str:
        return (f"IncomingMessage(delivery_tag={self.delivery_tag}, exchange={self.exchange!r},"
                f" routing_key={self.routing_key!r}, body_size={self.body_size})")


class ReturnedMessage(IncomingMessage):
    """A mandatory publish the broker returned; ``delivery`` is its ``Basic.Return``."""

    __slots__ = ("delivery",)
    delivery: Any


class ProcessContext:
    def __init__(self, message: IncomingMessage, requeue: bool, reject_on_redelivered: bool,
                 ignore_processed: bool) -> None:
        self.message = message
        self.requeue = requeue
        self.reject_on_redelivered = reject_on_redelivered
        self.ignore_processed = ignore_processed

    async def __aenter__(self) -> IncomingMessage:
        return self.message

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        message = self.message
        if self.ignore_processed and message.processed:
            return
        if exc_type is None:
            await message.ack()
            return
        requeue = self.requeue
        if self.reject_on_redelivered and message.redelivered:
            log.info("message %r was redelivered and will be rejected", message)
            requeue = False
        try:
            await message.reject(requeue=requeue)
        except ChannelInvalidStateError:
            log.warning("reject is not sent since the channel is closed")


def _properties(encoded: bytes) -> Any:
    """The properties as aio-pika reads them: with pamqp (aio-pika's own decoder, where it
    is installed: a float header stays a float), else with pika's."""
    if _PAMQP is None or not encoded:
        return props.decode(encoded)
    header = _PAMQP()
    header.unmarshal(_HEADER.pack(60, 0, 0) + encoded)
    return _PamqpProperties(header.properties)


class _PamqpProperties:
    """pamqp's properties under the names pika gives them (``type``, a timestamp in s)."""

    def __init__(self, p: Any) -> None:
        self.headers, self.content_type, self.content_encoding = (
            p.headers, p.content_type, p.content_encoding)
        self.delivery_mode, self.priority, self.correlation_id = (
            p.delivery_mode, p.priority, p.correlation_id)
        self.reply_to, self.expiration, self.message_id = p.reply_to, p.expiration, p.message_id
        self.timestamp = None if p.timestamp is None else p.timestamp.timestamp()
        self.type, self.user_id, self.app_id, self.cluster_id = (
            p.message_type, p.user_id, p.app_id, p.cluster_id)

