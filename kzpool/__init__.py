"""kzpool: reliable RabbitMQ channels for CPU-heavy Python consumers.

    connection = kzpool.connect()               # was: pika.BlockingConnection(...)
    channel = connection.channel()              # a float lease: pika's BlockingChannel
    channel.basic_publish("", "jobs", b"hello")
"""

from __future__ import annotations

from .client.connection import Connection, connect
from .client.lease import Confirm, Lease
from .client.pool import PoolClient
from .common.config import Config, load
from .common.errors import (
    BrokerUnavailable,
    BrokerURIError,
    ChannelClosedByBroker,
    ClientClosed,
    ConfigError,
    ConnectionBlockedTimeout,
    ConnectionClosedByBroker,
    DeliveryTakenBack,
    KzpoolError,
    LeaseClosed,
    LeaseNotYours,
    LeaseRequestError,
    LeaseTimeout,
    LimitExceeded,
    NackError,
    PoolAccessDenied,
    PoolNotRunning,
    ProtocolError,
    StartupError,
    TransactionLost,
    UnroutableError,
)
from .common.options import LeaseOptions
from .common.uri import BrokerURI
from .consumer.listener import Binding, Listener, Message
from .lease.state import MoveEvent

__version__ = "0.1.0"

__all__ = [
    "Binding",
    "BrokerURI",
    "BrokerURIError",
    "BrokerUnavailable",
    "ChannelClosedByBroker",
    "ClientClosed",
    "Config",
    "ConfigError",
    "Confirm",
    "Connection",
    "ConnectionBlockedTimeout",
    "ConnectionClosedByBroker",
    "DeliveryTakenBack",
    "KzpoolError",
    "Lease",
    "LeaseClosed",
    "LeaseNotYours",
    "LeaseOptions",
    "LeaseRequestError",
    "LeaseTimeout",
    "LimitExceeded",
    "Listener",
    "Message",
    "MoveEvent",
    "NackError",
    "PoolAccessDenied",
    "PoolClient",
    "PoolNotRunning",
    "ProtocolError",
    "StartupError",
    "TransactionLost",
    "UnroutableError",
    "__version__",
    "connect",
    "load",
]
