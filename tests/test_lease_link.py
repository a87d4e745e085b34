"""A lease against a scripted worker over a socket pair: delivery tags across a move,
confirm bookkeeping, topology replay, what a lease does with a connection the broker closed,
flow control, a signal handler's exception, dispatch.  No broker, no pool
(tests/fakes.py)."""

from __future__ import annotations

import socket
from typing import Any

import pika.exceptions
import pytest

import kzpool
import kzpool.lease.state
from kzpool.client.connection import Connection
from kzpool.client.pool import PoolClient
from kzpool.common import messages, wire
from kzpool.common.messages import Reason
from kzpool.common.wire import Flag, Kind
from kzpool.lease.confirms import ConfirmBook
from kzpool.lease.state import TagMap

from .fakes import FakeBackend, FakeWorker

REPLIES = {"queue_declare": "Queue.DeclareOk", "basic_qos": "Basic.QosOk",
           "queue_bind": "Queue.BindOk", "exchange_declare": "Exchange.DeclareOk",
           "basic_cancel": "Basic.CancelOk", "tx_select": "Tx.SelectOk",
           "tx_commit": "Tx.CommitOk", "tx_rollback": "Tx.RollbackOk"}


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
    worker.send(wire.deliver(tag, 0, "ctag-1", wire.names("", "q"), b"", body, 0))


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
    from kzpool.lease.confirms import Confirm, Unconfirmed

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


# ----- a call the broker answers by closing the whole connection ------------------------------

CLOSED_503 = Reason("ConnectionClosedByBroker", 503,
                    "COMMAND_INVALID - unknown exchange type 'bogus'")


def calls(backend: FakeBackend, method: str) -> list[messages.Call]:
    return [m for w in backend.workers for m in w.received
            if isinstance(m, messages.Call) and m.method == method]


def test_a_call_that_makes_the_broker_close_the_connection_fails_once_and_is_not_resent(
        backend: FakeBackend) -> None:
    def closing(item: Any, worker: FakeWorker) -> None:
        if isinstance(item, messages.Call) and item.args.get("exchange_type") == "bogus":
            worker.send(messages.Lost(CLOSED_503))  # what a worker says to every lease
            worker.close()
        else:
            broker(item, worker)

    backend.script = closing
    client = PoolClient("/fake/kz.sock", backend)
    moves: list[Any] = []
    culprit = client.lease("float", on_move=moves.append)
    culprit.queue_declare("kept")
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        culprit.exchange_declare("x", exchange_type="bogus")
    assert info.value.reply_code == 503 and "unknown exchange type" in info.value.reply_text
    assert len(calls(backend, "exchange_declare")) == 1  # not sent again on a new channel
    culprit.queue_declare("next")  # the next call runs on a new channel
    assert len(backend.workers) == 2 and len(moves) == 1
    assert [m.args["queue"] for m in backend.workers[1].received
            if isinstance(m, messages.Call)] == ["kept", "next"]
    assert len(calls(backend, "exchange_declare")) == 1  # nor replayed
    culprit.close()


def test_a_lease_idle_when_the_broker_closed_the_connection_moves_without_an_error(
        backend: FakeBackend) -> None:
    moves: list[Any] = []
    bystander = PoolClient("/fake/kz.sock", backend).lease("float", on_move=moves.append)
    bystander.queue_declare("mine")
    backend.workers[0].send(messages.Lost(CLOSED_503))  # another lease's call did it
    backend.workers[0].close()
    bystander.queue_declare("mine", passive=True)  # no error: it moved
    assert len(moves) == 1 and len(backend.workers) == 2
    bystander.close()


def test_an_enum_exchange_type_is_sent_by_its_value(backend: FakeBackend) -> None:
    from pika.exchange_type import ExchangeType

    lease = PoolClient("/fake/kz.sock", backend).lease("float")
    lease.exchange_declare("x", exchange_type=ExchangeType.topic)
    assert calls(backend, "exchange_declare")[0].args["exchange_type"] == "topic"
    with pytest.raises(TypeError, match="queue must be a str"):
        lease.queue_declare([1, 2, 3])  # type: ignore[arg-type]
    lease.close()


# ----- the broker's cancels, returns, dispatch -------------------------------------------------

