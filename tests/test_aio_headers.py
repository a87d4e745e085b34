"""Header values keep their types through the pool: a message aio-pika publishes with a
float header reaches a kzpool.aio consumer with that float (the worker passes a delivery's
properties through as bytes, and kzpool.aio reads them with aio-pika's own decoder)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

import kzpool.aio
from kzpool.testing import DEFAULT_URI, Pool


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    pool = Pool(tmp_path, [DEFAULT_URI]).start()
    try:
        pool.wait_ready()
        yield pool
    finally:
        pool.close()


def test_a_float_header_arrives_as_a_float(pool: Pool) -> None:
    queue_name = f"kzt-aio-h-{uuid.uuid4().hex[:8]}"
    headers = {"ratio": 1.5, "count": 3, "name": "x", "nested": {"f": 0.25}}

    async def main() -> dict[str, object]:
        plain = await aio_pika.connect(DEFAULT_URI)
        async with plain:
            channel = await plain.channel()
            await channel.declare_queue(queue_name, auto_delete=False)
            await channel.default_exchange.publish(aio_pika.Message(b"x", headers=headers),
                                                   routing_key=queue_name)
        async with await kzpool.aio.connect(pool.socket) as connection:
            queue = await (await connection.channel()).get_queue(queue_name)
            try:
                async with queue.iterator() as messages:
                    async for message in messages:
                        await message.ack()
                        return dict(message.headers)
            finally:
                await queue.delete(if_unused=False, if_empty=False)
        raise AssertionError("no message")

    got = asyncio.run(asyncio.wait_for(main(), 30))
    assert got == headers and isinstance(got["ratio"], float)
