"""Float leases fail over and back; sticky leases wait for their broker.  A real second node."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pika
import pytest

import kzpool
from kzpool.testing import (
    DEFAULT_MASKED,
    DEFAULT_PORT,
    DEFAULT_URI,
    Forwarder,
    Pool,
    drain,
    wait_for,
)

from .conftest import brokers

PoolMaker = Callable[..., Pool]


def test_float_lease_fails_over_and_back(pools: PoolMaker, faulty_node: Any) -> None:
    pool = pools([faulty_node.url, DEFAULT_URI], heartbeat=2,
                 reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    queue = f"kzt-{uuid.uuid4().hex[:10]}"
    moves: list[kzpool.MoveEvent] = []
    lease = kzpool.connect(pool.socket).lease("float", on_move=moves.append, timeout=15)
    primary, secondary = lease.broker, DEFAULT_MASKED
    assert primary == faulty_node.url.replace("guest:guest", "guest:***")
    lease.queue_declare(queue, durable=True)  # survives the broker's stop_app
    lease.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=2)
    sent = []

    def publish() -> str | None:
        body = b"%d" % len(sent)
        lease.basic_publish("", queue, body, persistent)  # confirmed, or it raises
        sent.append(body)
        return lease.broker

    publish()
    brokers.stop_app(faulty_node.name)
    # wait_for lets any lease error through: the caller's code sees none across the moves
    assert wait_for(lambda: publish() == secondary, 10, "a confirmed publish on the secondary")
    brokers.start_app(faulty_node.name)
    wait_for(lambda: publish() == primary, 15, "the lease to fail back to the primary")
    assert [(m.old_broker, m.new_broker) for m in moves] == [(primary, secondary),
                                                            (secondary, primary)]
    lease.close()
    got = drain(faulty_node.url, queue) + drain(DEFAULT_URI, queue)
    # every confirmed publish is on one broker or the other; one re-sent across a move may be
    # there twice (at least once, never lost)
    assert set(got) == set(sent) and len(got) - len(sent) <= 2


def test_sticky_lease_waits_for_its_broker_and_says_which(pools: PoolMaker,
                                                           faulty_node: Any) -> None:
    pool = pools([DEFAULT_URI, faulty_node.url], reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    pool.wait_rows(lambda rs: rs[1]["available"], 10, "the second broker")
    queue = f"kzt-{uuid.uuid4().hex[:10]}"
    lease = kzpool.connect(pool.socket).lease("sticky", broker=faulty_node.url, timeout=2)
    lease.queue_declare(queue, durable=True)
    lease.confirm_delivery()  # a publish right after the broker returns may meet its
    brokers.stop_app(faulty_node.name)  # connection closed again: confirmed, it is sent again
    wait_for(lambda: not pool.connections()[1]["available"], 10, "the broker to be seen down")
    with pytest.raises(kzpool.BrokerUnavailable, match=str(faulty_node.port)):
        lease.queue_declare(queue)
    brokers.start_app(faulty_node.name)
    pool.wait_rows(lambda rs: rs[1]["available"], 15, "the broker back")
    lease.basic_publish("", queue, b"back")  # restored, on the same broker; confirmed
    assert lease.broker == faulty_node.url.replace("guest:guest", "guest:***")
    lease.close()
    assert drain(faulty_node.url, queue) == [b"back"]


def test_flow_control_holds_publishes_and_says_so(pools: PoolMaker, faulty_node: Any) -> None:
    pool = pools([faulty_node.url], reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    queue = f"kzt-{uuid.uuid4().hex[:10]}"
    lease = kzpool.connect(pool.socket).lease("float", timeout=2)
    lease.queue_declare(queue)
    brokers._ctl(faulty_node.name, "-q", "set_vm_memory_high_watermark", "0.000001")
    try:
        lease.basic_publish("", queue, b"while blocked")  # the broker blocks on a publish
        pool.wait_rows(lambda rs: rs[0]["blocked"], 10, "status to show the block")
        with pytest.raises(kzpool.ConnectionBlockedTimeout, match="blocked"):
            lease.basic_publish("", queue, b"waits, then raises")
    finally:
        brokers._ctl(faulty_node.name, "-q", "set_vm_memory_high_watermark", "0.4")
    pool.wait_rows(lambda rs: not rs[0]["blocked"], 10, "the block to lift")
    lease.basic_publish("", queue, b"after")
    lease.close()
    assert b"after" in drain(faulty_node.url, queue)


def test_flow_control_fails_confirm_waits_and_calls_after_the_lease_timeout(
        pools: PoolMaker, faulty_node: Any) -> None:
    pool = pools([faulty_node.url], reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    queue = f"kzt-{uuid.uuid4().hex[:10]}"
    connection = kzpool.connect(pool.socket)
    notices: list[Any] = []
    connection.add_on_connection_blocked_callback(lambda conn, frame: notices.append(frame))
    connection.add_on_connection_unblocked_callback(lambda conn, frame: notices.append(frame))
    lease = connection.channel(timeout=2)
    lease.queue_declare(queue)
    lease.confirm_delivery()
    brokers._ctl(faulty_node.name, "-q", "set_vm_memory_high_watermark", "0.0000001")
    try:
        wait_for(lambda: "memory" in brokers._ctl(faulty_node.name, "-q", "eval",
                                                  "rabbit_alarm:get_alarms().").stdout, 30,
                 "the broker's memory alarm")  # it is raised a moment after the watermark
        with pytest.raises(kzpool.ConnectionBlockedTimeout, match="blocked the connection"):
            lease.basic_publish("", queue, b"held")  # the broker confirms nothing now
        with pytest.raises(pika.exceptions.ConnectionBlockedTimeout):
            lease.wait_for_confirms()  # "held" is still unconfirmed
        with pytest.raises(kzpool.ConnectionBlockedTimeout):
            lease.basic_publish("", queue, b"refused", wait=False)  # not sent while blocked
        other = connection.channel(timeout=2)
        with pytest.raises(kzpool.ConnectionBlockedTimeout):
            other.queue_declare(queue, passive=True)  # a blocked connection reads nothing
        pool.wait_rows(lambda rs: rs[0]["blocked"], 10, "status to show the block")
        connection.process_data_events(0)
        assert [type(f.method) for f in notices] == [pika.spec.Connection.Blocked]
    finally:
        brokers._ctl(faulty_node.name, "-q", "set_vm_memory_high_watermark", "0.4")
    pool.wait_rows(lambda rs: not rs[0]["blocked"], 10, "the block to lift")
    lease.basic_publish("", queue, b"after")
    lease.wait_for_confirms(10)  # "held" too, once the broker reads again
    assert other.queue_declare(queue, passive=True).method.message_count >= 2
    wait_for(lambda: connection.process_data_events(0) or len(notices) == 2, 10,
             "the unblocked notice")
    connection.close()
    assert sorted(drain(faulty_node.url, queue)) == [b"after", b"held"]


def test_a_silent_primary_is_left_on_missed_heartbeats(pools: PoolMaker, vhost: str) -> None:
    forwarder = Forwarder(("127.0.0.1", DEFAULT_PORT))
    try:
        silent_uri = f"amqp://guest:guest@127.0.0.1:{forwarder.port}/%2F"
        pool = pools([silent_uri, vhost], heartbeat=1, reconnect_backoff_max=0.5,
                     connect_timeout=1).start()
        pool.wait_ready()
        lease = kzpool.connect(pool.socket).lease("float", timeout=15)
        primary = lease.broker
        queue = f"kzt-{uuid.uuid4().hex[:10]}"
        lease.queue_declare(queue, auto_delete=False)
        lease.confirm_delivery()
        forwarder.silence()  # no close, no reset: packets just vanish
        # the worker reports its broker gone; the master makes the next one primary after
        rows = pool.wait_rows(lambda rs: not rs[0]["available"] and rs[1]["primary"], 15,
                              "the silent broker to be given up on, the secondary primary")
        assert rows[0]["error"] and rows[1]["primary"]
        wait_for(lambda: lease.basic_publish("", queue, b"x") is None
                 and lease.broker != primary, 15, "a confirmed publish on the secondary")
        forwarder.resume()
        wait_for(lambda: lease.basic_publish("", queue, b"y") is None
                 and lease.broker == primary, 20, "fail-back once the path is back")
        lease.queue_delete(queue)
        lease.close()
    finally:
        forwarder.close()


def test_a_message_over_the_brokers_max_size_fails_that_publish_only(
        pools: PoolMaker, faulty_node: Any) -> None:
    # 3.10's channels read the setting as they open; 4.x reads it at boot, into a
    # persistent term that its channels read
    limit = ("Old = application:get_env(rabbit, max_message_size, 134217728), "
             "application:set_env(rabbit, max_message_size, {size}), "
             "persistent_term:put(max_message_size, {size}), Old.")
    old = brokers._ctl(faulty_node.name, "-q", "eval", limit.format(size=65536)).stdout.strip()
    try:
        pool = pools([faulty_node.url]).start()
        pool.wait_ready()
        queue = f"kzt-{uuid.uuid4().hex[:10]}"
        lease = kzpool.connect(pool.socket).lease("float")
        lease.queue_declare(queue)
        lease.confirm_delivery()
        with pytest.raises(kzpool.ChannelClosedByBroker) as info:
            lease.basic_publish("", queue, b"x" * 100_000)
        assert info.value.reply_code == 406 and "max size" in str(info.value)
        lease.basic_publish("", queue, b"small")  # the lease survives
        with pytest.raises(kzpool.LeaseRequestError, match="over the"):
            lease.basic_publish("", queue, bytes(200 << 20))  # over kzpool's own frame limit
        lease.basic_publish("", queue, b"still fine")
        lease.close()
    finally:
        brokers._ctl(faulty_node.name, "-q", "eval", limit.format(size=int(old)))
    assert drain(faulty_node.url, queue) == [b"small", b"still fine"]


def test_a_call_that_closes_the_connection_moves_a_bystander_once_on_the_same_broker(
        pools: PoolMaker, extra_node: Any) -> None:
    pool = pools([extra_node.url, DEFAULT_URI], reconnect_backoff_min=1).start()
    pool.wait_ready()
    pool.wait_rows(lambda rs: all(r["available"] for r in rs), 10, "both brokers")
    connection = kzpool.connect(pool.socket)
    queue = f"kzt-{uuid.uuid4().hex[:10]}"
    moves: list[kzpool.MoveEvent] = []
    bystander = connection.channel(on_move=moves.append)
    primary = bystander.broker
    assert primary == extra_node.url.replace("guest:guest", "guest:***")
    bystander.queue_declare(queue, auto_delete=True)
    bystander.confirm_delivery()
    culprit = connection.channel()
    for round_ in range(3):  # the broker is up all along: no failover, no fail-back
        with pytest.raises(kzpool.ConnectionClosedByBroker) as info:
            culprit.basic_qos(prefetch_size=1)  # RabbitMQ 3.x and 4.x: 540, on the connection
        assert info.value.reply_code == 540
        bystander.basic_publish("", queue, b"%d" % round_)  # confirmed, on the same broker
        assert bystander.broker == primary
        assert [(m.old_broker, m.new_broker) for m in moves] == [(primary, primary)] * (
            round_ + 1), moves
        assert "540" in moves[-1].reason or "NOT_IMPLEMENTED" in moves[-1].reason
    rows = pool.connections()
    assert rows[0]["primary"] and not rows[1]["primary"]
    assert pool.status()["pool"]["pid"] == pool.pid
    culprit.queue_declare(queue, passive=True)  # the culprit carries on too, on the primary
    assert culprit.broker == primary
    bystander.queue_delete(queue)
    connection.close()
