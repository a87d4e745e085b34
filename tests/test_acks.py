"""Acks sent one by one reach the broker as fewer, larger acks (:mod:`kzpool.worker.holding`):
what is acked, and what is not, stays exactly what the client said, on a real broker."""

from __future__ import annotations

import multiprocessing
import os

import pytest

import kzpool
from kzpool.testing import DEFAULT_URI, Pool, wait_for
from kzpool.testing.amqp import drain, fill

from .conftest import Names


def n(i: int) -> bytes:
    """The body of :func:`fill`'s ``i``-th message (8 bytes: only its counter)."""
    return i.to_bytes(8, "big")


def left(queue: str) -> list[bytes]:
    """What ``queue`` still holds, in order of its counters (the queue then deleted)."""
    return sorted(drain(DEFAULT_URI, queue))


KEPT = {7, 8, 16, 30}  # of the consumed messages, those never acked


def test_acks_between_unacked_auto_acked_and_got_messages_settle_exactly_those(
        pool: Pool, names: Names) -> None:
    consumed, other = names("consumed"), names("other")
    fill(consumed, 40, 8)
    fill(other, 3, 8)
    lease = kzpool.connect(pool.socket).lease("float")
    lease.basic_qos(prefetch_count=50)
    assert lease.basic_get(other, auto_ack=True)[2] == n(0)  # a tag nobody settles
    got, _props, first = lease.basic_get(consumed)  # held, acked among the consumed
    assert got is not None and first == n(0)
    seen = 1
    for method, _props, body in lease.consume(consumed, inactivity_timeout=2):
        if method is None:
            break
        assert body == n(seen)
        if seen == 1:
            lease.basic_ack(got.delivery_tag)
        if seen not in KEPT:
            lease.basic_ack(method.delivery_tag)
        if seen == 20:  # an auto-acked tag between held ones
            assert lease.basic_get(other, auto_ack=True)[2] == n(1)
        seen += 1
    assert seen == 40
    lease.cancel()
    lease.close()
    assert left(consumed) == sorted(n(i) for i in KEPT)
    assert left(other) == [n(2)]


def _ack_all_and_exit(socket: str, queue: str) -> None:
    lease = kzpool.connect(socket).lease("float")
    lease.basic_qos(prefetch_count=100)
    for method, _props, _body in lease.consume(queue, inactivity_timeout=2):
        if method is None:
            os._exit(1)
        lease.basic_ack(method.delivery_tag)
        if method.delivery_tag == 100:
            os._exit(0)  # no close, no goodbye: the acks sent are all it leaves


def test_acks_a_client_sent_just_before_it_died_all_count(pool: Pool, queue: str) -> None:
    fill(queue, 100, 8)
    child = multiprocessing.get_context("fork").Process(
        target=_ack_all_and_exit, args=(pool.socket, queue))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    wait_for(lambda: not [r for r in pool.status()["assignments"]
                          if r["client_pid"] == child.pid], 10, "the dead client's lease to go")
    assert left(queue) == []


def test_an_ack_sent_twice_closes_the_channel_as_on_pika_and_the_acks_before_it_count(
        pool: Pool, queue: str) -> None:
    fill(queue, 10, 8)
    lease = kzpool.connect(pool.socket).lease("float")
    lease.basic_qos(prefetch_count=10)
    for method, _props, _body in lease.consume(queue, inactivity_timeout=2):
        assert method is not None
        lease.basic_ack(method.delivery_tag)
        if method.delivery_tag == 5:
            lease.basic_ack(method.delivery_tag)  # a bug of the client's: an unknown tag now
            break
    with pytest.raises(kzpool.ChannelClosedByBroker) as closed:
        lease.queue_declare(queue, passive=True)
    assert closed.value.reply_code == 406 and "unknown delivery tag 5" in closed.value.reply_text
    lease.cancel()  # the lease recovered on a new channel, its consumer with it
    lease.close()
    assert left(queue) == [n(i) for i in range(5, 10)]


def test_a_rolled_back_reject_leaves_its_message_unacked_whatever_is_acked_after(
        pool: Pool, queue: str) -> None:
    fill(queue, 4, 8)
    lease = kzpool.connect(pool.socket).lease("float")
    lease.basic_qos(prefetch_count=4)
    lease.tx_select()
    for method, _props, body in lease.consume(queue, inactivity_timeout=2):
        assert method is not None
        if body == n(0):
            lease.basic_reject(method.delivery_tag, requeue=True)
            lease.tx_rollback()  # the broker holds the first unsettled again
        elif body == n(3):
            break  # never settled
        else:
            lease.basic_ack(method.delivery_tag)  # the second and third: sent together
    lease.tx_commit()
    lease.cancel()
    lease.close()
    assert left(queue) == [n(0), n(3)]
