"""kombu through the kzpool transport when things happen: a lease's move under an event loop,
and fork (gunicorn's ``--preload``, multiprocessing).  Real pool, real broker, real kills."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu
import pika
import pytest
from kombu import Consumer, Producer, Queue
from kombu.asynchronous import Hub
from kombu.common import maybe_declare
from kombu.pools import connections, producers

import kzpool.kombu
from kzpool.testing import DEFAULT_URI, Pool, gone, queue_counts, wait_for


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    served = Pool(tmp_path, [DEFAULT_URI])
    try:
        served.start().wait_ready()
        yield served
    finally:
        served.close()


@pytest.fixture
def queue() -> Iterator[Queue]:
    made = Queue(f"kzt-{uuid.uuid4().hex[:10]}")
    yield made
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        conn.channel().queue_delete(made.name)


def send(queue: Queue, *bodies: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish("", queue.name, body.encode(),
                                  pika.BasicProperties(content_type="text/plain"))


def row_of(pool: Pool, lease: str | None) -> dict[str, Any]:
    return next(r for r in pool.status()["assignments"] if r["lease"] == lease)


def test_a_consumer_on_the_event_loop_carries_on_across_a_move(
        pool: Pool, queue: Queue) -> None:
    conn = kombu.Connection(f"kzpool://{pool.socket}")
    hub = Hub()
    conn.register_with_event_loop(hub)
    got: list[kombu.Message] = []
    maybe_declare(queue, conn.default_channel)  # kombu remembers it
    consumer = Consumer(conn, [queue], on_message=got.append, prefetch_count=3)
    consumer.consume()
    send(queue, "1", "2")
    wait_for(lambda: hub.run_once() or len(got) == 2, 10, "two deliveries")
    assert conn.declared_entities
    worker = pool.connections()[0]["pid"]
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: gone(worker), 10, "the worker gone")
    send(queue, "3")
    wait_for(lambda: hub.run_once() or len(got) == 5, 20, "1 and 2 again, and 3")
    assert sorted(m.body for m in got[2:]) == [b"1", b"2", b"3"]
    assert [m.delivery_info["redelivered"] for m in got[2:4]] == [True, True]
    assert min(m.delivery_tag for m in got[2:]) > max(m.delivery_tag for m in got[:2])
    got[0].ack()  # tags of the lost channel: dropped, never applied to another message
    got[1].ack()
    hub.run_once()
    assert conn.connected and not conn.declared_entities  # forgotten: may not exist there
    consumer.cancel()
    conn.close()  # the three unacked deliveries go back to the queue: none was acked
    wait_for(lambda: queue_counts(queue.name) == (3, 0), 10, "all three back in the queue")
    hub.close()


def _in_child(work: Callable[[], None]) -> int:
    """Run ``work`` in a child made by ``os.fork()``; its exit status (0: it went well)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_gets_its_own_connection_and_leaves_the_parents_alone(
        pool: Pool, queue: Queue) -> None:
    conn = kombu.Connection(f"kzpool://{pool.socket}")
    channel = conn.default_channel
    got: list[kombu.Message] = []
    consumer = Consumer(conn, [queue], on_message=got.append, prefetch_count=1)
    consumer.consume()
    before = row_of(pool, channel.lease.id)

    def child() -> None:
        assert not conn.connected
        with pytest.raises(kzpool.kombu.Forked, match="before a fork"):
            channel.basic_publish(channel.prepare_message("on the parent's lease"),
                                  routing_key=queue.name)  # refused: nothing sent
        conn.collect()  # what kombu's after-fork cleanup does
        Producer(conn).publish("from the child", routing_key=queue.name, retry=True)
        conn.close()

    assert _in_child(child) == 0
    wait_for(lambda: conn.drain_events(timeout=1) or got, 10, "the child's message",
             ignore=(socket.timeout,))
    assert [m.body for m in got] == [b"from the child"]
    got[0].ack()
    after = row_of(pool, channel.lease.id)
    assert (after["state"], after["moves"], after["pid"]) == (
        "assigned", before["moves"], before["pid"])  # the parent's lease, untouched
    Producer(conn).publish("from the parent", routing_key=queue.name)
    wait_for(lambda: conn.drain_events(timeout=1) or len(got) == 2, 10, "the parent's own",
             ignore=(socket.timeout,))
    got[1].ack()
    consumer.cancel()
    conn.close()


def _publish_through_pools(url: str, queue_name: str, body: str,
                           not_on: str | None = None) -> str | None:
    """Publish through kombu's pools, not on lease ``not_on`` (a parent's); the id of the
    lease the pooled producer used."""
    with producers[kombu.Connection(url)].acquire(block=True, timeout=10) as producer:
        producer.publish(body, routing_key=queue_name, retry=True)
        lease: str | None = producer.channel.lease.id
    assert lease != not_on, "a child published on its parent's lease"
    return lease


def test_pooled_producers_work_in_forked_and_multiprocessing_children(
        pool: Pool, queue: Queue) -> None:
    url = f"kzpool://{pool.socket}"
    with connections[kombu.Connection(url)].acquire(block=True) as conn:
        Producer(conn).publish("parent", routing_key=queue.name, declare=[queue])
    lease = _publish_through_pools(url, queue.name, "parent, pooled")  # a parent's lease
    before = row_of(pool, lease)
    assert _in_child(lambda: _publish_through_pools(url, queue.name, "fork", lease)
                     and None) == 0
    child = multiprocessing.get_context("fork").Process(
        target=_publish_through_pools, args=(url, queue.name, "multiprocessing", lease))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert _publish_through_pools(url, queue.name, "parent again") == lease
    after = row_of(pool, lease)
    assert (after["state"], after["moves"], after["pid"]) == (
        "assigned", before["moves"], before["pid"])  # nothing came over the parent's socket
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as broker:
        channel = broker.channel()
        bodies = []
        while (got := channel.basic_get(queue.name, auto_ack=True))[0] is not None:
            bodies.append(got[2])
    assert sorted(bodies) == sorted([b"parent", b"parent, pooled", b"fork",
                                     b"multiprocessing", b"parent again"])
