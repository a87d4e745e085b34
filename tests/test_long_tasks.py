"""Tasks longer than the broker's consumer timeout, on a node whose ``consumer_timeout`` is
5 s: the pool's own ``x-consumer-timeout`` lets a task finish (RabbitMQ 3.12 and later); an
ack of a delivery the broker took back raises in its caller, blocking and asyncio alike,
and the pool logs and counts it (RabbitMQ 4.x cancels the consumer of a quorum queue, 3.x
closes the channel: both)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika.exceptions
import aiormq.exceptions
import pika.exceptions
import pytest

import kzpool
import kzpool.aio
from kzpool.testing import LAYOUT, Pool, queue_counts, wait_for

from .conftest import brokers
from .test_metrics import free_port, scrape

PoolMaker = Callable[..., Pool]
RABBITMQ = LAYOUT.rabbitmq
BROKER_TIMEOUT = 5.0  # the node's consumer_timeout
QUORUM = {"x-queue-type": "quorum"}  # 4.x applies consumer timeouts to quorum queues only
OWN = {"x-consumer-timeout": 2000}  # a consume's own timeout: it passes through as it is
OWN_LONG = {"x-consumer-timeout": 600_000}


def crunch(seconds: float) -> None:
    """A task: CPU work, holding the GIL, for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(10_000))


def consumer_arguments(node: Any, queue: str) -> list[dict[str, Any]]:
    """The arguments of each consumer of ``queue``, as the broker lists them."""
    listed = brokers._ctl(node.name, "-q", "list_consumers", "queue_name", "arguments",
                          "--formatter", "json").stdout
    return [_table(row["arguments"]) for row in json.loads(listed) if row["queue_name"] == queue]


def _table(arguments: Any) -> dict[str, Any]:
    """An AMQP table as rabbitmqctl's JSON gives it: an object, or [key, type, value] rows."""
    if isinstance(arguments, dict):
        return arguments
    return {row[0]: row[-1] for row in arguments}


def taken_back(queue: str, uri: str) -> Callable[[], bool]:
    """The broker took the queue's one message back: it is ready again, and no consumer has
    it (4.x cancelled the consumer; 3.x closed its channel)."""
    return lambda: queue_counts(queue, uri) == (1, 0)


@pytest.mark.skipif(RABBITMQ < 4, reason="RabbitMQ 3.10 ignores x-consumer-timeout on a"
                                         " consume (3.12 and later honour it)")
