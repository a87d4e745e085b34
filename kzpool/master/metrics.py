"""Optional Prometheus metrics, served by the master's own loop (``[pool] metrics_port``).

No thread: the master forks, and a thread holding a lock at fork time would hang a child.
The listening socket sits in the master's selector; a scrape is read, answered with the
text exposition of :mod:`prometheus_client` and closed.  Everything is computed at scrape
time from the master's tables and the workers' latest reports; nothing is on a message path.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..common.errors import KzpoolError
from .assign import Assignment
from .slots import Slot

WORKER_COUNTERS = ("publishes", "deliveries", "redeliveries", "acks", "blocked_seconds")


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
    workers' slots, the lease rows, and how many moves there were so far."""

    def __init__(self, slots: Callable[[], Iterable[Slot]],
                 leases: Callable[[], Iterable[Assignment]], moves: Callable[[], int]) -> None:
        self.slots, self.leases, self.moves = slots, leases, moves

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
        for slot in self.slots():
            labels = [slot.spec.id, slot.spec.broker.uri.masked]
            up.add_metric([*labels, slot.spec.broker.zone], float(slot.available))
            blocked.add_metric(labels, float(slot.blocked))
            prechannels.add_metric(labels, float(slot.prechannels))
            for name, family in counters.items():
                family.add_metric(labels, float(slot.counters.get(name, 0)))
        leases = GaugeMetricFamily("kzpool_leases", "Leases by kind and state",
                                   labels=["kind", "state"])
        by_kind: dict[tuple[str, str], int] = {}
        for row in self.leases():
            key = (row.kind.value, row.state.value)
            by_kind[key] = by_kind.get(key, 0) + 1
        for (kind, state), count in sorted(by_kind.items()):
            leases.add_metric([kind, state], float(count))
        moves = CounterMetricFamily("kzpool_lease_moves", "Leases moved to another channel")
        moves.add_metric([], float(self.moves()))
        yield from (up, blocked, prechannels, leases, moves, *counters.values())


def serve(sock: socket.socket, collector: Collector) -> None:
    """Answer one scrape on an accepted socket; never blocks for long."""
    from prometheus_client import CollectorRegistry, generate_latest

    with contextlib.suppress(OSError), sock:
        sock.settimeout(1.0)
        request = sock.recv(4096)
        if not request.startswith(b"GET "):
            return
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        body = generate_latest(registry)
        sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
