"""Kazoo's listener_federator: a listener's federated bindings, consumed on a remote broker.

One :class:`Federator` per broker of every other zone.  It runs in a thread of the
listener's process, on a *sticky* lease on its broker (so it waits for that broker, and
``kzpool status`` lists it under ``federators``), declares the listener's exchange there and
a queue named after the local zone (``billing`` in zone ``east`` consumes ``billing-east``
on the remote brokers), binds the federated routing keys and consumes.  Every delivery goes
to the parent listener's :meth:`~kzpool.consumer.listener.Listener.dispatch`, one handler at a time
across the listener's threads, with the remote broker and zone stamped on the message; a
reply from the handler goes back through the federator's own lease, so through its broker.

Stopping: the listener sets its stop flag; each federator sees it within
:data:`STOP_CHECK` seconds, closes its lease (closing the channel cancels its consumer and
requeues what it had not acked, without waiting for the broker: a silent broker cannot hold
a stop up) and its thread ends.  All federators stop at once, not one after another.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from ..client.lease import Lease
from ..client.pool import PoolClient
from ..common.backoff import Backoff
from ..common.errors import KzpoolError, LeaseRequestError

log = logging.getLogger("kzpool.federator")

STOP_CHECK = 0.25  # seconds a federator may wait for a delivery before it looks at the flag
LEASE_TIMEOUT = 3600.0  # a federator waits for its broker as long as the pool lets it
RETRY = (0.2, 5.0)  # backoff between tries: first, cap


class Host(Protocol):
    """What a federator needs of its listener."""

    queue: str
    auto_ack: bool

    @property
    def stopping(self) -> bool: ...

    @property
    def federated_keys(self) -> list[str]: ...

    def wait_stopped(self, timeout: float) -> bool: ...

    def declare(self, lease: Lease, queue: str, keys: list[str]) -> str: ...

    def dispatch(self, lease: Lease, method: Any, properties: Any, body: bytes) -> None: ...


class Federator:
    """Consumes ``queue`` on ``broker`` (a remote zone's) for ``listener``."""

    def __init__(self, listener: Host, pool: PoolClient, broker: str, zone: str,
                 queue: str) -> None:
        self.listener = listener
        self.pool = pool
        self.broker = broker  # password masked: a sticky lease names a known broker by it
        self.zone = zone
        self.queue = queue
        self.lease: Lease | None = None
        self.error: str | None = None
        self._retry = Backoff(*RETRY)
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"federator {queue} on {broker}")

    def __repr__(self) -> str:
        return f"<Federator {self.queue} on {self.broker} ({self.zone})>"

    def start(self) -> Federator:
        self.thread.start()
        return self

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the thread to end; ``True`` if it did."""
        self.thread.join(max(0.0, timeout))
        return not self.thread.is_alive()

    def _run(self) -> None:
        while not self.listener.stopping:
            try:
                self._consume()
            except LeaseRequestError as exc:  # its broker or zone left the config
                log.warning("federator %s on %s: %s; stopping it", self.queue, self.broker, exc)
                self.error = str(exc)
                return
            except KzpoolError as exc:
                if self.error != str(exc) and not self.listener.stopping:
                    log.warning("federator %s on %s: %s; retrying", self.queue, self.broker, exc)
                self.error = str(exc)
            except Exception as exc:  # a bug: say so, and keep the federator alive
                log.exception("federator %s on %s failed; retrying", self.queue, self.broker)
                self.error = f"{type(exc).__name__}: {exc}"
            finally:
                if self.lease is not None:
                    self.lease.close()
                    self.lease = None
            self.listener.wait_stopped(self._retry.next_delay())

    def _consume(self) -> None:
        """One lease, kept while its broker comes and goes (the sticky lease waits for it,
        so ``kzpool status`` shows the federator all along); it ends only on stop or error."""
        listener = self.listener
        self.lease = lease = self.pool.lease(
            "sticky", broker=self.broker, zone=self.zone, timeout=LEASE_TIMEOUT,
            federates=listener.queue, abort=lambda: listener.stopping)
        queue = listener.declare(lease, self.queue, listener.federated_keys)
        self.error = None
        self._retry.reset()
        log.info("federator %s consuming %s on %s", listener.queue, queue, self.broker)
        for method, properties, body in lease.consume(queue, auto_ack=listener.auto_ack,
                                                      inactivity_timeout=STOP_CHECK):
            if method is not None:
                listener.dispatch(lease, method, properties, body)
            if listener.stopping:
                return
