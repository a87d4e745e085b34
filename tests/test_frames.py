"""Frames bounded in time and size on every bound lease (issue 17, rows 7, 8 and 10), tried
as a hostile client would, with real processes: a frame announced and never finished drops
that lease alone; large publishes pass through one at a time.  Afterwards the worker is the
same process, stayed under :data:`RSS_BOUND`, and a bystander lease on it never moved and
kept its confirms coming."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Callable

import pika
import pytest

import kzpool
from kzpool.common import wire
from kzpool.testing import DEFAULT_URI, Pool, queue_depth
from kzpool.testing.nodes import rabbitmq_version

from .bystander import Bystander, PeakRSS, worker_pid
from .hostile import wait_eof

PoolMaker = Callable[..., Pool]
RSS_BOUND = 200 << 20  # the worker's resident memory, all through (its cap: 256 MiB)


@pytest.fixture
def pool(pools: PoolMaker) -> Pool:
    p = pools([DEFAULT_URI], prechannels=4).start()
    p.wait_ready()
    return p


def announce(sock: socket.socket, size: int, then: bytes = b"") -> None:
    """A publish frame's header announcing ``size`` bytes, and ``then`` (never the rest)."""
    sock.setblocking(True)
    with contextlib.suppress(OSError):  # dropped while it sent: what the test is after
        sock.sendall(wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.Kind.PUBLISH, 0, size)
                     + then)


def test_a_frame_header_then_silence_drops_that_lease_alone(pool: Pool) -> None:
    pid = worker_pid(pool)
    client = kzpool.connect(pool.socket)
    hostile = client.lease("float", timeout=10)
    sock = hostile._impl.sock
    assert sock is not None
    with Bystander(pool) as bystander, PeakRSS(pid) as rss:
        announce(sock, 129 << 20)
        wait_eof([sock], 30, "the worker to drop the lease whose frame never came whole")
        ended: list[BaseException | str] = []

        def next_call() -> None:
            try:
                hostile.queue_declare(f"kzt-after-{uuid.uuid4().hex[:8]}", auto_delete=True)
                ended.append("answered")
            except Exception as exc:
                ended.append(exc)
        caller = threading.Thread(target=next_call, daemon=True)
        caller.start()
        caller.join(hostile.timeout + 10)
        assert ended, "the hostile lease's next call hung past its timeout"
        bystander.keeps_confirming()
    client.close()
    assert worker_pid(pool) == pid
    assert bystander.unharmed()
    bystander.client.close()
    assert rss.peak < RSS_BOUND, rss.peak


def test_unfinished_large_frames_on_several_leases_drop_each_alone(pool: Pool) -> None:
    pid = worker_pid(pool)
    client = kzpool.connect(pool.socket)
    socks = []
    for _ in range(3):
        sock = client.lease("float")._impl.sock
        assert sock is not None
        socks.append(sock)
    with Bystander(pool) as bystander, PeakRSS(pid) as rss:
        senders = [threading.Thread(target=announce, args=(s, 120 << 20, bytes(100 << 20)),
                                    daemon=True) for s in socks]
        for sender in senders:
            sender.start()
        wait_eof(socks, 90, "the worker to drop every lease whose frame never came whole")
        bystander.keeps_confirming()
        for sender in senders:
            sender.join(30)
    client.close()
    assert worker_pid(pool) == pid
    assert bystander.unharmed()
    bystander.client.close()
    assert rss.peak < RSS_BOUND, rss.peak


# RabbitMQ 4 refuses a message over 16 MiB by default (max_message_size); 3.x takes 128 MiB
LARGEST = 100_000_000 if rabbitmq_version() < 4 else 16_000_000


def test_large_publishes_pass_one_at_a_time(pool: Pool) -> None:
    pid = worker_pid(pool)
    queue = f"kzt-large-{uuid.uuid4().hex[:8]}"
    client = kzpool.connect(pool.socket)
    loader = client.lease("float", timeout=120)
    loader.queue_declare(queue, auto_delete=False, arguments={"x-expires": 120_000})
    loader.confirm_delivery()
    with Bystander(pool) as bystander, PeakRSS(pid) as rss:
        loader.basic_publish("", queue, bytes(LARGEST))
        for _ in range(20):
            loader.basic_publish("", queue, bytes(10_000_000))
        bystander.keeps_confirming()
    assert queue_depth(queue) == 21  # every one confirmed is there
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        method, _props, body = conn.channel().basic_get(queue, auto_ack=True)
        assert method is not None and len(body) == LARGEST
        conn.channel().queue_delete(queue)
    client.close()
    assert worker_pid(pool) == pid
    assert bystander.unharmed()
    bystander.client.close()
    assert rss.peak < RSS_BOUND, rss.peak
