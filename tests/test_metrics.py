"""Prometheus metrics from the master's loop: what a scrape shows after real traffic."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Callable

import kzpool
from kzpool.testing import DEFAULT_URI, Pool, wait_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(kzpool_\w+)(\{[^}]*\})? (\S+)$", line)
        if match:
            found[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return found


def test_metrics_follow_the_traffic(pools: Callable[..., Pool]) -> None:
    port = free_port()
    pool = pools([DEFAULT_URI], metrics_port=port).start()
    pool.wait_ready()
    with kzpool.connect(pool.socket).lease("float") as lease:
        queue = lease.queue_declare("", exclusive=True).method.queue
        for _ in range(5):
            lease.basic_publish("", queue, b"x")
        for method, _props, _body in lease.consume(queue, inactivity_timeout=5):
            lease.basic_ack(method.delivery_tag)
            if method.delivery_tag == 5:
                break
        lease.cancel()
        # workers tell the master about assignments within a few ms: wait for it
        held = wait_for(lambda: (m := scrape(port)).get(
            'kzpool_leases{kind="float",state="assigned"}') == 1 and m, 5, "the lease's row")
        assert held['kzpool_leases{kind="float",state="assigned"}'] == 1
    conn = 'broker="amqp://guest:***@127.0.0.1:5672/%2F",connection="c1"'
    metrics = wait_for(lambda: (m := scrape(port)).get(f"kzpool_acks_total{{{conn}}}") == 5
                       and m, 5, "the worker's counters in a scrape")
    assert metrics[f"kzpool_publishes_total{{{conn}}}"] == 5
    assert metrics[f"kzpool_deliveries_total{{{conn}}}"] == 5
    assert metrics[f'kzpool_connection_up{{{conn},zone="local"}}'] == 1
    assert metrics[f"kzpool_connection_blocked{{{conn}}}"] == 0
    assert "kzpool_lease_moves_total" in metrics
