"""Exclusive queues die with the client connection that declared them, as they die with a
pika connection, and are locked for every other client of the pool (405, in the broker's
words), though every lease of a worker shares its broker connection.

Real pools, real client processes (closed, ``os._exit``, ``kill -9``; RabbitMQ's tutorial 3
subscriber), a worker killed, the pool killed and started again, a fail-back; the broker is
looked at with plain pika.  A queue gone and nothing collected: a fanout exchange bound to it
routes nothing afterwards (plain pika's mandatory publishes all come back)."""

from __future__ import annotations

import os
import queue as queues
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pika
import pika.exceptions
import pytest

import kzpool
from kzpool.testing import DEFAULT_URI, Pool, default_uri, wait_for
from kzpool.testing.amqp import queue_exists

from .conftest import brokers, brokers_run, default_ctl
from .hostile import as_nobody, open_up

PoolMaker = Callable[..., Pool]
TUTORIALS = Path(__file__).resolve().parent.parent / "examples" / "tutorials"
GONE_WITHIN = 10  # seconds allowed for a queue to go (a deadline, not a measure)

# A client process: an exclusive, server-named queue bound to a fanout exchange; then it
# ends as its first argument says ("close": closes its connection and lives on; "exit":
# os._exit; "lost": a channel error, then it lives on until killed; else until killed).
CLIENT = textwrap.dedent("""
    import os, sys, time
    import pika.exceptions
    import kzpool
    connection = kzpool.connect()
    channel = connection.channel()
    channel.exchange_declare(sys.argv[2], "fanout")
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, sys.argv[2])
    print(queue, flush=True)
    if sys.argv[1] == "close":
        connection.close()
        print("closed", flush=True)
    elif sys.argv[1] == "exit":
        os._exit(0)
    elif sys.argv[1] == "lost":
        try:
            channel.queue_declare(sys.argv[2] + "-missing", passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            print("lost", exc.reply_code, flush=True)
    time.sleep(600)
""")


@dataclass(frozen=True)
class Served:
    pool: Pool
    uri: str  # the broker (a vhost of this module's own), for plain pika


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    vhost = f"kzt-ex-{uuid.uuid4().hex[:8]}"
    brokers_run(["add_vhost", vhost])
    brokers_run(["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])
    uri = default_uri(vhost)
    pool = Pool(tmp_path_factory.mktemp("exclusive"), [uri], prechannels=4)
    try:
        pool.start().wait_ready()
        yield Served(pool, uri)
    finally:
        pool.close()
        brokers_run(["delete_vhost", vhost])


@pytest.fixture
def exchange() -> str:
    return f"kzt-ex-{uuid.uuid4().hex[:10]}"


class Client:
    """A client process of ``CLIENT``; its lines read with deadlines."""

    def __init__(self, socket: str, how: str, exchange: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT, how, exchange],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "KZPOOL_SOCKET": socket})
        self.lines: queues.Queue[str] = queues.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.queue = self.line()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("(exited)")

    def line(self, timeout: float = 20) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queues.Empty:
            raise AssertionError(f"no line from the client within {timeout} s") from None
        assert line != "(exited)" and not line.startswith("Traceback"), line
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def clients(served: Served) -> Iterator[Callable[[str, str], Client]]:
    started: list[Client] = []

    def start(how: str, exchange: str) -> Client:
        started.append(Client(served.pool.socket, how, exchange))
        return started[-1]
    yield start
    for client in started:
        client.kill()


def wait_gone(queue: str, uri: str) -> None:
    wait_for(lambda: not queue_exists(queue, uri), GONE_WITHIN, f"queue {queue} to be deleted")


def unroutable(uri: str, exchange: str, count: int) -> int:
    """Publish ``count`` confirmed, mandatory messages to ``exchange``: how many came back
    unrouted (every one, if no queue is bound to it)."""
    back = 0
    with pika.BlockingConnection(pika.URLParameters(uri)) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for n in range(count):
            try:
                channel.basic_publish(exchange, "", b"log %d" % n, mandatory=True)
            except pika.exceptions.UnroutableError:
                back += 1
    return back


def broker_refusal(uri: str, queue: str) -> tuple[int, str]:
    """What the broker answers a connection of its own that takes from ``queue``."""
    with pika.BlockingConnection(pika.URLParameters(uri)) as conn, \
            pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        conn.channel().basic_get(queue)
    return info.value.reply_code, info.value.reply_text


