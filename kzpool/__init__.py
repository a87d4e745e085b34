"""kzpool: reliable RabbitMQ channels for CPU-heavy Python consumers."""

from __future__ import annotations

from .config import Config, load
from .errors import (
    BrokerURIError,
    ConfigError,
    KzpoolError,
    PoolNotRunning,
    ProtocolError,
    StartupError,
)
from .uri import BrokerURI

__version__ = "0.1.0"

__all__ = [
    "BrokerURI",
    "BrokerURIError",
    "Config",
    "ConfigError",
    "KzpoolError",
    "PoolNotRunning",
    "ProtocolError",
    "StartupError",
    "__version__",
    "load",
]
