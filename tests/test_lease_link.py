"""A lease against a scripted worker over a socket pair: delivery tags across a move,
confirm bookkeeping, topology replay.  No broker, no pool (tests/fakes.py)."""

from __future__ import annotations

from typing import Any

import pika.exceptions
import pytest

from kzpool.client.confirms import ConfirmBook
from kzpool.client.pool import PoolClient
from kzpool.client.tags import TagMap
from kzpool.common import messages, wire
from kzpool.common.messages import Reason
from kzpool.common.wire import Flag, Kind

from .fakes import FakeBackend, FakeWorker

REPLIES = {"queue_declare": "Queue.DeclareOk", "basic_qos": "Basic.QosOk",
           "queue_bind": "Queue.BindOk", "exchange_declare": "Exchange.DeclareOk"}


def broker(item: Any, worker: FakeWorker) -> None:
    """A worker that binds every lease request and answers every call as a broker would."""
    match item:
        case messages.LeaseRequest():
            worker.send(messages.Leased(item.lease or "L1", "amqp://guest:***@fake/", "local",
                                        channel=1, worker=1))
        case messages.Call(method="queue_declare"):
            name = item.args["queue"] or f"amq.gen-{id(worker)}"
            worker.send(messages.Reply(item.id, "Queue.DeclareOk", {
                "queue": name, "message_count": 0, "consumer_count": 0}))
        case messages.Call(method=method):
            worker.send(messages.Reply(item.id, REPLIES.get(method, "Basic.QosOk")))
        case messages.Consume():
            worker.send(messages.Reply(item.id, "Basic.ConsumeOk", {
                "consumer_tag": item.args.get("consumer_tag") or "ctag-1"}))
        case messages.ConfirmSelect():
            worker.send(messages.Reply(item.id, "Confirm.SelectOk"))


def deliver(worker: FakeWorker, tag: int, body: bytes) -> None:
    worker.send(wire.deliver(tag, 0, "ctag-1", "", "q", b"", body, 0))


def lose(worker: FakeWorker) -> None:
    worker.send(messages.Lost(Reason("ConnectionClosed", 0, "broker gone")))
    worker.close()


def frames(worker: FakeWorker, kind: Kind) -> list[tuple[int, int, bytes]]:
    return [f for f in worker.received if isinstance(f, tuple) and f[0] == kind]


def wait(predicate: Any, what: str) -> None:
    import time

    deadline = time.monotonic() + 5
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(broker)


def test_delivery_tags_stay_unique_across_a_move_and_old_ones_are_dropped(
        backend: FakeBackend) -> None:
    moves = []
    lease = PoolClient("/fake/kz.sock", backend).lease("float", on_move=moves.append)
    lease.queue_declare("q")
    stream = lease.consume("q", inactivity_timeout=2)
    first = backend.workers[0]
    deliver(first, 1, b"a")
    deliver(first, 2, b"b")
    assert [next(stream)[0].delivery_tag for _ in range(2)] == [1, 2]
    lease.basic_ack(1)
    wait(lambda: frames(first, Kind.SETTLE), "the ack on the first channel")
    lose(first)
    lease.basic_ack(2)  # a tag of the lost channel: dropped, or sent to the dead socket
    lease.queue_declare("q")  # the next call moves the lease: a new worker, topology replayed
    second = backend.workers[1]
    assert [type(m).__name__ for m in second.received[:3]] == ["LeaseRequest", "Call", "Consume"]
    assert second.received[2].args["consumer_tag"] == "ctag-1"  # the same consumer tag
    deliver(second, 1, b"c")
    method, _props, body = next(stream)
    assert (method.delivery_tag, body) == (3, b"c")  # not 1: that was "a"
    lease.basic_ack(3)
    wait(lambda: frames(second, Kind.SETTLE), "the ack on the new channel")
    assert [wire.read_tag(p) for _k, _f, p in frames(second, Kind.SETTLE)] == [1]
    assert len(moves) == 1 and moves[0].reason in ("broker gone", "worker gone")
    lease.close()


