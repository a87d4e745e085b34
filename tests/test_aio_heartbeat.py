"""asyncio's version of the reason kzpool exists: a coroutine that holds the event loop
starves aio-pika's heartbeats, not a kzpool.aio channel's.

The same aio-pika consumer code runs twice, side by side in two processes: on
``aio_pika.connect(url)`` and on ``kzpool.aio.connect()``.  Its handler computes for four
heartbeat intervals without yielding to the loop, then acks.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import traceback
import uuid
from collections.abc import Awaitable, Callable
from multiprocessing.queues import SimpleQueue
from typing import Any

import aio_pika
import pika

import kzpool.aio
from kzpool.testing import DEFAULT_URI, Pool, queue_counts, wait_for
from tests.handlers import CPU_SECONDS, HEARTBEAT, burn


async def consume_one(connection: aio_pika.abc.AbstractConnection, queue_name: str) -> None:
    """Plain aio-pika consumer code: a long computation, then the ack."""
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.declare_queue(queue_name)
        async with queue.iterator() as messages:
            async for message in messages:
                async with message.process():
                    burn(CPU_SECONDS)
                break
        await channel.declare_queue(queue_name, passive=True)  # one more round trip


def run(connect: Callable[[], Awaitable[Any]], queue: str, out: SimpleQueue[str]) -> None:
    async def main() -> None:
        await consume_one(await connect(), queue)
    try:
        asyncio.run(asyncio.wait_for(main(), CPU_SECONDS + 20))
        out.put("ok")
    except BaseException as exc:
        out.put(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def test_a_coroutine_that_holds_the_loop_keeps_its_channel(pools: Callable[..., Pool]) -> None:
    pool = pools([DEFAULT_URI], heartbeat=HEARTBEAT).start()
    pool.wait_ready()
    queues = {name: f"kzt-aiohb-{name}-{uuid.uuid4().hex[:8]}" for name in ("aio_pika", "kzpool")}
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        for queue in queues.values():
            channel.queue_declare(queue)
            channel.basic_publish("", queue, b"heavy work")
    connects: dict[str, Callable[[], Awaitable[Any]]] = {
        "aio_pika": lambda: aio_pika.connect(
            f"{DEFAULT_URI}?heartbeat={HEARTBEAT}"),
        "kzpool": lambda: kzpool.aio.connect(pool.socket)}
    context = multiprocessing.get_context("fork")
    results = {name: context.SimpleQueue() for name in queues}
    children = [context.Process(target=run, args=(connects[n], queues[n], results[n]))
                for n in queues]
    for child in children:
        child.start()
    for child in children:
        child.join(CPU_SECONDS + 30)
    outcome = {name: q.get() for name, q in results.items()}
    assert outcome["kzpool"] == "ok"
    assert outcome["aio_pika"] != "ok", "aio-pika kept its connection: the case proves nothing"
    # kzpool's ack went through; aio-pika's message came back to its queue
    assert queue_counts(queues["kzpool"]) == (0, 0)
    wait_for(lambda: queue_counts(queues["aio_pika"]) == (1, 0), 10,
             "aio-pika's message back in its queue")
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        for queue in queues.values():
            channel.queue_delete(queue)
