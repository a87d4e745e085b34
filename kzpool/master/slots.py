"""The master's picture of its connection workers: one :class:`Slot` per worker it keeps.

A slot outlives its worker processes: when a worker dies the slot stays, marked dead, until
the master forks a new one into it.  Pure data and decisions, no I/O: unit-testable.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..common.config import Broker, Config, Consumer
from ..common.messages import Report
from ..common.sockets import Outbox
from ..common.states import ConnState, ProcState
from ..common.wire import FrameReader
from ..worker.spec import WorkerSpec
from .life import Life

LINK_LIMIT = 16 << 20  # bytes the master may have queued for a worker that does not read


@dataclass
class Slot:
    spec: WorkerSpec
    life: Life
    state: ConnState = ConnState.STARTING
    link: socket.socket | None = None
    reader: FrameReader = field(default_factory=FrameReader)
    outbox: Outbox = field(default_factory=lambda: Outbox(LINK_LIMIT))  # to the worker
    writing: bool = False  # the link waits to be writable (the outbox is not empty)
    last_seen: float = 0.0  # monotonic
    error: str | None = None
    since: float = field(default_factory=time.time)  # wall clock, for status
    prechannels: int = 0
    channels: int = 0
    blocked: bool = False
    full: bool = False  # its connection reached channel_max
    counters: dict[str, float] = field(default_factory=dict)  # cumulative, from the worker
    rss: int = 0
    cpu: float = 0.0
    primary: bool = False
    tried: bool = False  # at least one connect attempt has ended, well or not
    retiring: bool = False  # replaced on purpose (RSS): respawn at once
    silenced: bool = False  # killed for being silent past worker_timeout
    removed: bool = False  # dropped from the config: never respawn
    hold_until: float = 0.0  # monotonic: reconnecting at once, it stays primary until then

    @property
    def pid(self) -> int:
        return self.life.pid

    @property
    def available(self) -> bool:
        return self.pid != 0 and self.state.available

    @property
    def holds_role(self) -> bool:
        """It may be (or stay) its zone's primary: connected, or connecting again at once
        because the broker closed its connection for a client's call (the broker is up),
        for at most a connect's time (:attr:`hold_until`): leases wait for it meanwhile."""
        return self.available or (self.pid != 0 and self.state is ConnState.RECONNECTING
                                  and self.hold_until > 0)

    @property
    def has_room(self) -> bool:
        """It can bind one more lease: a prechannel ready, or room for a new channel, and
        fewer leases than ``max_peers``."""
        return self.available and self.channels < self.spec.settings.max_peers and (
            self.prechannels > 0 or not self.full)

    def apply_report(self, report: Report) -> None:
        """Take a worker's report; unknown states are ignored, not trusted."""
        try:
            self.state = ConnState(report.state)
        except ValueError:
            return
        self.error = report.error
        self.since = report.since or time.time()
        self.blocked, self.full = report.blocked, report.full
        self.counters = {k: float(v) for k, v in report.counters.items()
                         if isinstance(v, int | float) and not isinstance(v, bool)}
        self.prechannels, self.channels = report.prechannels, report.channels
        if not self.state.connecting:
            self.tried = True

    def row(self) -> dict[str, Any]:
        """The connections-table row: never a password."""
        broker = self.spec.broker
        return {
            "id": self.spec.id,
            "broker": broker.uri.masked,
            "zone": broker.zone,
            "local": broker.local,
            "hidden": broker.hidden,
            "primary": self.primary,
            "available": self.available,
            "state": self.state.value,
            "pid": self.pid or None,
            "prechannels": self.prechannels,
            "channels": self.channels,
            "blocked": self.blocked,
            "held_back": int(self.counters.get("leases_held_back", 0)),  # over lease_buffer
            "full": self.full,
            "error": self.error,
            "since": round(self.since, 3),
            "rss": self.rss,
            "cpu": round(self.cpu, 1),
        }


def broker_key(broker: Broker) -> str:
    """Identity of a broker across reloads: the full URI (a new password is a new broker)."""
    return broker.uri.uri


def masked(slots: Iterable[Slot], key: str | None) -> str:
    """The password-free URI of the broker whose key is ``key`` (``"none"``: no such one)."""
    return next((s.spec.broker.uri.masked for s in slots if broker_key(s.spec.broker) == key),
                "none")


def plan(config: Config) -> list[tuple[Broker, int]]:
    """Every (broker, index) the config asks a worker for, in config order."""
    per_broker = config.settings.connections_per_broker
    return [(b, i) for b in config.brokers for i in range(1, per_broker + 1)]


def startup_settled(slots: Iterable[Slot]) -> bool:
    """Ready to serve: a local broker is up and every local broker before it was tried.

    This keeps the primary at READY the one config order names, not the fastest to connect.
    """
    local = sorted((s for s in slots if s.spec.broker.local),
                   key=lambda s: (s.spec.broker.order, s.spec.index))
    for slot in local:
        if slot.available:
            return True
        if not (slot.tried or slot.state.final):
            return False
    return False


def startup_hopeless(slots: Iterable[Slot]) -> bool:
    """No local broker can come up without a change of config: each failed for good
    (credentials, vhost, TLS), so waiting for ``startup_timeout`` would change nothing."""
    local = [s for s in slots if s.spec.broker.local]
    return bool(local) and all(s.state.final for s in local)


@dataclass
class ConsumerSlot:
    """One process of a ``[consumer:NAME]`` section."""

    consumer: Consumer
    index: int
    life: Life
    state: ProcState = ProcState.DEAD
    error: str | None = None
    since: float = field(default_factory=time.time)
    rss: int = 0
    retired: bool = False  # its section changed or went: it stops and is not restarted
    kill_at: float = 0.0  # monotonic; a retired one still running then gets SIGKILL

    @property
    def pid(self) -> int:
        return self.life.pid

    @property
    def title(self) -> str:
        return f"kzpool: consumer {self.consumer.name} #{self.index}"

    def row(self) -> dict[str, Any]:
        return {"name": self.consumer.name, "index": self.index, "pid": self.pid or None,
                "state": self.state.value, "restarts": self.life.restarts, "error": self.error,
                "since": round(self.since, 3), "rss": self.rss,
                "queue": self.consumer.settings.queue}