# ----- the client goes --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "exit", "kill"])
def test_a_clients_exclusive_queue_goes_with_it(served: Served, clients: Any, exchange: str,
                                                how: str) -> None:
    """connection.close() (the process lives on), os._exit, kill -9: the queue is deleted,
    and what is published afterwards is collected nowhere."""
    client = clients(how, exchange)
    if how == "close":
        assert client.line() == "closed"
    elif how == "kill":
        assert queue_exists(client.queue, served.uri)
        client.kill()
    wait_gone(client.queue, served.uri)
    if how == "close":
        assert client.proc.poll() is None  # deleted at the close, not at the exit
    assert unroutable(served.uri, exchange, 100) == 100


def test_tutorial_3s_subscriber_killed_then_100_logs_collects_nothing(served: Served) -> None:
    """RabbitMQ's tutorial 3 subscriber (examples/tutorials/receive_logs.py), kill -9."""
    subscriber = subprocess.Popen(
        [sys.executable, "-u", str(TUTORIALS / "receive_logs.py")], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "KZPOOL_SOCKET": served.pool.socket})
    try:
        assert subscriber.stdout is not None
        assert "Waiting for logs" in subscriber.stdout.readline()
        queue = wait_for(lambda: bound_to("logs", served.uri), 10, "the subscriber's queue")
        assert queue.startswith("amq.gen-") and queue_exists(queue, served.uri)
    finally:
        subscriber.kill()
        subscriber.wait(10)
    wait_gone(queue, served.uri)
    assert unroutable(served.uri, "logs", 100) == 100
    assert not queue_exists(queue, served.uri)


def bound_to(exchange: str, uri: str) -> str | None:
    """The queue bound to ``exchange`` on ``uri``'s vhost (rabbitmqctl), if there is one."""
    vhost = uri.rsplit("/", 1)[1]
    listed = default_ctl("list_bindings", "-p", vhost, "source_name", "destination_name")
    for line in listed.stdout.splitlines():
        source, _, destination = line.partition("\t")
        if source == exchange:
            return destination
    return None


def test_a_queue_outlives_the_lease_that_declared_it_not_its_connection(served: Served) -> None:
    """As with pika, where an exclusive queue outlives channel.close() and goes with the
    connection: another lease of the same connection still uses it."""
    connection = kzpool.connect(served.pool.socket)
    declaring, other = connection.channel(), connection.channel()
    queue = declaring.queue_declare("", exclusive=True).method.queue
    declaring.confirm_delivery()
    declaring.basic_publish("", queue, b"kept")  # confirmed: on the queue
    declaring.close()
    assert other.basic_get(queue, auto_ack=True)[2] == b"kept"
    assert queue_exists(queue, served.uri)
    connection.close()
    wait_gone(queue, served.uri)


def test_a_channel_error_leaves_the_connections_queue_as_it_was(served: Served, clients: Any,
                                                                 exchange: str) -> None:
    """A channel error closes a pika channel, not its connection: the lease comes back on
    its next call to the same queue, with what was published meanwhile.  Its process
    killed before that next call, the queue goes all the same."""
    moves: list[kzpool.MoveEvent] = []
    connection = kzpool.connect(served.pool.socket)
    lease = connection.channel(on_move=moves.append)
    lease.exchange_declare(exchange, "fanout")
    queue = lease.queue_declare("", exclusive=True).method.queue
    lease.queue_bind(queue, exchange)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
        lease.queue_declare(f"{exchange}-missing", passive=True)
    assert unroutable(served.uri, exchange, 3) == 0  # collected, while the lease is lost
    assert [lease.basic_get(queue, auto_ack=True)[2] for _ in range(3)] == \
        [b"log 0", b"log 1", b"log 2"]
    assert [move.renamed for move in moves] == [{}]  # the same queue, not a new one
    connection.close()
    wait_gone(queue, served.uri)

    client = clients("lost", exchange)
    assert client.line() == "lost 404"
    assert queue_exists(client.queue, served.uri)  # its process lives: its lease may come back
    client.kill()
    wait_gone(client.queue, served.uri)


def test_a_queue_auto_deleted_by_a_channel_error_comes_back_renamed(served: Served) -> None:
    """An exclusive, auto-delete queue whose only consumer went with the channel (a channel
    error) is deleted by the broker: the lease's replay makes a new one, as a move does."""
    moves: list[kzpool.MoveEvent] = []
    connection = kzpool.connect(served.pool.socket)
    lease = connection.channel(on_move=moves.append)
    queue = lease.queue_declare("", exclusive=True, auto_delete=True).method.queue
    lease.basic_consume(queue, lambda *_: None)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
        lease.queue_declare(f"kzt-ex-{uuid.uuid4().hex[:10]}", passive=True)
    wait_gone(queue, served.uri)  # the broker's doing
    lease.queue_declare(queue, passive=True)  # the next call replays: a new queue
    renamed = moves[0].renamed[queue]
    assert renamed != queue and queue_exists(renamed, served.uri)
    connection.close()
    wait_gone(renamed, served.uri)


