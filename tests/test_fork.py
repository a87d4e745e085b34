"""A connection or a lease used in a child of ``fork()``: the child gets leases of its own on
their first use (their topology replayed), the parent's stay the parent's, nothing hangs,
nothing confirmed is lost or arrives twice.  Real forks: ``os.fork()``, gunicorn's
``--preload``, ``multiprocessing``'s fork start method; kzpool.aio's channels refuse to be
used in a child, and its connection opens new ones there."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kzpool
import kzpool.aio
from kzpool.testing import DEFAULT_URI, Pool, drain, wait_for

from .hostile import pids, read_within

CHILD_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    served = Pool(Path(tmp_path_factory.mktemp("fork")), [DEFAULT_URI], prechannels=4)
    try:
        served.start().wait_ready()
        yield served
    finally:
        served.close()


def fork_child(action: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Fork; the child runs ``action`` and exits.  Returns what waits for the child's answer
    (failing the test if it does not come within :data:`CHILD_TIMEOUT`: a hang)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            answer = {"ok": action()}
        except BaseException as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write_end, json.dumps(answer).encode())
        os._exit(0)
    os.close(write_end)

    def result() -> dict[str, Any]:
        try:
            answer = json.loads(read_within(read_end, CHILD_TIMEOUT, "the child's answer"))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
        assert "ok" in answer, answer["error"]
        return dict(answer["ok"])
    return result


def test_a_lease_with_confirms_publishes_on_both_sides_of_a_fork(pool: Pool, queue: str) -> None:
    before = pids(pool)
    connection = kzpool.connect(pool.socket)
    moves: list[kzpool.MoveEvent] = []
    lease = connection.channel(on_move=moves.append)
    lease.queue_declare(queue)
    lease.confirm_delivery()
    lease.basic_publish("", queue, b"before")
    in_flight = [lease.basic_publish("", queue, b"in-flight-%d" % i, wait=False)
                 for i in range(20)]  # not confirmed yet at the fork: the parent's
    parent_id = lease.id

    def child() -> dict[str, Any]:
        errors = [str(f.exception(0)) for f in in_flight]
        for i in range(30):
            lease.basic_publish("", queue, b"child-%d" % i)  # confirmed, or it raises
        declared = lease.queue_declare(queue, passive=True)
        lease.close()
        connection.close()
        return {"id": lease.id, "moves": [(m.reason, m.old_broker, m.new_broker) for m in moves],
                "errors": errors, "declared": declared.method.queue}

    result = fork_child(child)
    for i in range(30):
        lease.basic_publish("", queue, b"parent-%d" % i)
    for future in in_flight:
        future.result(10)  # the parent's confirms reach the parent
    seen = result()
    assert seen["id"] != parent_id and lease.id == parent_id and not moves
    assert seen["moves"] == [["forked", lease.broker, lease.broker]]
    assert all("before fork()" in error for error in seen["errors"]), seen["errors"][:2]
    assert seen["declared"] == queue
    lease.close()
    connection.close()
    sent = [b"before", *(b"in-flight-%d" % i for i in range(20)),
            *(b"parent-%d" % i for i in range(30)), *(b"child-%d" % i for i in range(30))]
    got = drain(DEFAULT_URI, queue)
    assert sorted(got) == sorted(sent)  # each once: nothing lost, nothing sent twice
    assert pids(pool) == before


def test_a_child_runs_none_of_the_deliveries_of_the_parents_consumer(pool: Pool,
                                                                     queue: str) -> None:
    connection = kzpool.connect(pool.socket)
    lease = connection.channel()
    lease.queue_declare(queue)
    lease.basic_qos(prefetch_count=10)
    with connection.channel() as publisher:
        publisher.confirm_delivery()
        for i in range(10):
            publisher.basic_publish("", queue, b"%d" % i)
    parent_got: list[bytes] = []
    lease.basic_consume(queue, lambda ch, method, _p, body: (
        parent_got.append(body), ch.basic_ack(method.delivery_tag)))

    def got(count: int) -> bool:
        connection.process_data_events(0.05)
        return len(parent_got) >= count
    wait_for(lambda: got(1), 10, "the parent's consumer to run")
    at_fork = len(parent_got)

    def child() -> dict[str, Any]:
        child_got: list[bytes] = []
        lease.basic_consume(queue, lambda ch, method, _p, body: (
            child_got.append(body), ch.basic_ack(method.delivery_tag)))
        connection.sleep(0.5)  # dispatching: the parent's deliveries must not run here
        lease.close()
        return {"ran": len(parent_got) - at_fork, "got": len(child_got)}

    result = fork_child(child)
    wait_for(lambda: got(10), 20, "the parent's consumer to get every message")
    assert result() == {"ran": 0, "got": 0}  # every message was the parent's
    assert sorted(parent_got) == sorted(b"%d" % i for i in range(10))  # each once
    lease.queue_delete(queue)
    connection.close()


# ----- gunicorn --preload ------------------------------------------------------------------

APP = '''
import json, os
import kzpool

connection = kzpool.connect()          # in gunicorn's master: --preload imports the app there
channel = connection.channel()
channel.queue_declare(os.environ["KZT_QUEUE"])
channel.confirm_delivery()
channel.basic_publish("", os.environ["KZT_QUEUE"], b"from the master")
MASTER = {"pid": os.getpid(), "lease": channel.id}


def app(environ, start_response):
    body = "%d%s" % (os.getpid(), environ["PATH_INFO"])
    channel.basic_publish("", os.environ["KZT_QUEUE"], body.encode())   # confirmed
    answer = json.dumps({"pid": os.getpid(), "lease": channel.id, "master": MASTER,
                         "body": body}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(answer)))])
    return [answer]
'''


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def get(path: str, url: str) -> dict[str, Any]:
    client = UnixHTTP(path)
    try:
        client.request("GET", url)
        response = client.getresponse()
        assert response.status == 200, response.read()
        return dict(json.loads(response.read()))
    finally:
        client.close()


def test_gunicorn_preload_workers_get_leases_of_their_own(pool: Pool, queue: str,
                                                          tmp_path: Path) -> None:
    before = pids(pool)
    (tmp_path / "kzt_app.py").write_text(APP)
    bind = str(tmp_path / "gunicorn.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "--workers", "2", "--bind",
         f"unix:{bind}", "--chdir", str(tmp_path), "--graceful-timeout", "5", "kzt_app:app"],
        env={**os.environ, "KZPOOL_SOCKET": pool.socket, "KZT_QUEUE": queue},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    answers: list[dict[str, Any]] = []
    try:
        def both_workers() -> bool:
            answers.append(get(bind, f"/{len(answers)}"))
            return len({a["pid"] for a in answers}) == 2 and len(answers) >= 20
        # (its socket refuses until gunicorn listens on it)
        wait_for(both_workers, 60, "answers from both workers",
                 ignore=(FileNotFoundError, ConnectionRefusedError))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        output = server.communicate(timeout=30)[0].decode(errors="replace")
    print(output)
    master = answers[0]["master"]
    by_worker = {a["pid"]: a["lease"] for a in answers}
    assert all(a["lease"] == by_worker[a["pid"]] for a in answers)  # one lease per worker
    assert len(set(by_worker.values())) == 2 and master["lease"] not in by_worker.values()
    assert master["pid"] not in by_worker
    got = drain(DEFAULT_URI, queue)
    assert sorted(got) == sorted([b"from the master", *(a["body"].encode() for a in answers)])
    assert pids(pool) == before


# ----- multiprocessing, fork start method ---------------------------------------------------

INHERITED: dict[str, Any] = {}  # what the parent made before its pool of processes forked


def publish_task(n: int) -> tuple[int, str]:
    lease = INHERITED["lease"]
    lease.basic_publish("", INHERITED["queue"], b"task-%d" % n)  # confirmed
    return os.getpid(), str(lease.id)


def test_multiprocessing_fork_children_publish_on_leases_of_their_own(pool: Pool,
                                                                       queue: str) -> None:
    before = pids(pool)
    connection = kzpool.connect(pool.socket)
    lease = connection.channel()
    lease.queue_declare(queue)
    lease.confirm_delivery()
    lease.basic_publish("", queue, b"parent-before")
    INHERITED.update(lease=lease, queue=queue)
    try:
        with multiprocessing.get_context("fork").Pool(3) as workers:
            done = workers.map_async(publish_task, range(30), chunksize=1)
            lease.basic_publish("", queue, b"parent-during")
            results = done.get(CHILD_TIMEOUT)
    finally:
        INHERITED.clear()
    lease.basic_publish("", queue, b"parent-after")
    children = {pid: lease_id for pid, lease_id in results}
    assert lease.id not in children.values() and os.getpid() not in children
    assert len(set(children.values())) == len(children)  # one lease per child
    assert sorted(drain(DEFAULT_URI, queue)) == sorted(
        [b"parent-before", b"parent-during", b"parent-after",
         *(b"task-%d" % n for n in range(30))])
    lease.close()
    connection.close()
    assert pids(pool) == before


# ----- kzpool.aio ---------------------------------------------------------------------------

def test_an_aio_channel_refuses_to_be_used_in_a_child_and_its_connection_opens_new_ones(
        pool: Pool, queue: str) -> None:
    async def main() -> dict[str, Any]:
        connection = await kzpool.aio.connect(pool.socket)
        channel = await connection.channel()
        await channel.declare_queue(queue)
        await channel.default_exchange.publish(kzpool.aio.Message(b"before"), queue)

        def child() -> dict[str, Any]:
            async def in_child() -> dict[str, Any]:
                try:
                    await channel.default_exchange.publish(kzpool.aio.Message(b"x"), queue)
                except kzpool.KzpoolError as exc:
                    refused = str(exc)
                else:
                    refused = ""
                await channel.close()  # closes nothing of the parent's
                own = await connection.channel()  # the connection opens the child's own
                await own.default_exchange.publish(kzpool.aio.Message(b"child"), queue)
                await own.close()
                return {"refused": refused}
            # this thread runs the parent's loop (a fork copies it): a loop of its own
            box: dict[str, Any] = {}
            runner = threading.Thread(target=lambda: box.update(asyncio.run(in_child())))
            runner.start()
            runner.join(CHILD_TIMEOUT)
            return box

        result = fork_child(child)
        await channel.default_exchange.publish(kzpool.aio.Message(b"parent"), queue)
        seen = await asyncio.get_running_loop().run_in_executor(None, result)
        await channel.default_exchange.publish(kzpool.aio.Message(b"parent after"), queue)
        await connection.close()
        return seen

    seen = asyncio.run(asyncio.wait_for(main(), 90))
    assert "before fork()" in seen["refused"], seen
    assert sorted(drain(DEFAULT_URI, queue)) == sorted(
        [b"before", b"child", b"parent", b"parent after"])
