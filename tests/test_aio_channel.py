"""kzpool.aio behaves as aio-pika does where aio-pika code looks: results, errors, settling,
the queue iterator, and channel errors (after which a robust channel recovers, as aio-pika's
does).  A real pool on the default broker; names of their own."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any

import aio_pika
import aiormq.exceptions
import pamqp.commands
import pytest
from aio_pika import Message
from aio_pika.patterns import RPC, Master

import kzpool
import kzpool.aio
from kzpool.testing import DEFAULT_URI, Pool, drain, queue_counts


@pytest.fixture(scope="module")
def socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pool = Pool(tmp_path_factory.mktemp("aio-channel"), [DEFAULT_URI]).start()
    try:
        pool.wait_ready()
        yield pool.socket
    finally:
        pool.close()


@pytest.fixture
def name() -> str:
    return f"kzt-aio-{uuid.uuid4().hex[:10]}"


def run(main: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(main, 60))


def test_publish_returns_what_aio_pika_returns(socket: str, name: str) -> None:
    returned: list[Any] = []

    async def main() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            channel = await connection.channel()
            channel.return_callbacks.add(lambda ch, message: returned.append(message))
            queue = await channel.declare_queue(name, auto_delete=True)
            exchange = channel.default_exchange
            ack = await exchange.publish(Message(b"routed"), routing_key=queue.name)
            assert isinstance(ack, pamqp.commands.Basic.Ack)
            back = await exchange.publish(Message(b"lost"), routing_key=f"{name}-none")
            assert not isinstance(back, pamqp.commands.Basic.Ack)
            assert back.body == b"lost" and back.delivery.reply_code == 312
            assert isinstance(await exchange.publish(Message(b"x"), f"{name}-none",
                                                     mandatory=False), pamqp.commands.Basic.Ack)
            raising = await connection.channel(on_return_raises=True)
            with pytest.raises(aiormq.exceptions.DeliveryError) as info:
                await raising.default_exchange.publish(Message(b"no"), f"{name}-none")
            assert isinstance(info.value, aio_pika.exceptions.PublishError)
            assert info.value.frame.reply_text == "NO_ROUTE"
            plain = await connection.channel(publisher_confirms=False)
            assert await plain.default_exchange.publish(Message(b"p"), queue.name) is None
            with pytest.raises(RuntimeError):
                connection.channel(publisher_confirms=False, on_return_raises=True)
            with pytest.raises(ValueError, match="too long"):
                await exchange.publish(Message(b"k"), "k" * 256)
            assert [m.body for m in returned] == [b"lost"]  # callbacks: confirms, not raising
            await aio_pika_waits_for(lambda: queue_counts(name) == (2, 0))
            await queue.delete(if_unused=False, if_empty=False)
    run(main())


async def aio_pika_waits_for(predicate: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(predicate):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


def test_get_and_the_rules_of_settling(socket: str, name: str) -> None:
    async def main() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(name, auto_delete=True)
            with pytest.raises(aio_pika.exceptions.QueueEmpty):
                await queue.get()
            assert await queue.get(fail=False) is None
            for body in (b"ack", b"drop", b"again", b"twice"):
                await channel.default_exchange.publish(Message(body, correlation_id=7), name)
            message = await queue.get()
            assert (message.body, message.correlation_id, message.message_count) == (
                b"ack", "7", 3)
            async with message.process():
                pass  # acked on the way out
            message = await queue.get()
            with pytest.raises(ZeroDivisionError):
                async with message.process():
                    1 / 0  # noqa: B018  (rejected, not requeued: aio-pika's default)
            message = await queue.get()
            with pytest.raises(KeyError):
                async with message.process(requeue=True):
                    raise KeyError("requeued")
            again = await queue.get()
            assert again.body == b"again" and again.redelivered
            await again.ack()
            with pytest.raises(aio_pika.exceptions.MessageProcessError):
                await again.ack()
            message = await queue.get()
            with pytest.raises(aio_pika.exceptions.MessageProcessError):
                async with message.process():
                    await message.nack(requeue=True)
            message = await queue.get()
            async with message.process(ignore_processed=True):
                await message.reject()
            await channel.default_exchange.publish(Message(b"auto"), name)
            auto = await queue.get(no_ack=True)
            with pytest.raises(TypeError):
                await auto.ack()
            assert await queue.get(fail=False) is None  # everything settled
    run(main())


def test_the_iterator_gives_back_what_it_buffered(socket: str, name: str) -> None:
    async def main() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=5)
            queue = await channel.declare_queue(name)
            for i in range(5):
                await channel.default_exchange.publish(Message(b"%d" % i), name)
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    break
            await aio_pika_waits_for(lambda: queue_counts(name) == (4, 0))
            await queue.purge()
            waiting = queue.iterator(timeout=0.2)
            with pytest.raises(TimeoutError):
                await waiting.__anext__()
            with pytest.raises(StopAsyncIteration):
                await waiting.__anext__()
            await queue.delete()  # aio-pika's defaults: only if unused and empty
    run(main())


def test_a_queue_deleted_under_its_consumers_ends_them(socket: str, name: str) -> None:
    """The broker's cancel: the iterator ends after what it buffered, a callback consumer
    gets no more, and the channel goes on (aio-pika's plain channel only logs it)."""
    called: list[bytes] = []

    async def main() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=5)
            queue = await channel.declare_queue(name)
            other = await channel.declare_queue(f"{name}-cb", auto_delete=True)
            await other.consume(lambda message: called.append(message.body), no_ack=True)
            await channel.default_exchange.publish(Message(b"kept"), name)
            got = []
            async with queue.iterator() as messages:
                async for message in messages:
                    got.append(message.body)
                    await message.ack()
                    async with await kzpool.aio.connect(socket) as deleting:
                        await (await deleting.channel()).queue_delete(name)
                        await (await deleting.channel()).queue_delete(f"{name}-cb")
            assert got == [b"kept"]
            await channel.declare_queue(f"{name}-cb", auto_delete=True)
            await channel.default_exchange.publish(Message(b"late"), f"{name}-cb")
            late = await channel.get_queue(f"{name}-cb")
            assert (await late.get(no_ack=True)).body == b"late"  # not the old consumer's
            assert called == []
            await late.delete()
    run(main())


