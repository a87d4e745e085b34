"""What kzpool's own tests and benches share: a real pool run in its own process group,
waits on conditions with deadlines, a TCP forwarder that can go silent, looks at the
broker with plain pika, and which RabbitMQ nodes the tests use (``KZPOOL_TEST_RABBITMQ``:
the machine's 3.10, or 4.x nodes from a chroot).  Not part of the public API."""

from __future__ import annotations

from .amqp import consumer_count, drain, publish, queue_counts, queue_depth
from .forwarder import Forwarder
from .nodes import DEFAULT_HOSTPORT, DEFAULT_MASKED, DEFAULT_PORT, DEFAULT_URI, LAYOUT, default_uri
from .pool import Pool, gone, titles, wait_for, write_config

__all__ = ["DEFAULT_HOSTPORT", "DEFAULT_MASKED", "DEFAULT_PORT", "DEFAULT_URI", "LAYOUT",
           "Forwarder", "Pool", "consumer_count", "default_uri", "drain", "gone", "publish",
           "queue_counts", "queue_depth", "titles", "wait_for", "write_config"]
