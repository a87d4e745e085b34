"""kzpool.aio channels fail over and back with their topology, losing nothing confirmed; a
sticky one waits for its broker and comes back by itself.  A real second node (kzp1), which
these tests stop and start."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import pamqp.commands
import pika
import pytest
from aio_pika import DeliveryMode, ExchangeType, Message

import kzpool
import kzpool.aio
from kzpool.testing import DEFAULT_MASKED, DEFAULT_URI, Pool, drain, queue_counts

from .conftest import brokers

PoolMaker = Callable[..., Pool]
SECONDARY = DEFAULT_MASKED


async def until(predicate: Callable[[], Any], what: str, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def publish(uri: str, queue: str, body: bytes) -> None:
    with pika.BlockingConnection(pika.URLParameters(uri)) as conn:
        conn.channel().basic_publish("", queue, body)


def test_an_asyncio_consumer_and_a_confirmed_publisher_fail_over_and_back(
        pools: PoolMaker, faulty_node: Any) -> None:
    pool = pools([faulty_node.url, DEFAULT_URI], heartbeat=2,
                 reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    queue = f"kzt-aio-{uuid.uuid4().hex[:10]}"
    primary = faulty_node.url.replace("guest:guest", "guest:***")
    moves: dict[str, list[kzpool.MoveEvent]] = {"consumer": [], "publisher": []}
    sent: list[bytes] = []
    received: list[bytes] = []

    async def main() -> None:
        connection = await kzpool.aio.connect(pool.socket)

        async def declare(channel: aio_pika.abc.AbstractChannel) -> Any:
            """An exchange, a queue and a binding: each channel replays them after a move."""
            exchange = await channel.declare_exchange(f"{queue}-x", ExchangeType.TOPIC,
                                                      durable=True)
            durable = await channel.declare_queue(queue, durable=True)  # survives stop_app
            await durable.bind(exchange, routing_key="jobs.#")
            return exchange, durable

        consuming = await connection.channel(on_move=moves["consumer"].append, timeout=15)
        await consuming.set_qos(prefetch_count=50)
        _exchange, durable = await declare(consuming)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                received.append(message.body)

        await durable.consume(on_message)
        publishing = await connection.channel(on_move=moves["publisher"].append, timeout=15)
        exchange, _queue = await declare(publishing)
        assert publishing.broker == consuming.broker == primary
        stop = asyncio.Event()

        async def publish() -> None:
            while not stop.is_set():
                body = b"%d" % len(sent)
                confirm = await exchange.publish(  # or it raises
                    Message(body, delivery_mode=DeliveryMode.PERSISTENT), routing_key="jobs.a")
                assert isinstance(confirm, pamqp.commands.Basic.Ack)  # not returned
                sent.append(body)

        publisher = asyncio.create_task(publish())

        async def more(what: str) -> None:
            mark = len(received)
            await until(lambda: len(received) > mark + 20 or publisher.done(), what)
            assert not publisher.done(), publisher.exception()

        await more("deliveries on the primary")
        await asyncio.to_thread(brokers.stop_app, faulty_node.name)
        await until(lambda: publishing.broker == consuming.broker == SECONDARY,
                    "both channels on the secondary")
        await more("deliveries on the secondary")
        await asyncio.to_thread(brokers.start_app, faulty_node.name)
        await until(lambda: publishing.broker == consuming.broker == primary,
                    "both channels back on the primary")
        await more("deliveries on the primary again")
        stop.set()
        await publisher
        await connection.close()  # what the consumer had not acked goes back to the queue
        await until(lambda: queue_counts(queue, faulty_node.url)[1] == 0, "the consumer gone")

    asyncio.run(asyncio.wait_for(main(), 90))
    left = drain(faulty_node.url, queue) + drain(DEFAULT_URI, queue)
    for uri in (faulty_node.url, DEFAULT_URI):
        with pika.BlockingConnection(pika.URLParameters(uri)) as conn:
            conn.channel().exchange_delete(f"{queue}-x")
    # every confirmed publish was consumed, or waits in a queue on one broker or the other
    assert set(sent) - set(received) - set(left) == set()
    assert set(received) | set(left) == set(sent)
    for events in moves.values():
        assert [(m.old_broker, m.new_broker) for m in events] == [(primary, SECONDARY),
                                                                 (SECONDARY, primary)]


def test_a_sticky_channel_waits_for_its_broker_and_comes_back_by_itself(
        pools: PoolMaker, faulty_node: Any) -> None:
    pool = pools([DEFAULT_URI, faulty_node.url], reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    pool.wait_rows(lambda rs: rs[1]["available"], 10, "the second broker")
    queue = f"kzt-aio-{uuid.uuid4().hex[:10]}"
    got: list[bytes] = []

    async def main() -> None:
        connection = await kzpool.aio.connect(pool.socket)
        channel = await connection.channel(kind="sticky", broker=faulty_node.url, timeout=2)
        durable = await channel.declare_queue(queue, durable=True)

        async def consume() -> None:  # the iterator style: it outlives the outage
            async with durable.iterator() as messages:
                async for message in messages:
                    async with message.process():
                        got.append(message.body)

        consumer = asyncio.create_task(consume())
        await channel.default_exchange.publish(Message(b"before"), routing_key=queue)
        await until(lambda: got == [b"before"], "the first message")
        await asyncio.to_thread(brokers.stop_app, faulty_node.name)
        with pytest.raises(kzpool.BrokerUnavailable, match=str(faulty_node.port)):
            await channel.default_exchange.publish(Message(b"lost?"), routing_key=queue)
        await asyncio.to_thread(brokers.start_app, faulty_node.name)
        await until(lambda: not channel.is_closed and channel.broker is not None
                    and queue_counts(queue, faulty_node.url) == (0, 1),
                    "the consumer back on its broker, with nobody calling", timeout=30)
        await asyncio.to_thread(publish, faulty_node.url, queue, b"after")  # from elsewhere
        await until(lambda: b"after" in got, "a delivery on the restored channel")
        assert channel.broker == faulty_node.url.replace("guest:guest", "guest:***")
        await connection.close()
        await consumer  # closing the connection ends the loop

    asyncio.run(asyncio.wait_for(main(), 90))
    drain(faulty_node.url, queue)