def test_a_task_longer_than_the_brokers_consumer_timeout_finishes_under_the_pools_default(
        pools: PoolMaker, timeout_node: Any) -> None:
    pool = pools([timeout_node.url]).start()
    pool.wait_ready()
    queue = f"kzt-long-{uuid.uuid4().hex[:8]}"
    seen: list[tuple[bool, list[dict[str, Any]]]] = []

    def on_message(channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
        seen.append((method.redelivered, consumer_arguments(timeout_node, queue)))
        crunch(BROKER_TIMEOUT + 3)  # longer than the broker's consumer_timeout
        channel.basic_ack(method.delivery_tag)
        channel.stop_consuming()

    with kzpool.connect(pool.socket).channel() as channel:
        channel.queue_declare(queue, durable=True, arguments=QUORUM)  # no timeout of its own
        channel.basic_publish("", queue, b"a long task")
        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(queue, on_message)
        channel.start_consuming()
        left = channel.queue_declare(queue, passive=True).method
        own = channel.basic_consume(queue, lambda *_: None, arguments={**OWN_LONG})
        listed = consumer_arguments(timeout_node, queue)
        channel.basic_cancel(own)
        channel.queue_delete(queue)
    assert seen == [(False, [{"x-consumer-timeout": 86_400_000}])]  # once: acked in time
    assert (left.message_count, left.consumer_count) == (0, 0)
    assert listed == [OWN_LONG]  # a consume's own timeout passes as it is


def test_an_ack_of_a_delivery_the_broker_took_back_raises_in_its_caller(
        pools: PoolMaker, timeout_node: Any) -> None:
    port = free_port()
    pool = pools([timeout_node.url], metrics_port=port).start()
    pool.wait_ready()
    uri, queue = timeout_node.url, f"kzt-long-{uuid.uuid4().hex[:8]}"
    errors: list[kzpool.DeliveryTakenBack] = []
    cancels: list[str] = []
    seen: list[bool] = []

    def on_message(channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
        seen.append(method.redelivered)
        if method.redelivered:  # given again: a short task this time
            channel.basic_ack(method.delivery_tag)
            channel.stop_consuming()
            return
        wait_for(taken_back(queue, uri), 60, "the broker to take the message back")
        with pytest.raises(kzpool.DeliveryTakenBack) as caught:
            channel.basic_ack(method.delivery_tag)
        errors.append(caught.value)

    with kzpool.connect(pool.socket).channel() as channel:
        channel.queue_declare(queue, durable=True, arguments=QUORUM)
        channel.basic_publish("", queue, b"a long task")
        channel.basic_qos(prefetch_count=1)
        channel.add_on_cancel_callback(lambda frame: cancels.append(frame.method.consumer_tag))
        tag = channel.basic_consume(queue, on_message, arguments=OWN)
        channel.start_consuming()
        if RABBITMQ >= 4:  # the broker cancelled the consumer: start_consuming returned
            assert cancels == [tag]
            channel.basic_consume(queue, on_message)
            channel.start_consuming()
        left = channel.queue_declare(queue, passive=True).method.message_count
        channel.queue_delete(queue)

    (error,) = errors
    assert isinstance(error, pika.exceptions.ChannelClosedByBroker)  # what pika users catch
    assert error.reply_code == 406 and "no longer held by the broker" in str(error)
    assert ("cancelled its consumer" if RABBITMQ >= 4 else "timed out") in str(error)
    assert seen == [False, True] and left == 0
    if RABBITMQ < 4:
        assert cancels == []  # 3.x closed the channel: the consumer goes on, on a new one
    wait_for(lambda: "took back 1 unsettled deliveries" in pool.logs(), 10, "the pool's log")
    counted = wait_for(lambda: (m := scrape(port)) and next(
        (v for k, v in m.items() if k.startswith("kzpool_deliveries_taken_back_total")), 0)
        and m, 10, "the take-back in the metrics")
    assert [v for k, v in counted.items()
            if k.startswith("kzpool_deliveries_taken_back_total")] == [1]


def test_an_asyncio_ack_of_a_message_the_broker_took_back_raises_in_its_caller(
        pools: PoolMaker, timeout_node: Any) -> None:
    pool = pools([timeout_node.url]).start()
    pool.wait_ready()
    uri, name = timeout_node.url, f"kzt-long-{uuid.uuid4().hex[:8]}"
    errors: list[BaseException] = []
    redelivered: list[bool] = []

    async def main() -> None:
        # robust: after RabbitMQ 3.x's channel close the channel goes on, as aio-pika's does
        async with await kzpool.aio.connect_robust(pool.socket) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1)
            queue = await channel.declare_queue(name, durable=True, arguments=QUORUM)
            await channel.default_exchange.publish(aio_pika.Message(b"a long task"), name)
            while not redelivered or not redelivered[-1]:  # 4.x ends the iterator: again
                async with queue.iterator(arguments=OWN) as messages:
                    async for message in messages:
                        redelivered.append(message.redelivered)
                        if message.redelivered:
                            await message.ack()
                            break
                        # the coroutine holds the loop, past the consumer's timeout
                        wait_for(taken_back(name, uri), 60, "the broker to take it back")
                        with pytest.raises(kzpool.aio.DeliveryTakenBack) as caught:
                            await message.ack()
                        errors.append(caught.value)
            await queue.delete(if_unused=False, if_empty=False)

    asyncio.run(asyncio.wait_for(main(), 100))
    (error,) = errors
    assert isinstance(error, aiormq.exceptions.ChannelPreconditionFailed)
    assert isinstance(error, aio_pika.exceptions.ChannelInvalidStateError)
    assert "no longer held by the broker" in str(error)
    assert redelivered == [False, True]
