"""Prometheus metrics from the master's loop: what a scrape shows after real traffic."""

from __future__ import annotations

import contextlib
import re
import selectors
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator

import pytest

import kzpool
from kzpool.common.status import Health
from kzpool.master import metrics
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


def test_idle_http_clients_never_stall_the_master(pools: Callable[..., Pool]) -> None:
    port = free_port()
    pool = pools([DEFAULT_URI], metrics_port=port).start()
    pool.wait_ready()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]  # send nothing
    try:
        # the master's loop goes on: a lease is placed, a scrape is answered, /healthz too
        with kzpool.connect(pool.socket).lease("float", timeout=5) as lease:
            lease.queue_declare("", exclusive=True)
        assert "kzpool_connection_up" in " ".join(scrape(port))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            assert reply.status == 200

        def all_dropped() -> bool:
            scrape(port)  # an event on the port: the pool drops who is past the deadline
            return all(closed(s) for s in idle)

        # and the idle ones are dropped: at once past the bound, the rest past their deadline
        wait_for(all_dropped, 15, "every idle HTTP client to be closed by the pool")
    finally:
        for sock in idle:
            sock.close()


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


# ----- the HTTP side and the counted families, in this process --------------------------


@contextlib.contextmanager
def serving(collector: metrics.Collector,
            health: Callable[[], Health] | None) -> Iterator[int]:
    """A metrics Server on a loop of its own (a thread standing in for the master's)."""
    selector = selectors.DefaultSelector()
    server = metrics.Server(socket.create_server(("127.0.0.1", 0)), selector, collector, health)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for key, _events in selector.select(0.05):
                key.data(key.fd)
            server.expire()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield server.listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_counted_families_are_named_as_the_rabbitmq_exporter_names_its_own() -> None:
    tally = metrics.Tally()
    tally.inc("failovers", zone="east")
    tally.inc("failovers", zone="east")
    tally.inc("failbacks", zone="east")
    tally.inc("worker_restarts", broker="amqp://guest:***@h:5672/%2F", reason="killed")
    tally.inc("lease_requests_refused", reason="unavailable", amount=3)
    tally.inc("missed_heartbeats", connection="c1", broker="amqp://guest:***@h:5672/%2F")
    with pytest.raises(ValueError, match="no counter 'failovers' with labels"):
        tally.inc("failovers", broker="x")
    collector = metrics.Collector(list, list, lambda: 4, tally.snapshot)
    with serving(collector, None) as port:
        text = raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").decode()
    assert text.startswith("HTTP/1.0 200 OK\r\n")
    broker = 'broker="amqp://guest:***@h:5672/%2F"'
    for line in ('kzpool_failovers_total{zone="east"} 2.0',
                 'kzpool_failbacks_total{zone="east"} 1.0',
                 f'kzpool_worker_restarts_total{{{broker},reason="killed"}} 1.0',
                 'kzpool_lease_requests_refused_total{reason="unavailable"} 3.0',
                 f'kzpool_missed_heartbeats_total{{{broker},connection="c1"}} 1.0',
                 "kzpool_lease_moves_total 4.0", "# TYPE kzpool_failovers_total counter"):
        assert line in text.splitlines(), line


def test_the_port_answers_healthz_and_refuses_the_rest() -> None:
    verdicts = [Health(True, "primary a in zone local, 1/1 connections up"),
                Health(False, "no primary in local zone local: a: connection refused")]
    collector = metrics.Collector(list, list, lambda: 0)
    with serving(collector, lambda: verdicts[0]) as port:
        ok = raw(port, b"GET /healthz HTTP/1.0\r\n\r\n")
        verdicts.pop(0)
        down = raw(port, b"GET /healthz?verbose HTTP/1.0\r\n\r\n")
        missing = raw(port, b"GET /nope HTTP/1.0\r\n\r\n")
        post = raw(port, b"POST /metrics HTTP/1.0\r\n\r\n")
        huge = raw(port, b"GET /metrics HTTP/1.0\r\nX: " + b"y" * 9000)
    assert ok.startswith(b"HTTP/1.0 200 OK\r\n")
    assert ok.endswith(b"\r\n\r\nprimary a in zone local, 1/1 connections up\n")
    assert down.startswith(b"HTTP/1.0 503 Service Unavailable\r\n")
    assert down.endswith(b"\r\n\r\nno primary in local zone local: a: connection refused\n")
    assert missing.startswith(b"HTTP/1.0 404 ")
    assert post.startswith(b"HTTP/1.0 405 ")
    assert huge.startswith(b"HTTP/1.0 431 ")


def test_a_client_that_sends_nothing_is_dropped_and_the_oldest_gives_way() -> None:
    collector = metrics.Collector(list, list, lambda: 0)
    with serving(collector, None) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(metrics.MAX_PEERS)]
        # one more: the oldest idle one is dropped to make room; the scrape is answered
        assert raw(port, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 OK")
        wait_for(lambda: closed(idle[0]), 5, "the oldest idle client to be dropped")
        wait_for(lambda: all(closed(s) for s in idle), metrics.PEER_DEADLINE + 5,
                 "every idle client to be dropped at its deadline")
        for sock in idle:
            sock.close()


def test_a_lease_that_left_nothing_on_its_channel_hands_it_to_the_next(
        pools: Callable[..., Pool]) -> None:
    """Plain leases released back to back reuse their channels (the counter says so); a
    lease that put its channel in confirm mode, consumed and set QoS leaves it to no one:
    every later lease can still choose transactions, which confirm mode would refuse."""
    port = free_port()
    pool = pools([DEFAULT_URI], metrics_port=port, prechannels=2).start()
    pool.wait_ready()
    client = kzpool.connect(pool.socket)
    keeper = client.lease("float")  # its exclusive queue lives while the connection has one
    with client.lease("float") as used:
        used.confirm_delivery()
        used.basic_qos(prefetch_count=3)
        queue = used.queue_declare("", exclusive=True).method.queue
        used.basic_consume(queue, lambda *args: None)
    for _ in range(20):
        with client.lease("float") as lease:
            lease.queue_declare(queue, passive=True)
    conn = 'broker="amqp://guest:***@127.0.0.1:5672/%2F",connection="c1"'
    reused = wait_for(lambda: scrape(port).get(f"kzpool_channels_reused_total{{{conn}}}"), 5,
                      "a reused channel counted")
    assert 1 <= reused <= 20
    for _ in range(4):  # every channel the worker holds ready, and then some
        with client.lease("float") as lease:
            lease.tx_select()
            lease.basic_publish("", queue, b"in a transaction")
            lease.tx_commit()
    keeper.close()