# ----- locked for the others --------------------------------------------------------------------

TOUCH: dict[str, Callable[[Any, str], object]] = {
    "passive declare": lambda lease, q: lease.queue_declare(q, passive=True),
    "declare": lambda lease, q: lease.queue_declare(q),
    "exclusive declare": lambda lease, q: lease.queue_declare(q, exclusive=True),
    "consume": lambda lease, q: lease.basic_consume(q, lambda *_: None),
    "get": lambda lease, q: lease.basic_get(q),
    "bind": lambda lease, q: lease.queue_bind(q, "amq.fanout"),
    "unbind": lambda lease, q: lease.queue_unbind(q, "amq.fanout"),
    "purge": lambda lease, q: lease.queue_purge(q),
    "delete": lambda lease, q: lease.queue_delete(q),
}


def test_another_client_is_refused_as_the_broker_refuses_another_connection(
        served: Served) -> None:
    """A second client connection of the same pool (same worker, same broker connection)
    gets 405 RESOURCE_LOCKED in the broker's words for every touch of the first one's
    exclusive queues, named or server-named; its lease then recovers as after any channel
    error.  Publishing to them is allowed, as the broker allows it (RPC replies)."""
    owner, other = kzpool.connect(served.pool.socket), kzpool.connect(served.pool.socket)
    mine = owner.channel()
    named = f"kzt-ex-{uuid.uuid4().hex[:10]}"
    mine.queue_declare(named, exclusive=True)
    mine.queue_bind(named, "amq.fanout")
    server_named = mine.queue_declare("", exclusive=True).method.queue
    mine.queue_bind(server_named, "amq.fanout")
    mine.basic_publish("", named, b"the owner's")
    theirs = other.channel()
    assert theirs.broker == mine.broker  # the same worker: its connection is both leases'
    for queue in (named, server_named):
        expected = broker_refusal(served.uri, queue)
        assert expected[0] == 405 and "RESOURCE_LOCKED" in expected[1]
        for what, touch in TOUCH.items():
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
                touch(theirs, queue)
            assert (info.value.reply_code, info.value.reply_text) == expected, what
            assert theirs.is_open  # the next call recovers on a new channel
    theirs.basic_publish("", named, b"a reply")
    assert [mine.basic_get(named, auto_ack=True)[2] for _ in range(2)] == \
        [b"the owner's", b"a reply"]
    mine.queue_purge(server_named)  # the owner's calls all go through
    mine.queue_unbind(named, "amq.fanout")
    mine.basic_consume(named, lambda *_: None)
    owner.close()
    wait_gone(named, served.uri)
    wait_gone(server_named, served.uri)
    theirs.queue_declare(named, exclusive=True, auto_delete=True)  # free for another now
    other.close()
    wait_gone(named, served.uri)


