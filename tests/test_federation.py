"""Zones and federation: a listener's federated bindings consumed on the other zone's brokers.

The remote zone's broker is a vhost of the local RabbitMQ node (or that vhost behind a TCP
forwarder that can go silent): to the pool it is another broker, with its own connection.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

import kzpool
from kzpool.common.status import render
from kzpool.testing import (
    DEFAULT_HOSTPORT,
    DEFAULT_PORT,
    DEFAULT_URI,
    Forwarder,
    Pool,
    consumer_count,
    gone,
    publish,
    queue_depth,
    wait_for,
)

from .test_consumers import consumer_pool, consumers, traced

PoolMaker = Callable[..., Pool]


@pytest.fixture
def names(vhost: str) -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:8]
    found = {"queue": f"kzt-f-{tag}", "exchange": f"kzt-fx-{tag}", "remote": vhost}
    yield found
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        channel.queue_delete(found["queue"])
        channel.exchange_delete(found["exchange"])  # the remote vhost goes with its fixture


def federators(pool: Pool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pool.status()["federators"]
    return rows


def assigned_federator(pool: Pool) -> dict[str, Any]:
    return wait_for(lambda: next((r for r in federators(pool) if r["state"] == "assigned"), None),
                    15, "a federator on the remote broker")


def got(channel: pika.adapters.blocking_connection.BlockingChannel,
        queue: str) -> tuple[object, pika.BasicProperties, bytes] | None:
    method, properties, body = channel.basic_get(queue, auto_ack=True)
    return (method, properties, body) if method is not None else None


def test_federated_events_reach_the_listener_and_replies_stay_in_their_zone(
        pools: PoolMaker, names: dict[str, str]) -> None:
    remote = names["remote"]
    pool = pools({"east": [DEFAULT_URI], "west": [remote]}, zone="east").start()
    pool.wait_ready()
    seen: list[tuple[str, bytes, str | None, str | None]] = []
    listener = kzpool.Listener(queue=names["queue"], exchange=names["exchange"],
                               bindings=[kzpool.Binding("call.#", federate=True), "local.only"])

    @listener.responder("#")
    def handle(message: kzpool.Message) -> None:
        seen.append((message.routing_key, message.body, message.zone, message.broker))
        assert listener.lease is message.lease  # in a handler: the lease that received it
        if message.properties.reply_to:
            message.reply(b"re: " + message.body)  # through it: on the broker it came from

    client = kzpool.connect(pool.socket)
    listener.start(client)
    row = assigned_federator(pool)
    assert row["federates"] == names["queue"] and row["zone"] == "west"
    assert row["broker"] == remote.replace("guest:guest@", "guest:***@")
    text = render(pool.status())
    assert "federators:" in text and names["queue"] in text

    with pika.BlockingConnection(pika.URLParameters(remote)) as conn:
        replies = conn.channel().queue_declare("", exclusive=True).method.queue
        properties = pika.BasicProperties(reply_to=replies, correlation_id="c-1")
        publish(remote, names["exchange"], "local.only", b"not federated")
        publish(remote, names["exchange"], "call.west", b"w", properties)
        publish(DEFAULT_URI, names["exchange"], "call.east", b"e")
        assert listener.run(client, max_messages=2) == 2
        channel = conn.channel()
        _method, props, body = wait_for(lambda: got(channel, replies), 10,
                                        "the reply on the remote broker")
    listener.close()
    by_key = {key: (body, zone, broker) for key, body, zone, broker in seen}
    assert set(by_key) == {"call.west", "call.east"}
    assert by_key["call.west"][:2] == (b"w", "west")
    assert by_key["call.west"][2] == row["broker"]
    assert by_key["call.east"][:2] == (b"e", "east")
    assert (body, props.correlation_id) == (b"re: w", "c-1")
    assert queue_depth(f"{names['queue']}-east", remote) == 0  # the federated queue, named for east
    wait_for(lambda: not federators(pool), 10, "the federator gone with its listener")


def test_stop_is_bounded_with_a_silent_federated_broker_and_a_stuck_handler(
        pools: PoolMaker, tmp_path: Path, names: dict[str, str]) -> None:
    """Kazoo's design note asked for this test and never got it."""
    remote = names["remote"]
    forwarder = Forwarder(("127.0.0.1", DEFAULT_PORT))
    silent = remote.replace(DEFAULT_HOSTPORT, f"127.0.0.1:{forwarder.port}")
    federated = f"{names['queue']}-east"
    try:
        pool, trace = consumer_pool(
            pools, tmp_path, names, "stuck", uris={"east": [DEFAULT_URI], "west": [silent]},
            pool_settings={"zone": "east"}, shutdown_timeout=3, prefetch=1, federate="true")
        assigned_federator(pool)
        wait_for(lambda: consumer_count(federated, remote), 10, "the federator consuming")
        publish(DEFAULT_URI, names["exchange"], "billing.forever", b"stuck here")
        wait_for(lambda: traced(trace), 10, "the handler to be stuck")
        publish(remote, names["exchange"], "billing.remote", b"waits its turn")
        wait_for(lambda: queue_depth(federated, remote) == 0, 10, "the federator to hold a message")
        forwarder.silence()  # no close, no reset: packets to and from west just vanish
        consumer = int(consumers(pool)[0]["pid"])
        elapsed = pool.stop(3 + 1 + 2)  # shutdown_timeout + 1 s, and a margin for a loaded machine
        assert elapsed < 3 + 1 + 2, elapsed
        assert gone(consumer)
        wait_for(lambda: queue_depth(names["queue"]) == 1, 5,
                 "the stuck message back on its queue")
    finally:
        forwarder.close()  # the broker sees west's connection end: it requeues what it held
    wait_for(lambda: queue_depth(federated, remote) == 1, 10, "the federated message requeued")


