"""kzpool.aio's exclusive queues, as the blocking client's: they go with the connection that
declared them (closed, or its process killed), another connection of the pool gets aio-pika's
``ChannelLockedResource`` (405) for them, and a channel error leaves them as they were.
kzpool.aio names a queue declared without a name itself (as aio-pika's robust channel does),
so these are named queues to the worker.  A real pool; the broker looked at with plain
pika."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Awaitable, Iterator

import aiormq.exceptions
import pytest
from aio_pika import ExchangeType, Message

import kzpool.aio
from kzpool.testing import DEFAULT_URI, Pool, wait_for
from kzpool.testing.amqp import queue_exists

from .test_exclusive import GONE_WITHIN, unroutable


@pytest.fixture(scope="module")
def socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pool = Pool(tmp_path_factory.mktemp("aio-exclusive"), [DEFAULT_URI], prechannels=4).start()
    try:
        pool.wait_ready()
        yield pool.socket
    finally:
        pool.close()


@pytest.fixture
def exchange() -> str:
    return f"kzt-aio-ex-{uuid.uuid4().hex[:10]}"


def run(main: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(main, 60))


async def wait_gone(queue: str) -> None:
    await asyncio.to_thread(wait_for, lambda: not queue_exists(queue), GONE_WITHIN,
                            f"queue {queue} to be deleted")


def test_the_queue_goes_when_its_connection_closes(socket: str, exchange: str) -> None:
    async def main() -> None:
        connection = await kzpool.aio.connect(socket)
        first, second = await connection.channel(), await connection.channel()
        logs = await first.declare_exchange(exchange, ExchangeType.FANOUT)
        queue = await first.declare_queue(exclusive=True)
        await queue.bind(logs)
        await first.close()  # another channel of its connection still has it
        await second.default_exchange.publish(Message(b"kept"), routing_key=queue.name)
        assert await asyncio.to_thread(queue_exists, queue.name)
        await connection.close()
        await wait_gone(queue.name)
        assert await asyncio.to_thread(unroutable, DEFAULT_URI, exchange, 100) == 100
    run(main())


SUBSCRIBER = textwrap.dedent("""
    import asyncio, sys
    from aio_pika import ExchangeType
    import kzpool.aio

    async def main():
        connection = await kzpool.aio.connect()
        channel = await connection.channel()
        logs = await channel.declare_exchange(sys.argv[1], ExchangeType.FANOUT)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(logs)
        print(queue.name, flush=True)
        async with queue.iterator() as messages:
            async for message in messages:
                async with message.process():
                    print(message.body.decode(), flush=True)

    asyncio.run(main())
""")


def test_a_killed_subscribers_queue_goes_and_collects_nothing(socket: str, exchange: str) -> None:
    """aio-pika's tutorial 3 subscriber, on kzpool.aio, killed with SIGKILL."""
    subscriber = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, exchange],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True,
                                  env={**os.environ, "KZPOOL_SOCKET": socket})
    try:
        assert subscriber.stdout is not None
        assert select.select([subscriber.stdout], [], [], 20)[0], "the subscriber's queue"
        queue = subscriber.stdout.readline().strip()
        assert queue_exists(queue), queue
        assert unroutable(DEFAULT_URI, exchange, 1) == 0
        assert subscriber.stdout.readline().strip() == "log 0"
    finally:
        subscriber.kill()
        subscriber.wait(10)
    wait_for(lambda: not queue_exists(queue), GONE_WITHIN, f"queue {queue} to be deleted")
    assert unroutable(DEFAULT_URI, exchange, 100) == 100


def test_another_connection_gets_channel_locked_resource(socket: str) -> None:
    async def main() -> None:
        owner, other = await kzpool.aio.connect(socket), await kzpool.aio.connect_robust(socket)
        mine = await owner.channel()
        queue = await mine.declare_queue(exclusive=True)
        await mine.default_exchange.publish(Message(b"the owner's"), routing_key=queue.name)
        theirs = await other.channel()
        seen = await theirs.get_queue(queue.name, ensure=False)  # not declared: no call

        async def consume() -> None:
            await seen.consume(lambda message: asyncio.sleep(0))

        touches = {
            "passive declare": lambda: theirs.get_queue(queue.name),
            "declare": lambda: theirs.declare_queue(queue.name, exclusive=True),
            "consume": consume,
            "get": lambda: seen.get(fail=False),
            "bind": lambda: seen.bind("amq.fanout"),
            "purge": lambda: seen.purge(),
            "delete": lambda: theirs.queue_delete(queue.name),
        }
        for what, touch in touches.items():
            await theirs.ready()  # a robust channel, back after the last touch's error
            with pytest.raises(aiormq.exceptions.ChannelLockedResource) as info:
                await touch()
            assert info.value.reply_code == 405, what
            assert f"locked queue '{queue.name}' in vhost '/'" in info.value.reply_text, what
        await theirs.ready()
        await theirs.default_exchange.publish(Message(b"a reply"), routing_key=queue.name)
        got = [await queue.get(no_ack=True, timeout=5) for _ in range(2)]
        assert [m.body for m in got] == [b"the owner's", b"a reply"]
        await owner.close()
        await wait_gone(queue.name)
        await other.close()
    run(main())


def test_a_channel_error_leaves_the_queue_as_it_was(socket: str, exchange: str) -> None:
    async def main() -> None:
        async with await kzpool.aio.connect_robust(socket) as connection:
            channel = await connection.channel()
            logs = await channel.declare_exchange(exchange, ExchangeType.FANOUT)
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(logs)
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.get_queue(f"{exchange}-missing")
            await channel.ready()  # a robust channel recovers from the error
            assert await asyncio.to_thread(unroutable, DEFAULT_URI, exchange, 2) == 0
            got = [await queue.get(no_ack=True, timeout=5) for _ in range(2)]
            assert [m.body for m in got] == [b"log 0", b"log 1"]
        await wait_gone(queue.name)
    run(main())
