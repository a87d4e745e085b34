"""Optional Prometheus metrics and ``/healthz``, served by the master's own loop
(``[pool] metrics_port``).

No thread: the master forks, and a thread holding a lock at fork time would hang a child.
The listening socket and every HTTP client sit in the master's selector (:class:`Server`),
non-blocking: a request is read as it comes, answered with the text exposition of
:mod:`prometheus_client` (or the health line) as far as the client takes it, and closed.  A
client gets :data:`PEER_DEADLINE` seconds for the whole exchange and at most
:data:`MAX_PEERS` are served at once, the oldest dropped for a new one.  Everything is
computed at scrape time from the master's tables, the workers' latest reports and the
:class:`Tally` the master's modules count into; nothing is on a message path.

Names follow the RabbitMQ exporter's: ``kzpool_`` prefix, ``_total`` for counters.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..common.errors import KzpoolError
from ..common.status import Health
from .assign import Assignment
from .slots import Slot

log = logging.getLogger("kzpool.metrics")

WORKER_COUNTERS = ("publishes", "deliveries", "redeliveries", "acks", "channels_reused",
                   "blocked_seconds", "consumers_cancelled", "deliveries_taken_back",
                   "lease_holds", "leases_closed_unread")
WORKER_GAUGES = {  # a worker's report's counter -> (metric, help): what it holds now
    "leases_held_back": ("kzpool_leases_held_back",
                         "Leases held back: their clients left over lease_buffer unread"),
    "client_buffered_bytes": ("kzpool_client_buffered_bytes",
                              "Bytes a worker holds that its clients have not read")}
PEER_DEADLINE = 5.0  # seconds a client has to send its request and read the answer
MAX_PEERS = 8
MAX_REQUEST = 8192  # bytes of request line and headers
ACCEPTS_PER_WAKE = 16

Labels = tuple[tuple[str, str], ...]  # (name, value) pairs, in the family's label order
Counts = Mapping[tuple[str, Labels], float]


class RestartReason(enum.Enum):
    """Why a connection worker was started again (``kzpool_worker_restarts_total``)."""

    CRASHED = "crashed"  # exited with an error code
    KILLED = "killed"  # ended by a signal the master did not send
    EXITED = "exited"  # exited 0 although nobody asked it to
    UNRESPONSIVE = "unresponsive"  # silent for worker_timeout: the master killed it
    MEMORY = "memory"  # above worker_max_rss: the master replaced it


@dataclass(frozen=True)
class Family:
    help: str
    labels: tuple[str, ...]


COUNTED = {
    "failovers": Family("Times a zone's primary moved to a broker later in config order (the"
                        " primary was lost)", ("zone",)),
    "failbacks": Family("Times a zone's primary moved back to a broker earlier in config order",
                        ("zone",)),
    "worker_restarts": Family("Connection workers started again, by why the last one ended",
                              ("broker", "reason")),
    "lease_requests_refused": Family("Lease requests the pool refused, by the refusal's code",
                                     ("reason",)),
    "missed_heartbeats": Family("Broker connections lost because the broker's heartbeats"
                                " stopped", ("connection", "broker")),
}


@dataclass
class Tally:
    """Counters the master's modules count into, by name and labels.  Not thread-safe: the
    master's loop only."""

    counts: dict[tuple[str, Labels], float] = field(default_factory=dict)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` to counter ``name`` (one of :data:`COUNTED`) with exactly its
        labels; a wrong name or label set is a programming error (``ValueError``)."""
        family = COUNTED.get(name)
        if family is None or set(labels) != set(family.labels):
            raise ValueError(f"no counter {name!r} with labels {sorted(labels)}")
        key = (name, tuple((label, labels[label]) for label in family.labels))
        self.counts[key] = self.counts.get(key, 0.0) + amount

    def snapshot(self) -> Counts:
        return dict(self.counts)


@dataclass
class PrimaryChanges:
    """Counts each zone's primary moving: to a broker later in config order than its last
    one is a failover, earlier a fail-back (a zone with no primary for a while, or a worker
    reconnecting that kept the role, changes nothing)."""

    tally: Tally
    last: dict[str, str] = field(default_factory=dict)  # zone → its last primary

    def seen(self, zones: Iterable[str], primaries: Iterable[str | None],
             order: Mapping[str, int]) -> None:
        """The primary of each zone now (``order``: each broker key's place in the config)."""
        for zone, primary in zip(zones, primaries, strict=True):
            last = self.last.get(zone)
            if primary is None or primary == last:
                continue
            self.last[zone] = primary
            if last is not None and last in order and primary in order:
                name = "failovers" if order[primary] > order[last] else "failbacks"
                self.tally.inc(name, zone=zone)


def listen(address: str, port: int) -> socket.socket:
    try:
        import prometheus_client  # noqa: F401  (checked here: fail at start-up, not on a scrape)
    except ImportError as exc:
        raise KzpoolError("[pool] metrics_port is set but prometheus-client is not installed"
                          " (pip install 'kzpool[metrics]')") from exc
    sock = socket.create_server((address, port))
    sock.setblocking(False)
    return sock


class Collector:
    """A prometheus_client collector over the master's state, read through callables: the
    workers' slots, the lease rows, how many moves there were so far, and the counters of
    :data:`COUNTED` (``counted``: a :meth:`Tally.snapshot`)."""

    def __init__(self, slots: Callable[[], Iterable[Slot]],
                 leases: Callable[[], Iterable[Assignment]], moves: Callable[[], int],
                 counted: Callable[[], Counts] = dict) -> None:
        self.slots, self.leases, self.moves, self.counted = slots, leases, moves, counted

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("kzpool_connection_up", "Connection to the broker is open",
                               labels=["connection", "broker", "zone"])
        blocked = GaugeMetricFamily("kzpool_connection_blocked",
                                    "The broker blocks publishing (flow control)",
                                    labels=["connection", "broker"])
        prechannels = GaugeMetricFamily("kzpool_prechannels", "Channels opened ahead of time",
                                        labels=["connection", "broker"])
        counters = {name: CounterMetricFamily(f"kzpool_{name}", f"{name} through the pool",
                                              labels=["connection", "broker"])
                    for name in WORKER_COUNTERS}
        gauges = {key: GaugeMetricFamily(metric, text, labels=["connection", "broker"])
                  for key, (metric, text) in WORKER_GAUGES.items()}
        for slot in self.slots():
            labels = [slot.spec.id, slot.spec.broker.uri.masked]
            for name, gauge in gauges.items():
                gauge.add_metric(labels, float(slot.counters.get(name, 0)))
            up.add_metric([*labels, slot.spec.broker.zone], float(slot.available))
            blocked.add_metric(labels, float(slot.blocked))
            prechannels.add_metric(labels, float(slot.prechannels))
            for name, family in counters.items():
                family.add_metric(labels, float(slot.counters.get(name, 0)))
        leases = GaugeMetricFamily("kzpool_leases", "Leases by kind and state",
                                   labels=["kind", "state"])
        by_kind: dict[tuple[str, str], int] = {}
        for row in self.leases():
            key = (row.kind, row.state.value)
            by_kind[key] = by_kind.get(key, 0) + 1
        for (kind, state), count in sorted(by_kind.items()):
            leases.add_metric([kind, state], float(count))
        moves = CounterMetricFamily("kzpool_lease_moves", "Leases moved to another channel")
        moves.add_metric([], float(self.moves()))
        yield from (up, blocked, prechannels, leases, moves, *counters.values(),
                    *gauges.values())
        yield from self._counted(CounterMetricFamily)

    def _counted(self, family_type: Any) -> Iterator[Any]:
        """The :data:`COUNTED` families; every zone, broker and connection the pool has now
        shows 0 until counted (so ``increase()`` sees the first one)."""
        counts = {**self._zeros(), **self.counted()}
        families = {name: family_type(f"kzpool_{name}", spec.help, labels=list(spec.labels))
                    for name, spec in COUNTED.items()}
        for (name, labels), value in sorted(counts.items()):
            if name in families:
                families[name].add_metric([v for _, v in labels], float(value))
        yield from families.values()

    def _zeros(self) -> dict[tuple[str, Labels], float]:
        zeros: dict[tuple[str, Labels], float] = {}
        for slot in self.slots():
            broker = slot.spec.broker
            if not broker.hidden:
                for name in ("failovers", "failbacks"):
                    zeros[(name, (("zone", broker.zone),))] = 0.0
            for reason in RestartReason:
                zeros[("worker_restarts", (("broker", broker.uri.masked),
                                           ("reason", reason.value)))] = 0.0
            zeros[("missed_heartbeats", (("connection", slot.spec.id),
                                         ("broker", broker.uri.masked)))] = 0.0
        return zeros


# ----- the HTTP side ---------------------------------------------------------------------


@dataclass
class Peer:
    sock: socket.socket
    deadline: float  # monotonic
    inbox: bytes = b""
    outbox: bytes = b""  # the answer, once there is one: what the client has not taken yet


class Server:
    """The metrics port: ``GET /metrics`` (or ``/``), ``GET /healthz``; in ``selector`` (the
    master's), whose callbacks take the ready fd.  Never blocks: every socket is
    non-blocking, a request is read and an answer written as far as the client goes, and a
    client past :data:`PEER_DEADLINE` is dropped on the next event or :meth:`expire`.

    ``health``: what ``/healthz`` answers (200 when ok, else 503), ``None``: 404.  Not
    thread-safe.  At the process's file limit an incoming client is accepted on a reserved
    descriptor and closed at once, so the listening socket never spins the loop.
    """

    def __init__(self, listener: socket.socket, selector: selectors.BaseSelector,
                 collector: Collector, health: Callable[[], Health] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.listener, self.selector, self.collector = listener, selector, collector
        self.health, self.clock = health, clock
        self.exposition = _exposition_of(collector)  # imported now: at the file limit an
        # import would fail
        self.peers: dict[int, Peer] = {}  # by fd, oldest first
        self.spare: int | None = os.open(os.devnull, os.O_RDONLY)
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, self._on_listener)

    def next_deadline(self) -> float | None:
        """When :meth:`expire` has a client to drop next (monotonic), if any."""
        return min((p.deadline for p in self.peers.values()), default=None)

    def expire(self, now: float | None = None) -> None:
        """Drop every client past its deadline."""
        now = self.clock() if now is None else now
        for fd, peer in list(self.peers.items()):
            if now >= peer.deadline:
                self._drop(fd)

    def close(self) -> None:
        for fd in list(self.peers):
            self._drop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        self.listener.close()
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None

    # ----- events ----------------------------------------------------------------------

    def _on_listener(self, _fd: int) -> None:
        now = self.clock()
        self.expire(now)
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, _address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self._shed():
                    log.warning("metrics port: accept failed: %s", exc)
                    return
                continue
            if len(self.peers) >= MAX_PEERS:
                self._drop(next(iter(self.peers)))  # the oldest: most likely the idle one
            sock.setblocking(False)
            self.peers[sock.fileno()] = Peer(sock, now + PEER_DEADLINE)
            self.selector.register(sock, selectors.EVENT_READ, self._on_peer)

    def _shed(self) -> bool:
        """Out of descriptors: take the waiting client on the reserved one and close it."""
        if self.spare is None:
            return False
        os.close(self.spare)
        self.spare = None
        try:
            with contextlib.suppress(OSError):
                self.listener.accept()[0].close()
        finally:
            with contextlib.suppress(OSError):
                self.spare = os.open(os.devnull, os.O_RDONLY)
        return True

    def _on_peer(self, fd: int) -> None:
        self.expire()
        peer = self.peers.get(fd)
        if peer is None:
            return
        try:
            self._serve(fd, peer)
        except Exception:  # one client must never end the master's loop
            log.exception("metrics port: dropping a client after an error serving it")
            self._drop(fd)

    def _serve(self, fd: int, peer: Peer) -> None:
        if peer.outbox:
            self._write(fd, peer)
            return
        try:
            data = peer.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        peer.inbox += data
        if b"\r\n\r\n" in peer.inbox or b"\n\n" in peer.inbox:
            self._answer(fd, peer, *self._route(peer.inbox))
        elif len(peer.inbox) > MAX_REQUEST:
            self._answer(fd, peer, 431, "text/plain", b"request header too large\n")

    def _route(self, request: bytes) -> tuple[int, str, bytes]:
        line = request.split(b"\n", 1)[0].decode("latin-1").split()
        if len(line) < 2:
            return 400, "text/plain", b"bad request\n"
        method, path = line[0], line[1].split("?", 1)[0]
        if method != "GET":
            return 405, "text/plain", b"only GET\n"
        if path in ("/", "/metrics"):
            return 200, "text/plain; version=0.0.4", self.exposition()
        if path == "/healthz" and self.health is not None:
            verdict = self.health()
            return (200 if verdict.ok else 503), "text/plain", f"{verdict.reason}\n".encode()
        return 404, "text/plain", b"not found: /metrics or /healthz\n"


    def _answer(self, fd: int, peer: Peer, code: int, kind: str, body: bytes) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 503: "Service Unavailable"}[code]
        head = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        peer.outbox = head.encode() + body
        self.selector.modify(peer.sock, selectors.EVENT_WRITE, self._on_peer)
        self._write(fd, peer)

    def _write(self, fd: int, peer: Peer) -> None:
        try:
            sent = peer.sock.send(peer.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        peer.outbox = peer.outbox[sent:]
        if not peer.outbox:
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        peer = self.peers.pop(fd, None)
        if peer is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(peer.sock)
        peer.sock.close()


def _exposition_of(collector: Collector) -> Callable[[], bytes]:
    """What ``GET /metrics`` answers: ``collector``'s metrics in Prometheus's text format."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return lambda: bytes(generate_latest(registry))
