"""Celery through kzpool:// beside amqp://, on the same broker, in the same run.

    .venv/bin/python bench/celery.py [--tasks 3000] [--workers 4] [--runs 3] [--pool solo]

For each transport, on a vhost of its own (the pool serves its vhost through one broker
connection):

* ``publish``: ``app.send_task("tiny")`` N times from this process (Celery's producer pool,
  no confirms), tasks a second;
* ``run``: one ``celery worker`` (``--pool``, Celery's defaults otherwise) started on those
  N queued tasks; tasks a second from the first task's start to the last's (each task
  appends the time to a file: ``bench/celery_app.py``);
* ``connections``: ``--workers`` worker processes up and idle; the broker connections (and
  their channels) that they hold, or for kzpool:// that the pool holds for them (found by
  their ports: ``rabbitmqctl list_connections peer_port`` and ``psutil``).

The transports run interleaved, ``--runs`` times; prints the medians and the ratios
kzpool / amqp.  Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# this file's name is celery's: the package must not find it on the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import pika  # noqa: E402
import pika.exceptions  # noqa: E402
import psutil  # noqa: E402
from celery import Celery  # noqa: E402

import kzpool.kombu  # noqa: E402, F401  (the kzpool:// scheme)
from bench.leases import Pool  # noqa: E402

TRANSPORTS = ("amqp", "kzpool")
VHOST = "kzpool-bench-celery-{}"


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          check=True, timeout=120)
    return done.stdout


def vhost_uri(transport: str) -> str:
    name = VHOST.format(transport)
    if name not in rabbitmqctl("list_vhosts").split():
        rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return f"amqp://guest:guest@127.0.0.1:5672/{name}"


def held_by(pids: list[int], vhost: str) -> tuple[int, int]:
    """The broker connections of ``vhost`` that the processes ``pids`` (and their children)
    hold, and the channels on them."""
    ports = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(pid)
            for proc in (parent, *parent.children(recursive=True)):
                ports |= {c.laddr.port for c in proc.net_connections("tcp")
                          if c.raddr and c.raddr.port == 5672}
    rows = [row.split("\t") for row in rabbitmqctl(
        "list_connections", "peer_port", "vhost", "channels", "--no-table-headers").splitlines()]
    mine = [row for row in rows if len(row) == 3 and row[1] == vhost and int(row[0]) in ports]
    return len(mine), sum(int(row[2]) for row in mine)


class Worker:
    """A ``celery worker`` of bench/celery_app.py in its own session."""

    def __init__(self, broker: str, queue: str, record: Path, pool: str, log: Path,
                 level: str = "WARNING") -> None:
        env = {**os.environ, "KZB_BROKER": broker, "KZB_QUEUE": queue,
               "KZB_RECORD": str(record)}
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker",
                 f"--pool={pool}", "--concurrency=1", f"--loglevel={level}",
                 "-n", f"kzb-{os.getpid()}-{id(self)}@localhost"],
                cwd=ROOT, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout} s")


class Side:
    """One transport: its broker URL for Celery, its vhost, its queue."""

    def __init__(self, transport: str, work: Path, pool_kind: str) -> None:
        self.transport, self.work, self.pool_kind = transport, work, pool_kind
        uri = vhost_uri(transport)
        self.vhost = uri.rsplit("/", 1)[1]
        self.pool: Pool | None = None
        self.uri = self.broker = uri
        if transport == "kzpool":
            self.pool = Pool(uri, prechannels=4)
            self.broker = f"kzpool://{self.pool.socket}"
        self.queue = f"kzb-{transport}-{os.getpid()}"

    def app(self) -> Celery:
        return Celery("kzb", broker=self.broker, set_as_current=False,
                      config_source={"task_default_queue": self.queue})

    def purge(self, delete: bool = False) -> None:
        """Empty the queue (Celery's producers remember declaring it: it stays), or delete
        it at the end."""
        with pika.BlockingConnection(pika.URLParameters(self.uri)) as conn, \
                contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
            channel = conn.channel()
            channel.queue_delete(self.queue) if delete else channel.queue_purge(self.queue)

    def publish(self, count: int) -> float:
        """Publish one task, then ``count`` timed: ``count + 1`` are queued after."""
        app = self.app()
        app.send_task("tiny")  # the connection and its first declare, outside the timing
        start = time.perf_counter()
        for _ in range(count):
            app.send_task("tiny")
        elapsed = time.perf_counter() - start
        app.close()
        return count / elapsed

    def run(self, count: int) -> float:
        record = self.work / f"{self.transport}-{time.monotonic_ns()}.record"
        record.touch()
        worker = Worker(self.broker, self.queue, record, self.pool_kind,
                        self.work / f"{self.transport}.log")
        try:
            wait(lambda: len(record.read_text().splitlines()) >= count, 300,
                 f"{count} tasks on {self.transport}")
        finally:
            worker.stop()
        times = sorted(float(t) for t in record.read_text().split())
        return (len(times) - 1) / (times[-1] - times[0])

    def connections(self, workers: int) -> tuple[int, int]:
        started = [Worker(self.broker, self.queue, self.work / "idle.record", self.pool_kind,
                          self.work / f"{self.transport}-idle-{n}.log", "INFO")
                   for n in range(workers)]
        try:
            wait(lambda: all(" ready." in self._log_of(w) for w in started), 120, "workers up")
            holders = [self.pool.proc.pid] if self.pool else [w.proc.pid for w in started]
            return held_by(holders, self.vhost)
        finally:
            for worker in started:
                worker.stop()

    def _log_of(self, worker: Worker) -> str:
        with contextlib.suppress(OSError):
            return worker.log.read_text(errors="replace")
        return ""

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pool", default="solo", help="the workers' --pool")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kzb-celery-"))
    sides = {t: Side(t, work, args.pool) for t in TRANSPORTS}
    rates: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.runs):
            for transport, side in sides.items():
                side.purge()
                rates.setdefault(("publish", transport), []).append(side.publish(args.tasks))
                rates.setdefault(("run", transport), []).append(side.run(args.tasks + 1))
        held = {t: side.connections(args.workers) for t, side in sides.items()}
    finally:
        for side in sides.values():
            side.purge(delete=True)
            side.close()
    report(args, rates, held)


def report(args: argparse.Namespace, rates: dict[tuple[str, str], list[float]],
           held: dict[str, tuple[int, int]]) -> None:
    from importlib.metadata import version

    print(f"$ {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{datetime.date.today()}, celery {version('celery')}, kombu {version('kombu')},"
          f" {os.cpu_count()} cores; medians of {args.runs} runs, {args.tasks} tasks")
    print("\n| case | amqp:// | kzpool:// | kzpool / amqp |\n|---|---|---|---|")
    for case, unit in (("publish", "tasks/s"), ("run", "tasks/s")):
        amqp, kz = (statistics.median(rates[(case, t)]) for t in TRANSPORTS)
        label = "publish (send_task)" if case == "publish" else f"run ({args.pool} worker)"
        print(f"| {label} | {amqp:,.0f} {unit} | {kz:,.0f} {unit} | {kz / amqp:.2f}x |")
    (ac, ach), (kc, kch) = held["amqp"], held["kzpool"]
    print(f"| broker connections, {args.workers} idle workers | {ac} | {kc} |"
          f" {kc / ac:.2f}x |")
    print(f"| broker channels, {args.workers} idle workers | {ach} | {kch} |"
          f" {kch / ach:.2f}x |")
    print("\n(each run: " + ", ".join(f"{c} {t} " + "/".join(f"{r:,.0f}" for r in v)
                                      for (c, t), v in rates.items()) + ")")


if __name__ == "__main__":
    main()
