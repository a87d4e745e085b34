"""An in-service consumer process: one ``[consumer:NAME]`` section, one of its ``processes``.

The master forks it and asks for its lease on its behalf, on a socket pair whose other end
the child keeps; the child imports the section's handler, takes that lease (later moves go
through the lease sockets like any client's), and runs a :class:`~kzpool.consumer.listener.Listener`
until told to stop, until ``max_messages`` or ``max_rss`` say it is time to recycle, or
until the master is gone.

Exit codes (:mod:`kzpool.common.exitcodes`): 0 stopped or recycled (the master starts a new one at
once), :data:`~kzpool.common.exitcodes.CONSUMER_BOOT` when the handler cannot be imported or is not
callable (not restarted: a restart will not fix it), anything else a crash (restarted with
backoff).  SIGTERM only records the request; the loop acts on it between messages.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sys
from typing import Any

import psutil

from ..client.pool import PoolClient
from ..common import exitcodes, proc
from ..common.config import Consumer
from ..common.errors import ConfigError
from .listener import Listener

log = logging.getLogger("kzpool.consumer")

RSS_CHECK_EVERY = 100  # messages
CONSUMER_LEASE_TIMEOUT = 10.0  # seconds the first lease may wait for a broker


def load_handler(spec: str) -> Any:
    """``module.path:attribute``; :class:`ImportError` or :class:`AttributeError` if absent."""
    module, _, attribute = spec.partition(":")
    target: Any = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def build_listener(consumer: Consumer) -> Listener:
    """The section's Listener: its handler's own subclass, or one calling a plain function."""
    s = consumer.settings
    handler = load_handler(s.handler)
    options: dict[str, Any] = {
        "queue": s.queue, "exchange": s.exchange, "exchange_type": s.exchange_type,
        "bindings": s.bindings, "prefetch": s.prefetch, "durable": s.durable,
        "requeue_on_error": s.requeue_on_error, "kind": s.lease, "broker": s.broker,
        "federate": s.federate}
    if isinstance(handler, type) and issubclass(handler, Listener):
        return handler(**options)
    if not callable(handler):
        raise TypeError(f"{s.handler} is neither callable nor a kzpool.Listener subclass")
    return Listener(responders={"#": handler}, **options)


def run_consumer(consumer: Consumer, index: int, socket_path: str, master_pid: int,
                 stop_timeout: float, handed: socket.socket) -> int:
    """Entry point in the forked child.  ``stop_timeout``: how long federators may take to
    finish their handlers once stopping (the master's SIGKILL comes before it ends);
    ``handed``: the socket on which the master asked for this process's lease."""
    proc.die_with_parent(signal.SIGTERM)
    proc.set_title(f"kzpool: consumer {consumer.name} #{index}")
    try:
        listener = build_listener(consumer)
    except Exception as exc:
        log.error("consumer %s: cannot load handler %s: %s: %s", consumer.name,
                  consumer.settings.handler, type(exc).__name__, exc)
        return exitcodes.CONSUMER_BOOT
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: listener.stop())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.getppid() != master_pid:
        return exitcodes.WORKER_PARENT_GONE
    return _serve(listener, consumer, PoolClient(socket_path), master_pid, stop_timeout,
                  handed)


def _serve(listener: Listener, consumer: Consumer, pool: PoolClient, master_pid: int,
           stop_timeout: float, handed: socket.socket) -> int:
    limit, rss_limit = consumer.settings.max_messages, consumer.settings.max_rss
    me = psutil.Process()
    try:
        try:
            listener.start(pool, handed)
        except ConfigError as exc:  # what the broker will not take: a restart will not fix it
            log.error("consumer %s: %s", consumer.name, exc)
            return exitcodes.CONSUMER_BOOT
        while not listener.stopping and os.getppid() == master_pid:
            batch = min(RSS_CHECK_EVERY, limit - listener.handled) if limit else RSS_CHECK_EVERY
            before = listener.handled
            listener.run(pool, max_messages=before + batch)
            if limit and listener.handled >= limit:
                log.info("consumer %s: %d messages handled; recycling", consumer.name, limit)
                break
            if rss_limit and me.memory_info().rss > rss_limit:
                log.info("consumer %s: above max_rss; recycling", consumer.name)
                break
    finally:
        listener.close(stop_timeout)
        sys.stdout.flush()
    return exitcodes.OK
