"""kzpool: reliable RabbitMQ channels for CPU-heavy Python consumers.

    pool = kzpool.connect()                     # the pool's lease socket
    with pool.lease("float") as channel:        # pika BlockingChannel's interface
        channel.basic_publish("", "jobs", b"hello")
"""

from __future__ import annotations

from .client.lease import Confirm, Lease, MoveEvent
from .client.pool import PoolClient, connect
from .common.config import Config, load
from .common.errors import (
    BrokerUnavailable,
    BrokerURIError,
    ChannelClosedByBroker,
    ConfigError,
    ConnectionBlockedTimeout,
    KzpoolError,
    LeaseClosed,
    LeaseRequestError,
    LeaseTimeout,
    NackError,
    PoolAccessDenied,
    PoolNotRunning,
    ProtocolError,
    StartupError,
    UnroutableError,
)
from .common.uri import BrokerURI
from .consumer.listener import Binding, Listener, Message

__version__ = "0.1.0"

__all__ = [
    "Binding",
    "BrokerURI",
    "BrokerURIError",
    "BrokerUnavailable",
    "ChannelClosedByBroker",
    "Config",
    "ConfigError",
    "Confirm",
    "ConnectionBlockedTimeout",
    "KzpoolError",
    "Lease",
    "LeaseClosed",
    "LeaseRequestError",
    "LeaseTimeout",
    "Listener",
    "Message",
    "MoveEvent",
    "NackError",
    "PoolAccessDenied",
    "PoolClient",
    "PoolNotRunning",
    "ProtocolError",
    "StartupError",
    "UnroutableError",
    "__version__",
    "connect",
    "load",
]