def test_unconfirmed_publishes_are_sent_again_in_order_after_a_move(
        backend: FakeBackend) -> None:
    lease = PoolClient("/fake/kz.sock", backend).lease("float")
    lease.confirm_delivery()
    futures = [lease.basic_publish("", "q", f"m{i}".encode(), wait=False) for i in range(3)]
    first = backend.workers[0]
    wait(lambda: len(frames(first, Kind.PUBLISH)) == 3, "three publishes")
    first.send(wire.tagged(Kind.CONFIRM, 1, 0))
    assert futures[0] is not None and futures[0].result(5) is None
    lose(first)
    with pytest.raises(TimeoutError):  # nothing confirms them yet on the new channel
        lease.wait_for_confirms(0.2)
    second = backend.workers[1]
    assert isinstance(second.received[1], messages.ConfirmSelect)  # confirm mode replayed
    resent = [wire.read_publish(p)[3] for _k, _f, p in frames(second, Kind.PUBLISH)]
    assert resent == [b"m1", b"m2"]  # numbered 1 and 2 on the new channel
    second.send(wire.tagged(Kind.CONFIRM, 2, Flag.MULTIPLE))
    lease.wait_for_confirms(5)
    assert all(f is not None and f.done() and f.exception() is None for f in futures)
    lease.close()


def test_a_nack_and_a_return_fail_their_publish_only(backend: FakeBackend) -> None:
    lease = PoolClient("/fake/kz.sock", backend).lease("float")
    lease.confirm_delivery()
    nacked, returned, fine = (lease.basic_publish("", key, b"x", mandatory=True, wait=False)
                              for key in ("a", "b", "c"))
    worker = backend.workers[0]
    wait(lambda: len(frames(worker, Kind.PUBLISH)) == 3, "three publishes")
    worker.send(wire.tagged(Kind.CONFIRM, 1, Flag.NACK))
    worker.send(wire.returned(312, "NO_ROUTE", "", "b", b"", b"x"))
    worker.send(wire.tagged(Kind.CONFIRM, 3, Flag.MULTIPLE))
    assert nacked is not None and returned is not None and fine is not None
    with pytest.raises(pika.exceptions.NackError):
        nacked.result(5)
    with pytest.raises(pika.exceptions.UnroutableError):
        returned.result(5)
    assert fine.result(5) is None
    lease.close()


def test_a_channel_error_reaches_the_caller_once_then_the_lease_recovers(
        backend: FakeBackend) -> None:
    def refusing(item: Any, worker: FakeWorker) -> None:
        if isinstance(item, messages.Call) and item.args.get("passive"):
            worker.send(messages.Lost(Reason("ChannelClosedByBroker", 404, "NOT_FOUND")))
            worker.close()
        else:
            broker(item, worker)

    backend.script = refusing
    lease = PoolClient("/fake/kz.sock", backend).lease("float")
    lease.queue_declare("kept")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        lease.queue_declare("missing", passive=True)
    assert info.value.reply_code == 404
    lease.queue_declare("next")  # a new channel, with "kept" declared again first
    replayed = [m.args["queue"] for m in backend.workers[1].received
                if isinstance(m, messages.Call)]
    assert replayed == ["kept", "next"]  # the passive declare is not replayed
    lease.close()


def test_tag_map() -> None:
    tags = TagMap()
    assert [tags.shown(t) for t in (1, 2, 3)] == [1, 2, 3]
    tags.new_channel()
    assert tags.shown(1) == 4
    assert tags.channel_tag(4) == 1 and tags.channel_tag(3) is None and tags.channel_tag(0) == 0


def test_confirm_book_renumbers_what_is_pending() -> None:
    from kzpool.client.confirms import Confirm, Unconfirmed

    book = ConfirmBook()
    entries = [Unconfirmed(Confirm(lambda _d, _t: True, "L"), f"f{i}".encode(), "", "q", None,
                           b"") for i in range(4)]
    for entry in entries:
        book.add(entry)
    book.confirmed(2, Flag.MULTIPLE)
    assert entries[0].future.done() and entries[1].future.done()
    assert book.renumber() == [b"f2", b"f3"] and sorted(book.pending) == [1, 2]
    book.confirmed(1, 0)
    assert entries[2].future.done() and not entries[3].future.done()
