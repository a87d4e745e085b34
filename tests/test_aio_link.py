"""An asyncio channel against a scripted worker over socket pairs (tests/fakes.py): delivery
tags across a move, publishes sent again and renumbered, a channel error, recovery with
nobody calling.  No broker, no pool: the link's decisions alone."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq.exceptions
import pytest

import kzpool.aio
import kzpool.lease.state
from kzpool.common import messages, wire
from kzpool.common.messages import Reason
from kzpool.common.wire import Flag, Kind

from .fakes import FakeBackend, FakeWorker

LOST = Reason("ConnectionClosed", 0, "broker gone")


def script(item: Any, worker: FakeWorker) -> None:
    """A worker that binds every lease and answers every call as a broker would."""
    match item:
        case messages.LeaseRequest():
            worker.send(messages.Leased(item.lease or "L1", "amqp://guest:***@fake/", "local",
                                        channel=1, worker=1))
        case messages.Call(method="queue_declare"):
            worker.send(messages.Reply(item.id, "Queue.DeclareOk", {
                "queue": item.args["queue"], "message_count": 0, "consumer_count": 0}))
        case messages.Call(method="queue_bind", args={"exchange": "missing"}):
            pass  # the broker will close the channel instead
        case messages.Call(method=method):
            worker.send(messages.Reply(item.id, {
                "basic_qos": "Basic.QosOk", "tx_select": "Tx.SelectOk",
                "tx_commit": "Tx.CommitOk", "tx_rollback": "Tx.RollbackOk"}.get(
                    method, "Queue.BindOk")))
        case messages.Consume():
            worker.send(messages.Reply(item.id, "Basic.ConsumeOk", {
                "consumer_tag": item.args["consumer_tag"]}))
        case messages.ConfirmSelect():
            worker.send(messages.Reply(item.id, "Confirm.SelectOk"))


class AsyncBackend:
    """The fake backend's socket pairs, for the event loop."""

    def __init__(self, fake: FakeBackend) -> None:
        self.fake = fake

    async def connect(self, path: str) -> socket.socket:
        sock = self.fake.connect(path)
        sock.setblocking(False)
        return sock


async def open_channel(fake: FakeBackend, robust: bool = True,
                       **kwargs: Any) -> kzpool.aio.Channel:
    client = kzpool.aio.pool.PoolClient("/fake/kz.sock", AsyncBackend(fake))
    cls = kzpool.aio.RobustChannel if robust else kzpool.aio.Channel
    channel = cls(client, **kwargs)
    await channel.initialize()
    return channel


def received(worker: FakeWorker, kind: type | Kind) -> list[Any]:
    if isinstance(kind, Kind):
        return [f for f in worker.received if isinstance(f, tuple) and f[0] == kind]
    return [m for m in worker.received if isinstance(m, kind)]


async def until(predicate: Callable[[], Any], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.005)


def lose(worker: FakeWorker, reason: Reason = LOST) -> None:
    worker.send(messages.Lost(reason))
    worker.close()


def run(main: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(main, 20))


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend(script)