def test_a_channel_error_raises_then_a_robust_channel_recovers(socket: str, name: str) -> None:
    got: list[bytes] = []

    async def main() -> None:
        async with await kzpool.aio.connect_robust(socket) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(name, auto_delete=True)

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    got.append(message.body)

            await queue.consume(on_message)
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity) as info:
                await channel.declare_queue(f"{name}-missing", passive=True)
            assert isinstance(info.value, kzpool.KzpoolError) and info.value.reply_code == 404
            await channel.ready()
            await channel.default_exchange.publish(Message(b"after"), name)  # confirmed
            for _ in range(500):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [b"after"]  # the consumer came back on the new channel
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                await queue.delete()  # in use: 406, as aio-pika's default
            assert channel.is_closed  # until it has recovered
            await channel.ready()
            assert not channel.is_closed
    run(main())


def test_closed_channels_and_connections(socket: str, name: str) -> None:
    async def main() -> None:
        connection = await kzpool.aio.connect(socket)
        assert isinstance(connection, aio_pika.abc.AbstractConnection)
        assert not isinstance(connection, aio_pika.abc.AbstractRobustConnection)
        unopened = connection.channel()
        assert unopened.is_closed and not unopened.is_initialized
        channel = await connection.channel()
        assert isinstance(channel, aio_pika.abc.AbstractChannel) and not channel.is_closed
        queue = await channel.declare_queue(name, auto_delete=True)
        assert (queue.declaration_result.message_count,
                queue.declaration_result.consumer_count) == (0, 0)

        consuming = asyncio.Event()

        async def loop() -> int:
            count = 0
            async with queue.iterator() as messages:
                consuming.set()
                async for _message in messages:
                    count += 1
            return count
        looping = asyncio.create_task(loop())
        await consuming.wait()
        await connection.close()
        assert await looping == 0  # closing the connection ends the loop
        assert channel.is_closed and connection.is_closed
        with pytest.raises(aio_pika.exceptions.ChannelInvalidStateError):
            await channel.default_exchange.publish(Message(b"x"), name)
        with pytest.raises(RuntimeError):
            connection.channel()
        await connection.close()  # again: nothing
    run(main())


def test_connect_says_what_is_wrong(tmp_path: Any) -> None:
    async def main() -> None:
        with pytest.raises(kzpool.PoolNotRunning, match="no such socket"):
            await kzpool.aio.connect(str(tmp_path / "none.sock"))
        with pytest.raises(kzpool.LeaseRequestError, match="socket path, not a broker URL"):
            await kzpool.aio.connect("amqp://guest:guest@localhost/")
    run(main())
    with pytest.raises(ValueError, match="sticky lease needs a broker"):
        kzpool.aio.Channel(kzpool.aio.pool.PoolClient("/x"), kind="sticky")


def test_closing_a_channel_gives_back_what_it_had_not_acked(socket: str, name: str) -> None:
    """Closing a channel gives back what it had not acked (the worker closes the channel)."""
    async def main() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            channel = await connection.channel()
            await channel.declare_queue(name)
            await channel.default_exchange.publish(Message(b"unacked"), name)
            queue = await channel.get_queue(name)
            message = await queue.get()
            assert message.body == b"unacked"
            await channel.close()
        await aio_pika_waits_for(lambda: queue_counts(name) == (1, 0))
    run(main())
    assert drain(DEFAULT_URI, name) == [b"unacked"]