def test_a_queue_the_broker_deleted_is_free_for_another_client(served: Served) -> None:
    """An exclusive, auto-delete queue goes when its last consumer is cancelled, while its
    connection lives on: its name is another connection's to take, as on the broker."""
    owner, other = kzpool.connect(served.pool.socket), kzpool.connect(served.pool.socket)
    mine, theirs = owner.channel(), other.channel()
    queue = f"kzt-ex-{uuid.uuid4().hex[:10]}"
    mine.queue_declare(queue, exclusive=True, auto_delete=True)
    mine.basic_cancel(mine.basic_consume(queue, lambda *_: None))
    wait_gone(queue, served.uri)  # the broker's doing
    theirs.queue_declare(queue, exclusive=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        mine.basic_get(queue)  # the other one's now
    assert info.value.reply_code == 405
    owner.close()
    assert queue_exists(queue, served.uri)
    other.close()
    wait_gone(queue, served.uri)


def test_a_user_cannot_reach_another_users_queue_even_naming_its_connection(
        pools: PoolMaker) -> None:
    """allow_users names two users; nobody's process claims root's connection id (as a
    hostile client can): the id is scoped to the uid of its peer credentials, so an RPC
    client's replies stay its own."""
    pool = pools([DEFAULT_URI], allow_users="root, nobody").start()
    pool.wait_ready()
    open_up(pool)
    owner = kzpool.connect(pool.socket)
    replies = owner.channel()
    queue = replies.queue_declare("", exclusive=True).method.queue
    replies.basic_publish("", queue, b"root's reply")
    stolen = owner.identity.value  # read here: a forked child draws an id of its own

    def spy() -> str:
        client = kzpool.connect(pool.socket)
        client.identity = SimpleNamespace(value=stolen)  # type: ignore[assignment]
        lease = client.channel()
        answers = []
        for what in ("get", "consume", "passive declare", "purge"):
            try:
                TOUCH[what](lease, queue)
                answers.append(f"{what}: allowed")
            except pika.exceptions.ChannelClosedByBroker as exc:
                answers.append(f"{what}: {exc.reply_code}")
        lease.basic_publish("", queue, b"nobody's reply")
        return ", ".join(answers)
    assert as_nobody(spy) == "get: 405, consume: 405, passive declare: 405, purge: 405"
    assert [replies.basic_get(queue, auto_ack=True)[2] for _ in range(2)] == \
        [b"root's reply", b"nobody's reply"]
    owner.close()
    wait_gone(queue, DEFAULT_URI)


# ----- workers and pools go; leases move --------------------------------------------------------


def test_a_worker_killed_leaves_no_exclusive_queue(pools: PoolMaker) -> None:
    """kill -9 of the worker: the broker sees its connection close and deletes the queue;
    the lease moves, its queue replayed (a new name), and that one goes at its close."""
    pool = pools([DEFAULT_URI], prechannels=2).start()
    pool.wait_ready()
    moves: list[kzpool.MoveEvent] = []
    connection = kzpool.connect(pool.socket)
    lease = connection.channel(on_move=moves.append)
    queue = lease.queue_declare("", exclusive=True).method.queue
    worker = pool.connections()[0]["pid"]
    os.kill(worker, signal.SIGKILL)
    wait_gone(queue, DEFAULT_URI)
    pool.wait_rows(lambda rs: rs[0]["available"] and rs[0]["pid"] != worker, 20, "a new worker")
    lease.basic_get(queue)  # the next call moves the lease
    renamed = moves[0].renamed[queue]
    assert queue_exists(renamed)
    connection.close()
    wait_gone(renamed, DEFAULT_URI)


def test_a_pool_killed_leaves_no_exclusive_queue(pools: PoolMaker) -> None:
    """kill -9 of the master: its workers follow it, their connections close, the broker
    deletes the queue; started again, the lease's queue is replayed, and goes at its
    close."""
    pool = pools([DEFAULT_URI], prechannels=2).start()
    pool.wait_ready()
    moves: list[kzpool.MoveEvent] = []
    connection = kzpool.connect(pool.socket)
    lease = connection.channel(on_move=moves.append, timeout=30)
    queue = lease.queue_declare("", exclusive=True).method.queue
    pool.signal(signal.SIGKILL)
    pool.wait_exit(5)
    wait_for(lambda: not pool.group(), 10, "the pool's workers to follow the master")
    wait_gone(queue, DEFAULT_URI)
    pool.start()
    pool.wait_ready()
    lease.basic_get(queue)
    renamed = moves[0].renamed[queue]
    assert queue_exists(renamed)
    connection.close()
    wait_gone(renamed, DEFAULT_URI)


def test_a_lease_moved_back_leaves_no_exclusive_queue_behind(pools: PoolMaker,
                                                             faulty_node: Any) -> None:
    """Fail-over, then fail-back: the worker the lease leaves is still up, and deletes the
    queue that the lease's replay made there."""
    pool = pools([faulty_node.url, DEFAULT_URI], heartbeat=2,
                 reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    moves: list[kzpool.MoveEvent] = []
    connection = kzpool.connect(pool.socket)
    lease = connection.channel(on_move=moves.append, timeout=15)
    first = lease.queue_declare("", exclusive=True).method.queue
    brokers.stop_app(faulty_node.name)
    wait_for(lambda: lease.queue_declare(first, passive=True) and moves, 15,
             "the lease on the secondary")
    on_secondary = moves[0].renamed[first]
    assert queue_exists(on_secondary, DEFAULT_URI)
    brokers.start_app(faulty_node.name)
    wait_for(lambda: lease.queue_declare(first, passive=True) and len(moves) == 2, 20,
             "the lease back on the primary")
    wait_gone(on_secondary, DEFAULT_URI)
    on_primary = moves[1].renamed[on_secondary]
    assert queue_exists(on_primary, faulty_node.url)
    connection.close()
    wait_gone(on_primary, faulty_node.url)
