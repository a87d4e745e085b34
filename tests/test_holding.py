"""What the broker holds for a lease, what it takes back, and the consumer timeout a worker
adds to a consume (pure logic)."""

from __future__ import annotations

import pytest

import kzpool
from kzpool.common.config import loads
from kzpool.common.options import LeaseOptions
from kzpool.common.wire import Flag
from kzpool.lease.takeback import TakenBack, Why
from kzpool.worker import amqp, timeouts
from kzpool.worker.holding import Holding
from kzpool.worker.timeouts import ConsumeTimeout

# ----- the worker's side: held, taken back ---------------------------------------------------


def test_held_deliveries_are_settled_one_by_one_many_at_once_or_all() -> None:
    holding = Holding(1)
    holding.consuming("c1", auto_ack=False)
    holding.consuming("quick", auto_ack=True)
    for tag, ctag in [(1, "c1"), (2, "quick"), (3, "c1"), (4, "c1"), (5, "")]:
        holding.delivered(tag, ctag)
    assert list(holding.held) == [1, 3, 4, 5]  # an auto-ack consumer's need no settle
    holding.settled(3, multiple=False)
    holding.settled(4, multiple=True)
    assert list(holding.held) == [5]
    holding.settled(0, multiple=True)
    assert not holding.held


def test_a_consumer_the_broker_cancelled_takes_its_deliveries_back_and_may_consume_again() -> None:
    holding = Holding(1)
    for ctag in ("c1", "c2"):
        holding.consuming(ctag, auto_ack=False)
    for tag, ctag in [(1, "c1"), (2, "c2"), (3, "c1")]:
        holding.delivered(tag, ctag)
    counters = {"consumers_cancelled": 0, "deliveries_taken_back": 0}
    assert holding.cancel("c1", counters, "lease1") == (1, 3)
    assert counters == {"consumers_cancelled": 1, "deliveries_taken_back": 2}
    assert "c1" in holding.cancelled and list(holding.held) == [2]
    holding.consuming("c1", auto_ack=False)  # the same tag, consuming again
    assert "c1" not in holding.cancelled
    assert holding.take_all() == (2,) and not holding.held


def _held(*tags: int) -> Holding:
    holding = Holding(1)
    holding.consuming("c1", auto_ack=False)
    holding.consuming("quick", auto_ack=True)
    for tag in tags:
        holding.delivered(tag, "c1")
    return holding


def test_acks_of_the_oldest_held_in_turn_go_as_one() -> None:
    holding = _held(1, 2, 4, 5)
    holding.delivered(3, "quick")  # needs no settle: it does not stop the run
    assert [holding.settle(tag, 0) for tag in (1, 2, 4)] == [b"", b"", b""]
    assert holding.run() == amqp.settle(1, amqp.ACK, 4, True, False)
    assert holding.run() == b""
    assert holding.settle(5, 0) == b"" and list(holding.held) == []
    assert holding.run() == amqp.settle(1, amqp.ACK, 5, False, False)  # one: as it was


def test_an_ack_past_one_still_held_goes_alone_after_the_run() -> None:
    holding = _held(1, 2, 3, 4)
    assert holding.settle(1, 0) == b""
    assert holding.settle(3, 0) == amqp.settle(1, amqp.ACK, 1, False, False) + \
        amqp.settle(1, amqp.ACK, 3, False, False)  # 2 is still held: not covered
    assert holding.settle(2, 0) == b""  # the oldest again
    assert holding.settle(4, Flag.SETTLE_NACK | Flag.REQUEUE) == \
        amqp.settle(1, amqp.ACK, 2, False, False) + amqp.settle(1, amqp.NACK, 4, False, True)
    assert not holding.held and holding.run() == b""


def test_acks_go_one_by_one_when_asked_or_once_the_broker_took_deliveries_back() -> None:
    holding = _held(1, 2)
    assert holding.settle(1, 0, alone=True) == amqp.settle(1, amqp.ACK, 1, False, False)
    assert holding.settle(2, Flag.MULTIPLE) == amqp.settle(1, amqp.ACK, 2, True, False)
    holding = _held(1, 2, 3)
    holding.delivered(4, "c2")
    holding.cancel("c2", {"consumers_cancelled": 0, "deliveries_taken_back": 0}, "lease1")
    assert holding.settle(1, 0) == amqp.settle(1, amqp.ACK, 1, False, False)
    assert holding.settle(3, Flag.SETTLE_REJECT) == amqp.settle(1, amqp.REJECT, 3, False, False)


