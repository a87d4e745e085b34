"""What a worker holds toward one client is that client's alone: each row of the byte
budget's table (deliveries with ``auto_ack``, prefetch 0, large messages, many leases,
returns), tried as a hostile client would, with real processes.  Afterwards the worker is
the same process, the bystander lease never moved, nothing confirmed was lost, and the
worker's memory stayed under a stated bound.  And a worker stopped while large deliveries
arrive closes its connection cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import psutil
import pytest

import kzpool
from kzpool.testing import DEFAULT_URI, Pool, wait_for
from kzpool.testing.amqp import fill

from .bystander import worker_pid

PoolMaker = Callable[..., Pool]
KB = 1 << 10
ROOT = Path(__file__).resolve().parent.parent


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


# ----- the attacks: a client that asked for deliveries or returns and reads none -------------

RSS_CAP = 160 << 20  # the test pool's worker_max_rss
BOUND = 110 << 20  # what the worker's RSS must stay under meanwhile



class Hostile:
    """``tests/unread.py`` in its own process: it asks, and reads nothing until told to."""

    running: list[subprocess.Popen[str]] = []  # ended after each test, whatever happened

    def __init__(self, pool: Pool, mode: str, queue: str, count: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.unread", pool.socket, mode, queue, str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        Hostile.running.append(self.proc)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line

    def read_all(self, unmoved: bool = True) -> str:
        """Tell it to read; what it got (``got N distinct M``, or its error first)."""
        out, _ = self.proc.communicate("read\n", timeout=90)
        assert out.strip().endswith("moves 0") or not unmoved, out  # its own leases stayed
        return out.strip().rsplit("\n", 1)[0]


@pytest.fixture(autouse=True)
def _end_hostiles() -> Iterator[None]:
    yield
    while Hostile.running:
        proc = Hostile.running.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


class Watch:
    """The worker's pid and peak RSS, and a bystander on two other leases of that worker
    publishing with confirms and consuming, round after round, while an attack goes on."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.pid = worker_pid(pool)
        self.peak = 0
        self.moves: list[kzpool.MoveEvent] = []
        self.client = kzpool.connect(pool.socket)
        self.publisher = self.client.lease("float", on_move=self.moves.append)
        self.consumer = self.client.lease("float", on_move=self.moves.append)
        self.queue = queue_name("bystander")
        self.publisher.queue_declare(self.queue)
        self.publisher.confirm_delivery()
        self.sent = self.received = 0

    def round(self) -> None:
        """One confirmed publish, and its delivery on the other lease; the worker's RSS."""
        self.peak = max(self.peak, psutil.Process(self.pid).memory_info().rss)
        self.publisher.basic_publish("", self.queue, str(self.sent).encode())
        self.sent += 1
        method, _props, _body = self.consumer.basic_get(self.queue, auto_ack=True)
        self.received += method is not None

    def during(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.round()

    def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        def check() -> bool:
            self.round()
            return done()
        wait_for(check, timeout, what)

    def held_back(self) -> int:
        return int(self.pool.connections()[0]["held_back"])

    def check(self) -> None:
        """The worker is the same, under its bound; the bystander never moved and got
        every confirmed publish."""
        self.during(0.5)
        left = self.sent - self.received
        while left and self.consumer.basic_get(self.queue, auto_ack=True)[0] is not None:
            left -= 1
        assert worker_pid(self.pool) == self.pid, self.pool.logs()[-3000:]
        assert self.peak < BOUND, f"worker peaked at {self.peak >> 20} MiB"
        assert not self.moves, self.moves
        assert left == 0, f"{left} confirmed publishes not delivered"
        self.publisher.queue_delete(self.queue)
        self.client.close()


@pytest.fixture
def budget_pool(pools: PoolMaker) -> Pool:
    pool = pools([DEFAULT_URI], prechannels=2, lease_buffer="1M", lease_buffer_grace="600",
                 worker_max_rss=f"{RSS_CAP >> 20}M").start()
    pool.wait_ready()
    return pool


@pytest.mark.parametrize(("mode", "count", "size"), [  # each more than BOUND, whole
    ("auto_ack", 60_000, 2 * KB),  # row 2: auto_ack, never read
    ("default", 400, 300 * KB),  # row 3: the default prefetch (1000), large messages
    ("prefetch0", 120_000, 1 * KB),  # row 6: basic_qos(0), never read
])
def test_a_consumer_that_never_reads_is_held_back_alone(
        budget_pool: Pool, mode: str, count: int, size: int) -> None:
    queue = queue_name(mode)
    fill(queue, count, size)
    watch = Watch(budget_pool)
    hostile = Hostile(budget_pool, mode, queue, count)
    watch.until(lambda: watch.held_back() == 1, 30, "the lease to be held back")
    watch.during(3)  # held back: what it asked for waits in its queue
    assert watch.held_back() == 1
    answer = hostile.read_all()
    assert answer == f"got {count} distinct {count}", answer  # every one, once
    watch.until(lambda: watch.held_back() == 0, 30, "the lease to consume again")
    watch.check()
    budget_pool_queue_delete(queue)


def budget_pool_queue_delete(queue: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        conn.channel().queue_delete(queue)


@pytest.mark.timeout(300)  # 200 consumes on one queue wait on the broker's queue process
def test_two_hundred_leases_that_never_read_are_held_back_alone(budget_pool: Pool) -> None:
    """Row 5: 200 leases, each consuming with prefetch 0 on one queue, never reading: the
    worker's leases together hold a quarter of worker_max_rss at most."""
    queue, count = queue_name("many"), 30_000  # 60 MB: past the 40 MB of the pot
    fill(queue, count, 2 * KB)
    watch = Watch(budget_pool)
    hostile = Hostile(budget_pool, "many", queue, count)
    watch.until(lambda: watch.held_back() > 0, 60, "leases to be held back")
    watch.during(3)
    answer = hostile.read_all()
    assert answer == f"got {count} distinct {count}", answer
    watch.until(lambda: watch.held_back() == 0, 30, "the leases to consume again")
    watch.check()
    budget_pool_queue_delete(queue)


def test_a_consumer_reading_every_few_seconds_keeps_its_lease(budget_pool: Pool) -> None:
    """Row 4: basic_qos(0), the client reading now and then: held back between its reads,
    never moved, every message once."""
    queue, count = queue_name("slow"), 20_000
    fill(queue, count, 1 * KB)
    watch = Watch(budget_pool)
    client = kzpool.connect(budget_pool.socket)
    moves: list[kzpool.MoveEvent] = []
    lease = client.lease("float", on_move=moves.append)
    lease.basic_qos(prefetch_count=0)
    got: list[bytes] = []

    def on_message(ch: kzpool.Lease, method: object, _props: object, body: bytes) -> None:
        got.append(body)
        ch.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]

    lease.basic_consume(queue, on_message)
    for _ in range(3):
        watch.until(lambda: watch.held_back() == 1, 30, "the lease to be held back")
        watch.during(2)
        client.process_data_events(0)  # what is there now
    wait_for(lambda: client.process_data_events(0.2) or len(got) == count, 60, "the rest")
    assert len(set(got)) == count
    assert not moves, moves
    client.close()
    watch.check()
    budget_pool_queue_delete(queue)


def test_returns_never_read_hold_back_their_publisher_alone(pools: PoolMaker) -> None:
    """Row 9: mandatory publishes no queue takes, their returns never read: the worker stops
    reading that client's publishes while it holds twice lease_buffer for it, and closes
    its lease once it has read nothing for lease_buffer_grace."""
    pool = pools([DEFAULT_URI], prechannels=2, lease_buffer="1M", lease_buffer_grace="3",
                 worker_max_rss=f"{RSS_CAP >> 20}M").start()
    pool.wait_ready()
    watch = Watch(pool)
    hostile = Hostile(pool, "returns", str(2 << 20), 20)  # 20 x 2 MiB
    watch.until(lambda: watch.held_back() == 1, 30, "the lease to be held back")
    shown = subprocess.run([sys.executable, "-m", "kzpool", "status", "--json", "--socket",
                            pool.socket], capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(shown.stdout)["connections"][0]["held_back"] == 1  # as kzpool status says
    watch.until(lambda: "closing it" in pool.logs(), 30, "the lease to be closed")
    hostile.read_all(unmoved=False)  # it goes on as it can: the pool's side is asserted
    watch.check()


def test_a_client_that_reads_nothing_past_the_grace_has_its_lease_closed(
        pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], prechannels=2, lease_buffer="1M", lease_buffer_grace="2",
                 worker_max_rss=f"{RSS_CAP >> 20}M").start()
    pool.wait_ready()
    queue, count = queue_name("grace"), 20_000
    fill(queue, count, 2 * KB)
    watch = Watch(pool)
    hostile = Hostile(pool, "auto_ack", queue, count)
    watch.until(lambda: "closing it" in pool.logs(), 30, "the lease to be closed")
    answer = hostile.read_all()
    assert "error: LimitExceeded: " in answer and "lease_buffer" in answer, answer
    assert watch.held_back() == 0
    watch.check()
    budget_pool_queue_delete(queue)
