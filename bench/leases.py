"""Lease throughput and latency: kzpool next to direct pika and kombu, on the same broker.

    .venv/bin/python bench/leases.py [--messages 50000] [--confirm-messages 5000]
                                     [--runs 3] [--only CASE] [--uri URI]

Starts a real pool (``kzpool serve``, one broker) and, in the same run against the same
broker, measures with 256-byte messages:

* ``publish``: N publishes without confirms to a fresh queue (timed up to a round trip that
  follows the last publish on the same channel, so the broker has them all);
* ``confirm``: pika ``confirm_delivery()`` then one ``basic_publish`` at a time (a round trip
  each), kombu with ``confirm_publish``, kzpool the same way (``wait=True``) and kzpool
  pipelined (``basic_publish(..., wait=False)`` for all, then ``wait_for_confirms()``);
* ``consume``: N messages pre-filled with pika, then consumed and acked one by one in the
  callback with prefetch 500, until all N arrived;
* ``acquire``: ``pool.lease("float")`` + ``close()`` 1,000 times, the acquire alone timed,
  back to back and with 1 ms between a close and the next acquire (the worker has then
  finished with the closed lease);
  pika's ``connection.channel()`` on an open ``BlockingConnection`` for scale;
* ``hold``: 1,000 float leases acquired and held at once: acquire latency, and the resident
  memory of the pool's processes (master and children) before and after, on a
  fresh pool.

Prints msg/s (median of ``--runs``) with the ratios kzpool/pika and kombu/pika, and the
targets kzpool should meet.  Queues are deleted after each case.  Not a test: this machine
is shared and noisy, so run it a few times before believing a number.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu
import pika
import psutil
from kombu.transport.pyamqp import Transport as PyAmqpTransport

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kzpool
from kzpool.common.errors import KzpoolError

URI = "amqp://guest:guest@127.0.0.1:5672/%2F"
BODY = bytes(range(256))
PREFETCH = 500
CASES = ("publish", "confirm", "consume", "acquire", "hold")

# case -> (minimum kzpool/pika ratio, what it says)
TARGETS = {
    "publish": (1.5, ">= 1.5x pika"),
    "confirm": (4.0, ">= 4x pika confirm_delivery"),
    "consume": (1.2, ">= 1.2x pika"),
}


# ----- the pool ------------------------------------------------------------------------------


class Pool:
    """A ``kzpool serve`` process group on a private socket; :meth:`stop` leaves nothing."""

    def __init__(self, uri: str, prechannels: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kzb-"))
        self.socket = str(self.dir / "kzpool.sock")
        config = self.dir / "config.ini"
        config.write_text(f"[pool]\nsocket = {self.socket}\nprechannels = {prechannels}\n"
                          "max_leases_per_process = 2000\n"
                          f"log_level = warning\n[amqp]\nuri = {uri}\n")
        self.log = open(self.dir / "serve.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "kzpool", "serve", "-c", str(config)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.client = self._wait_running(30.0)

    def _wait_running(self, timeout: float) -> kzpool.PoolClient:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kzpool serve exited with {self.proc.returncode}; see"
                                   f" {self.dir / 'serve.log'}")
            try:
                client = kzpool.connect(self.socket)
                if client.status()["pool"]["state"] == "running":
                    return client
            except (OSError, KzpoolError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"the pool did not start within {timeout} s")

    def processes(self) -> list[psutil.Process]:
        master = psutil.Process(self.proc.pid)
        return [master, *master.children(recursive=True)]

    def rss(self) -> int:
        total = 0
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def worker_pids(self) -> list[int]:
        return [int(row["pid"]) for row in self.client.status()["connections"] if row["pid"]]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()


# ----- helpers -------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, pool: Pool) -> None:
        self.args = args
        self.pool = pool
        self.uri = args.uri
        self.kombu_uri = kombu_uri(args.uri)
        self.admin = pika.BlockingConnection(pika.URLParameters(self.uri))
        self.admin_channel = self.admin.channel()
        self.serial = 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.admin.close()

    @contextlib.contextmanager
    def queue(self, tag: str) -> Iterator[str]:
        """A fresh, empty queue, deleted afterwards."""
        self.serial += 1
        name = f"kzbench-{os.getpid()}-{tag}-{self.serial}"
        self.admin.process_data_events(0)  # answer heartbeats between cases
        self.admin_channel.queue_declare(name)
        self.admin_channel.queue_purge(name)
        try:
            yield name
        finally:
            self.admin_channel.queue_delete(name)

    def depth(self, queue: str) -> int:
        return int(self.admin_channel.queue_declare(queue, passive=True).method.message_count)

    def fill(self, queue: str, count: int) -> None:
        """Pre-fill ``queue`` with pika (confirmed at the end by a round trip)."""
        channel = self.admin_channel
        for _ in range(count):
            channel.basic_publish("", queue, BODY)
        deadline = time.monotonic() + 30
        while self.depth(queue) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def check(self, queue: str, expected: int, who: str) -> None:
        deadline = time.monotonic() + 10
        while (got := self.depth(queue)) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        if got != expected:
            print(f"  !! {who}: {got} messages in the queue, expected {expected}",
                  file=sys.stderr)


def kombu_uri(uri: str) -> str:
    """kombu spells the default vhost ``//``, not ``/%2F``."""
    return uri[:-4] + "//" if uri.endswith("/%2F") else uri


