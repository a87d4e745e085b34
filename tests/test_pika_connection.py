"""``kzpool.connect()`` behaves as pika's BlockingConnection, and one call's broker error
stays with its caller.  Real default broker, real pool processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

import kzpool
from kzpool.testing import DEFAULT_URI, Pool, queue_depth, wait_for


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    served = Pool(Path(tmp_path_factory.mktemp("pika-conn")), [DEFAULT_URI], prechannels=4,
                  reconnect_backoff_max=0.5)
    try:
        served.start().wait_ready()
        yield served
    finally:
        served.close()




def test_connect_gives_a_blocking_connection(pool: Pool, queue: str) -> None:
    with kzpool.connect(pool.socket) as connection:
        assert connection.is_open and not connection.is_closed
        assert connection.publisher_confirms_supported and connection.basic_nack_supported
        assert connection.consumer_cancel_notify_supported
        assert connection.exchange_exchange_bindings_supported
        channel = connection.channel()
        channel.queue_declare(queue)
        with pytest.raises(ValueError, match="picks a lease's channel number"):
            connection.channel(7)
    assert connection.is_closed and channel.is_closed  # the with-block closed both
    with pytest.raises(pika.exceptions.ConnectionWrongStateError):
        connection.close()
    with pytest.raises(pika.exceptions.ConnectionWrongStateError):
        connection.channel()
    with pytest.raises(pika.exceptions.ConnectionWrongStateError):
        connection.process_data_events()
    with pytest.raises(pika.exceptions.ConnectionWrongStateError):
        connection.add_callback_threadsafe(lambda: None)
    with pytest.raises(pika.exceptions.ChannelWrongStateError):
        channel.basic_publish("", queue, b"x")


def test_timers_run_in_process_data_events_and_removed_ones_never(
        connection: kzpool.Connection) -> None:
    ran: list[str] = []
    later = connection.call_later(0.05, lambda: ran.append("later"))
    connection.process_data_events(time_limit=None)  # returns once something ran
    assert ran == ["later"]
    connection.remove_timeout(later)  # fired already: fine
    removed = connection.call_later(0, lambda: ran.append("removed"))
    connection.remove_timeout(removed)
    connection.process_data_events(time_limit=0.1)
    assert ran == ["later"]
    late = connection.call_later(5, lambda: ran.append("never"))
    connection.call_later(0, lambda: connection.remove_timeout(late))
    connection.sleep(0.1)  # sleeping dispatches too
    assert ran == ["later"]
    with pytest.raises(TypeError):
        connection.call_later(0, None)  # type: ignore[arg-type]


def test_closing_the_connection_in_a_callback_ends_start_consuming_quietly(
        connection: kzpool.Connection, queue: str) -> None:
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    for body in (b"1", b"2"):
        channel.basic_publish("", queue, body)
    channel.basic_consume(queue, lambda *_: connection.close())
    channel.start_consuming()  # no exception
    assert connection.is_closed and channel.is_closed
    wait_for(lambda: queue_depth(queue) == 2, 5, "both back on the queue")


def test_a_sticky_channel_from_the_connection(connection: kzpool.Connection) -> None:
    channel = connection.channel(kind="sticky", broker=DEFAULT_URI, timeout=5)
    assert channel.kind == "sticky"
    assert channel.broker == DEFAULT_URI.replace("guest:guest", "guest:***")
    assert channel.queue_declare("", exclusive=True).method.queue.startswith("amq.gen-")


# ----- a call the broker answers by closing the whole connection ------------------------------

def test_a_call_that_closes_the_connection_fails_in_its_caller_only(
        connection: kzpool.Connection, queue: str) -> None:
    moves: dict[str, list[kzpool.MoveEvent]] = {"culprit": [], "consumer": [], "idle": []}
    culprit, consumer, idle = (connection.channel(on_move=moves[who].append) for who in moves)
    consumer.queue_declare(queue)
    got: list[bytes] = []
    consumer.basic_consume(queue, lambda _c, _m, _p, body: got.append(body), auto_ack=True)
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        culprit.basic_qos(prefetch_size=1)  # RabbitMQ 3.x and 4.x: 540, on the connection
    assert info.value.args[0] == 540 and "prefetch_size" in info.value.args[1]
    assert isinstance(info.value, kzpool.ConnectionClosedByBroker)
    culprit.queue_declare(queue, passive=True)  # its next call goes through
    idle.basic_publish("", queue, b"after")  # the others just moved
    while not got:
        connection.process_data_events(time_limit=None)
    assert got == [b"after"]
    for _ in range(5):  # nothing is sent again: no more moves come
        culprit.queue_declare(queue, passive=True)
        idle.queue_declare(queue, passive=True)
    assert [len(m) for m in moves.values()] == [1, 1, 1]
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as flow:
        culprit.flow(False)  # RabbitMQ: 540 NOT_IMPLEMENTED, on the connection
    assert flow.value.args[0] == 540
    assert culprit.flow(True) is True
    assert [len(m) for m in moves.values()] == [2, 1, 1]  # the others wait for their calls


# ----- waits that stay the caller's -----------------------------------------------------------

def test_a_timeout_raised_by_a_signal_handler_reaches_the_caller(
        connection: kzpool.Connection, queue: str) -> None:
    moves: list[kzpool.MoveEvent] = []
    channel = connection.channel(on_move=moves.append)
    channel.queue_declare(queue)

    def alarm(_signum: int, _frame: Any) -> None:
        raise TimeoutError("the caller's deadline")

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(TimeoutError, match="the caller's deadline"):
            for _item in channel.consume(queue):  # an empty queue: waits
                pass
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(TimeoutError, match="the caller's deadline"):
            connection.process_data_events(time_limit=None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    channel.basic_publish("", queue, b"still here")
    method, _props, body = next(channel.consume(queue))
    assert body == b"still here" and not moves  # the same channel all along
    channel.basic_ack(method.delivery_tag)


def test_a_process_with_more_than_1024_files_holds_leases(
        connection: kzpool.Connection, queue: str) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this process may open {hard} files only")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert max(held) > 1024
        channel = connection.channel()  # its socket is above 1,024 too
        channel.queue_declare(queue)
        channel.confirm_delivery()
        channel.basic_publish("", queue, b"high")
        got: list[bytes] = []
        channel.basic_consume(queue, lambda _c, m, _p, body: (got.append(body),
                                                              channel.basic_ack(m.delivery_tag)))
        while not got:
            connection.process_data_events(time_limit=None)
        assert got == [b"high"]
        assert next(channel.consume(f"{queue}", inactivity_timeout=0.05)) == (None, None, None)
        channel.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