def test_close_returns_once_the_broker_requeued_what_was_delivered(socket: str,
                                                                    name: str) -> None:
    """``await channel.close()``, in the consumer's callback too, returns after the broker's
    CloseOk: a ``get`` on another channel right after finds the messages, many times over."""
    async def main() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            check = await connection.channel()
            checked = await check.declare_queue(name)
            for round_ in range(60):
                channel = await connection.channel()
                for body in (b"1", b"2"):
                    await channel.default_exchange.publish(Message(body), name)
                queue = await channel.get_queue(name)
                closed = asyncio.Event()

                async def on_message(_message: Any, channel: Any = channel,
                                     closed: asyncio.Event = closed) -> None:
                    await channel.close()
                    closed.set()
                await queue.consume(on_message)
                await asyncio.wait_for(closed.wait(), 10)
                got = [await checked.get(no_ack=True, fail=False) for _ in range(3)]
                bodies = [m.body if m is not None else None for m in got]
                assert bodies == [b"1", b"2", None], f"round {round_}: {bodies}"
            await checked.delete()
    run(main())


def test_exchange_to_exchange_bindings_route(socket: str, name: str) -> None:
    async def main() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            channel = await connection.channel()
            source = await channel.declare_exchange(f"{name}-src", aio_pika.ExchangeType.TOPIC)
            destination = await channel.declare_exchange(f"{name}-dst", "fanout",
                                                         auto_delete=True)
            await destination.bind(source, "a.*")  # the destination binds to its source
            queue = await channel.declare_queue(name, auto_delete=True)
            await queue.bind(destination)
            await source.publish(Message(b"routed"), routing_key="a.b")
            back = await source.publish(Message(b"not"), routing_key="b.c")
            assert back.body == b"not"  # no binding matched: returned
            assert (await queue.get()).body == b"routed"
            await destination.unbind(source, "a.*")
            assert (await source.publish(Message(b"gone"), "a.b")).body == b"gone"
            await queue.delete(if_unused=False, if_empty=False)
            await destination.delete()
            await source.delete()
    run(main())


WITHOUT_AIO_PIKA = """
import asyncio, sys

class NoAioPika:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("aio_pika", "aiormq", "pamqp"):
            raise ImportError(f"no {name} here")

sys.meta_path.insert(0, NoAioPika())
import kzpool.aio
from kzpool.aio import ExchangeType, Message

async def main(socket, name):
    async with await kzpool.aio.connect(socket) as connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(name, ExchangeType.FANOUT, auto_delete=True)
        queue = await channel.declare_queue(name, auto_delete=True)
        await queue.bind(exchange)
        ack = await exchange.publish(Message(b"own", correlation_id=5), routing_key="")
        message = await queue.get()
        await message.ack()
        try:
            await queue.get()
        except kzpool.aio.QueueEmpty as exc:
            empty = isinstance(exc, asyncio.QueueEmpty)
        back = await channel.default_exchange.publish(Message(b"back"), f"{name}-none")
        robust = await kzpool.aio.connect_robust(socket)
        tx = (await robust.channel(publisher_confirms=False)).transaction()
        async with tx:
            pass
        await robust.close()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("aio_pika", "aiormq"))
        print(ack.name, message.body.decode(), message.correlation_id, empty, loaded,
              type(back).__name__, tx, kzpool.aio.Queue.__mro__[1].__name__)

asyncio.run(main(*sys.argv[1:]))
"""


def test_without_aio_pika_its_own_message_and_exchange_type_work(socket: str, name: str) -> None:
    done = subprocess.run([sys.executable, "-c", WITHOUT_AIO_PIKA, socket, name],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Basic.Ack", "own", "5", "True", "[]", "DeliveredMessage",
                                   "commited", "object"]


def test_aio_pikas_rpc_and_master_patterns_run_on_it(socket: str, name: str) -> None:
    done: list[int] = []

    async def multiply(*, x: int, y: int) -> int:
        return x * y

    async def task(*, number: int) -> None:
        done.append(number)

    async def main() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            channel = await connection.channel()
            rpc = await RPC.create(channel)
            await rpc.register(f"{name}-multiply", multiply, auto_delete=True)
            assert await rpc.call(f"{name}-multiply", kwargs={"x": 6, "y": 7}) == 42
            await rpc.close()
            master = Master(channel)
            worker = await master.create_worker(f"{name}-tasks", task, auto_delete=True)
            for number in range(5):
                await master.create_task(f"{name}-tasks", kwargs={"number": number})
            await aio_pika_waits_for(lambda: len(done) == 5)
            await worker.close()
    run(main())
    assert sorted(done) == [0, 1, 2, 3, 4]