def kombu_connection(uri: str, confirm: bool = False) -> kombu.Connection:
    options = {"confirm_publish": True} if confirm else {}
    connection = kombu.Connection(uri, transport="pyamqp", transport_options=options)
    connection.connect()
    assert isinstance(connection.transport, PyAmqpTransport)
    return connection


class CpuMeter:
    """CPU seconds spent by the broker, the pool's processes, this process and its reaped
    children (a C client run with ``subprocess``) over each :func:`timed` call."""

    def __init__(self, broker: psutil.Process | None,
                 pool: Callable[[], list[psutil.Process]]) -> None:
        self.broker, self.pool = broker, pool
        self.last: dict[str, float] = {}
        self._start: dict[str, float] = {}

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            return float(times.user + times.system)
        return 0.0

    def _read(self) -> dict[str, float]:
        own = os.times()
        return {"broker": self._cpu(self.broker) if self.broker else float("nan"),
                "pool": sum(self._cpu(p) for p in self.pool()),
                "client": own.user + own.system,
                "child": own.children_user + own.children_system}

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> None:
        end = self._read()
        self.last = {k: end[k] - self._start[k] for k in end}


meter: CpuMeter | None = None  # set by a bench that reports CPU per message


def broker_process(uri: str) -> psutil.Process | None:
    """The local process listening on ``uri``'s port (the broker), if it can be seen."""
    port = pika.URLParameters(uri).port
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    return None


def timed(function: Callable[[], None]) -> float:
    if meter is not None:
        meter.start()
    start = time.perf_counter()
    function()
    elapsed = time.perf_counter() - start
    if meter is not None:
        meter.stop()
    return elapsed


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


# ----- publish ---------------------------------------------------------------------------------


def publish_pika(bench: Bench, count: int) -> float:
    connection = pika.BlockingConnection(pika.URLParameters(bench.uri))
    try:
        channel = connection.channel()
        with bench.queue("pub-pika") as queue:
            def run() -> None:
                for _ in range(count):
                    channel.basic_publish("", queue, BODY)
                channel.queue_declare(queue, passive=True)  # a round trip after the last one
            elapsed = timed(run)
            bench.check(queue, count, "pika publish")
    finally:
        connection.close()
    return count / elapsed


def publish_kombu(bench: Bench, count: int) -> float:
    with kombu_connection(bench.kombu_uri) as connection:
        channel = connection.channel()
        producer = kombu.Producer(channel, auto_declare=False)
        with bench.queue("pub-kombu") as queue:
            def run() -> None:
                for _ in range(count):
                    producer.publish(BODY, routing_key=queue, retry=False)
                channel.queue_declare(queue, passive=True)
            elapsed = timed(run)
            bench.check(queue, count, "kombu publish")
    return count / elapsed


def publish_kzpool(bench: Bench, count: int) -> float:
    with bench.pool.client.lease("float") as lease, bench.queue("pub-kz") as queue:
        def run() -> None:
            for _ in range(count):
                lease.basic_publish("", queue, BODY)
            lease.queue_declare(queue, passive=True)
        elapsed = timed(run)
        bench.check(queue, count, "kzpool publish")
    return count / elapsed


