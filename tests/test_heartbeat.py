"""The reason kzpool exists: a CPU-heavy callback starves pika's heartbeats, not a lease's.

The same consumer code runs twice, side by side in two processes: once on a direct pika
channel, once on a lease.  Only how it gets its channel differs.
"""

from __future__ import annotations

import multiprocessing
import traceback
import uuid
from collections.abc import Callable
from multiprocessing.queues import SimpleQueue
from typing import Any

import pika

import kzpool
from kzpool.testing import DEFAULT_URI, Pool
from tests.handlers import CPU_SECONDS, HEARTBEAT, burn


def consume_one(channel: Any, queue: str) -> None:
    """A plain pika consumer: its callback works for a long time, then acks."""
    def on_message(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
        burn(CPU_SECONDS)
        ch.basic_ack(method.delivery_tag)
        ch.stop_consuming()
    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue, on_message)
    channel.start_consuming()
    channel.queue_declare(queue, passive=True)  # one more round trip after the ack


def run(get_channel: Callable[[], Any], queue: str, out: SimpleQueue[str]) -> None:
    try:
        consume_one(get_channel(), queue)
        out.put("ok")
    except Exception as exc:
        out.put(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def direct_pika() -> Any:
    params = pika.URLParameters(DEFAULT_URI)
    params.heartbeat = HEARTBEAT
    return pika.BlockingConnection(params).channel()


def test_a_cpu_heavy_callback_keeps_its_lease(pools: Callable[..., Pool]) -> None:
    pool = pools([DEFAULT_URI], heartbeat=HEARTBEAT).start()
    pool.wait_ready()
    queues = {name: f"kzt-hb-{name}-{uuid.uuid4().hex[:8]}" for name in ("pika", "kzpool")}
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        for queue in queues.values():
            channel.queue_declare(queue)
            channel.basic_publish("", queue, b"heavy work")
    context = multiprocessing.get_context("fork")
    results = {name: context.SimpleQueue() for name in queues}
    getters = {"pika": direct_pika,
               "kzpool": lambda: kzpool.connect(pool.socket).lease("float")}
    children = [context.Process(target=run, args=(getters[n], queues[n], results[n]))
                for n in queues]
    for child in children:
        child.start()
    for child in children:
        child.join(CPU_SECONDS + 30)
    outcome = {name: q.get() for name, q in results.items()}
    assert outcome["kzpool"] == "ok"
    assert outcome["pika"] != "ok", "direct pika kept its connection: the case proves nothing"
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        # the lease's ack went through: its message is gone; pika's came back to the queue
        assert channel.queue_declare(queues["kzpool"], passive=True).method.message_count == 0
        for queue in queues.values():
            channel.queue_delete(queue)