def test_a_broker_cancel_ends_start_consuming_after_the_deliveries_before_it(
        backend: FakeBackend) -> None:
    lease = PoolClient("/fake/kz.sock", backend).lease("float")
    lease.queue_declare("q")
    got: list[bytes] = []
    cancels: list[Any] = []
    lease.add_on_cancel_callback(cancels.append)
    tag = lease.basic_consume("q", lambda _ch, _m, _p, body: got.append(body))
    worker = backend.workers[0]
    deliver(worker, 1, b"a")
    deliver(worker, 2, b"b")
    worker.send(messages.Cancelled(tag))  # the queue was deleted
    lease.start_consuming()  # returns: no consumer left
    assert got == [b"a", b"b"] and lease.consumer_tags == []
    assert [c.method.consumer_tag for c in cancels] == [tag]
    lose(worker)
    lease.queue_declare("q")  # a move: the cancelled consumer is not replayed
    assert not any(isinstance(m, messages.Consume) for m in backend.workers[1].received)
    lease.close()


def test_a_broker_cancel_ends_the_consume_generator(backend: FakeBackend) -> None:
    lease = PoolClient("/fake/kz.sock", backend).lease("float")
    stream = lease.consume("q")
    deliver_later = backend.workers[0]
    first = _start(stream, deliver_later, [b"a", b"b"], cancel="ctag-1")
    assert [first, *(body for _m, _p, body in stream)] == [b"a", b"b"]  # then it ends
    assert lease.consumer_tags == [] and lease.get_waiting_message_count() == 0
    lease.close()


def _start(stream: Any, worker: FakeWorker, bodies: list[bytes], cancel: str) -> bytes:
    """The first item of a consume() generator (its consumer starts then), with ``bodies``
    delivered and the consumer cancelled by the broker right after it starts."""
    import threading

    def feed() -> None:
        wait(lambda: any(isinstance(m, messages.Consume) for m in worker.received), "consume")
        for tag, body in enumerate(bodies, 1):
            deliver(worker, tag, body)
        worker.send(messages.Cancelled(cancel))
    threading.Thread(target=feed, daemon=True).start()
    body: bytes = next(stream)[2]
    return body


def test_returns_reach_the_return_callback_in_a_dispatcher_only(backend: FakeBackend) -> None:
    connection = Connection("/fake/kz.sock", backend)
    lease = connection.channel()
    returned: list[tuple[Any, ...]] = []
    lease.add_on_return_callback(lambda *args: returned.append(args))
    lease.basic_publish("", "nowhere", b"lost", mandatory=True)
    worker = backend.workers[0]
    worker.send(wire.returned(312, "NO_ROUTE", "", "nowhere", b"", b"lost"))
    lease.queue_declare("q")  # a blocking call reads the return, runs nothing
    assert returned == []
    connection.process_data_events(time_limit=1)
    (channel, method, _props, body), = returned
    assert channel is lease and body == b"lost"
    assert isinstance(method, pika.spec.Basic.Return) and method.reply_code == 312
    connection.close()


def test_process_data_events_runs_timers_then_every_lease_of_the_thread(
        backend: FakeBackend) -> None:
    connection = Connection("/fake/kz.sock", backend)
    order: list[str] = []
    leases = [connection.channel(), connection.channel()]
    for n, lease in enumerate(leases):
        lease.basic_consume("q", lambda _c, _m, _p, body: order.append(body.decode()))
        deliver(backend.workers[n], 1, f"lease{n}".encode())
    removed = connection.call_later(0, lambda: order.append("removed"))
    connection.call_later(0, lambda: order.append("timer"))
    connection.remove_timeout(removed)
    while len(order) < 3:
        connection.process_data_events(time_limit=5)
    assert order[0] == "timer" and sorted(order[1:]) == ["lease0", "lease1"]
    connection.add_callback_threadsafe(lambda: order.append("threadsafe"))
    connection.process_data_events(time_limit=None)  # returns once something ran
    assert order[-1] == "threadsafe"
    connection.close()
    assert all(lease.is_closed for lease in leases)
    with pytest.raises(pika.exceptions.ConnectionWrongStateError):
        connection.close()
    with pytest.raises(pika.exceptions.ChannelWrongStateError):
        leases[0].close()


def test_start_consuming_inside_a_callback_raises_reentrancy(backend: FakeBackend) -> None:
    lease = PoolClient("/fake/kz.sock", backend).lease("float")
    errors: list[BaseException] = []

    def nested(channel: Any, method: Any, _props: Any, _body: bytes) -> None:
        try:
            channel.start_consuming()
        except pika.exceptions.ReentrancyError as exc:
            errors.append(exc)
        channel.stop_consuming()

    lease.basic_consume("q", nested)
    deliver(backend.workers[0], 1, b"x")
    lease.start_consuming()
    assert len(errors) == 1
    lease.close()


