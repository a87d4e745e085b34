"""Leases against the real default broker: pika's interface, confirms, errors, client death."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.queues import SimpleQueue

import pika
import pika.exceptions
import pytest

import kzpool
from kzpool.testing import DEFAULT_MASKED, DEFAULT_URI, Pool, wait_for

PoolMaker = Callable[..., Pool]


@pytest.fixture
def pool(pools: PoolMaker) -> Pool:
    p = pools([DEFAULT_URI], prechannels=4, hidden_brokers=2).start()
    p.wait_ready()
    return p




def message_count(queue: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)


def test_a_lease_speaks_pika(pool: Pool, queue: str) -> None:
    client = kzpool.connect(pool.socket)
    with client.lease("float") as lease:
        assert lease.kind == "float" and lease.id
        assert lease.broker == DEFAULT_MASKED
        declared = lease.queue_declare(queue)
        assert declared.method.queue == queue and declared.method.message_count == 0
        lease.exchange_declare(f"{queue}-x", "topic", auto_delete=True)
        lease.queue_bind(queue, f"{queue}-x", "a.*")
        props = pika.BasicProperties(content_type="text/plain", headers={"n": 1})
        lease.basic_publish(f"{queue}-x", "a.b", b"one", props)
        lease.basic_publish("", queue, "two")
        method, properties, body = _get(lease, queue)
        assert body == b"one" and properties.headers == {"n": 1}
        assert isinstance(method, pika.spec.Basic.GetOk)
        lease.basic_ack(method.delivery_tag)
        seen = []
        for method, _props, body in lease.consume(queue, inactivity_timeout=1):
            if method is None:
                break
            seen.append(body)
            lease.basic_ack(method.delivery_tag)
        lease.cancel()
        assert seen == [b"two"]
        assert lease.basic_get(queue) == (None, None, None)


def _get(lease: kzpool.Lease, queue: str) -> tuple[object, object, bytes]:
    def got() -> tuple[object, object, bytes] | None:
        method, props, body = lease.basic_get(queue)
        return (method, props, body) if method else None
    return wait_for(got, 5, "a message from basic_get")


def test_pipelined_confirms_and_returns(pool: Pool, queue: str) -> None:
    with kzpool.connect(pool.socket).lease("float") as lease:
        lease.queue_declare(queue)
        lease.confirm_delivery()
        futures = [lease.basic_publish("", queue, b"x" * 256, wait=False) for _ in range(500)]
        lease.wait_for_confirms(timeout=10)
        assert all(f.done() and f.exception() is None for f in futures)
        returned = lease.basic_publish("", f"{queue}-nobody", b"lost", mandatory=True,
                                       wait=False)
        assert returned is not None
        with pytest.raises(pika.exceptions.UnroutableError):
            returned.result(5)
        with pytest.raises(kzpool.UnroutableError):
            lease.basic_publish("", f"{queue}-nobody", b"lost", mandatory=True)
        lease.basic_publish("", queue, b"after")
    assert message_count(queue) == 501


def test_channel_error_fails_the_call_and_the_lease_recovers(pool: Pool, queue: str) -> None:
    client = kzpool.connect(pool.socket)
    other = client.lease("float")
    other.queue_declare(queue)
    with client.lease("float") as lease:
        lease.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            lease.basic_publish(f"{queue}-missing-exchange", "rk", b"x")
        assert info.value.reply_code == 404
        with pytest.raises(kzpool.ChannelClosedByBroker) as passive:
            lease.queue_declare(f"{queue}-missing", passive=True)
        assert passive.value.reply_code == 404
        lease.basic_publish("", queue, b"fine")  # recovered, confirms still on
    other.basic_publish("", queue, b"untouched")  # no confirm: it reaches the queue soon
    wait_for(lambda: message_count(queue) == 2, 5, "both messages on the queue")
    other.close()


def _consume_and_die(socket_path: str, queue: str, got: SimpleQueue[int]) -> None:
    lease = kzpool.connect(socket_path).lease("float")
    lease.basic_qos(prefetch_count=10)
    for method, _props, _body in lease.consume(queue):
        got.put(method.delivery_tag)  # never acked
        if method.delivery_tag == 3:
            os.kill(os.getpid(), signal.SIGKILL)


def test_client_death_returns_its_messages(pool: Pool, queue: str) -> None:
    lease = kzpool.connect(pool.socket).lease("float")
    lease.queue_declare(queue)
    for i in range(5):
        lease.basic_publish("", queue, b"m%d" % i)
    context = multiprocessing.get_context("fork")
    got: SimpleQueue[int] = context.SimpleQueue()  # put() is synchronous: kill -9 loses nothing
    child = context.Process(target=_consume_and_die, args=(pool.socket, queue, got))
    child.start()
    child.join(20)
    assert child.exitcode == -signal.SIGKILL
    assert [got.get() for _ in range(3)] == [1, 2, 3]
    wait_for(lambda: not [r for r in pool.status()["assignments"]
                          if r["client_pid"] == child.pid], 5, "the dead client's rows to go")
    wait_for(lambda: message_count(queue) == 5, 5, "its messages back on the queue")
    lease.close()


def test_status_lists_leases(pool: Pool) -> None:
    client = kzpool.connect(pool.socket)
    leases = [client.lease("float") for _ in range(3)]
    def assigned() -> list[dict[str, object]] | None:
        rows = pool.status()["assignments"]
        return rows if len(rows) == 3 and all(r["state"] == "assigned" for r in rows) else None
    rows = wait_for(assigned, 5, "3 assigned rows")
    worker = pool.connections()[0]["pid"]
    assert {r["lease"] for r in rows} == {lease.id for lease in leases}
    for row in rows:
        assert row["kind"] == "float" and row["client_pid"] == os.getpid()
        assert row["pid"] == worker and row["channel"] and row["moves"] == 0
        assert row["broker"] == DEFAULT_MASKED and row["since"]
    for lease in leases:
        lease.close()
    wait_for(lambda: not pool.status()["assignments"], 5, "rows to go on close")
    wait_for(lambda: pool.connections()[0]["prechannels"] == 4, 5, "prechannels refilled")


def test_bad_lease_requests_are_named(pool: Pool) -> None:
    client = kzpool.connect(pool.socket)
    with pytest.raises(kzpool.LeaseRequestError, match=r"unknown lease kind 'wobbly'"):
        client.lease("wobbly")
    with pytest.raises(kzpool.LeaseRequestError, match="unknown zone 'mars'"):
        client.lease("float", zone="mars")
    with pytest.raises(kzpool.LeaseRequestError, match="scheme 'http'"):
        client.lease("sticky", broker="http://guest:pw@127.0.0.1/")
    with pytest.raises(kzpool.LeaseRequestError, match="needs a broker"):
        client.lease("sticky")
    with pytest.raises(kzpool.BrokerUnavailable, match=r"127\.0\.0\.1:5799"):
        client.lease("sticky", broker="amqp://guest:guest@127.0.0.1:5799/%2F", timeout=1)


def test_connect_without_a_pool(tmp_path: object) -> None:
    with pytest.raises(kzpool.PoolNotRunning, match=r"no pool is running at .*none\.sock"):
        kzpool.connect(f"{tmp_path}/none.sock")


def test_sticky_to_an_unknown_broker_adds_a_hidden_connection(pool: Pool, vhost: str) -> None:
    with kzpool.connect(pool.socket).lease("sticky", broker=vhost) as lease:
        assert lease.broker == vhost.replace("guest:guest", "guest:***")
        lease.queue_declare("kzt-hidden", auto_delete=True)
        rows = pool.connections()
        assert len(rows) == 2 and rows[0]["primary"] and not rows[1]["primary"]
        with kzpool.connect(pool.socket).lease("float") as floating:
            assert floating.broker == rows[0]["broker"]


def test_worker_kill_9_under_a_consuming_lease(pool: Pool, queue: str) -> None:
    moves: list[kzpool.MoveEvent] = []
    lease = kzpool.connect(pool.socket).lease("float", on_move=moves.append)
    lease.queue_declare(queue)
    lease.basic_qos(prefetch_count=5)
    for i in range(10):
        lease.basic_publish("", queue, b"%d" % i)
    stream = lease.consume(queue, inactivity_timeout=5)
    first = [next(stream) for _ in range(3)]  # delivered, not acked
    old_tags = [m.delivery_tag for m, _p, _b in first]
    worker = pool.connections()[0]["pid"]
    os.kill(worker, signal.SIGKILL)
    bodies: list[bytes] = []
    for method, _props, body in stream:
        assert method is not None, "consuming stopped after the worker died"
        assert method.delivery_tag > max(old_tags)  # tags stay unique across the move
        bodies.append(body)
        lease.basic_ack(method.delivery_tag)
        if len(set(bodies)) == 10:
            break
    lease.basic_ack(old_tags[0])  # a tag of the lost channel: dropped, not misapplied
    assert moves and moves[0].new_broker == lease.broker
    assert sorted(set(bodies)) == sorted(b"%d" % i for i in range(10))
    lease.cancel()
    row = wait_for(lambda: [r for r in pool.status()["assignments"] if r["lease"] == lease.id
                            and r["state"] == "assigned"], 5, "the row")[0]
    assert row["moves"] >= 1 and row["pid"] != worker
    lease.close()
    assert message_count(queue) == 0


def test_a_released_channel_carries_nothing_to_the_next_lease(pool: Pool, queue: str) -> None:
    client = kzpool.connect(pool.socket)
    with client.lease("float") as consumer:
        consumer.queue_declare(queue)
        consumer.basic_qos(prefetch_count=1)
        consumer.basic_consume(queue, lambda *_: None)
        assert message_count(queue) == 0
    for _ in range(20):  # publish-only leases: their clean channels are handed on
        with client.lease("float") as publisher:
            publisher.basic_publish("", queue, b"x")
    # no confirms: the last publishes reach the queue a moment after their lease closed
    wait_for(lambda: message_count(queue) == 20, 5, "the 20 messages on the queue")
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        declared = conn.channel().queue_declare(queue, passive=True).method
    assert declared.consumer_count == 0 and declared.message_count == 20
    rows = pool.wait_rows(lambda rs: rs[0]["prechannels"] == 4 and rs[0]["channels"] == 0, 5,
                          "prechannels back to 4 and no channel in use")
    assert rows[0]["available"]


def test_leases_spread_when_a_connection_is_full(pools: PoolMaker) -> None:
    small = f"{DEFAULT_URI}?channel_max=4"  # a tiny channel_max, as the broker may impose
    pool = pools([small], connections_per_broker=2, prechannels=1).start()
    pool.wait_ready()
    pool.wait_rows(lambda rs: all(r["prechannels"] == 1 for r in rs), 10, "prechannels")
    client = kzpool.connect(pool.socket)
    leases = [client.lease("float", timeout=5) for _ in range(7)]
    rows = pool.wait_rows(lambda rs: sum(r["channels"] for r in rs) == 7, 10, "7 channels bound")
    assert sorted(r["channels"] for r in rows) == [3, 4]  # 4 + 3: both connections serve
    assert any(r["full"] for r in rows)
    for lease in leases:
        lease.basic_publish("", "kzt-nowhere", b"x")
        lease.close()


def test_one_lease_per_thread(pool: Pool, queue: str) -> None:
    client = kzpool.connect(pool.socket)
    with client.lease("float") as setup:
        setup.queue_declare(queue)
    errors: list[BaseException] = []

    def publish(n: int) -> None:
        try:
            with client.lease("float") as lease:
                lease.confirm_delivery()
                for i in range(50):
                    lease.basic_publish("", queue, b"%d-%d" % (n, i))
        except BaseException as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=publish, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert message_count(queue) == 400


def test_a_server_named_queue_follows_its_lease(pool: Pool) -> None:
    moves: list[kzpool.MoveEvent] = []
    lease = kzpool.connect(pool.socket).lease("float", on_move=moves.append)
    old = lease.queue_declare("", exclusive=True).method.queue
    lease.exchange_declare("kzt-renamed", "fanout", auto_delete=True)
    os.kill(pool.connections()[0]["pid"], signal.SIGKILL)
    lease.queue_bind(old, "kzt-renamed")  # the lease recovers first, then binds the new name
    new = moves[-1].renamed[old]
    assert new != old and new.startswith("amq.gen-")
    lease.basic_publish("kzt-renamed", "", b"to the renamed queue")
    _method, _props, body = _get(lease, old)  # the old name still works through the lease
    assert body == b"to the renamed queue"
    lease.close()


def test_a_lease_says_when_the_pool_is_gone_and_carries_on_after(pool: Pool, queue: str) -> None:
    lease = kzpool.connect(pool.socket).lease("float", timeout=2)
    lease.queue_declare(queue)
    pool.signal(signal.SIGKILL)
    pool.wait_exit(5)
    wait_for(lambda: not pool.group(), 10, "the workers to follow the master")
    with pytest.raises(kzpool.PoolNotRunning, match=r"no pool is running at .*kzpool\.sock"):
        lease.basic_publish("", queue, b"while down")
    pool.start()  # the service comes back (systemd would restart it)
    pool.wait_ready()
    lease.basic_publish("", queue, b"after")  # the same lease: new channel, topology replayed
    lease.close()
    wait_for(lambda: message_count(queue) == 1, 5, "the message published after")