def test_tags_stay_unique_across_a_move_and_old_ones_are_dropped(fake: FakeBackend) -> None:
    async def main() -> None:
        moves: list[kzpool.MoveEvent] = []
        channel = await open_channel(fake, publisher_confirms=False, on_move=moves.append)
        queue = await channel.declare_queue("q")
        got: list[Any] = []

        async def on_message(message: Any) -> None:
            got.append(message)

        tag = await queue.consume(on_message)
        first = fake.workers[0]
        for n in (1, 2):
            first.send(wire.deliver(n, 0, tag, wire.names("", "q"), b"", b"old %d" % n, 0))
        await until(lambda: len(got) == 2, "two deliveries")
        await got[0].ack()
        await until(lambda: received(first, Kind.SETTLE), "the first ack")
        lose(first)
        await until(lambda: len(fake.workers) == 2 and received(fake.workers[1],
                                                               messages.Consume), "a replay")
        second = fake.workers[1]
        assert received(second, messages.LeaseRequest)[0].lease == "L1"  # resumed
        assert received(second, messages.Consume)[0].args["consumer_tag"] == tag  # same tag
        await until(lambda: moves, "the move reported")
        second.send(wire.deliver(1, 0, tag, wire.names("", "q"), b"", b"new 1",
                                 Flag.REDELIVERED))
        await until(lambda: len(got) == 3, "a delivery on the new channel")
        assert [m.delivery_tag for m in got] == [1, 2, 3]
        await got[1].ack()  # of the lost channel: dropped, never applied to "new 1"
        await got[2].ack()
        await until(lambda: received(second, Kind.SETTLE), "the new ack")
        await asyncio.sleep(0.05)
        assert [wire.read_tag(f[2]) for f in received(second, Kind.SETTLE)] == [1]
        assert [wire.read_tag(f[2]) for f in received(first, Kind.SETTLE)] == [1]
        await channel.close()
    run(main())


def test_unconfirmed_publishes_are_sent_again_renumbered(fake: FakeBackend) -> None:
    async def main() -> None:
        channel = await open_channel(fake)
        exchange = channel.default_exchange
        publishes = [asyncio.create_task(exchange.publish(kzpool.aio.Message(b"%d" % n), "q"))
                     for n in range(3)]
        first = fake.workers[0]
        await until(lambda: len(received(first, Kind.PUBLISH)) == 3, "three publishes")
        first.send(wire.tagged(Kind.CONFIRM, 1, 0))
        await until(lambda: publishes[0].done(), "the first confirm")
        lose(first)
        await until(lambda: len(fake.workers) == 2 and len(
            received(fake.workers[1], Kind.PUBLISH)) == 2, "the other two sent again")
        second = fake.workers[1]
        assert [wire.read_publish(f[2])[3] for f in received(second, Kind.PUBLISH)] == [
            b"1", b"2"]
        assert received(second, messages.ConfirmSelect)  # confirm mode replayed first
        second.send(wire.tagged(Kind.CONFIRM, 1, 0))  # the new channel's numbers
        second.send(wire.tagged(Kind.CONFIRM, 2, Flag.NACK))
        assert (await publishes[1]).name == "Basic.Ack"
        with pytest.raises(aiormq.exceptions.DeliveryError) as info:
            await publishes[2]
        assert info.value.frame.name == "Basic.Nack"
        await channel.close()
    run(main())


def test_a_consumer_the_broker_cancelled_is_not_replayed_after_a_move(
        fake: FakeBackend) -> None:
    async def main() -> None:
        moves: list[kzpool.MoveEvent] = []
        channel = await open_channel(fake, publisher_confirms=False, on_move=moves.append)
        queue = await channel.declare_queue("q")
        kept = await queue.consume(lambda message: None)
        gone = await (await channel.declare_queue("deleted")).consume(lambda message: None)
        fake.workers[0].send(messages.Cancelled(gone))  # the broker's: its queue was deleted
        lose(fake.workers[0])
        await until(lambda: moves, "the move reported, once the topology is replayed")
        assert len(received(fake.workers[1], messages.Call)) == 2  # both queues declared
        assert [m.args["consumer_tag"] for m in received(fake.workers[1],
                                                         messages.Consume)] == [kept]
        await channel.close()
    run(main())


