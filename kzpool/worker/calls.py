"""The calls a client makes on its channel: which there are, what they leave on the channel,
their arguments checked as AMQP can carry them, and how a failure reads to the client.

What a worker's sessions (:mod:`.session`) check and answer with.  Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import pika.exceptions
from pika import spec

from ..common.messages import Reason

# JSON calls a client may make, with the arguments pika's Channel method takes
RPC_METHODS: dict[str, tuple[str, ...]] = {
    "exchange_declare": ("exchange", "exchange_type", "passive", "durable", "auto_delete",
                         "internal", "arguments"),
    "exchange_delete": ("exchange", "if_unused"),
    "exchange_bind": ("destination", "source", "routing_key", "arguments"),
    "exchange_unbind": ("destination", "source", "routing_key", "arguments"),
    "queue_declare": ("queue", "passive", "durable", "exclusive", "auto_delete", "arguments"),
    "queue_bind": ("queue", "exchange", "routing_key", "arguments"),
    "queue_unbind": ("queue", "exchange", "routing_key", "arguments"),
    "queue_purge": ("queue",),
    "queue_delete": ("queue", "if_unused", "if_empty"),
    "basic_qos": ("prefetch_size", "prefetch_count", "global_qos"),
    "basic_cancel": ("consumer_tag",),
    "basic_recover": ("requeue",),
    "tx_select": (),
    "tx_commit": (),
    "tx_rollback": (),
}

CHANNEL_CLOSED = Reason("ChannelWrongStateError", 0, "Channel is closed.")

# calls that leave state on the channel itself, not on the broker
CHANNEL_STATE = frozenset({"basic_qos", "basic_recover", "basic_cancel", "tx_select", "flow"})


class CancelOk:
    """A ``Basic.CancelOk`` frame for a consumer that was gone already."""

    def __init__(self, consumer_tag: str) -> None:
        self.method = spec.Basic.CancelOk(consumer_tag)


SHORT_STRINGS = ("queue", "exchange", "routing_key", "consumer_tag", "exchange_type",
                 "destination", "source")
RANGES = {"prefetch_count": 0xFFFF, "prefetch_size": 0xFFFFFFFF}


def check_args(args: dict[str, Any]) -> None:
    """A call's arguments as AMQP can carry them: a :class:`ValueError` (answered to that
    caller alone) names the one that cannot be."""
    for name in SHORT_STRINGS:
        value = args.get(name)
        if isinstance(value, str) and len(value.encode()) > 255:
            raise ValueError(f"{name} {value[:40]!r}... is over AMQP's 255 bytes")
    for name, top in RANGES.items():
        value = args.get(name)
        if isinstance(value, int) and not 0 <= value <= top:
            raise ValueError(f"{name} = {value} is not between 0 and {top}")


def fields(method: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(method).items() if isinstance(v, str | int | bool | None)}


def reason_of(exc: BaseException) -> Reason:
    """Why a call failed or a channel closed, as the client reads it."""
    if isinstance(exc, pika.exceptions.ChannelClosed | pika.exceptions.ConnectionClosed):
        return Reason(type(exc).__name__, exc.reply_code, exc.reply_text)
    return Reason(type(exc).__name__, 0, str(exc))


def consuming(channel: Any, args: dict[str, Any]) -> bool:
    """Whether pika's ``channel`` still has the consumer a ``basic_cancel`` names: one the
    broker cancelled already gets no answer from pika, so the session answers for it."""
    tag = args.get("consumer_tag")
    return tag in getattr(channel, "consumer_tags", ()) and tag not in getattr(
        channel, "_cancelled", ())
