"""What kzpool's own tests and benches share: a real pool run in its own process group,
waits on conditions with deadlines, a TCP forwarder that can go silent, and looks at the
broker with plain pika.  Not part of the public API."""

from __future__ import annotations

from .amqp import DEFAULT_URI, consumer_count, drain, publish, queue_counts, queue_depth
from .forwarder import Forwarder
from .pool import Pool, gone, titles, wait_for, write_config

__all__ = ["DEFAULT_URI", "Forwarder", "Pool", "consumer_count", "drain", "gone", "publish",
           "queue_counts", "queue_depth", "titles", "wait_for", "write_config"]
