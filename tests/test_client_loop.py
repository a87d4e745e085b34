"""What an event loop needs of the blocking client: one descriptor to poll, and no delivery
handed out after its channel was lost.  Real pool, real broker, real worker kills."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

import kzpool
from kzpool.client.readiness import Readiness
from kzpool.common.sockets import readable
from kzpool.testing import DEFAULT_URI, Pool, gone, queue_depth, wait_for


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    served = Pool(tmp_path, [DEFAULT_URI])
    try:
        served.start().wait_ready()
        yield served
    finally:
        served.close()




def send(queue: str, *bodies: bytes) -> None:
    """Publish with plain pika, confirmed: the messages are on the broker after this."""
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish("", queue, body)


def kill_worker(pool: Pool) -> None:
    worker = pool.connections()[0]["pid"]
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: gone(worker), 10, "the worker to be gone")


def test_one_descriptor_is_readable_while_the_client_has_something_for_its_thread(
        pool: Pool, queue: str) -> None:
    connection = kzpool.connect(pool.socket)
    readiness = Readiness(connection.dispatcher)
    lease = connection.channel()
    lease.queue_declare(queue)
    got: list[bytes] = []
    lease.basic_consume(queue, lambda _ch, _m, _p, body: got.append(body), auto_ack=True)
    fd = readiness.fileno()

    def settle() -> None:  # what an event loop does after its poll said readable
        connection.process_data_events(0)
        readiness.refresh()

    readiness.refresh()
    assert not readable([fd], 0)
    send(queue, b"on the socket")
    assert readable([fd], 10), "a delivery on the lease's socket"
    settle()
    assert got == [b"on the socket"] and not readable([fd], 0)

    # a delivery that another call of the lease read (it waits in the lease, not the socket)
    send(queue, b"read by a call")
    wait_for(lambda: readable([fd], 0.1), 10, "the delivery on the socket")
    lease.queue_declare(queue, passive=True)  # its reply comes after the delivery: reads it
    readiness.refresh()
    assert readable([fd], 0), "a delivery read by a call waits: the descriptor says so"
    settle()
    assert got[-1] == b"read by a call" and not readable([fd], 0)

    # another thread's callback
    helper = threading.Thread(target=connection.add_callback_threadsafe,
                              args=(lambda: got.append(b"from a thread"),))
    helper.start()
    helper.join()
    assert readable([fd], 10)
    settle()
    assert got[-1] == b"from a thread" and not readable([fd], 0)

    # a move: the lease's socket is a new one, watched from the next refresh on
    kill_worker(pool)
    assert readable([fd], 10), "the lost channel"
    settle()  # the consuming lease gets a channel of the new worker
    send(queue, b"after the move")
    assert readable([fd], 10), "a delivery on the new socket"
    settle()
    assert got[-1] == b"after the move"
    connection.close()
    readiness.close()


def _prefetched(lease: kzpool.Lease, queue: str) -> None:
    """Make the lease read every delivery the broker gave its consumer: once none is ready on
    the broker, a call's reply on the same channel comes after them."""
    wait_for(lambda: queue_depth(queue) == 0, 10, "every message delivered")
    lease.queue_declare(queue, passive=True)


def test_deliveries_read_before_a_loss_during_a_callback_are_not_handed_out(
        pool: Pool, queue: str) -> None:
    connection = kzpool.connect(pool.socket)
    lease = connection.channel()
    lease.queue_declare(queue)
    send(queue, b"1", b"2", b"3")
    lease.basic_qos(prefetch_count=3)
    seen: list[tuple[bytes, bool]] = []

    def on_message(ch: Any, method: Any, _props: Any, body: bytes) -> None:
        seen.append((body, method.redelivered))
        if len(seen) == 1:  # 2 and 3 are read now: the channel goes while this one runs
            _prefetched(lease, queue)
            kill_worker(pool)
        elif len(seen) > 1:
            ch.basic_ack(method.delivery_tag)

    lease.basic_consume(queue, on_message)
    wait_for(lambda: connection.process_data_events(0.1) or len(seen) >= 4, 20,
             "every message again after the move")
    assert seen[0] == (b"1", False)
    # what was read with "1" belonged to the lost channel: the broker gave it again
    assert all(redelivered for _body, redelivered in seen[1:]), seen
    assert sorted(body for body, _r in seen[1:4]) == [b"1", b"2", b"3"]
    connection.close()


def test_the_consume_generator_hands_out_nothing_read_before_a_loss(
        pool: Pool, queue: str) -> None:
    lease = kzpool.connect(pool.socket).channel()
    lease.queue_declare(queue)
    send(queue, b"1", b"2", b"3")
    lease.basic_qos(prefetch_count=3)
    stream = lease.consume(queue, inactivity_timeout=10)
    method, _props, body = next(stream)
    assert (body, method.redelivered) == (b"1", False)
    _prefetched(lease, queue)
    assert lease.get_waiting_message_count() == 2
    kill_worker(pool)
    after = [next(stream) for _ in range(3)]
    assert all(m is not None and m.redelivered for m, _p, _b in after), after
    assert sorted(b for _m, _p, b in after) == [b"1", b"2", b"3"]
    lease.close()
