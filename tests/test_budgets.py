"""What a worker holds toward one client is that client's alone: each row of the byte
budget's table (deliveries with ``auto_ack``, prefetch 0, large messages, many leases,
returns), tried as a hostile client would, with real processes.  Afterwards the worker is
the same process, the bystander lease never moved, nothing confirmed was lost, and the
worker's memory stayed under a stated bound.  And a worker stopped while large deliveries
arrive closes its connection cleanly."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest

import kzpool
from kzpool.testing import DEFAULT_URI, Pool, wait_for

PoolMaker = Callable[..., Pool]
KB = 1 << 10


def queue_name(what: str) -> str:
    return f"kzt-budget-{what}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def flood() -> Iterator[Callable[[str, int], None]]:
    """``flood(queue, size)``: a thread publishing ``size``-byte messages to ``queue`` on its
    own pika connection, until the test ends."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def publish(queue: str, size: int) -> None:
        with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
            channel = conn.channel()
            body = os.urandom(size)
            while not stop.is_set():
                channel.basic_publish("", queue, body)
                conn.process_data_events(0)

    def start(queue: str, size: int) -> None:
        thread = threading.Thread(target=publish, args=(queue, size), daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(10)


def worker_pid(pool: Pool) -> int:
    pid = pool.connections()[0]["pid"]
    assert pid, pool.connections()
    return int(pid)


# ----- a worker stopped while large deliveries arrive -----------------------------------------

def consume_until(pool: Pool, queue: str, stop: threading.Event, got: list[int],
                  reasons: list[str]) -> None:
    """A consumer reading and acking ``queue`` flat out on its own connection (this thread)
    until ``stop``; each delivery counted in ``got``, each move's reason in ``reasons``."""
    client = kzpool.connect(pool.socket)
    consumer = client.lease("float", on_move=lambda e: reasons.append(e.reason))
    consumer.basic_qos(prefetch_count=20)

    def on_message(ch: kzpool.Lease, method: object, _props: object, _body: bytes) -> None:
        got[0] += 1
        ch.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]

    consumer.basic_consume(queue, on_message)
    while not stop.is_set():
        client.process_data_events(0.05)
    client.close()


def test_a_worker_stopped_while_large_deliveries_arrive_closes_cleanly(
        pools: PoolMaker, flood: Callable[[str, int], None]) -> None:
    """A delivery whose method frame the fast path took must not reach pika's frame assembly
    in pieces when the connection starts to close (``AttributeError: 'NoneType' object has
    no attribute 'body_size'``, the connection lost, every lease moved with that reason)."""
    pool = pools([DEFAULT_URI], prechannels=2).start()
    pool.wait_ready()
    client = kzpool.connect(pool.socket)
    reasons: list[str] = []
    bystander = client.lease("float", on_move=lambda e: reasons.append(e.reason))
    queue = queue_name("stop")
    bystander.queue_declare(queue, auto_delete=False)
    flood(queue, 300 * KB)  # several body frames each: one is under way at any moment
    stop, got = threading.Event(), [0]
    thread = threading.Thread(target=consume_until, args=(pool, queue, stop, got, reasons))
    thread.start()
    try:
        for round_ in range(4):
            old, seen = worker_pid(pool), got[0]
            wait_for(lambda seen=seen: got[0] > seen + 20, 30, "deliveries to flow")
            os.kill(old, signal.SIGTERM)
            pool.wait_rows(lambda rows, old=old: rows[0]["pid"] not in (None, old) and
                           rows[0]["state"] == "connected", 30, "a new worker")
            bystander.queue_declare(queue, passive=True)  # moves it: its channel went
            moved = 2 * (round_ + 1)
            wait_for(lambda moved=moved: len(reasons) >= moved, 30, "both leases to move")
    finally:
        stop.set()
        thread.join(30)
        bystander.queue_delete(queue)
    assert not [r for r in reasons if "Stream connection lost" in r or "Error" in r], reasons
    assert "body_size" not in pool.logs()