def test_a_channel_error_fails_its_call_and_the_channel_replays_alone(
        fake: FakeBackend) -> None:
    async def main() -> None:
        channel = await open_channel(fake, publisher_confirms=False)
        await channel.set_qos(prefetch_count=7)
        queue = await channel.declare_queue("q")
        first = fake.workers[0]
        binding = asyncio.create_task(queue.bind("missing"))
        await until(lambda: any(isinstance(m, messages.Call) and m.method == "queue_bind"
                                for m in first.received), "the bind sent")
        lose(first, Reason("ChannelClosedByBroker", 404, "NOT_FOUND - no exchange"))
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity, match="no exchange"):
            await binding
        await until(lambda: len(fake.workers) == 2 and len(fake.workers[1].received) >= 3,
                    "a new channel, with nobody calling")
        replayed = [(m.method, m.args) for m in fake.workers[1].received
                    if isinstance(m, messages.Call)]
        assert replayed == [("basic_qos", {"prefetch_count": 7, "prefetch_size": 0,
                                           "global_qos": False}),
                            ("queue_declare", {"queue": "q", "passive": False,
                                               "durable": False, "exclusive": False,
                                               "auto_delete": False, "arguments": None})]
        await channel.close()
        assert channel.is_closed
        with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
            await channel.set_qos(prefetch_count=1)
    run(main())


def test_a_transaction_cut_by_a_move_is_lost_at_commit(fake: FakeBackend) -> None:
    async def main() -> None:
        channel = await open_channel(fake, publisher_confirms=False)
        tx = channel.transaction()
        await tx.select()
        await channel.default_exchange.publish(kzpool.aio.Message(b"m"), "q")
        await until(lambda: received(fake.workers[0], Kind.PUBLISH), "the publish")
        lose(fake.workers[0])
        await until(lambda: len(fake.workers) == 2, "a new channel")
        await channel.ready()
        with pytest.raises(kzpool.TransactionLost):
            await tx.commit()  # after the move: rolled back on the new channel, then raised
        calls = [m.method for m in fake.workers[1].received if isinstance(m, messages.Call)]
        assert calls == ["tx_select", "tx_rollback"]  # transaction mode replayed
        await channel.default_exchange.publish(kzpool.aio.Message(b"again"), "q")
        await tx.commit()
        assert fake.workers[1].received[-1].method == "tx_commit"
        await channel.close()
    run(main())


def test_closing_the_channel_ends_the_calls_in_flight(fake: FakeBackend) -> None:
    async def main() -> None:
        channel = await open_channel(fake, publisher_confirms=False)
        queue = await channel.declare_queue("q")
        waiting = asyncio.create_task(queue.bind("missing"))  # the worker never answers
        await until(lambda: any(isinstance(m, messages.Call) and m.method == "queue_bind"
                                for m in fake.workers[0].received), "the bind sent")
        await channel.close()
        with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
            await waiting
        await until(lambda: received(fake.workers[0], messages.Close), "the lease given back")
    run(main())


def test_a_channel_waits_for_a_pool_that_went_away_and_says_it_restarted(
        fake: FakeBackend) -> None:
    async def main() -> None:
        moves: list[kzpool.MoveEvent] = []
        channel = await open_channel(fake, on_move=moves.append)
        publish = asyncio.create_task(channel.default_exchange.publish(
            kzpool.aio.Message(b"m"), "q"))
        first = fake.workers[0]
        await until(lambda: received(first, Kind.PUBLISH), "the publish")
        fake.refuse = 3  # the pool's socket refuses connects while it restarts
        lose(first)
        await until(lambda: len(fake.workers) == 2 and received(fake.workers[1], Kind.PUBLISH),
                    "the publish sent again on the new pool")
        assert fake.refused == 3 and not publish.done()
        assert received(fake.workers[1], messages.LeaseRequest)[0].lease == "L1"
        fake.workers[1].send(wire.tagged(Kind.CONFIRM, 1, 0))
        assert (await publish).name == "Basic.Ack"  # no exception on the way
        await until(lambda: moves, "the move reported")
        assert [m.reason for m in moves] == [kzpool.lease.state.POOL_RESTARTED]
        await channel.close()
    run(main())


def test_a_first_channel_does_not_wait_for_a_pool(fake: FakeBackend) -> None:
    async def main() -> None:
        fake.refuse = 1
        with pytest.raises(kzpool.PoolNotRunning, match="connection refused"):
            await open_channel(fake, timeout=3600)
        assert fake.refused == 1 and not fake.workers
    run(main())
