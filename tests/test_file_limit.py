"""The master and a worker at their file limit: every loop that opens a file, a socket or a
``/proc`` entry skips that reading, turns that peer away or tries that connect again later,
says so once, and goes on.  Real processes, the limit lowered with ``prlimit``."""

from __future__ import annotations

import os
import resource
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import kzpool
from kzpool.testing import DEFAULT_URI, Pool, wait_for

from .hostile import assert_whole, pids, raw

PoolMaker = Callable[..., Pool]


@contextmanager
def file_limit(pid: int, soft: int) -> Iterator[None]:
    """Process ``pid``'s soft limit on descriptors lowered to ``soft`` (restored after)."""
    old, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (old, hard))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def said(pool: Pool, text: str) -> int:
    """How many lines of the pool's log say ``text`` (its master must still run)."""
    assert pool.proc is not None and pool.proc.poll() is None, pool.logs()[-3000:]
    return sum(text in line for line in pool.logs().splitlines())


def test_the_master_held_at_its_file_limit_again_and_again_never_exits(
        pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    before = pids(pool)
    skipping = "skipping reading the master's memory"
    resumed = "reading the master's memory resumed"
    with file_limit(pool.pid, 128):
        for round_ in range(1, 7):
            flood: list[socket.socket] = []
            try:
                for _ in range(200):  # held by the master, or turned away at its limit
                    flood.append(raw(pool.socket))
                # the master's tick reads its own memory in /proc while every descriptor
                # is taken: it skips that reading and says so once
                wait_for(lambda n=round_: said(pool, skipping) >= n, 10,
                         f"round {round_}: the master to meet its limit in its tick")
            finally:
                for sock in flood:
                    sock.close()
            wait_for(lambda n=round_: said(pool, resumed) >= n, 10,
                     f"round {round_}: the master's readings to resume")
            assert pool.status()["pool"]["pid"] == before.master
            assert pids(pool) == before
    assert_whole(pool, before)
    assert "Traceback" not in pool.logs()


def test_a_worker_at_its_file_limit_loses_no_lease_and_connects_again(
        pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    before = pids(pool)
    worker = before.workers["c1"]
    connection = kzpool.connect(pool.socket)
    queue = f"kzt-{os.getpid()}-{id(pool)}"
    moves: list[kzpool.MoveEvent] = []
    bystander = connection.channel(on_move=moves.append, timeout=30)
    bystander.queue_declare(queue)
    bystander.confirm_delivery()
    culprit = connection.channel()

    # a client socket the master passes, which the kernel cannot give the worker: that
    # lease is placed again, and the worker goes on
    got: list[object] = []
    with file_limit(worker, open_fds(worker)):
        newcomer = threading.Thread(target=lambda: got.append(
            kzpool.connect(pool.socket).channel(timeout=30).queue_declare(queue)))
        newcomer.start()
        wait_for(lambda: said(pool, "skipping client sockets the master passes") >= 1, 15,
                 "the worker to miss a passed socket at its limit")
    newcomer.join(30)
    assert got and got[0].method.queue == queue
    assert pids(pool) == before

    # a connect at the limit (the broker closed the connection for the culprit's call):
    # tried again after the backoff, until descriptors are free
    with file_limit(worker, open_fds(worker) - 8):
        with pytest.raises(kzpool.ConnectionClosedByBroker):
            culprit.basic_qos(prefetch_size=1)  # 540, on the connection: RabbitMQ 3.x and 4.x
        pool.wait_rows(lambda rs: "too many open files" in str(rs[0]["error"]), 15,
                       "the worker's connect to meet its limit")
    bystander.basic_publish("", queue, b"after")  # confirmed, once the worker is back
    assert len(moves) == 1
    assert pids(pool) == before
    bystander.queue_delete(queue)
    connection.close()
    assert_whole(pool, before)