def test_basic_cancel_returns_what_an_auto_ack_consumer_had_not_dispatched(
        backend: FakeBackend) -> None:
    lease = PoolClient("/fake/kz.sock", backend).lease("float")
    worker = backend.workers[0]
    noack = lease.basic_consume("q", lambda *_: None, auto_ack=True, consumer_tag="ctag-1")
    deliver(worker, 1, b"a")
    deliver(worker, 2, b"b")
    assert [body for _m, _p, body in lease.basic_cancel(noack)] == [b"a", b"b"]
    ackable = lease.basic_consume("q", lambda *_: None, consumer_tag="ctag-1")
    deliver(worker, 3, b"c")
    assert lease.basic_cancel(ackable) == []  # nacked, requeued (a nack: see _requeue)
    wait(lambda: frames(worker, Kind.SETTLE), "the nack")
    (_kind, flags, payload), = frames(worker, Kind.SETTLE)
    assert wire.read_tag(payload) == 3 and flags == Flag.SETTLE_NACK | Flag.REQUEUE
    assert lease.basic_cancel("nobody") == []
    lease.close(404, "gone fishing")
    wait(lambda: isinstance(worker.received[-1], messages.Close), "the close")
    assert worker.received[-1] == messages.Close(404, "gone fishing")


# ----- flow control, transactions, a signal handler's exception ------------------------------

def test_waits_under_flow_control_end_in_connection_blocked_timeout(
        backend: FakeBackend) -> None:
    def silent_while_blocked(item: Any, worker: FakeWorker) -> None:
        if isinstance(item, messages.Call) and item.method == "queue_declare" and blocked:
            return  # a blocked connection reads nothing
        broker(item, worker)

    blocked: list[bool] = []
    backend.script = silent_while_blocked
    lease = PoolClient("/fake/kz.sock", backend).lease("float", timeout=0.3)
    lease.confirm_delivery()
    worker = backend.workers[0]
    held = lease.basic_publish("", "q", b"held", wait=False)  # its confirm never comes
    blocked.append(True)
    worker.send(messages.Blocked())
    assert held is not None
    with pytest.raises(pika.exceptions.ConnectionBlockedTimeout):
        held.result()
    with pytest.raises(kzpool.ConnectionBlockedTimeout):
        lease.wait_for_confirms()
    with pytest.raises(kzpool.ConnectionBlockedTimeout):
        lease.basic_publish("", "q", b"refused")  # not sent while blocked
    assert len(frames(worker, Kind.PUBLISH)) == 1
    with pytest.raises(kzpool.ConnectionBlockedTimeout):
        lease.queue_declare("q")  # the call is given up with its channel
    blocked.clear()
    lease.queue_declare("q")  # a new channel, not blocked
    assert len(backend.workers) == 2
    lease.close()


def test_tx_commit_after_a_move_raises_transaction_lost(backend: FakeBackend) -> None:
    lease = PoolClient("/fake/kz.sock", backend).lease("float")
    lease.tx_select()
    lease.basic_publish("", "q", b"in the transaction")
    lose(backend.workers[0])
    with pytest.raises(kzpool.TransactionLost):
        lease.tx_commit()
    second = backend.workers[1]
    assert next(m.method for m in second.received if isinstance(m, messages.Call)) == "tx_select"
    assert not frames(second, Kind.PUBLISH)  # nothing of the lost transaction was committed
    lease.basic_publish("", "q", b"again")
    lease.tx_commit()
    wait(lambda: frames(second, Kind.PUBLISH), "the publish")
    assert isinstance(second.received[-1], messages.Call)
    assert second.received[-1].method == "tx_commit"
    lease.close()


