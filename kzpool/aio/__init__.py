"""kzpool.aio: the pool for asyncio code, with aio-pika's interface.

    connection = await kzpool.aio.connect()     # instead of: await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("jobs", durable=True)
        await channel.default_exchange.publish(aio_pika.Message(b"hi"), routing_key="jobs")

Each channel is a pool lease: its broker connection and heartbeats live in the pool's
connection worker, so a coroutine may hold the event loop for minutes; it fails over to the
next broker of its zone and back to the primary, replaying its topology.  ``connect()``
gives aio-pika's plain channels, ``connect_robust()`` its robust ones (they differ on a
channel error).  aio-pika's own ``Message`` and ``ExchangeType`` are taken where aio-pika is
installed (``kzpool[aio]``), and kzpool.aio's classes pass ``isinstance`` against aio-pika's;
without it, kzpool.aio's own work the same and nothing of aio-pika is loaded.
"""

from __future__ import annotations

from ..lease.state import MoveEvent
from . import compat, errors
from .channel import Channel
from .compat import DeliveryMode, ExchangeType, TransactionState
from .connection import Connection, RobustConnection, connect, connect_robust
from .errors import (
    ChannelClosed,
    ChannelInvalidStateError,
    DeliveryError,
    MessageProcessError,
    PublishError,
    QueueEmpty,
)
from .exchange import Exchange, RobustExchange
from .incoming import IncomingMessage, ProcessContext, ReturnedMessage
from .iterator import QueueIterator
from .message import Message
from .queue import Queue, RobustQueue
from .robust import RobustChannel
from .transaction import Transaction

exceptions = errors  # aio_pika.exceptions's place

compat.register({
    "aio_pika.Connection": Connection, "aio_pika.RobustConnection": RobustConnection,
    "aio_pika.Channel": Channel, "aio_pika.RobustChannel": RobustChannel,
    "aio_pika.Exchange": Exchange, "aio_pika.RobustExchange": RobustExchange,
    "aio_pika.queue.QueueIterator": QueueIterator, "aio_pika.Message": Message,
    "aio_pika.message.IncomingMessage": IncomingMessage,
    "aio_pika.message.ReturnedMessage": ReturnedMessage,
    "aio_pika.message.ProcessContext": ProcessContext,
})

__all__ = [
    "Channel",
    "ChannelClosed",
    "ChannelInvalidStateError",
    "Connection",
    "DeliveryError",
    "DeliveryMode",
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
    "RobustChannel",
    "RobustConnection",
    "RobustExchange",
    "RobustQueue",
    "Transaction",
    "TransactionState",
    "connect",
    "connect_robust",
    "exceptions",
]
