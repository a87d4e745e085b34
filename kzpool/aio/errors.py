"""The errors kzpool.aio raises: aio-pika's own classes, as subclasses, in kzpool's tree.

Where aio-pika is installed each class here subclasses the aiormq / aio-pika class of the
same name (so ``except aio_pika.exceptions.DeliveryError`` and ``except
aiormq.exceptions.ChannelNotFoundEntity`` catch them) and :class:`~kzpool.KzpoolError` (so
``except kzpool.KzpoolError`` does too).  Without aio-pika the same names stand on small
stand-ins with the same constructors and attributes.

A channel error carries ``reply_code`` and ``reply_text``; codes 403, 404, 405 and 406
have their own classes, as in aiormq (built from the reply text alone); others are
:class:`ChannelClosed` ``(reply_code, reply_text)``.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from ..common.errors import KzpoolError


class _Standins:
    """aiormq's and aio-pika's exception classes, for a process without aio-pika."""

    class AMQPError(Exception):
        reason = "An unspecified AMQP error has occurred: %s"

    class AMQPChannelError(AMQPError):
        pass

    class ChannelClosed(AMQPChannelError):
        pass

    class ChannelAccessRefused(ChannelClosed):
        pass

    class ChannelNotFoundEntity(ChannelClosed):
        pass

    class ChannelLockedResource(ChannelClosed):
        pass

    class ChannelPreconditionFailed(ChannelClosed):
        pass

    class DuplicateConsumerTag(ChannelClosed):
        pass

    class DeliveryError(AMQPError):
        def __init__(self, message: Any, frame: Any, *args: Any) -> None:
            self.message = message
            self.frame = frame
            super().__init__(message, frame)

        def __str__(self) -> str:
            return f"Message delivery failed: {getattr(self.frame, 'name', self.frame)}"

    class PublishError(DeliveryError):
        pass

    class ChannelInvalidStateError(RuntimeError):
        pass

    class MessageProcessError(AMQPError):
        reason = "%s: %r"

    class QueueEmpty(AMQPError, asyncio.QueueEmpty):
        pass


def _base(module: str, name: str) -> Any:
    """``module.name`` where it can be imported, else the stand-in of that name."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return getattr(_Standins, name)


_ORM = "aiormq.exceptions"
_AIO = "aio_pika.exceptions"
_ChannelClosed: Any = _base(_ORM, "ChannelClosed")
_ChannelAccessRefused: Any = _base(_ORM, "ChannelAccessRefused")
_ChannelNotFoundEntity: Any = _base(_ORM, "ChannelNotFoundEntity")
_ChannelLockedResource: Any = _base(_ORM, "ChannelLockedResource")
_ChannelPreconditionFailed: Any = _base(_ORM, "ChannelPreconditionFailed")
_DuplicateConsumerTag: Any = _base(_ORM, "DuplicateConsumerTag")
_ChannelInvalidStateError: Any = _base(_ORM, "ChannelInvalidStateError")
_DeliveryError: Any = _base(_ORM, "DeliveryError")
_PublishError: Any = _base(_ORM, "PublishError")
_MessageProcessError: Any = _base(_AIO, "MessageProcessError")
_QueueEmpty: Any = _base(_AIO, "QueueEmpty")


class ChannelClosed(_ChannelClosed, KzpoolError):
    """The broker closed the channel because of a call (a robust channel recovers after, a
    plain one stays closed until ``reopen()``); ``ChannelClosed(None, None)``, as aiormq's,
    is what close callbacks hear when the channel's owner closed it."""

    code = "channel_closed"
    REPLY_CODE = 0

    def __init__(self, *args: Any) -> None:
        Exception.__init__(self, *args)
        if len(args) >= 2:
            self.reply_code, self.reply_text = int(args[0] or 0), str(args[1] or "")
        else:
            self.reply_code, self.reply_text = self.REPLY_CODE, str(args[0] if args else "")
        self.message = (f"{self.reply_code} {self.reply_text}" if self.reply_code
                        else self.reply_text or "the channel was closed")
        self.fields = {"reply_code": self.reply_code}

    def __str__(self) -> str:
        return self.message


class ChannelAccessRefused(_ChannelAccessRefused, ChannelClosed):
    REPLY_CODE = 403


class ChannelNotFoundEntity(_ChannelNotFoundEntity, ChannelClosed):
    REPLY_CODE = 404


class ChannelLockedResource(_ChannelLockedResource, ChannelClosed):
    REPLY_CODE = 405


class ChannelPreconditionFailed(_ChannelPreconditionFailed, ChannelClosed):
    REPLY_CODE = 406


class DuplicateConsumerTag(_DuplicateConsumerTag, ChannelClosed):
    """A consumer tag already used on this channel (checked before anything is sent)."""

    REPLY_CODE = 530


_BY_CODE: dict[int, type[ChannelClosed]] = {
    cls.REPLY_CODE: cls for cls in (ChannelAccessRefused, ChannelNotFoundEntity,
                                    ChannelLockedResource, ChannelPreconditionFailed)}


def channel_error(reply_code: int, reply_text: str) -> ChannelClosed:
    """The error aiormq raises for a channel the broker closed with ``reply_code``."""
    cls = _BY_CODE.get(reply_code)
    return cls(reply_text) if cls is not None else ChannelClosed(reply_code, reply_text)


class ChannelInvalidStateError(_ChannelInvalidStateError, KzpoolError):
    """The channel is closed (by its owner) or was never opened: a ``RuntimeError``."""

    code = "closed"

    def __init__(self, message: str = "the channel is closed", **fields: object) -> None:
        KzpoolError.__init__(self, message, **fields)


class DeliveryError(_DeliveryError, KzpoolError):
    """The broker nacked a publish: ``message`` is ``None``, ``frame`` the ``Basic.Nack``."""

    code = "nack"

    def __init__(self, message: Any, frame: Any, *args: Any) -> None:
        self.message = message
        self.frame = frame
        self.fields = {}
        Exception.__init__(self, message, frame, *args)


class PublishError(_PublishError, DeliveryError):
    """A mandatory publish came back (``on_return_raises=True``): ``message`` is the
    returned message, ``frame`` the ``Basic.Return``; ``args`` are its reply text and
    routing key, as aiormq gives them."""

    code = "unroutable"

    def __init__(self, message: Any, frame: Any, *args: Any) -> None:
        self.message = message
        self.frame = frame
        self.fields = {}
        Exception.__init__(self, frame.reply_text, frame.routing_key, *args)


class MessageProcessError(_MessageProcessError, KzpoolError):
    """An incoming message was acked, nacked or rejected twice."""

    code = "processed"

    def __init__(self, text: str, message: Any) -> None:
        Exception.__init__(self, text, message)
        self.message = text
        self.fields = {}

    def __str__(self) -> str:
        return f"{self.args[0]}: {self.args[1]!r}"


class QueueEmpty(_QueueEmpty, KzpoolError):
    """``queue.get()`` found the queue empty (also an ``asyncio.QueueEmpty``)."""

    code = "empty"

    def __init__(self) -> None:
        Exception.__init__(self)
        self.message = "the queue is empty"
        self.fields = {}

    def __str__(self) -> str:
        return self.message
