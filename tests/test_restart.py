"""A pool restart is a move, not a crash: ``kill -9`` of the master under its clients, the
pool started again on the same config, and the clients carry on (#12).

Real processes throughout: the pool is a real ``kzpool serve`` killed with SIGKILL; its
workers and in-service consumers follow it out; it is started again on the same config, so
its sockets come back at the same paths.  A confirmed publisher (pipelined and
``wait=True``) and a consumer in ``start_consuming()``, blocking and asyncio alike, see no
exception, and no confirmed publish is lost."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kzpool
import kzpool.aio
from kzpool.lease.state import POOL_RESTARTED
from kzpool.testing import DEFAULT_URI, Pool, consumer_count, wait_for

from . import test_consumers
from .test_consumers import consumer_pool, consumers, publish, traced

names = test_consumers.names  # fixture: a queue and an exchange of the test's own (and
# conftest's queue: a queue, deleted after)

PoolMaker = Callable[..., Pool]


def restart(pool: Pool, env: dict[str, str] | None = None) -> None:
    """``kill -9`` of the master; once every process of the pool is gone, start it again
    on the same config and wait until it serves."""
    pool.signal(signal.SIGKILL)
    pool.wait_exit(5)
    wait_for(lambda: not pool.group(), 10, "the pool's children to follow the master")
    pool.start(env=env)
    pool.wait_ready()


class Publisher(threading.Thread):
    """Confirmed publishes on a lease of its own: twenty pipelined, then one ``wait=True``,
    until told to stop.  ``confirmed``: every body the broker confirmed."""

    def __init__(self, socket: str, queue: str) -> None:
        super().__init__(daemon=True)
        self.socket, self.queue = socket, queue
        self.confirmed: list[bytes] = []
        self.moves: list[kzpool.MoveEvent] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with kzpool.connect(self.socket).lease("float", on_move=self.moves.append) as lease:
                lease.confirm_delivery()
                n = 0
                while not self.stop.is_set():
                    bodies = [b"p%d" % (n + i) for i in range(20)]
                    futures = [lease.basic_publish("", self.queue, body, wait=False)
                               for body in bodies]
                    for body, future in zip(bodies, futures, strict=True):
                        assert future is not None
                        future.result()
                        self.confirmed.append(body)
                    body = b"w%d" % n
                    lease.basic_publish("", self.queue, body)  # waits for its confirm
                    self.confirmed.append(body)
                    n += 20
        except BaseException as exc:  # what the test asserts never happens
            self.error = exc


class Consumer(threading.Thread):
    """A ``basic_consume`` consumer inside ``start_consuming()``, acking what it gets, until
    the test asks it to stop (a thread-safe callback)."""

    def __init__(self, socket: str, queue: str) -> None:
        super().__init__(daemon=True)
        self.socket, self.queue = socket, queue
        self.got: set[bytes] = set()
        self.moves: list[kzpool.MoveEvent] = []
        self.error: BaseException | None = None
        self.consuming = threading.Event()
        self.connection: Any = None

    def run(self) -> None:
        try:
            self.connection = kzpool.connect(self.socket)
            lease = self.connection.channel(on_move=self.moves.append)
            lease.queue_declare(self.queue)
            lease.basic_qos(prefetch_count=50)

            def on_message(channel: Any, method: Any, _props: Any, body: bytes) -> None:
                self.got.add(body)
                channel.basic_ack(method.delivery_tag)

            lease.basic_consume(self.queue, on_message)
            self.consuming.set()
            lease.start_consuming()
            lease.close()
            self.connection.close()
        except BaseException as exc:  # what the test asserts never happens
            self.error = exc

    def finish(self) -> None:
        """Leave ``start_consuming()`` (from the test's thread), and wait until it did."""
        self.connection.add_callback_threadsafe(self._stop_consuming)
        self.join(15)
        assert not self.is_alive(), "the consumer did not stop"

    def _stop_consuming(self) -> None:
        for member in self.connection.dispatcher.snapshot():
            member.channel.stop_consuming()


def test_a_restarted_pool_moves_a_confirmed_publisher_and_a_consumer(
        pools: PoolMaker, queue: str) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    consumer = Consumer(pool.socket, queue)
    consumer.start()
    assert consumer.consuming.wait(10), f"the consumer did not start: {consumer.error!r}"
    publisher = Publisher(pool.socket, queue)
    publisher.start()
    wait_for(lambda: len(publisher.confirmed) > 200 or publisher.error, 10, "publishes")
    restart(pool)
    before = len(publisher.confirmed)
    wait_for(lambda: len(publisher.confirmed) > before + 200 or publisher.error, 15,
             "publishes confirmed on the new pool")
    publisher.stop.set()
    publisher.join(15)
    assert publisher.error is None, f"the publisher saw {publisher.error!r}"
    confirmed = set(publisher.confirmed)
    wait_for(lambda: confirmed <= consumer.got or consumer.error, 15, "every confirmed body")
    consumer.finish()
    assert consumer.error is None, f"the consumer saw {consumer.error!r}"
    assert not confirmed - consumer.got  # 0 confirmed publishes lost
    for moves in (publisher.moves, consumer.moves):
        assert [m.reason for m in moves] == [POOL_RESTARTED]
        assert moves[0].new_broker == moves[0].old_broker  # the same broker, a new channel


def test_a_restarted_pool_moves_an_aio_publisher_and_consumer(
        pools: PoolMaker, queue: str) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    asyncio.run(_aio_restart(pool, queue))


async def _aio_restart(pool: Pool, queue: str) -> None:
    moves: list[kzpool.MoveEvent] = []
    connection = await kzpool.aio.connect(pool.socket)
    consuming = await connection.channel(on_move=moves.append)
    publishing = await connection.channel(on_move=moves.append)
    declared = await consuming.declare_queue(queue)
    got: set[bytes] = set()
    confirmed: list[bytes] = []
    stop = asyncio.Event()

    async def consume() -> None:
        async with declared.iterator() as messages:
            async for message in messages:
                got.add(message.body)
                await message.ack()

    async def publish_until_stopped() -> None:
        n = 0
        while not stop.is_set():
            bodies = [b"a%d" % (n + i) for i in range(20)]
            await asyncio.gather(*(publishing.default_exchange.publish(
                kzpool.aio.Message(body), queue) for body in bodies))
            confirmed.extend(bodies)
            await publishing.default_exchange.publish(kzpool.aio.Message(b"w%d" % n), queue)
            confirmed.append(b"w%d" % n)
            n += 20

    tasks = [asyncio.ensure_future(consume()), asyncio.ensure_future(publish_until_stopped())]

    async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                for task in tasks:
                    if task.done():
                        task.result()  # raises what the consumer or publisher saw
                        raise AssertionError(f"a task stopped before {what}")
                await asyncio.sleep(0.02)

    await until(lambda: len(confirmed) > 200, 10, "publishes")
    await asyncio.to_thread(restart, pool)
    before = len(confirmed)
    await until(lambda: len(confirmed) > before + 200, 15, "publishes on the new pool")
    stop.set()
    await tasks.pop()  # the publisher ends with no exception
    await until(lambda: set(confirmed) <= got, 15, "every confirmed body consumed")
    assert not set(confirmed) - got  # 0 confirmed publishes lost
    assert [m.reason for m in moves] == [POOL_RESTARTED] * 2
    tasks[0].cancel()
    await connection.close()


def test_in_service_consumers_go_and_come_back_with_the_pool(
        pools: PoolMaker, tmp_path: Path, names: dict[str, str]) -> None:
    pool, trace = consumer_pool(pools, tmp_path, names, "record", processes=2)
    publish(names, ["billing.before"] * 5)
    wait_for(lambda: len(traced(trace)) == 5, 15, "5 messages handled")
    old = {row["pid"] for row in consumers(pool)}
    restart(pool, env={"KZT_TRACE": str(trace), "PYTHONPATH": str(Path(__file__).parent.parent)})
    rows = wait_for(lambda: [r for r in consumers(pool) if r["state"] == "running" and r["pid"]]
                    if len(consumers(pool)) == 2 else None, 15, "two consumers again")
    wait_for(lambda: consumer_count(names["queue"]) == 2, 15, "both consuming again")
    publish(names, ["billing.after"] * 5)
    done = wait_for(lambda: len(traced(trace)) == 10 and traced(trace), 15, "5 more handled")
    after = {int(pid) for pid, key, _body in done if key == "billing.after"}
    assert after <= {r["pid"] for r in rows} and not after & old  # new processes
