"""Fail-back, done with care: a moved lease settles what it holds before it goes (a message
it had in hand is not given again, nor counted toward a quorum queue's delivery limit), and
a primary in maintenance (``rabbitmq-upgrade drain``) is left, and not failed back to until
it is revived.  A real second node, held by the test."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pika

import kzpool
from kzpool.testing import DEFAULT_MASKED, DEFAULT_URI, Pool, drain, wait_for

from .conftest import brokers

PoolMaker = Callable[..., Pool]
QUORUM = {"x-queue-type": "quorum"}


def moving(pool: Pool) -> bool:
    return any(row["state"] == "moving" for row in pool.status()["assignments"])


def test_a_fail_back_lets_the_consumer_settle_what_it_holds_first(
        pools: PoolMaker, faulty_node: Any) -> None:
    pool = pools([faulty_node.url, DEFAULT_URI], heartbeat=2,
                 reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    primary = faulty_node.url.replace("guest:guest", "guest:***")
    brokers.stop_app(faulty_node.name)
    pool.wait_rows(lambda rs: rs[1]["primary"], 15, "the secondary to be primary")
    queue = f"kzt-fb-{uuid.uuid4().hex[:8]}"
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        setup = conn.channel()
        setup.queue_declare(queue, durable=True, arguments=QUORUM)
        setup.confirm_delivery()
        for n in range(5):
            setup.basic_publish("", queue, b"%d" % n)
    moves: list[kzpool.MoveEvent] = []
    seen: list[tuple[bytes, bool]] = []
    connection = kzpool.connect(pool.socket)
    lease = connection.channel(on_move=moves.append, timeout=15)
    assert lease.broker == DEFAULT_MASKED

    def on_message(channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        if not seen:  # the primary returns while this consumer holds all five
            brokers.start_app(faulty_node.name)
            wait_for(lambda: moving(pool), 20, "the fail-back to begin")
        seen.append((body, method.redelivered))
        channel.basic_ack(method.delivery_tag)

    try:
        lease.queue_declare(queue, durable=True, arguments=QUORUM)
        lease.basic_qos(prefetch_count=5)
        lease.basic_consume(queue, on_message)
        wait_for(lambda: connection.process_data_events(0.2) is None and len(seen) == 5
                 and lease.queue_declare(queue, passive=True) and lease.broker == primary,
                 60, "the five handled, and the lease back on the primary")
        assert sorted(seen) == [(b"%d" % n, False) for n in range(5)]  # each once, in hand
        assert [(m.old_broker, m.new_broker) for m in moves] == [(DEFAULT_MASKED, primary)]
        assert drain(DEFAULT_URI, queue) == []  # nothing left behind, unacked or given back
    finally:
        lease.queue_delete(queue)
        lease.close()
        with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
            conn.channel().queue_delete(queue)


def test_a_primary_in_maintenance_is_left_and_failed_back_to_once_revived(
        pools: PoolMaker, faulty_node: Any) -> None:
    pool = pools([faulty_node.url, DEFAULT_URI], reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    queue = f"kzt-fb-{uuid.uuid4().hex[:8]}"
    moves: list[kzpool.MoveEvent] = []
    lease = kzpool.connect(pool.socket).channel(on_move=moves.append, timeout=15)
    primary = lease.broker
    assert primary == faulty_node.url.replace("guest:guest", "guest:***")
    lease.queue_declare(queue, durable=True)
    lease.confirm_delivery()

    def publish() -> str | None:
        lease.basic_publish("", queue, b"x")  # confirmed, or it raises
        return lease.broker

    try:
        brokers.upgrade(faulty_node.name, "drain")
        wait_for(lambda: publish() == DEFAULT_MASKED, 20, "a confirmed publish on the secondary")
        row = pool.wait_rows(lambda rs: "maintenance mode" in (rs[0]["error"] or ""), 10,
                             "the primary shown in maintenance")[0]
        assert not row["available"] and "Node was put into maintenance mode" in row["error"]
        reconnects = pool.logs().count("reconnecting in")
        wait_for(lambda: pool.logs().count("reconnecting in") >= reconnects + 2, 20,
                 "two more refused reconnects")
        assert publish() == DEFAULT_MASKED and len(moves) == 1  # drained: not back to it
        assert "maintenance" in moves[0].reason
    finally:
        brokers.upgrade(faulty_node.name, "revive")
    wait_for(lambda: publish() == primary, 20, "the fail-back once it is revived")
    assert [(m.old_broker, m.new_broker) for m in moves] == [(primary, DEFAULT_MASKED),
                                                            (DEFAULT_MASKED, primary)]
    lease.queue_delete(queue)
    lease.close()
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        conn.channel().queue_delete(queue)
