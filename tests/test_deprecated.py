"""kzpool's own declarations on a RabbitMQ 4 node that denies what 4.x deprecates
(``deprecated_features.permit.global_qos = false``,
``deprecated_features.permit.transient_nonexcl_queues = false``): prechannels, the default
prefetch, health, a listener on a server-named queue, and its federator.  A listener whose
named queue the broker denies stops with a clear error, and is not started again."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest

import kzpool
from kzpool.testing import LAYOUT, Pool, wait_for

from .conftest import brokers

PoolMaker = Callable[..., Pool]
pytestmark = pytest.mark.skipif(LAYOUT.rabbitmq < 4, reason="RabbitMQ 3.10 has no deprecated"
                                                            " features to deny")
ROOT = Path(__file__).resolve().parent.parent


def consumed_privately(node: Any, vhost: str) -> bool:
    """An exclusive queue of ``vhost`` has its consumer."""
    listed = brokers._ctl(node.name, "-q", "list_queues", "-p", vhost, "exclusive",
                          "consumers", "--formatter", "json").stdout
    return any(row["exclusive"] and row["consumers"] for row in json.loads(listed))


def test_the_pools_own_declarations_pass_a_broker_that_denies_the_deprecated(
        pools: PoolMaker, timeout_node: Any) -> None:
    vhost = f"kzt-{uuid.uuid4().hex[:8]}"  # a second zone, on the same node
    brokers._ctl(timeout_node.name, "-q", "add_vhost", vhost)
    brokers._ctl(timeout_node.name, "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*",
                 ".*")
    west = timeout_node.url.replace("/%2F", f"/{vhost}")
    tag = uuid.uuid4().hex[:8]
    try:
        pool = pools({"east": [timeout_node.url], "west": [west]}, zone="east",
                     prechannels=4).start()
        pool.wait_ready()
        pool.wait_rows(lambda rs: all(r["prechannels"] == 4 for r in rs), 10, "prechannels")
        health = subprocess.run([sys.executable, "-m", "kzpool", "health", "--socket",
                                 pool.socket], capture_output=True, text=True, timeout=30)
        assert health.returncode == 0, health.stdout + health.stderr
        client = kzpool.connect(pool.socket)
        got: list[tuple[bytes, str | None]] = []
        listener = kzpool.Listener(  # a server-named queue, federated: Kazoo's usual listener
            queue="", exchange=f"kzt-x-{tag}", bindings=["call.*"], federate=True,
            responders={"#": lambda message: got.append((message.body, message.zone))})
        listener.start(client)
        wait_for(lambda: consumed_privately(timeout_node, vhost), 15,
                 "the federator consuming in the other zone, on a queue of its own")
        for uri, body in ((timeout_node.url, b"east"), (west, b"west")):
            with pika.BlockingConnection(pika.URLParameters(uri)) as conn:
                conn.channel().basic_publish(f"kzt-x-{tag}", "call.in", body)
        listener.run(client, max_messages=2, inactivity=0.2)
        listener.close()
        assert sorted(got) == [(b"east", "east"), (b"west", "west")]
        with client.channel() as lease:  # a consumer with the pool's default prefetch
            queue = lease.queue_declare(f"kzt-q-{tag}", durable=True).method.queue
            lease.basic_publish("", queue, b"job")
            for method, _properties, body in lease.consume(queue, inactivity_timeout=10):
                assert body == b"job"
                lease.basic_ack(method.delivery_tag)
                break
            lease.cancel()
            lease.queue_delete(queue)
        assert "deprecated" not in pool.logs()
    finally:
        brokers._ctl(timeout_node.name, "-q", "delete_vhost", vhost)
        with pika.BlockingConnection(pika.URLParameters(timeout_node.url)) as conn:
            conn.channel().exchange_delete(f"kzt-x-{tag}")


def test_a_listener_queue_the_broker_denies_stops_with_a_clear_error(
        pools: PoolMaker, timeout_node: Any) -> None:
    queue = f"kzt-c-{uuid.uuid4().hex[:8]}"
    pool = pools([timeout_node.url], shutdown_timeout=5)
    pool.config.write_text(pool.config.read_text() + "\n".join([
        "[consumer:billing]", "handler = tests.handlers:record", f"queue = {queue}",
        "bindings = billing.*"]) + "\n")  # not durable: a transient named queue
    pool.start(env={"PYTHONPATH": str(ROOT)})
    pool.wait_ready()
    wait_for(lambda: "could not load its handler or declare its queue" in pool.logs(), 30,
             "the consumer to stop")
    logs = pool.logs()
    assert f"queue '{queue}': the broker denies transient non-exclusive queues" in logs
    assert "durable = true" in logs
    consumers = pool.status()["consumers"]
    assert [c["state"] for c in consumers] != ["running"]