# ----- confirms ------------------------------------------------------------------------------


def confirm_pika(bench: Bench, count: int) -> float:
    connection = pika.BlockingConnection(pika.URLParameters(bench.uri))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        with bench.queue("conf-pika") as queue:
            def run() -> None:
                for _ in range(count):
                    channel.basic_publish("", queue, BODY)
            elapsed = timed(run)
            bench.check(queue, count, "pika confirm")
    finally:
        connection.close()
    return count / elapsed


def confirm_kombu(bench: Bench, count: int) -> float:
    with kombu_connection(bench.kombu_uri, confirm=True) as connection:
        producer = kombu.Producer(connection.channel(), auto_declare=False)
        with bench.queue("conf-kombu") as queue:
            def run() -> None:
                for _ in range(count):
                    producer.publish(BODY, routing_key=queue, retry=False)
            elapsed = timed(run)
            bench.check(queue, count, "kombu confirm")
    return count / elapsed


def confirm_kzpool_wait(bench: Bench, count: int) -> float:
    with bench.pool.client.lease("float") as lease, bench.queue("conf-kzw") as queue:
        lease.confirm_delivery()

        def run() -> None:
            for _ in range(count):
                lease.basic_publish("", queue, BODY)
        elapsed = timed(run)
        bench.check(queue, count, "kzpool confirm wait=True")
    return count / elapsed


def confirm_kzpool_pipelined(bench: Bench, count: int) -> float:
    with bench.pool.client.lease("float") as lease, bench.queue("conf-kzp") as queue:
        lease.confirm_delivery()

        def run() -> None:
            futures = [lease.basic_publish("", queue, BODY, wait=False) for _ in range(count)]
            lease.wait_for_confirms()
            failed = [f for f in futures if f is not None and f.exception(0) is not None]
            if failed:
                raise RuntimeError(f"{len(failed)} pipelined publishes failed")
        elapsed = timed(run)
        bench.check(queue, count, "kzpool confirm pipelined")
    return count / elapsed


# ----- consume + ack ---------------------------------------------------------------------------


def consume_on(channel: Any, queue: str, count: int) -> tuple[float, int]:
    """The same pika consumer code for a pika channel and a lease: seconds taken, received."""
    channel.basic_qos(prefetch_count=PREFETCH)
    received = 0

    def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        nonlocal received
        ch.basic_ack(method.delivery_tag)
        received += 1
        if received == count:
            ch.stop_consuming()

    def run() -> None:
        channel.basic_consume(queue, on_message)
        channel.start_consuming()
    return timed(run), received


def consume_pika(bench: Bench, count: int) -> float:
    connection = pika.BlockingConnection(pika.URLParameters(bench.uri))
    try:
        with bench.queue("cons-pika") as queue:
            bench.fill(queue, count)
            elapsed, _received = consume_on(connection.channel(), queue, count)
            bench.check(queue, 0, "pika consume")
    finally:
        connection.close()
    return count / elapsed


def consume_kombu(bench: Bench, count: int) -> float:
    with kombu_connection(bench.kombu_uri) as connection, bench.queue("cons-kombu") as queue:
        bench.fill(queue, count)
        received = 0

        def on_message(message: Any) -> None:
            nonlocal received
            message.ack()
            received += 1

        consumer = kombu.Consumer(connection.channel(), [kombu.Queue(queue, no_declare=True)],
                                  on_message=on_message, auto_declare=False)
        consumer.qos(prefetch_count=PREFETCH)

        def run() -> None:
            with consumer:
                while received < count:
                    connection.drain_events(timeout=30)
        elapsed = timed(run)
        bench.check(queue, 0, "kombu consume")
    return count / elapsed


def consume_kzpool(bench: Bench, count: int) -> float:
    with bench.pool.client.lease("float") as lease, bench.queue("cons-kz") as queue:
        bench.fill(queue, count)
        elapsed, received = consume_on(lease, queue, count)
        if received != count:
            print(f"  !! kzpool consume: start_consuming returned after {received} of {count}",
                  file=sys.stderr)
        bench.check(queue, 0, "kzpool consume")
    return count / elapsed


# ----- leases ----------------------------------------------------------------------------------