def test_federators_restart_with_their_consumer(pools: PoolMaker, tmp_path: Path,
                                                names: dict[str, str]) -> None:
    remote = names["remote"]
    federated = f"{names['queue']}-east"
    pool, trace = consumer_pool(pools, tmp_path, names, "answer",
                                uris={"east": [DEFAULT_URI], "west": [remote]},
                                pool_settings={"zone": "east"}, federate="true")
    first = int(consumers(pool)[0]["pid"])
    assert assigned_federator(pool)["client_pid"] == first
    wait_for(lambda: consumer_count(federated, remote), 10, "the federator consuming")
    publish(remote, names["exchange"], "billing.one", b"1")
    wait_for(lambda: [*map(tuple, traced(trace))] == [(str(first), "billing.one", "1", "west")],
             10, "the west event handled, stamped with its zone")

    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: consumers(pool)[0]["pid"] not in (None, first)
                      and int(consumers(pool)[0]["pid"]), 10, "a new consumer")
    wait_for(lambda: [r["client_pid"] for r in federators(pool)] == [second], 10,
             "one federator, the new consumer's")
    wait_for(lambda: consumer_count(federated, remote), 10, "the new federator consuming")
    publish(remote, names["exchange"], "billing.two", b"2")
    wait_for(lambda: (str(second), "billing.two", "2", "west") in map(tuple, traced(trace)),
             10, "the next west event handled by the new consumer")


def test_a_federator_waits_in_status_for_a_remote_broker_that_is_down(
        pools: PoolMaker, names: dict[str, str]) -> None:
    with socket.socket() as probe:  # a port nothing listens on: that broker is down
        probe.bind(("127.0.0.1", 0))
        down = f"amqp://guest:guest@127.0.0.1:{probe.getsockname()[1]}/%2F"
    pool = pools({"east": [DEFAULT_URI], "west": [down]}, zone="east").start()
    pool.wait_ready()
    listener = kzpool.Listener(queue=names["queue"], exchange=names["exchange"],
                               bindings=["billing.*"], federate=True)
    listener.start(kzpool.connect(pool.socket))
    row = wait_for(lambda: federators(pool), 10, "the federator's row")[0]
    assert (row["state"], row["zone"]) == ("waiting", "west")
    assert row["broker"] == down.replace("guest:guest@", "guest:***@")
    until = time.monotonic() + 3  # it stays there while it waits, not only now and then
    while time.monotonic() < until:
        assert [(r["lease"], r["state"]) for r in federators(pool)] == [(row["lease"], "waiting")]
    listener.close()
    wait_for(lambda: not federators(pool), 10, "the row gone once the listener stopped")


def test_federators_stop_together_when_their_brokers_are_silent(
        pools: PoolMaker, tmp_path: Path, names: dict[str, str]) -> None:
    """Handlers that return, two remote brokers that say nothing: the consumer process stops
    by itself (its federators do not wait for their brokers, nor for one another)."""
    remote = names["remote"]
    forwarders = [Forwarder(("127.0.0.1", DEFAULT_PORT)) for _ in range(2)]
    silent = [remote.replace(DEFAULT_HOSTPORT, f"127.0.0.1:{f.port}") for f in forwarders]
    try:
        pool, _trace = consumer_pool(
            pools, tmp_path, names, "record",
            uris={"east": [DEFAULT_URI], "west": silent[:1], "south": silent[1:]},
            pool_settings={"zone": "east"}, shutdown_timeout=3, federate="true")
        wait_for(lambda: len([r for r in federators(pool) if r["state"] == "assigned"]) == 2,
                 15, "two federators")
        wait_for(lambda: consumer_count(f"{names['queue']}-east", remote) == 2, 10,
                 "both consuming")
        for forwarder in forwarders:
            forwarder.silence()
        pool.stop(3 + 1 + 2)  # shutdown_timeout + 1 s, and a margin for a loaded machine
        assert "still busy" not in pool.logs()  # the consumer was not killed: it stopped
    finally:
        for forwarder in forwarders:
            forwarder.close()