def test_a_signal_handlers_timeout_reaches_the_caller_and_the_lease_keeps_its_channel(
        backend: FakeBackend) -> None:
    import signal

    held: list[messages.Call] = []

    def slow(item: Any, worker: FakeWorker) -> None:
        if isinstance(item, messages.Call) and item.args.get("queue") == "slow":
            held.append(item)  # answered late, after the next call came
            return
        if held:
            worker.send(messages.Reply(held.pop().id, "Queue.DeclareOk", {
                "queue": "slow", "message_count": 0, "consumer_count": 0}))
        broker(item, worker)

    def alarm(_signum: int, _frame: Any) -> None:
        raise TimeoutError("the caller's own deadline")

    backend.script = slow
    lease = PoolClient("/fake/kz.sock", backend).lease("float")
    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(TimeoutError, match="the caller's own deadline"):
            lease.queue_declare("slow")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert lease.queue_declare("fast").method.queue == "fast"  # not the late "slow" reply
    assert len(backend.workers) == 1  # the same channel: not taken for a lost worker
    lease.close()


def test_basic_cancel_drops_a_queued_broker_cancel_and_requeues_what_was_queued(
        backend: FakeBackend) -> None:
    lease = PoolClient("/fake/kz.sock", backend).lease("float")
    cancels: list[Any] = []
    lease.add_on_cancel_callback(cancels.append)
    tag = lease.basic_consume("q", lambda *_: pytest.fail("dispatched"))
    worker = backend.workers[0]
    deliver(worker, 1, b"a")
    worker.send(messages.Cancelled(tag))
    lease.queue_declare("q")  # a blocking call: both are read and queued, nothing runs
    assert lease.basic_cancel(tag) == []
    lease.connection.dispatcher.process(0)  # what process_data_events does: nothing runs
    assert cancels == [] and lease.consumer_tags == []
    wait(lambda: frames(worker, Kind.SETTLE), "the reject of the queued delivery")
    lease.close()


# ----- a pool that went away: a restart ----------------------------------------------------

def test_a_lease_waits_for_a_pool_that_went_away_then_replays_and_resends(
        backend: FakeBackend) -> None:
    moves: list[kzpool.MoveEvent] = []
    lease = PoolClient("/fake/kz.sock", backend).lease("float", on_move=moves.append)
    lease.queue_declare("q")
    lease.confirm_delivery()
    future = lease.basic_publish("", "q", b"m", wait=False)
    backend.refuse = 3  # the pool's socket refuses connects while it restarts
    lose(backend.workers[0])
    with pytest.raises(TimeoutError):  # no exception but the caller's own wait running out
        lease.wait_for_confirms(0.5)
    second = backend.workers[1]
    assert backend.refused == 3
    assert [type(m).__name__ for m in second.received[:3]] == ["LeaseRequest", "Call",
                                                               "ConfirmSelect"]
    assert second.received[0].lease == "L1"  # the same lease, on the new pool
    wait(lambda: frames(second, Kind.PUBLISH), "the publish sent again")
    second.send(wire.tagged(Kind.CONFIRM, 1, 0))
    assert future is not None and future.result(5) is None
    assert [m.reason for m in moves] == [kzpool.lease.state.POOL_RESTARTED]
    lease.close()


def test_a_first_lease_does_not_wait_for_a_pool(backend: FakeBackend) -> None:
    backend.refuse = 1
    with pytest.raises(kzpool.PoolNotRunning, match="connection refused"):
        PoolClient("/fake/kz.sock", backend).lease("float", timeout=3600)
    assert backend.refused == 1 and not backend.workers


def test_a_lease_whose_pool_stays_away_raises_after_its_timeout_and_recovers_later(
        backend: FakeBackend) -> None:
    lease = PoolClient("/fake/kz.sock", backend).lease("float", timeout=0.3)
    backend.refuse = 10 ** 6
    lose(backend.workers[0])
    with pytest.raises(kzpool.PoolNotRunning):
        lease.queue_declare("q")
    assert backend.refused > 1  # it looked again while it waited
    backend.refuse = 0
    assert lease.queue_declare("q").method.queue == "q"
    lease.close()


def test_an_in_service_consumers_lease_goes_with_its_master(backend: FakeBackend) -> None:
    ours, theirs = socket.socketpair()
    FakeWorker(theirs, broker).send(messages.Leased("L7", "amqp://guest:***@fake/", "local",
                                                    channel=1, worker=1))
    lease = PoolClient("/fake/kz.sock", backend).lease("float", handed=ours, timeout=3600)
    backend.refuse = 1
    lose_handed = messages.Lost(Reason("ConnectionClosed", 0, "master gone"))
    theirs.sendall(messages.encode(lose_handed))
    theirs.close()
    with pytest.raises(kzpool.PoolNotRunning):  # at once: the next master starts its own
        lease.queue_declare("q")
    lease.close()
