"""Acks sent one by one reach the broker as fewer, larger acks (:mod:`kzpool.worker.holding`):
what is acked, and what is not, stays exactly what the client said, on a real broker."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable

import pika
import pytest

import kzpool
from kzpool.testing import DEFAULT_URI, Pool, wait_for

from .conftest import Names

PoolMaker = Callable[..., Pool]


@pytest.fixture
def pool(pools: PoolMaker) -> Pool:
    p = pools([DEFAULT_URI], prechannels=2).start()
    p.wait_ready()
    return p


def _bodies(queue: str) -> list[bytes]:
    """What ``queue`` holds, read off with pika (and acked)."""
    bodies = []
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        while True:
            method, _props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return sorted(bodies)
            bodies.append(body)


def _fill(queue: str, prefix: bytes, count: int) -> None:
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        channel.queue_declare(queue)
        channel.confirm_delivery()
        for i in range(count):
            channel.basic_publish("", queue, b"%s%02d" % (prefix, i))


KEPT = {7, 8, 16, 30}  # of the consumed messages, those never acked


def test_acks_between_unacked_auto_acked_and_got_messages_settle_exactly_those(
        pool: Pool, names: Names) -> None:
    consumed, other = names("consumed"), names("other")
    _fill(consumed, b"a", 40)
    _fill(other, b"b", 3)
    lease = kzpool.connect(pool.socket).lease("float")
    lease.basic_qos(prefetch_count=50)
    assert lease.basic_get(other, auto_ack=True)[2] == b"b00"  # a tag nobody settles
    got, _props, first = lease.basic_get(consumed)  # held, acked among the consumed
    assert got is not None and first == b"a00"
    seen = 1
    for method, _props, body in lease.consume(consumed, inactivity_timeout=2):
        if method is None:
            break
        assert body == b"a%02d" % seen
        if seen == 1:
            lease.basic_ack(got.delivery_tag)
        if seen not in KEPT:
            lease.basic_ack(method.delivery_tag)
        if seen == 20:  # an auto-acked tag between held ones
            assert lease.basic_get(other, auto_ack=True)[2] == b"b01"
        seen += 1
    assert seen == 40
    lease.cancel()
    lease.close()
    assert _bodies(consumed) == sorted(b"a%02d" % i for i in KEPT)
    assert _bodies(other) == [b"b02"]


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
    _fill(queue, b"m", 100)
    child = multiprocessing.get_context("fork").Process(
        target=_ack_all_and_exit, args=(pool.socket, queue))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    wait_for(lambda: not [r for r in pool.status()["assignments"]
                          if r["client_pid"] == child.pid], 10, "the dead client's lease to go")
    assert _bodies(queue) == []


def test_an_ack_sent_twice_closes_the_channel_as_on_pika_and_the_acks_before_it_count(
        pool: Pool, queue: str) -> None:
    _fill(queue, b"m", 10)
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
    assert _bodies(queue) == [b"m%02d" % i for i in range(5, 10)]


def test_a_rolled_back_reject_leaves_its_message_unacked_whatever_is_acked_after(
        pool: Pool, queue: str) -> None:
    _fill(queue, b"m", 4)
    lease = kzpool.connect(pool.socket).lease("float")
    lease.basic_qos(prefetch_count=4)
    lease.tx_select()
    for method, _props, body in lease.consume(queue, inactivity_timeout=2):
        assert method is not None
        if body == b"m00":
            lease.basic_reject(method.delivery_tag, requeue=True)
            lease.tx_rollback()  # the broker holds m00 unsettled again
        elif body == b"m03":
            break  # never settled
        else:
            lease.basic_ack(method.delivery_tag)  # m01 and m02: sent together
    lease.tx_commit()
    lease.cancel()
    lease.close()
    assert _bodies(queue) == [b"m00", b"m03"]
