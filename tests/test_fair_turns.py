"""Fair turns (issue 17, row 1), with real processes: a lease publishing flat out without
confirms and another consuming flat out do not hold back a third lease of the same worker
confirming its publishes one by one.  Afterwards the worker is the same process and stayed
under :data:`RSS_BOUND`, the bystander never moved and every publish it saw confirmed is in
its queue, and the loader's publishes reached their queue in the order it made them (across
the worker's moves of them to its bulk connection and back, which a call causes)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest

import kzpool
from kzpool.testing import DEFAULT_URI, Pool, wait_for

from .bystander import Bystander, PeakRSS, worker_pid

PoolMaker = Callable[..., Pool]
RSS_BOUND = 200 << 20

# argv: role, queue.  The loader numbers its bodies and, at 20,000, makes a call (which
# brings its publishes back to its own channel first); the consumer checks their order.
ROLE = r"""
import sys
import kzpool
role, queue = sys.argv[1:3]
lease = kzpool.connect().lease("float", timeout=60)
if role == "loader":
    n = 0
    while True:
        for _ in range(1000):
            lease.basic_publish("", queue, n.to_bytes(8, "big"))
            n += 1
        print(n, flush=True)
        if n == 20000:
            lease.queue_declare(queue, passive=True)
else:
    lease.basic_qos(prefetch_count=200)
    last, seen, wrong = -1, 0, 0
    for method, _props, body in lease.consume(queue):
        number = int.from_bytes(body, "big")
        wrong += number <= last
        last, seen = number, seen + 1
        lease.basic_ack(method.delivery_tag)
        if seen % 1000 == 0:
            print(seen, wrong, flush=True)
"""


@pytest.fixture
def pool(pools: PoolMaker) -> Pool:
    p = pools([DEFAULT_URI], prechannels=4).start()
    p.wait_ready()
    return p


@pytest.fixture
def bulk_queue() -> Iterator[str]:
    queue = f"kzt-bulk-{uuid.uuid4().hex[:8]}"
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        conn.channel().queue_declare(queue, arguments={"x-max-length": 100_000})
    yield queue
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        conn.channel().queue_delete(queue)


class Role:
    """A client process in a role of :data:`ROLE`; its last line of output."""

    def __init__(self, pool: Pool, role: str, queue: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ROLE, role, queue],
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "KZPOOL_SOCKET": pool.socket})
        self.last = ""

    def reaches(self, count: int, timeout: float) -> list[int]:
        """Its output once its first number is at least ``count``."""
        assert self.proc.stdout is not None
        def far_enough() -> list[int] | None:
            assert self.proc.stdout is not None and self.proc.poll() is None
            self.last = self.proc.stdout.readline()
            numbers = [int(x) for x in self.last.split()]
            return numbers if numbers[0] >= count else None
        return wait_for(far_enough, timeout, f"{count} in {self.proc.args[3]}'s output")

    def stop(self) -> list[int]:
        """Kill it; the numbers of its last line."""
        self.proc.kill()
        rest, _ = self.proc.communicate(timeout=10)
        lines = (self.last + rest).split("\n")
        return next(([int(x) for x in line.split()] for line in reversed(lines) if line), [0])


def test_a_flat_out_loader_and_consumer_do_not_hold_back_a_bystander(
        pool: Pool, bulk_queue: str) -> None:
    pid = worker_pid(pool)
    loader = Role(pool, "loader", bulk_queue)
    consumer = Role(pool, "consumer", bulk_queue)
    try:
        with PeakRSS(pid) as rss:
            loader.reaches(20_000, 60)  # flat out, and past its first call
            consumer.reaches(1000, 60)
            with Bystander(pool) as bystander:
                start = loader.reaches(0, 10)[0]
                bystander.keeps_confirming(300, timeout=60)
    finally:
        published = loader.stop()[0]
        seen, wrong = consumer.stop()
    assert published > start and seen > 0  # both went on while the bystander confirmed
    assert wrong == 0  # the loader's publishes in the order it made them
    assert worker_pid(pool) == pid
    assert bystander.unharmed()
    bystander.client.close()
    assert rss.peak < RSS_BOUND, rss.peak


def test_a_flat_out_publish_to_a_missing_exchange_closes_that_lease_alone(pool: Pool) -> None:
    pid = worker_pid(pool)
    client = kzpool.connect(pool.socket)
    loader = client.lease("float")
    queue = f"kzt-gone-{uuid.uuid4().hex[:8]}"
    loader.queue_declare(queue, auto_delete=True, arguments={"x-max-length": 1000})
    with Bystander(pool) as bystander:
        for n in range(100_000):
            loader.basic_publish("", queue, n.to_bytes(8, "big"))
        loader.basic_publish(f"kzt-no-such-{uuid.uuid4().hex[:8]}", "", b"lost")
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
            for _ in range(100):  # the broker closes the channel a moment later
                loader.queue_declare(queue, passive=True)
        assert closed.value.reply_code == 404
        bystander.keeps_confirming()
    assert worker_pid(pool) == pid
    assert bystander.unharmed()
    bystander.client.close()
    client.close()


def test_publishes_keep_their_order_across_calls(pool: Pool) -> None:
    """A lease publishing 8 KB messages flat out, with a call every 600 (each brings its
    publishes back to its own channel; those that fill its share go to the bulk connection
    again, a few times a run here): its queue holds them in the order it made them."""
    client = kzpool.connect(pool.socket)
    lease = client.lease("float")
    queue = f"kzt-order-{uuid.uuid4().hex[:8]}"
    lease.queue_declare(queue, arguments={"x-expires": 120_000})
    total = 12_000
    for n in range(total):
        lease.basic_publish("", queue, n.to_bytes(8, "big") + bytes(8184))
        if n % 600 == 599:
            lease.queue_declare(queue, passive=True)
    client.close()
    got: list[int] = []
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=1000)
        for method, _props, body in channel.consume(queue, auto_ack=True,
                                                    inactivity_timeout=5):
            if method is None:
                break
            got.append(int.from_bytes(body[:8], "big"))
            if len(got) == total:
                break
        channel.cancel()
        channel.queue_delete(queue)
    wrong = next((at for at, n in enumerate(got) if n != at), None)
    assert wrong is None and len(got) == total, (len(got), wrong, got[wrong or 0:][:5])
