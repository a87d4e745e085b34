"""kzpool.aio: the pool for asyncio code, with aio-pika's interface.

    connection = await kzpool.aio.connect()     # instead of: await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("jobs", durable=True)
        await channel.default_exchange.publish(aio_pika.Message(b"hi"), routing_key="jobs")

Each channel is a pool lease: its broker connection and heartbeats live in the pool's
connection worker, so a coroutine may hold the event loop for minutes; it fails over to the
next broker of its zone and back to the primary, replaying its topology.  aio-pika's own
``Message`` and ``ExchangeType`` are taken where aio-pika is installed (``kzpool[aio]``);
without it, kzpool.aio's own work the same.
"""

from __future__ import annotations

from ..lease.state import MoveEvent
from . import compat, errors
from .channel import Channel
from .compat import DeliveryMode, ExchangeType
from .connection import Connection, connect, connect_robust
from .errors import (
    ChannelClosed,
    ChannelInvalidStateError,
    DeliveryError,
    DeliveryTakenBack,
    MessageProcessError,
    PublishError,
    QueueEmpty,
)
from .exchange import Exchange
from .incoming import IncomingMessage, ProcessContext, ReturnedMessage
from .iterator import QueueIterator
from .message import Message
from .queue import Queue

exceptions = errors  # aio_pika.exceptions's place

compat.register_abcs({"AbstractConnection": Connection, "AbstractRobustConnection": Connection,
                      "AbstractChannel": Channel, "AbstractRobustChannel": Channel,
                      "AbstractExchange": Exchange, "AbstractQueueIterator": QueueIterator,
                      "AbstractMessage": Message, "AbstractIncomingMessage": IncomingMessage,
                      "AbstractProcessContext": ProcessContext})

__all__ = [
    "Channel",
    "ChannelClosed",
    "ChannelInvalidStateError",
    "Connection",
    "DeliveryError",
    "DeliveryMode",
    "DeliveryTakenBack",
    "Exchange",
    "ExchangeType",
    "IncomingMessage",
    "Message",
    "MessageProcessError",
    "MoveEvent",
    "ProcessContext",
    "PublishError",
    "Queue",
    "QueueEmpty",
    "QueueIterator",
    "ReturnedMessage",
    "connect",
    "connect_robust",
    "exceptions",
]