def acquire_kzpool(bench: Bench, count: int, pause: float = 0.0) -> list[float]:
    """``pause``: seconds between a close and the next acquire (0: back to back)."""
    client = bench.pool.client
    times = []
    for _ in range(count):
        start = time.perf_counter()
        lease = client.lease("float")
        times.append(time.perf_counter() - start)
        lease.close()
        if pause:
            time.sleep(pause)
    return times


def channel_open_pika(bench: Bench, count: int) -> list[float]:
    connection = pika.BlockingConnection(pika.URLParameters(bench.uri))
    times = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            channel = connection.channel()
            times.append(time.perf_counter() - start)
            channel.close()
    finally:
        connection.close()
    return times


def hold_kzpool(bench: Bench, count: int) -> dict[str, Any]:
    """On a pool of its own, so the other cases' garbage does not hide the growth."""
    pool = Pool(bench.uri, bench.args.prechannels)
    try:
        time.sleep(0.5)  # prechannels open, first samples taken
        return hold(pool, count)
    finally:
        pool.stop()


def hold(pool: Pool, count: int) -> dict[str, Any]:
    before = pool.rss()
    leases: list[kzpool.Lease] = []
    times = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            leases.append(pool.client.lease("float"))
            times.append(time.perf_counter() - start)
        channels = sum(int(r["channels"]) for r in pool.client.status()["connections"])
        after = pool.rss()
    finally:
        for lease in leases:
            lease.close()
    return {"times": times, "before": before, "after": after, "channels": channels}


# ----- the report ---------------------------------------------------------------------------


def rate(values: list[float]) -> str:
    return f"{statistics.median(values):>10,.0f}"


def ratio(values: list[float], base: list[float]) -> str:
    return f"{statistics.median(values) / statistics.median(base):5.2f}x"


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f"  (runs {min(values):,.0f} .. {max(values):,.0f})"


def ms(value: float) -> str:
    return f"{value * 1000:7.3f} ms"


def run_throughput(bench: Bench, runs: int, rows: list[tuple[str, Callable[[Bench, int], float],
                                                               int]]) -> list[list[float]]:
    """Each row ``runs`` times, interleaved so that noise hits all of them alike."""
    results: list[list[float]] = [[] for _ in rows]
    for _ in range(runs):
        for index, (_label, function, count) in enumerate(rows):
            results[index].append(function(bench, count))
    return results


