"""What a worker's answer to a call becomes for the caller: pika's frame, or pika's error.

A :class:`~kzpool.common.messages.Reply` names the AMQP method that answered (``Queue.
DeclareOk`` and its fields), or the reason the call failed.  Pure.
"""

from __future__ import annotations

from typing import Any

from pika import spec

from ..common.errors import (
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
    DuplicateConsumerTag,
    KzpoolError,
)
from ..common.messages import Reason, Reply

METHODS = {cls.NAME: cls for cls in spec.methods.values()}


def method_of(reply: Reply) -> Any:
    """The ``pika.spec`` method instance a reply names, with its fields."""
    cls = METHODS.get(str(reply.method))
    if cls is None:
        raise KzpoolError(f"unexpected reply {reply.method!r}")
    return cls(**reply.fields)


def error_of(reason: Reason) -> Exception:
    """The exception pika raises for a call that failed for ``reason``."""
    if reason.kind == "ConnectionClosedByBroker":
        return ConnectionClosedByBroker(reason.code, reason.text)
    if reason.kind == "TypeError":
        return TypeError(reason.text)
    if reason.kind == "ValueError":
        return ValueError(reason.text)
    if reason.kind == "DuplicateConsumerTag":
        return DuplicateConsumerTag(reason.text)
    if reason.kind == "ChannelClosedByBroker" or reason.code:
        return ChannelClosedByBroker(reason.code, reason.text)
    return KzpoolError(f"{reason.kind}: {reason.text}", reason=reason.kind)
