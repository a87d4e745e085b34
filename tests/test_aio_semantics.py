"""kzpool.aio's plain and robust channels as aio-pika's: ``reopen()``, ``ready()``, close,
reopen and reconnect callbacks, what a channel error does to each kind, returned messages as
aiormq's ``DeliveredMessage``, ``isinstance`` against aio-pika's classes, transactions, the
``all_channels`` warning and ``get_queue``'s objects.  A real pool on the default broker."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import aiormq.abc
import aiormq.exceptions
import pamqp.commands
import pytest
from aio_pika import Message

import kzpool
import kzpool.aio
from kzpool.testing import DEFAULT_URI, Pool, drain, queue_counts

Connect = Callable[..., Awaitable[kzpool.aio.Connection]]
KINDS = {"plain": kzpool.aio.connect, "robust": kzpool.aio.connect_robust}


@pytest.fixture(scope="module")
def socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pool = Pool(tmp_path_factory.mktemp("aio-semantics"), [DEFAULT_URI]).start()
    try:
        pool.wait_ready()
        yield pool.socket
    finally:
        pool.close()


@pytest.fixture
def name() -> str:
    return f"kzt-aio-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=sorted(KINDS))
def connect(request: pytest.FixtureRequest) -> Connect:
    return KINDS[request.param]


def run(main: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(main, 60))


async def until(predicate: Callable[[], Any], what: str, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def on_broker(predicate: Callable[[], Any], what: str, timeout: float = 20) -> None:
    """Until ``predicate`` (which asks the broker, blocking) holds: in a thread."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(predicate):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class Events:
    """Close, reopen and reconnect callbacks as they come: (what, sender, argument)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, Any]] = []
        self.closed_inside: list[bool] = []

    def watch(self, channel: Any) -> None:
        def on_close(sender: Any, exc: Any = None) -> None:
            self.closed_inside.append(sender.is_closed)
            self.seen.append(("close", sender, exc))
        channel.close_callbacks.add(on_close)
        channel.reopen_callbacks.add(lambda *args: self.seen.append(("reopen", *args, None)))

    def kinds(self) -> list[str]:
        return [what for what, _sender, _arg in self.seen]


# ----- reopen(), ready(), reconnect_callbacks ---------------------------------------------------


def test_a_closed_channel_reopens_plain_bare_robust_with_its_topology(
        socket: str, name: str, connect: Connect) -> None:
    got: list[bytes] = []

    async def main() -> None:
        async with await connect(socket) as connection:
            channel = await connection.channel()
            events = Events()
            events.watch(channel)
            queue = await channel.declare_queue(name)
            await queue.consume(lambda m: got.append(m.body), no_ack=True)
            await channel.close()
            assert channel.is_closed and events.kinds() == ["close"]
            assert isinstance(events.seen[0][2], aiormq.exceptions.ChannelClosed)
            with pytest.raises(RuntimeError):
                await channel.initialize()
            with pytest.raises(aio_pika.exceptions.ChannelInvalidStateError):
                await queue.get(fail=False)
            async with await kzpool.aio.connect(socket) as other:
                await (await other.channel()).queue_delete(name)
            await channel.reopen()
            assert not channel.is_closed
            robust = isinstance(channel, kzpool.aio.RobustChannel)
            assert events.kinds() == (["close", "reopen"] if robust else ["close"])
            if robust:  # declared and consumed again, as aio-pika's robust channel does
                await channel.default_exchange.publish(Message(b"again"), name)
                await until(lambda: got == [b"again"], "the consumer replayed")
            else:  # a bare channel: the queue is not declared again
                with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                    await channel.get_queue(name)
                await channel.reopen()
            await channel.default_exchange.publish(Message(b"x"), "nowhere")
            await queue.declare()  # the same queue object works on the reopened channel
            await queue.delete(if_unused=False, if_empty=False)
    run(main())


def test_ready_waits_for_a_robust_channel_and_not_past_its_close(socket: str) -> None:
    async def main() -> None:
        async with await kzpool.aio.connect_robust(socket) as connection:
            channel = await connection.channel()
            await asyncio.wait_for(channel.ready(), 5)
            await channel.close()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(channel.ready(), 0.3)
            assert channel.is_closed
            waiting = asyncio.ensure_future(channel.ready())
            await channel.reopen()
            await asyncio.wait_for(waiting, 5)
            assert not channel.is_closed
        plain = await kzpool.aio.connect(socket)
        assert not hasattr(await plain.channel(), "ready")  # as aio-pika's plain Channel
        await plain.close()
    run(main())


# ----- a channel error --------------------------------------------------------------------------


def test_a_channel_error_closes_a_plain_channel_until_it_is_reopened(
        socket: str, name: str) -> None:
    async def main() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            channel = await connection.channel()
            events = Events()
            events.watch(channel)
            queue = await channel.declare_queue(name, auto_delete=True)
            got: list[bytes] = []
            await queue.consume(lambda m: got.append(m.body), no_ack=True)
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(f"{name}-missing", passive=True)
            with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
                await channel.set_qos(10)  # at once: closed
            await asyncio.wait_for(channel.closed(), 5)
            await until(lambda: events.seen, "the close callbacks")
            [(_what, sender, exc)] = events.seen
            assert sender is channel and isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity)
            assert events.closed_inside == [True] and channel.is_closed
            with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
                await channel.default_exchange.publish(Message(b"no"), name)  # still closed
            await channel.reopen()
            assert not channel.is_closed and events.kinds() == ["close"]  # no reopen callbacks
            await channel.declare_queue(name, auto_delete=True)
            await channel.default_exchange.publish(Message(b"kept"), name)
            await on_broker(lambda: queue_counts(name) == (1, 0), "the message queued")
            assert got == []  # its consumer ended with the closed channel
        assert drain(DEFAULT_URI, name) == [b"kept"]
    run(main())


def test_a_robust_channel_calls_its_close_then_reopen_callbacks_and_recovers(
        socket: str, name: str) -> None:
    async def main() -> None:
        async with await kzpool.aio.connect_robust(socket) as connection:
            channel = await connection.channel()
            events = Events()
            events.watch(channel)
            limited = await channel.declare_queue(name, arguments={"x-max-length": 1})
            got: list[bytes] = []
            await limited.consume(lambda m: got.append(m.body), no_ack=True)
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                await channel.declare_queue(name)  # other arguments: 406
            with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
                await channel.set_qos(10)  # at once: closed, as aio-pika's
            await until(lambda: events.kinds() == ["close", "reopen"], "close, then reopen")
            (_, sender, exc), (_, reopened, _) = events.seen
            assert sender is channel and reopened is channel
            assert isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed)
            assert events.closed_inside == [True]
            await asyncio.wait_for(channel.ready(), 5)
            assert not channel.is_closed
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                await channel.declare_queue(name)  # the first queue was declared again: 406
            await channel.ready()
            await channel.default_exchange.publish(Message(b"back"), name)
            await until(lambda: got == [b"back"], "the consumer replayed")
            await channel.queue_delete(name)
    run(main())


def test_calls_made_while_a_robust_channel_recovers_wait_for_it(socket: str, name: str) -> None:
    async def main() -> None:
        async with await kzpool.aio.connect_robust(socket) as connection:
            channel = await connection.channel()
            closing = asyncio.Event()
            channel.close_callbacks.add(lambda *_: closing.set())
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.get_exchange(f"{name}-missing")
            await closing.wait()  # from here on calls wait for the new channel
            queue = await channel.declare_queue(name, auto_delete=True)
            assert not channel.is_closed
            assert (await channel.default_exchange.publish(Message(b"m"), queue.name)).name \
                == "Basic.Ack"
    run(main())


def test_close_callbacks_that_raise_or_never_return_hold_recovery_up_to_the_timeout(
        socket: str, name: str) -> None:
    async def main() -> None:
        async with await kzpool.aio.connect_robust(socket) as connection:
            channel = await connection.channel(timeout=1.0)
            reopened = asyncio.Event()
            hanging = asyncio.Event()

            def raising(*_: Any) -> None:
                raise RuntimeError("a close callback's own fault")

            async def hang(*_: Any) -> None:
                hanging.set()
                await asyncio.Event().wait()
            channel.close_callbacks.add(raising)
            channel.close_callbacks.add(hang)
            channel.reopen_callbacks.add(lambda *_: reopened.set())
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.get_queue(f"{name}-missing")
            await asyncio.wait_for(hanging.wait(), 5)
            await asyncio.wait_for(reopened.wait(), 10)  # recovered all the same
            assert not channel.is_closed
            await channel.declare_queue(name, auto_delete=True)
    run(main())


def test_a_publish_the_broker_refuses_closes_the_channel_too(
        socket: str, name: str, connect: Connect) -> None:
    async def main() -> None:
        async with await connect(socket) as connection:
            channel = await connection.channel(publisher_confirms=False)
            events = Events()
            events.watch(channel)
            exchange = await channel.get_exchange(f"{name}-gone", ensure=False)
            await exchange.publish(Message(b"to no exchange"), "k")  # no confirm: no error yet
            await until(lambda: events.seen, "the close callbacks")
            assert events.seen[0][2].reply_code == 404
            if isinstance(channel, kzpool.aio.RobustChannel):
                await channel.ready()
                assert not channel.is_closed
            else:
                await channel.closed()
                assert channel.is_closed
    run(main())


# ----- returned messages, isinstance ------------------------------------------------------------


def test_a_returned_publish_is_aiormqs_delivered_message(socket: str, name: str) -> None:
    async def main() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            channel = await connection.channel()
            called: list[Any] = []
            channel.return_callbacks.add(lambda ch, message: called.append((ch, message)))
            back = await channel.default_exchange.publish(
                Message(b"lost", message_id="m-1", headers={"h": "v"}), f"{name}-none")
            assert isinstance(back, aiormq.abc.DeliveredMessage)
            assert isinstance(back.delivery, pamqp.commands.Basic.Return)
            assert (back.body, back.delivery.reply_code, back.routing_key, back.exchange) == (
                b"lost", 312, f"{name}-none", "")
            assert back.header.properties.message_id == "m-1"
            assert back.header.properties.headers == {"h": "v"}
            assert back.header.body_size == 4
            [(sender, returned)] = called
            assert sender is channel and returned.body == b"lost"
            assert isinstance(returned, aio_pika.message.IncomingMessage)
            raising = await connection.channel(on_return_raises=True)
            with pytest.raises(aio_pika.exceptions.PublishError) as info:
                await raising.default_exchange.publish(Message(b"no"), f"{name}-none")
            assert isinstance(info.value.message, aiormq.abc.DeliveredMessage)
            assert info.value.args == ("NO_ROUTE", f"{name}-none")
    run(main())


def test_its_objects_are_instances_of_aio_pikas_classes(
        socket: str, name: str, connect: Connect) -> None:
    async def main() -> None:
        async with await connect(socket) as connection:
            robust = isinstance(connection, kzpool.aio.RobustConnection)
            assert isinstance(connection, aio_pika.Connection)
            assert isinstance(connection, aio_pika.RobustConnection) is robust
            async with connection.channel(publisher_confirms=False) as channel:
                assert isinstance(channel, aio_pika.Channel)
                assert isinstance(channel, aio_pika.abc.AbstractChannel)
                assert isinstance(channel, aio_pika.RobustChannel) is robust
                assert isinstance(channel, aio_pika.abc.AbstractRobustChannel) is robust
                queue = await channel.declare_queue(name, auto_delete=True)
                assert isinstance(queue, aio_pika.Queue)
                assert isinstance(queue, aio_pika.abc.AbstractQueue)
                assert isinstance(queue, aio_pika.RobustQueue) is robust
                exchange = await channel.declare_exchange(f"{name}-x", auto_delete=True)
                assert isinstance(exchange, aio_pika.Exchange)
                assert isinstance(exchange, aio_pika.RobustExchange) is robust
                assert isinstance(channel.transaction(), aio_pika.transaction.Transaction)
                message = Message(b"m")
                await channel.default_exchange.publish(message, name)
                assert isinstance(kzpool.aio.Message(b"own"), aio_pika.Message)
                incoming = await queue.get(timeout=5)
                assert isinstance(incoming, aio_pika.message.IncomingMessage)
                assert isinstance(incoming, aio_pika.abc.AbstractIncomingMessage)
                assert isinstance(incoming.process(), aio_pika.message.ProcessContext)
                await incoming.ack()
                assert isinstance(queue.iterator(), aio_pika.queue.QueueIterator)
                await exchange.delete()
            assert channel.is_closed
    run(main())


# ----- transactions -----------------------------------------------------------------------------


def test_transactions_commit_and_roll_back_as_aio_pikas(
        socket: str, name: str, connect: Connect) -> None:
    async def main() -> None:
        async with await connect(socket) as connection:
            with pytest.raises(RuntimeError, match="publisher confirms"):
                (await connection.channel()).transaction()
            channel = await connection.channel(publisher_confirms=False)
            queue = await channel.declare_queue(name, auto_delete=True)
            tx = channel.transaction()
            assert str(tx) == "created" and tx.state == aio_pika.abc.TransactionState.CREATED
            assert isinstance(await tx.select(), pamqp.commands.Tx.SelectOk)
            await channel.default_exchange.publish(Message(b"rolled back"), name)
            assert isinstance(await tx.rollback(), pamqp.commands.Tx.RollbackOk)
            assert tx.state == aio_pika.abc.TransactionState.ROLLED_BACK
            await channel.default_exchange.publish(Message(b"committed"), name)
            assert isinstance(await tx.commit(), pamqp.commands.Tx.CommitOk)
            assert tx.state == aio_pika.abc.TransactionState.COMMITED
            with pytest.raises(ValueError):
                async with channel.transaction():
                    await channel.default_exchange.publish(Message(b"raised"), name)
                    raise ValueError("rolled back on the way out")
            async with channel.transaction():
                await channel.default_exchange.publish(Message(b"with"), name)
            await on_broker(lambda: queue_counts(name) == (2, 0), "two committed")
            got = [(await queue.get(no_ack=True)).body for _ in range(2)]
            assert got == [b"committed", b"with"]
    run(main())


# ----- set_qos(all_channels=...), get_queue and get_exchange ----------------------------------


def test_set_qos_all_channels_warns(socket: str, connect: Connect) -> None:
    async def main() -> None:
        async with await connect(socket) as connection:
            channel = await connection.channel()
            with pytest.deprecated_call(match="global_"):
                await channel.set_qos(prefetch_count=1, all_channels=True)
            assert isinstance(await channel.set_qos(prefetch_count=2, global_=True),
                              pamqp.commands.Basic.QosOk)
    run(main())


def test_get_queue_and_get_exchange(socket: str, name: str, connect: Connect) -> None:
    async def main() -> None:
        async with await connect(socket) as connection:
            channel = await connection.channel()
            robust = isinstance(channel, kzpool.aio.RobustChannel)
            queue = await channel.declare_queue(name, auto_delete=True)
            exchange = await channel.declare_exchange(f"{name}-x", auto_delete=True)
            for _ in range(2):
                got, got_x = await channel.get_queue(name), await channel.get_exchange(f"{name}-x")
                assert (got is queue, got_x is exchange) == (robust, robust)
                assert (got.name, got_x.name) == (queue.name, exchange.name)
            assert (await channel.declare_queue(name, passive=True) is queue) is robust
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.get_queue(f"{name}-missing")  # a passive declare on the broker
            if robust:
                await channel.ready()
            else:
                await channel.reopen()
            await channel.exchange_delete(f"{name}-x")
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.get_exchange(f"{name}-x")  # forgotten with the delete
    run(main())


# ----- a move -----------------------------------------------------------------------------------


def test_a_move_calls_reopen_then_reconnect_callbacks_and_closes_nothing(
        pools: Callable[..., Pool], name: str, connect: Connect) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    got: list[bytes] = []

    async def main() -> None:
        async with await connect(pool.socket) as connection:
            events = Events()
            connection.reconnect_callbacks.add(
                lambda sender: events.seen.append(("reconnect", sender, None)))
            channel = await connection.channel()
            events.watch(channel)
            queue = await channel.declare_queue(name, auto_delete=True)
            await queue.consume(lambda m: got.append(m.body), no_ack=True)
            os.kill(pool.connections()[0]["pid"], signal.SIGKILL)  # its worker: a move
            await until(lambda: events.kinds() == ["reopen", "reconnect"], "the move", 30)
            assert events.seen[0][1] is channel and events.seen[1][1] is connection
            await channel.default_exchange.publish(Message(b"after"), name)
            await until(lambda: got == [b"after"], "the consumer, moved")
            assert not channel.is_closed
    run(main())