# ----- the lease's side: a settle of what was taken back ---------------------------------------


def test_a_settle_of_a_delivery_taken_back_is_found_once() -> None:
    taken = TakenBack()
    taken.add((1, 2), base=10, why=Why("ctag"))  # tags 11 and 12 as the lease shows them
    assert taken.check(13, multiple=False) is None
    assert taken.check(11, multiple=False) == (11, Why("ctag"))
    assert taken.check(11, multiple=False) is None  # told once
    assert taken.check(20, multiple=True) == (12, Why("ctag"))
    assert not taken.tags


def test_why_names_the_cause_and_what_to_do() -> None:
    cancelled = Why("ctag1.x").describe(7)
    assert cancelled.startswith("PRECONDITION_FAILED - delivery 7 is no longer held")
    assert "cancelled its consumer 'ctag1.x'" in cancelled and "consumer_timeout" in cancelled
    closed = Why("", 406, "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed"
                          " out").describe(7)
    assert "the broker closed its channel: 406 PRECONDITION_FAILED - delivery ack" in closed
    error = kzpool.DeliveryTakenBack(406, closed, delivery_tag=7)
    assert error.reply_code == 406 and isinstance(error, kzpool.ChannelClosedByBroker)


# ----- the consumer timeout a consume gets ------------------------------------------------------


@pytest.mark.parametrize(("version", "supported"), [
    ("3.10.8", False), ("3.11.28", False), ("3.12.0", True), ("4.3.6", True),
    (b"4.0.5", True), ("", False), (None, False)])
def test_the_timeout_is_added_from_rabbitmq_3_12(version: object, supported: bool) -> None:
    assert timeouts.supported({"version": version}) is supported


def test_the_pools_default_or_the_leases_own_is_added_where_the_broker_takes_it() -> None:
    settings = loads("[pool]\nconsumer_timeout = 7200\n[amqp]\nuri = amqp://h/\n").settings
    new = {"version": "4.3.6"}
    assert timeouts.seconds(LeaseOptions(), settings, new) == 7200.0
    assert timeouts.seconds(LeaseOptions(consumer_timeout=60), settings, new) == 60
    assert timeouts.seconds(LeaseOptions(consumer_timeout=0), settings, new) == 0
    assert timeouts.seconds(LeaseOptions(), settings, {"version": "3.10.8"}) == 0


def test_a_consume_that_names_a_timeout_or_a_queue_declared_with_one_keeps_it() -> None:
    added = ConsumeTimeout(86400)
    assert added.arguments("q", None) == {"x-consumer-timeout": 86_400_000}
    assert added.arguments("q", {"x-priority": 5}) == {"x-priority": 5,
                                                       "x-consumer-timeout": 86_400_000}
    own = {"x-consumer-timeout": 2000}
    assert added.arguments("q", own) is own
    added.declared({"queue": "own", "arguments": {"x-consumer-timeout": 60_000}})
    assert added.arguments("own", None) is None
    assert ConsumeTimeout(0).arguments("q", None) is None


def test_where_only_quorum_queues_take_it_it_goes_to_those_the_lease_declared() -> None:
    assert not timeouts.quorum_only({"version": "4.0.5"})
    assert timeouts.quorum_only({"version": "4.3.6"})
    added = ConsumeTimeout(60, quorum_only=True)
    added.declared({"queue": "qq", "arguments": {"x-queue-type": "quorum"}})
    added.declared({"queue": "classic", "arguments": None})
    assert added.arguments("qq", None) == {"x-consumer-timeout": 60_000}
    assert added.arguments("classic", None) is None  # 4.3 would refuse it there
    assert added.arguments("elsewhere", None) is None  # of a type it cannot know


def test_a_bad_consumer_timeout_is_named_where_the_lease_is_asked_for() -> None:
    for bad in (-1, True, "1h", 30 * 86400.0):
        with pytest.raises(kzpool.LeaseRequestError, match="consumer_timeout") as caught:
            LeaseOptions(consumer_timeout=bad)  # type: ignore[arg-type]
        assert caught.value.fields["option"] == "consumer_timeout"
