"""kombu through the kzpool transport: what kombu's py-amqp transport does, on leases.

After kombu's own integration tests (``t/integration/common.py``: basic functionality,
exchange types, TTL, priority, messages, the event loop), written for this transport and run
against a real pool and the real broker; each test uses names of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp.exceptions
import kombu
import kombu.exceptions
import pytest
from kombu import Consumer, Exchange, Producer, Queue

import kzpool
import kzpool.kombu
from kzpool.testing import DEFAULT_URI, Pool, queue_counts, wait_for

from .conftest import Names


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    served = Pool(Path(tmp_path_factory.mktemp("kombu")), [DEFAULT_URI])
    try:
        served.start().wait_ready()
        yield served
    finally:
        served.close()


@pytest.fixture
def url(pool: Pool) -> str:
    return f"kzpool://{pool.socket}"


@pytest.fixture
def conn(url: str) -> Iterator[kombu.Connection]:
    connection = kombu.Connection(url)
    yield connection
    connection.close()


@pytest.fixture
def confirmed(url: str) -> Iterator[kombu.Connection]:
    """A connection with publisher confirms: a publish is on its queues when it returns."""
    connection = kombu.Connection(url, transport_options={"confirm_publish": True})
    yield connection
    connection.close()




def drain_all(conn: kombu.Connection, timeout: float = 0.5) -> None:
    """Drain until ``timeout`` passes with nothing to dispatch."""
    with contextlib.suppress(socket.timeout):
        while True:
            conn.drain_events(timeout=timeout)


def consume(conn: kombu.Connection, queue: Queue, count: int,
            ack: bool = True) -> list[kombu.Message]:
    """The next ``count`` messages of ``queue`` (each acked unless told not to)."""
    got: list[kombu.Message] = []

    def on_message(message: kombu.Message) -> None:
        got.append(message)
        if ack:
            message.ack()

    with Consumer(conn, [queue], on_message=on_message, accept=["json", "pickle", "text/plain"]):
        wait_for(lambda: conn.drain_events(timeout=1) or len(got) >= count, 10,
                 f"{count} message(s)", ignore=(socket.timeout,))
    return got


# ----- reaching the pool --------------------------------------------------------------------

def test_a_connection_connects_closes_and_connects_again(url: str) -> None:
    conn = kombu.Connection(url)
    assert conn.connect() and conn.connected and conn.transport.driver_type == "amqp"
    assert isinstance(conn.connection, kzpool.kombu.Connection) and conn.as_uri() == url
    channel = conn.channel()
    assert channel.is_open and channel.connection.client is conn
    conn.close()
    assert conn.connection is None and not channel.is_open
    assert conn.default_channel.is_open  # connects again, lazily
    conn.close()


def test_the_scheme_needs_the_import_the_transport_path_does_not(pool: Pool) -> None:
    script = ("import kombu\n"
              "try:\n"
              "    kombu.Connection('kzpool://').connect()\n"
              "except KeyError as exc:\n"
              "    print('without import:', exc)\n"
              "conn = kombu.Connection(transport='kzpool.kombu:Transport')\n"
              "conn.connect(); print('transport path:', conn.connection)\n"
              "import kzpool.kombu\n"
              "conn = kombu.Connection('kzpool://'); conn.connect()\n"
              "print('after import:', conn.connection)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env={"KZPOOL_SOCKET": pool.socket, "PATH": "/usr/bin"})
    assert done.returncode == 0, done.stderr
    assert "without import: 'No such transport: kzpool'" in done.stdout
    assert f"transport path: <kzpool.kombu.Connection {pool.socket}>" in done.stdout
    assert f"after import: <kzpool.kombu.Connection {pool.socket}>" in done.stdout


def test_no_pool_is_a_recoverable_connection_error_kombu_retries(tmp_path: Path) -> None:
    conn = kombu.Connection(f"kzpool://{tmp_path}/nothing.sock")
    with pytest.raises(kzpool.PoolNotRunning) as caught:
        conn.connect()
    assert isinstance(caught.value, amqp.exceptions.RecoverableConnectionError)
    assert isinstance(caught.value, conn.recoverable_connection_errors)
    errors: list[Exception] = []
    with pytest.raises(kombu.exceptions.OperationalError, match=r"nothing\.sock"):
        conn.ensure_connection(errback=lambda exc, _interval: errors.append(exc),
                               max_retries=2, interval_start=0, interval_step=0)
    assert len(errors) == 2 and all(isinstance(e, kzpool.PoolNotRunning) for e in errors)


@pytest.mark.parametrize(("target", "options", "error"), [
    ("kzpool://broker.example/x.sock", {}, "not through a host"),
    ("kzpool:///x.sock?confirm_publish=1", {}, "takes no query"),
    ("kzpool://", {"kind": "floaty"}, "transport_options: unknown lease kind 'floaty'"),
    ("kzpool://", {"kind": "sticky"}, "transport_options: a sticky lease needs a broker"),
    ("kzpool://", {"timeout": -1}, "transport_options: timeout -1"),
    ("kzpool://", {"connection_id": "mine"}, "connection_id is set by the connection"),
])
def test_a_bad_url_or_lease_option_is_named_and_not_retried(
        target: str, options: dict[str, Any], error: str) -> None:
    conn = kombu.Connection(target, transport_options=options)
    errbacks: list[Exception] = []
    with pytest.raises(ValueError, match=error):
        conn.ensure_connection(errback=lambda exc, _i: errbacks.append(exc), max_retries=3)
    assert not errbacks


def test_lease_options_travel_in_transport_options(pool: Pool, names: Names) -> None:
    broker = pool.connections()[0]["broker"].replace("***", "guest")
    conn = kombu.Connection(f"kzpool://{pool.socket}", transport_options={
        "kind": "sticky", "broker": broker, "timeout": 3.5, "max_retries": 1})
    lease = conn.default_channel.lease
    assert (lease.kind, lease.timeout) == ("sticky", 3.5)
    assert dataclasses.replace(lease.options, connection_id=None) == kzpool.LeaseOptions(
        kind="sticky", broker=broker, timeout=3.5)
    conn.close()


# ----- publish and consume ------------------------------------------------------------------

def test_publish_consume_ack(conn: kombu.Connection, names: Names) -> None:
    queue = Queue(names("q"), Exchange(names("x"), "direct"), routing_key="rk")
    producer = Producer(conn)
    producer.publish({"hello": "world"}, exchange=queue.exchange, routing_key="rk",
                     declare=[queue], serializer="pickle", retry=True,
                     headers={"k": "v", "n": 1}, correlation_id="c-1", priority=3)
    message = consume(conn, queue, 1)[0]
    assert message.payload == {"hello": "world"}
    assert message.content_type == "application/x-python-serialize"
    assert message.headers == {"k": "v", "n": 1}
    assert message.properties["correlation_id"] == "c-1"
    assert message.properties["delivery_mode"] == 2 and message.properties["priority"] == 3
    info = message.delivery_info
    assert (info["exchange"], info["routing_key"], info["redelivered"]) == (
        queue.exchange.name, "rk", False)
    assert message.acknowledged and queue_counts(queue.name) == (0, 0)


def test_drain_events_times_out_on_an_empty_queue(conn: kombu.Connection,
                                                   names: Names) -> None:
    queue = Queue(names("q"))
    got: list[Any] = []
    with Consumer(conn, [queue], callbacks=[lambda body, m: got.append(body)]):
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.3)
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0)
    assert got == []


def test_simple_queue_and_simple_buffer(conn: kombu.Connection, names: Names) -> None:
    simple = conn.SimpleQueue(names("simple"))
    simple.put({"n": 1}, headers={"custom": "yes"})
    message = simple.get(timeout=5)
    assert message.payload == {"n": 1} and message.headers["custom"] == "yes"
    assert message.content_encoding == "utf-8"
    message.ack()
    with pytest.raises(simple.Empty):
        simple.get(timeout=0.2)
    assert simple.qsize() == 0
    simple.close()
    buffer = conn.SimpleBuffer(names("buffer"))
    buffer.put("a string")
    assert buffer.get(timeout=5).payload == "a string"  # no_ack: nothing to ack
    buffer.close()


def test_every_exchange_type_routes(confirmed: kombu.Connection, names: Names) -> None:
    channel = confirmed.default_channel
    routes = {
        "direct": (Exchange(names("direct"), "direct"), {"routing_key": "a"},
                   [({"routing_key": "a"}, True), ({"routing_key": "b"}, False)]),
        "topic": (Exchange(names("topic"), "topic"), {"routing_key": "t.*"},
                  [({"routing_key": "t.1"}, True), ({"routing_key": "t"}, False)]),
        "fanout": (Exchange(names("fanout"), "fanout"), {"routing_key": ""},
                   [({"routing_key": "anything"}, True)]),
        "headers": (Exchange(names("headers"), "headers"),
                    {"binding_arguments": {"x-match": "all", "kind": "k"}},
                    [({"headers": {"kind": "k"}}, True), ({"headers": {"kind": "j"}}, False)]),
    }
    for kind, (exchange, binding, cases) in routes.items():
        queue = Queue(names(f"{kind}-q"), exchange, **binding)
        second = Queue(names(f"{kind}-q2"), exchange, **binding)
        producer = Producer(channel, exchange=exchange)
        for publish, routed in cases:
            producer.publish({"kind": kind}, declare=[queue, second], **publish)
            expected = 1 if routed else 0
            assert queue_counts(queue.name) == (expected, 0), (kind, publish)
            assert queue_counts(second.name) == (expected, 0), (kind, publish)
            queue(channel).purge()
            second(channel).purge()


def test_exchange_to_exchange_bindings_and_unbinding(confirmed: kombu.Connection,
                                                      names: Names) -> None:
    channel = confirmed.default_channel
    source = Exchange(names("source"), "topic", channel=channel)
    target = Exchange(names("target"), "fanout", channel=channel)
    source.declare()
    target.declare()
    queue = Queue(names("q"), target, channel=channel)
    queue.declare()
    target.bind_to(source, routing_key="e.#")
    Producer(channel, exchange=source).publish("via the binding", routing_key="e.1")
    assert queue_counts(queue.name) == (1, 0)
    target.unbind_from(source, routing_key="e.#")
    queue.unbind_from(target)
    Producer(channel, exchange=source).publish("not routed", routing_key="e.1")
    Producer(channel, exchange=target).publish("not routed")
    assert queue_counts(queue.name) == (1, 0)
    assert queue.purge() == 1


def test_message_ttl_and_queue_ttl(conn: kombu.Connection, names: Names) -> None:
    queue = Queue(names("q"))
    producer = Producer(conn)
    producer.publish("gone soon", routing_key=queue.name, declare=[queue], expiration=0.1)
    bound = queue(conn.default_channel)
    wait_for(lambda: bound.get(no_ack=True) is None and bound.queue_declare(passive=True
                                                                            ).message_count == 0,
             5, "the message to expire")
    short = Queue(names("short"), message_ttl=0.1)
    producer.publish("gone soon too", routing_key=short.name, declare=[short])
    wait_for(lambda: queue_counts(short.name) == (0, 0), 5, "the queue's TTL")


def test_priorities_and_requeue(conn: kombu.Connection, names: Names) -> None:
    queue = Queue(names("q"), max_priority=10)
    producer = Producer(conn)
    for body, priority in (("low", 1), ("high", 5), ("low too", 1)):
        producer.publish(body, routing_key=queue.name, declare=[queue], priority=priority)
    first = consume(conn, queue, 3, ack=False)
    assert [m.payload for m in first][:1] == ["high"]
    for message in first:
        message.requeue()
    producer.publish("top", routing_key=queue.name, priority=10)
    again = consume(conn, queue, 4)
    assert [m.payload for m in again] == ["top", "high", "low", "low too"]
    assert all(m.delivery_info["redelivered"] for m in again[1:])


def test_basic_get_ack_reject_requeue_and_purge(conn: kombu.Connection, names: Names) -> None:
    simple = conn.SimpleQueue(names("q"))
    for n in range(4):
        simple.put(n)
    message = simple.get_nowait()
    assert message.payload == 0 and message.delivery_info["message_count"] == 3
    message.ack()
    simple.get_nowait().reject(requeue=False)  # 1 dropped
    simple.get_nowait().reject(requeue=True)  # 2 back
    simple.get_nowait().requeue()  # 3 back
    back = []
    for _ in range(2):
        again = simple.get_nowait()
        back.append(again.payload)
        again.ack()
    assert sorted(back) == [2, 3]
    with pytest.raises(simple.Empty):
        simple.get_nowait()
    simple.put("purged")
    assert simple.queue.purge() == 1
    simple.close()


# ----- confirms, returns and errors ---------------------------------------------------------

def test_confirm_publish_raises_what_the_broker_refused_and_carries_on(
        url: str, names: Names) -> None:
    conn = kombu.Connection(url, transport_options={"confirm_publish": True})
    channel = conn.default_channel
    with pytest.raises(amqp.exceptions.NotFound, match="no exchange"):
        Producer(channel).publish("to nowhere", exchange=names("missing"), routing_key="k")
    queue = Queue(names("q"))
    Producer(channel).publish("confirmed", routing_key=queue.name, declare=[queue])
    assert queue_counts(queue.name) == (1, 0)  # the same channel, usable again
    with pytest.raises(amqp.exceptions.ChannelError) as caught:  # no return handler
        Producer(channel).publish("unroutable", routing_key=names("nobody"), mandatory=True)
    assert caught.value.reply_code == 312
    returned: list[tuple[Any, ...]] = []
    producer = Producer(channel, on_return=lambda *args: returned.append(args))
    nobody = names("nobody2")
    producer.publish("unroutable", routing_key=nobody, mandatory=True)  # the handler has it
    wait_for(lambda: drain_all(conn, 0.1) or returned, 5, "the return")
    assert len(returned) == 1
    exc, exchange, routing_key, message = returned[0]
    assert isinstance(exc, amqp.exceptions.ChannelError) and exc.reply_code == 312
    assert (exchange, routing_key, message.body) == ("", nobody, b"unroutable")
    conn.close()


def test_channel_errors_are_py_amqps_and_the_channel_is_usable_after(
        conn: kombu.Connection, names: Names) -> None:
    channel = conn.default_channel
    missing = Queue(names("missing"), channel=channel)
    with pytest.raises(amqp.exceptions.NotFound) as caught:
        missing.queue_declare(passive=True)
    assert isinstance(caught.value, conn.channel_errors)
    assert caught.value.reply_code == 404
    queue = Queue(names("q"), durable=False, channel=channel)
    queue.declare()
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        Queue(queue.name, durable=True, channel=channel).declare()
    assert Queue(queue.name, channel=channel).queue_declare(passive=True).message_count == 0
    # RabbitMQ 3 closes the connection for it (503), RabbitMQ 4 the channel (406)
    with pytest.raises((amqp.exceptions.InvalidCommand,
                        amqp.exceptions.PreconditionFailed)) as invalid:
        Exchange(names("bad"), "no-such-type", channel=channel).declare()
    assert isinstance(invalid.value, conn.connection_errors + conn.channel_errors)
    assert Queue(queue.name, channel=channel).queue_declare(passive=True).message_count == 0


def test_a_broker_cancel_calls_on_cancel_or_raises_consumer_cancelled(
        conn: kombu.Connection, names: Names) -> None:
    channel = conn.channel()
    queue = Queue(names("q"), channel=channel)
    queue.declare()
    cancelled: list[str] = []
    channel.basic_consume(queue.name, callback=lambda raw: None, on_cancel=cancelled.append)
    other = conn.channel()
    other.queue_delete(queue.name)
    wait_for(lambda: drain_all(conn, 0.1) or cancelled, 5, "the broker's cancel")
    queue.declare()
    channel.basic_consume(queue.name, callback=lambda raw: None)
    other.queue_delete(queue.name)
    with pytest.raises(amqp.exceptions.ConsumerCancelled):
        drain_all(conn, 2)


# ----- the event loop, threads, moves, fork -------------------------------------------------

def test_the_event_loop_dispatches_acks_from_another_thread(
        conn: kombu.Connection, names: Names) -> None:
    from kombu.asynchronous import Hub

    hub = Hub()
    conn.register_with_event_loop(hub)
    queue = Queue(names("q"))
    acked: list[Any] = []

    def on_message(message: kombu.Message) -> None:  # ack from a timer thread, via the hub
        threading.Timer(0.05, hub.call_soon, (lambda: (message.ack(),
                                                       acked.append(message.payload)),)).start()

    with Consumer(conn, [queue], on_message=on_message, prefetch_count=1):
        for n in range(3):
            Producer(conn).publish(n, routing_key=queue.name, declare=[queue])
        wait_for(lambda: hub.run_once() or len(acked) == 3, 10, "three acks")
    assert acked == [0, 1, 2] and queue_counts(queue.name) == (0, 0)
    hub.close()


def test_the_event_loop_runs_what_a_dispatch_asked_of_it_before_it_waits(
        conn: kombu.Connection, names: Names) -> None:
    """As Celery's worker starts: a first drain from a callback of the loop (not from a
    readable descriptor), acks through ``call_soon``, and a timer far away, so the loop's
    poll would wait 10 s for a broker that waits for those acks."""
    from kombu.asynchronous import Hub

    hub = Hub()
    hub.timer.max_interval = 600  # the poll waits for the timer (up to the hub's 10 s)
    conn.register_with_event_loop(hub)
    hub.call_later(600, lambda: None)
    queue = Queue(names("q"))
    for n in range(6):
        Producer(conn).publish(n, routing_key=queue.name, declare=[queue])
    acked: list[Any] = []

    def on_message(message: kombu.Message) -> None:
        hub.call_soon(lambda: (message.ack(), acked.append(message.payload)))

    with Consumer(conn, [queue], on_message=on_message, prefetch_count=2):
        hub.call_soon(lambda: drain_all(conn, 0))
        wait_for(lambda: hub.run_once() or len(acked) == 6, 8, "six acks, without waits")
    hub.close()


def test_an_ack_from_a_thread_that_does_not_drain_is_sent_by_the_one_that_does(
        conn: kombu.Connection, names: Names) -> None:
    queue = Queue(names("q"))
    got: list[kombu.Message] = []
    with Consumer(conn, [queue], on_message=got.append, prefetch_count=1):
        for n in range(2):
            Producer(conn).publish(n, routing_key=queue.name, declare=[queue])
        wait_for(lambda: conn.drain_events(timeout=1) or got, 5, "one",
                 ignore=(socket.timeout,))
        helper = threading.Thread(target=got[0].ack)
        helper.start()
        helper.join()
        wait_for(lambda: conn.drain_events(timeout=1) or len(got) == 2, 5,
                 "the next: prefetch 1 waited for the ack", ignore=(socket.timeout,))
        got[1].ack()
        drain_all(conn, 0.2)
    conn.close()  # an unacked message would go back to its queue now
    assert queue_counts(queue.name) == (0, 0)