def report_throughput(title: str, rows: list[tuple[str, Callable[[Bench, int], float], int]],
                      results: list[list[float]], target: tuple[float, str] | None,
                      kz_row: int) -> None:
    print(f"\n{title}")
    base = results[0]
    for (label, _function, count), values in zip(rows, results, strict=True):
        versus = "" if values is base else f"   {ratio(values, base)} pika"
        print(f"  {label:<34} {count:>7,} msgs {rate(values)} msg/s{versus}{spread(values)}")
    if target is not None:
        got = statistics.median(results[kz_row]) / statistics.median(base)
        verdict = "ok" if got >= target[0] else "MISSED"
        print(f"  target: kzpool {target[1]}: {got:.2f}x  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000,
                        help="messages per publish and consume case (default 50,000)")
    parser.add_argument("--confirm-messages", type=int, default=5_000,
                        help="messages for the one-by-one confirm cases (default 5,000)")
    parser.add_argument("--leases", type=int, default=1_000,
                        help="acquisitions in the acquire and hold cases (default 1,000)")
    parser.add_argument("--only", choices=CASES, action="append",
                        help="run only this case (repeatable)")
    parser.add_argument("--runs", type=int, default=1, help="repeat each case, report the median")
    parser.add_argument("--prechannels", type=int, default=10)
    parser.add_argument("--uri", default=URI)
    args = parser.parse_args()
    cases = args.only or list(CASES)
    n, nc, runs = args.messages, args.confirm_messages, args.runs

    print(f"$ {shlex.join(['python', *sys.argv])}")
    print(f"# {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {os.cpu_count()} CPUs,"
          f" broker {args.uri.split('@')[-1]}, {len(BODY)}-byte messages, {runs} run(s),"
          f" median shown; pool prechannels = {args.prechannels}")
    print(f"# pika {pika.__version__}, kombu {kombu.__version__} (py-amqp), kzpool"
          f" {kzpool.__version__}, Python {sys.version.split()[0]}")
    pool = Pool(args.uri, args.prechannels)
    bench = Bench(args, pool)
    try:
        if "publish" in cases:
            rows = [("pika BlockingConnection", publish_pika, n),
                    ("kombu Producer", publish_kombu, n),
                    ("kzpool lease", publish_kzpool, n)]
            report_throughput("1. publish, no confirms", rows, run_throughput(bench, runs, rows),
                              TARGETS["publish"], 2)
        if "confirm" in cases:
            rows = [("pika confirm_delivery, one by one", confirm_pika, nc),
                    ("kombu confirm_publish=True", confirm_kombu, nc),
                    ("kzpool confirm, wait=True", confirm_kzpool_wait, nc),
                    ("kzpool pipelined, wait=False", confirm_kzpool_pipelined, n)]
            report_throughput("2. publish with confirms", rows,
                              run_throughput(bench, runs, rows), TARGETS["confirm"], 3)
        if "consume" in cases:
            rows = [("pika basic_consume", consume_pika, n),
                    ("kombu Consumer", consume_kombu, n),
                    ("kzpool lease basic_consume", consume_kzpool, n)]
            report_throughput(f"3. consume + ack one by one, prefetch {PREFETCH}", rows,
                              run_throughput(bench, runs, rows), TARGETS["consume"], 2)
        if "acquire" in cases:
            kz: list[list[float]] = []
            paced: list[list[float]] = []
            pk: list[list[float]] = []
            for _ in range(runs):
                kz.append(acquire_kzpool(bench, args.leases))
                paced.append(acquire_kzpool(bench, args.leases, pause=0.001))
                pk.append(channel_open_pika(bench, args.leases))
                time.sleep(0.5)
            kz50 = statistics.median(percentile(t, 0.5) for t in kz)
            kz99 = statistics.median(percentile(t, 0.99) for t in kz)
            pk50 = statistics.median(percentile(t, 0.5) for t in pk)
            pk99 = statistics.median(percentile(t, 0.99) for t in pk)
            worst = max(max(t) for t in kz)
            print(f"\n4. lease acquire latency, {args.leases:,} x (lease + close), acquire timed")
            print(f"  kzpool pool.lease('float')        p50 {ms(kz50)}   p99 {ms(kz99)}"
                  f"   max {ms(worst)}   (back to back)")
            pc50 = statistics.median(percentile(t, 0.5) for t in paced)
            pc99 = statistics.median(percentile(t, 0.99) for t in paced)
            print(f"  kzpool pool.lease('float')        p50 {ms(pc50)}   p99 {ms(pc99)}"
                  f"   max {ms(max(max(t) for t in paced))}   (1 ms between close and acquire)")
            print(f"  pika connection.channel()         p50 {ms(pk50)}   p99 {ms(pk99)}")
            for name, p50, p99 in (("back to back", kz50, kz99), ("paced", pc50, pc99)):
                ok = p50 <= 0.0003 and p99 <= 0.002
                print(f"  target: p50 <= 0.3 ms, p99 <= 2 ms, {name}: {'ok' if ok else 'MISSED'}")
        if "hold" in cases:
            held = [hold_kzpool(bench, args.leases) for _ in range(runs)]
            p50 = statistics.median(percentile(h["times"], 0.5) for h in held)
            p99 = statistics.median(percentile(h["times"], 0.99) for h in held)
            before = statistics.median(h["before"] for h in held)
            after = statistics.median(h["after"] for h in held)
            channels = min(h["channels"] for h in held)
            print(f"\n5. {args.leases:,} float leases held at once")
            print(f"  acquire                           p50 {ms(p50)}   p99 {ms(p99)}"
                  f"   max {ms(max(max(h['times']) for h in held))}")
            print(f"  pool RSS (master + children)      {before / 2**20:.1f} MB before,"
                  f" {after / 2**20:.1f} MB with {channels:,} channels bound:"
                  f" {(after - before) / args.leases / 1024:.1f} KB per lease")
            print(f"  target: p99 <= 5 ms  {'ok' if p99 <= 0.005 else 'MISSED'}")
    finally:
        bench.close()
        pool.stop()


if __name__ == "__main__":
    main()
