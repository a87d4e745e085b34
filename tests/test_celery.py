"""Celery workers on kzpool://: real ``celery worker`` processes, a real pool, real brokers.

The tasks (``tests/celery_app.py``) hold the GIL while they compute, so nothing in a worker
answers the broker's heartbeats meanwhile; on ``amqp://`` the broker drops such a worker's
connection (``broker_heartbeat=2``, a 10 s task), on ``kzpool://`` the pool's worker keeps
the heartbeats.  Each test reads what the tasks recorded (one line a start or an end) and
the worker's log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from kzpool.testing import DEFAULT_URI, Pool, wait_for

from .celery_app import make_app, send
from .conftest import ROOT, brokers

LOST = "Connection to broker lost"
LONG = 10.0  # seconds a long task computes: five heartbeat intervals
PoolMaker = Callable[..., Pool]


class Worker:
    """A ``celery worker`` of ``tests.celery_app`` in its own session, logging to a file."""

    def __init__(self, directory: Path, broker: str, queue: str, pool: str = "solo",
                 concurrency: int = 1, acks_late: bool = True, *options: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.broker, self.queue, self.pool, self.concurrency = broker, queue, pool, concurrency
        self.acks_late, self.options = acks_late, options
        self.node = f"kzt-{uuid.uuid4().hex[:8]}@localhost"
        self.log, self.record = directory / "worker.log", directory / "record"
        self.record.touch()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        env = {**os.environ, "KZT_BROKER": self.broker, "KZT_QUEUE": self.queue,
               "KZT_RECORD": str(self.record), "KZT_ACKS_LATE": "1" if self.acks_late else "0",
               "KZT_HEARTBEAT": "2", "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker",
                 f"--pool={self.pool}", f"--concurrency={self.concurrency}", "-n", self.node,
                 "--loglevel=INFO", *self.options], stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.text()
            return f"{self.node} ready." in self.text()
        wait_for(ready, timeout, f"worker {self.node} to be ready")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[list[str]]:
        return [line.split() for line in self.record.read_text().splitlines()]

    def count(self, event: str, tag: str) -> int:
        return sum(1 for words in self.lines() if words[:2] == [event, tag])

    def deliveries(self, tag: str) -> list[str]:
        """How each start of ``tag`` was delivered: ``first`` or ``redelivered``."""
        return [words[3] for words in self.lines() if words[:2] == ["start", tag]]

    def pids(self, event: str, tag: str) -> set[int]:
        return {int(words[2]) for words in self.lines() if words[:2] == [event, tag]}

    def send(self, name: str, *args: Any) -> None:
        send(make_app(self.broker, self.queue, self.acks_late), name, *args)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def make(*args: Any, **kwargs: Any) -> Worker:
        made.append(Worker(*args, **kwargs))
        return made[-1]

    yield make
    for worker in made:
        worker.stop()
        print(f"--- {worker.broker} worker {worker.node}:\n{worker.text()}\n"
              f"--- its record:\n{worker.record.read_text()}")


def test_a_solo_worker_runs_a_long_task_once_where_amqp_loses_its_connection(
        pools: PoolMaker, workers: Callable[..., Worker], tmp_path: Path) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    kz = workers(tmp_path / "kzpool", f"kzpool://{pool.socket}", f"kzt-{uuid.uuid4().hex}")
    plain = workers(tmp_path / "amqp", DEFAULT_URI,
                    f"kzt-{uuid.uuid4().hex}")
    for worker in (kz, plain):
        worker.start()
        worker.send("burn", "long", LONG)  # (the queue is declared as the task is sent)
        worker.send("burn", "next", 0)
    wait_for(lambda: kz.count("done", "next"), 3 * LONG, "kzpool's next task")
    # the plain worker: its connection dropped during the task, so the broker gave it again
    wait_for(lambda: LOST in plain.text() and plain.count("start", "long") >= 2, 3 * LONG,
             "amqp:// to lose its connection and start the long task again")
    assert (kz.count("start", "long"), kz.count("done", "long")) == (1, 1)
    assert (kz.count("start", "next"), kz.count("done", "next")) == (1, 1)
    assert LOST not in kz.text() and "Couldn't ack" not in kz.text()


@pytest.mark.parametrize("kind", ["prefork", "threads"])
def test_a_worker_of_two_runs_long_tasks_at_once_and_tasks_that_publish(
        kind: str, pools: PoolMaker, workers: Callable[..., Worker], tmp_path: Path) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    queue = f"kzt-{uuid.uuid4().hex[:10]}"
    # prefork: a child per task, each forked while the parent holds its leases
    options = ["--max-tasks-per-child=1"] if kind == "prefork" else []
    kz = workers(tmp_path, f"kzpool://{pool.socket}", queue, kind, 2, True, *options).start()
    kz.wait_ready()
    kz.send("burn", "a", LONG / 2)
    kz.send("burn", "b", LONG / 2)
    kz.send("spawn", "s")  # publishes from a child (a thread): through a lease of its own
    kz.send("burn", "next", 0)
    app = make_app(kz.broker, queue)
    assert app.control.ping(destination=[kz.node], timeout=5) == [{kz.node: {"ok": "pong"}}]
    wait_for(lambda: all(kz.count("done", t) for t in ("a", "b", "s", "s-child", "next")),
             4 * LONG, "every task")
    for tag in ("a", "b", "s", "s-child", "next"):
        assert (kz.count("start", tag), kz.count("done", tag)) == (1, 1), tag
    if kind == "prefork":
        assert kz.pids("start", "a") != kz.pids("start", "b")  # two children computed
        assert kz.pid not in kz.pids("start", "s")
    assert LOST not in kz.text() and "Couldn't ack" not in kz.text()
    if kind == "prefork":  # a child killed mid-task takes nothing of its parent's along
        kz.send("burn", "victim", 3 * LONG)
        wait_for(lambda: kz.pids("start", "victim"), 30, "the victim to start")
        os.kill(kz.pids("start", "victim").pop(), signal.SIGKILL)
        wait_for(lambda: "WorkerLostError" in kz.text(), 30, "the worker to see it")
        kz.send("burn", "after", 0)
        wait_for(lambda: kz.count("done", "after"), 30, "a task after the kill")
    # the parent's leases were never disturbed by its children
    rows = [r for r in pool.status()["assignments"] if r["client_pid"] == kz.pid]
    assert rows and all(r["moves"] == 0 for r in rows)
    assert LOST not in kz.text()


def test_a_worker_fails_over_and_back_mid_task_and_loses_no_task(
        faulty_node: Any, vhost: str, pools: PoolMaker, workers: Callable[..., Worker],
        tmp_path: Path) -> None:
    pool = pools([faulty_node.url, vhost], heartbeat=2, reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    queue = f"kzt-{uuid.uuid4().hex[:10]}"
    kz = workers(tmp_path, f"kzpool://{pool.socket}", queue, acks_late=False).start()
    kz.wait_ready()
    kz.send("burn", "a", LONG / 2)  # on the primary
    kz.send("burn", "d", 0)  # on the primary, behind a
    wait_for(lambda: kz.count("start", "a"), 30, "a to start")
    brokers.stop_app(faulty_node.name)
    kz.send("burn", "b", 0)  # only on the secondary: runs if the worker's consumer moved
    wait_for(lambda: kz.count("done", "b"), 60, "b, on the secondary, after a")
    brokers.start_app(faulty_node.name)
    pool.wait_rows(lambda rows: rows[0]["available"] and rows[0]["primary"], 30,
                   "the primary back")
    kz.send("burn", "c", 0)  # on the primary: runs once the worker's consumer is back there
    wait_for(lambda: kz.count("done", "c") and kz.count("done", "d"), 60, "c and d")
    wait_for(lambda: kz.count("done", "a") == 2, 30, "a again")
    # a ran to its end; its ack (which the solo pool sends after the task) could not reach
    # the broker it came from, gone meanwhile, which gave it again once back: any client
    # gets that.  Nothing else ran twice, nothing was lost, the worker saw no failure.
    assert kz.deliveries("a") == ["first", "redelivered"]
    for tag in ("b", "c", "d"):
        assert kz.deliveries(tag) == ["first"] and kz.count("done", tag) == 1, tag
    assert LOST not in kz.text()


def test_the_example_app_runs_as_its_docstring_says(pools: PoolMaker, tmp_path: Path) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    example = ROOT / "examples" / "celery"
    env = {**os.environ, "KZPOOL_SOCKET": pool.socket}
    log = tmp_path / "worker.log"
    with open(log, "ab") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=solo", "-l",
             "INFO", "-n", f"kzt-{uuid.uuid4().hex[:8]}@localhost"], cwd=example, env=env,
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        sent = subprocess.run([sys.executable, "send.py", "3"], cwd=example, env=env,
                              capture_output=True, text=True, timeout=60)
        assert sent.stdout == "sent crunch(3.0) and crunch(0.1)\n", sent.stderr
        wait_for(lambda: "crunched for 0.1 s" in log.read_text(), 60, "both tasks")
        text = log.read_text()
        assert text.count("crunched for 3.0 s") == 1 and LOST not in text
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
        print(log.read_text())
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as broker:
        broker.channel().queue_delete("celery")  # the example's: Celery's default queue
