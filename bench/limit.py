"""How close a lease comes to the limit: kzpool next to a C client on rabbitmq-c, and RPC.

    .venv/bin/python bench/limit.py [--rounds 3] [--messages 50000] [--confirm-messages 5000]
                                    [--window 1000] [--requests 2000] [--warm-up 100]
                                    [--leases 1000] [--uri URI]

Builds ``bench/limit_client.c`` (a small rabbitmq-c client) into ``/tmp/kzpool-bench/``
(``$KZPOOL_BENCH_CACHE``), installing ``librabbitmq-dev`` with apt-get when the header is
missing and it runs as root; otherwise it says how and leaves the C column out.  Then starts
a real pool (``kzpool serve``, one broker, ``bench/leases.py``'s ``Pool``) and, in the same
run against the same broker, with 256-byte messages, runs ``--rounds`` rounds, each of them
every case below in this order, so that the machine's noise falls on all of them alike:

* ``publish``: N publishes without confirms, then a round trip (C, lease, pika);
* ``consume``: N pre-filled messages consumed with prefetch 500, each acked on its own;
* ``confirm``: N publishes in confirm mode with at most ``--window`` unconfirmed (C, and
  the lease with ``basic_publish(..., wait=False)`` Futures); pika's ``BlockingConnection``
  cannot pipeline, so its column is ``confirm_delivery()`` one by one, for scale;
* ``rpc``: a server process consuming a request queue and replying to ``reply_to`` with the
  ``correlation_id``, and this process as the client, one request outstanding, each reply
  read from an exclusive server-named queue: ``--requests`` round trips timed after
  ``--warm-up``, with a lease on both sides, then with pika ``BlockingConnection`` on both;
* ``acquire``: ``pool.lease("float")`` + ``close()`` back to back, the acquire timed
  (``bench/leases.py``'s acquire case).

Prints the median over the rounds of each rate (and the spread), kzpool's ratio to C (and
to pika for RPC), the goal and whether it is met, with the commit and date.  Queues are
fresh and deleted after each case.  Not a test: the machine is shared and noisy, so run it
a few times before believing a number.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import multiprocessing
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import leases
import pika
from leases import (
    BODY,
    PREFETCH,
    URI,
    Bench,
    CpuMeter,
    Pool,
    acquire_kzpool,
    broker_process,
    confirm_pika,
    consume_kzpool,
    consume_pika,
    percentile,
    publish_kzpool,
    publish_pika,
    timed,
)

import kzpool
from kzpool import Confirm

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "limit_client.c"
CACHE = Path(os.environ.get("KZPOOL_BENCH_CACHE", "/tmp/kzpool-bench"))
HEADERS = (Path("/usr/include/rabbitmq-c/amqp.h"), Path("/usr/include/amqp.h"))
PACKAGE = "librabbitmq-dev"
STOP = b"stop"  # the request that ends an RPC server

# case -> minimum lease / C
GOALS = {"publish": 0.9, "consume": 0.85, "confirm": 0.85}  # lease / C client, by rate
RPC_GOAL = 1.0  # maximum lease p50 / pika p50
ACQUIRE_GOAL = 0.0003  # maximum p50, seconds


# ----- the C client ---------------------------------------------------------------------------


def have_header() -> bool:
    return any(path.exists() for path in HEADERS)


def install_header() -> str | None:
    """Install the rabbitmq-c headers with apt-get; None when done, else why not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"rabbitmq-c's header is missing: install it (`apt-get install -y {PACKAGE}`"
                " as root) and run again")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"# installing {PACKAGE} (apt-get install -y {PACKAGE})", flush=True)
    install = ["apt-get", "install", "-y", "-q", PACKAGE]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # a stale package list: update it once and try again
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not have_header():
        return f"apt-get install {PACKAGE} failed: {done.stderr.strip()[-300:]}"
    return None


def build_client() -> tuple[Path | None, str]:
    """The C client's binary (built once per version of its source), or None and why not."""
    source = SOURCE.read_bytes()
    binary = CACHE / f"limit_client-{hashlib.sha256(source).hexdigest()[:12]}"
    if binary.exists():
        return binary, f"{binary} (cached)"
    if not have_header() and (why := install_header()) is not None:
        return None, why
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc) found: install one (`apt-get install -y gcc`)"
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([compiler, "-O2", "-Wall", "-o", str(partial), str(SOURCE),
                           "-lrabbitmq"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None, f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-500:]}"
    partial.rename(binary)
    return binary, f"{binary} (built)"


class LimitBench(Bench):
    """``bench/leases.py``'s Bench, with the C client and this bench's settings."""

    def __init__(self, args: argparse.Namespace, pool: Pool, client: Path | None) -> None:
        super().__init__(args, pool)
        self.client = client
        self.rabbitmq_c = ""
        params = pika.URLParameters(args.uri)
        credentials = params.credentials
        assert isinstance(credentials, pika.PlainCredentials)
        self.c_args = ["-u", credentials.username, "-p", credentials.password,
                       "-v", params.virtual_host, params.host, str(params.port)]

    def run_c(self, queue: str, mode: str, *numbers: int) -> float:
        """Run the C client in ``mode`` on ``queue``: the seconds it measured."""
        assert self.client is not None
        command = [str(self.client), *self.c_args, queue, str(len(BODY)), mode,
                   *map(str, numbers)]
        if leases.meter is not None:
            leases.meter.start()
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        if leases.meter is not None:
            leases.meter.stop()
        if done.returncode != 0:
            raise RuntimeError(f"limit_client {mode} failed: {done.stderr.strip()}")
        result = json.loads(done.stdout)
        if result["nacks"]:
            print(f"  !! C {mode}: {result['nacks']} publishes nacked", file=sys.stderr)
        self.rabbitmq_c = result["rabbitmq_c"]
        return float(result["seconds"])


# ----- throughput cases -----------------------------------------------------------------------


def publish_c(bench: LimitBench, count: int) -> float:
    with bench.queue("pub-c") as queue:
        seconds = bench.run_c(queue, "publish", count)
        bench.check(queue, count, "C publish")
    return count / seconds


def consume_c(bench: LimitBench, count: int) -> float:
    with bench.queue("cons-c") as queue:
        bench.fill(queue, count)
        seconds = bench.run_c(queue, "consume", count, PREFETCH)
        bench.check(queue, 0, "C consume")
    return count / seconds


def confirm_c(bench: LimitBench, count: int) -> float:
    with bench.queue("conf-c") as queue:
        seconds = bench.run_c(queue, "confirm", count, bench.args.window)
        bench.check(queue, count, "C confirm")
    return count / seconds


def confirm_lease(bench: LimitBench, count: int) -> float:
    """Pipelined: ``wait=False`` Futures, at most ``--window`` of them unconfirmed."""
    window = bench.args.window
    with bench.pool.client.lease("float") as lease, bench.queue("conf-kz") as queue:
        lease.confirm_delivery()

        def run() -> None:
            pending: deque[Confirm] = deque()
            for _ in range(count):
                if len(pending) >= window:
                    pending.popleft().result(None)  # raises NackError if nacked
                future = lease.basic_publish("", queue, BODY, wait=False)
                assert future is not None
                pending.append(future)
            lease.wait_for_confirms()
            failed = [f for f in pending if f.exception(0) is not None]
            if failed:
                raise RuntimeError(f"{len(failed)} pipelined publishes failed")

        elapsed = timed(run)
        bench.check(queue, count, "kzpool confirm pipelined")
    return count / elapsed


# case -> (title, C, lease, pika, a note on pika's column)
Case = tuple[str, Callable[[LimitBench, int], float], Callable[[Any, int], float],
             Callable[[Any, int], float], str]
CASES: dict[str, Case] = {
    "publish": ("publish, no confirms", publish_c, publish_kzpool, publish_pika, ""),
    "consume": (f"consume + ack, prefetch {PREFETCH}", consume_c, consume_kzpool, consume_pika,
                ""),
    "confirm": ("pipelined confirms, window {window}", confirm_c, confirm_lease, confirm_pika,
                "pika: confirm_delivery(), one publish at a time ({confirm_messages:,} messages):"
                " BlockingConnection cannot pipeline"),
}


# ----- RPC --------------------------------------------------------------------------------------


def open_channel(kind: str, where: str) -> tuple[Any, Callable[[], None]]:
    """A lease (``where``: the pool's socket) or a pika channel (``where``: a URI)."""
    if kind == "lease":
        lease = kzpool.connect(where).lease("float")
        return lease, lease.close
    connection = pika.BlockingConnection(pika.URLParameters(where))
    return connection.channel(), connection.close


def rpc_server(kind: str, where: str, queue: str, ready: Event) -> None:
    """Answer each request on ``queue`` to its ``reply_to``, until the STOP request."""
    channel, close = open_channel(kind, where)
    try:
        channel.basic_qos(prefetch_count=10)

        def on_request(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            if body == STOP:
                ch.basic_ack(method.delivery_tag)
                ch.stop_consuming()
                return
            ch.basic_publish("", properties.reply_to, body,
                             pika.BasicProperties(correlation_id=properties.correlation_id))
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(queue, on_request)
        ready.set()
        channel.start_consuming()
    finally:
        close()


def stop_process(process: multiprocessing.process.BaseProcess) -> None:
    process.join(10)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


def rpc_round(bench: LimitBench, kind: str, requests: int, warm_up: int) -> list[float]:
    """Round trips, in seconds, with ``kind`` ("lease" or "pika") on both sides."""
    where = bench.pool.socket if kind == "lease" else bench.uri
    context = multiprocessing.get_context("spawn")  # a fresh process: no pool state inherited
    with bench.queue(f"rpc-{kind}") as queue:
        ready = context.Event()
        server = context.Process(target=rpc_server, args=(kind, where, queue, ready),
                                 name=f"rpc server ({kind})", daemon=True)
        server.start()
        channel, close = open_channel(kind, where)
        try:
            if not ready.wait(30):
                raise TimeoutError(f"the {kind} RPC server was not consuming after 30 s"
                                   f" (exit code {server.exitcode})")
            reply_queue = channel.queue_declare("", exclusive=True).method.queue
            replies = channel.consume(reply_queue, auto_ack=True, inactivity_timeout=10)
            times = []
            for serial in range(warm_up + requests):
                correlation_id = str(serial)
                properties = pika.BasicProperties(reply_to=reply_queue,
                                                  correlation_id=correlation_id)
                start = time.perf_counter()
                channel.basic_publish("", queue, BODY, properties)
                method, reply_properties, _body = next(replies)
                elapsed = time.perf_counter() - start
                if method is None:
                    raise TimeoutError(f"{kind} RPC: no reply to request {serial} in 10 s")
                if reply_properties.correlation_id != correlation_id:
                    raise RuntimeError(f"{kind} RPC: reply {reply_properties.correlation_id!r}"
                                       f" to request {correlation_id!r}")
                if serial >= warm_up:
                    times.append(elapsed)
            channel.cancel()
            channel.queue_delete(reply_queue)
            channel.basic_publish("", queue, STOP)
        finally:
            with contextlib.suppress(Exception):
                close()
            stop_process(server)
    return times


# ----- the report -------------------------------------------------------------------------------


def git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{commit} + uncommitted changes" if git("status", "--porcelain") else commit


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cell(values: list[float], width: int = 12) -> str:
    return f"{median(values):>{width},.0f}" if values else f"{'-':>{width}}"


def ms(value: float) -> str:
    return f"{value * 1000:.3f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report_rates(args: argparse.Namespace, rates: dict[str, dict[str, list[float]]],
                 have_c: bool) -> None:
    print(f"\n{'case':<36} {'C msg/s':>12} {'lease msg/s':>12} {'pika msg/s':>12} "
          f" {'lease/C':>8}  {'goal':<14} met?")
    for name, (title, *_functions, pika_label) in CASES.items():
        got = rates[name]
        title = title.format(window=args.window)
        pika_cell = cell(got["pika"]) + ("*" if pika_label else " ")
        if have_c:
            share = median(got["lease"]) / median(got["c"])
            ratio, met = f"{share:7.2f}x", verdict(share >= GOALS[name])
        else:
            ratio, met = f"{'-':>8}", "n/a (no C client)"
        print(f"{title:<36} {cell(got['c'])} {cell(got['lease'])} {pika_cell} {ratio}"
              f"  {'>= ' + format(GOALS[name], '.2g') + 'x C':<14} {met}")
    for _title, *_functions, pika_label in CASES.values():
        if pika_label:
            print(f"* {pika_label.format(confirm_messages=args.confirm_messages)}")
    print("\nrounds (msg/s, in run order; lease/C within each round):")
    for name, (title, *_rest) in CASES.items():
        got = rates[name]
        row = "   ".join(f"{who} " + " ".join(f"{v:,.0f}" for v in got[who])
                         for who in ("c", "lease", "pika") if got[who])
        if got["c"]:
            row += "   lease/C " + " ".join(f"{lease / c:.2f}"
                                          for lease, c in zip(got["lease"], got["c"], strict=True))
        print(f"  {title.format(window=args.window):<36} {row}")


def report_cpu(args: argparse.Namespace, cpu: dict[str, dict[str, list[dict[str, float]]]]
               ) -> None:
    """CPU per message of each process over the timed part of each case (medians)."""
    print("\nCPU per message, µs (medians of the rounds; the broker, the pool's processes, the"
          " client process; 2 cores = at most 2 s of CPU a second):")
    print(f"  {'case':<34} {'who':<6} {'broker':>7} {'pool':>7} {'client':>7} {'total':>7}")
    for name, (title, *_rest) in CASES.items():
        for who in ("c", "lease", "pika"):
            got = cpu[name][who]
            if not got:
                continue
            each = {k: median([g[k] for g in got]) * 1e6 for k in got[0]}
            client = each["client"] + each["child"]
            total = each["broker"] + each["pool"] + client
            pool = f"{each['pool']:7.1f}" if who == "lease" else f"{'-':>7}"
            print(f"  {title.format(window=args.window):<34} {who:<6} {each['broker']:7.1f}"
                  f" {pool} {client:7.1f} {total:7.1f}")


def report_rpc(args: argparse.Namespace, rpc: dict[str, list[list[float]]]) -> None:
    print(f"\nRPC round trip: {args.requests:,} requests after {args.warm_up:,} warm-up, one"
          " outstanding, reply_to an exclusive server-named queue (median of the rounds)")
    summary: dict[str, tuple[float, float]] = {}
    for kind, label in (("lease", "lease client, lease server"),
                        ("pika", "pika client, pika server")):
        p50 = median([percentile(t, 0.5) for t in rpc[kind]])
        p99 = median([percentile(t, 0.99) for t in rpc[kind]])
        summary[kind] = (p50, p99)
        each = ", ".join(f"{ms(percentile(t, 0.5))}/{ms(percentile(t, 0.99))}"
                         for t in rpc[kind])
        print(f"  {label:<28} p50 {ms(p50):>10}   p99 {ms(p99):>10}   (rounds p50/p99: {each})")
    p50_ratio = summary["lease"][0] / summary["pika"][0]
    p99_ratio = summary["lease"][1] / summary["pika"][1]
    print(f"  lease / pika                 p50 {p50_ratio:9.2f}x   p99 {p99_ratio:9.2f}x"
          f"   goal p50 <= {RPC_GOAL:.1f}x pika: {verdict(p50_ratio <= RPC_GOAL)}")


def report_acquire(args: argparse.Namespace, acquire: list[list[float]]) -> None:
    p50 = median([percentile(t, 0.5) for t in acquire])
    p99 = median([percentile(t, 0.99) for t in acquire])
    each = ", ".join(ms(percentile(t, 0.5)) for t in acquire)
    print(f"\nlease acquire, {args.leases:,} x pool.lease('float') + close() back to back")
    print(f"  p50 {ms(p50)}   p99 {ms(p99)}   (rounds p50: {each})"
          f"   goal p50 <= {ACQUIRE_GOAL * 1000:.1f} ms: {verdict(p50 <= ACQUIRE_GOAL)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every case, alternating; medians shown (default 3)")
    parser.add_argument("--messages", type=int, default=50_000,
                        help="messages per publish, consume and pipelined confirm case"
                             " (default 50,000)")
    parser.add_argument("--confirm-messages", type=int, default=5_000,
                        help="messages for pika's one-by-one confirms (default 5,000)")
    parser.add_argument("--window", type=int, default=1_000,
                        help="unconfirmed publishes at most, pipelined (default 1,000)")
    parser.add_argument("--requests", type=int, default=2_000,
                        help="RPC round trips timed per round (default 2,000)")
    parser.add_argument("--warm-up", type=int, default=100,
                        help="RPC round trips before the timed ones (default 100)")
    parser.add_argument("--leases", type=int, default=1_000,
                        help="acquisitions per round in the acquire case (default 1,000)")
    parser.add_argument("--prechannels", type=int, default=10)
    parser.add_argument("--uri", default=URI)
    args = parser.parse_args()
    n, rounds = args.messages, args.rounds

    print(f"$ {shlex.join(['python', *sys.argv])}")
    client, how = build_client()
    print(f"# commit {git_commit()}, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z},"
          f" {os.cpu_count()} CPUs, broker {args.uri.split('@')[-1]}, {len(BODY)}-byte messages,"
          f" {rounds} alternating round(s), median shown")
    print(f"# C client: {how}")
    if client is None:
        print("# the C column is left out")
    pool = Pool(args.uri, args.prechannels)
    bench = LimitBench(args, pool, client)
    rates: dict[str, dict[str, list[float]]] = {
        name: {"c": [], "lease": [], "pika": []} for name in CASES}
    cpu: dict[str, dict[str, list[dict[str, float]]]] = {
        name: {"c": [], "lease": [], "pika": []} for name in CASES}
    leases.meter = meter = CpuMeter(broker_process(args.uri), pool.processes)
    rpc: dict[str, list[list[float]]] = {"lease": [], "pika": []}
    acquire: list[list[float]] = []
    try:
        for number in range(1, rounds + 1):
            print(f"# round {number} of {rounds}", file=sys.stderr, flush=True)
            for name, (_title, c_case, lease_case, pika_case, _label) in CASES.items():
                pika_count = args.confirm_messages if name == "confirm" else n
                for who, case, count in (("c", c_case, n), ("lease", lease_case, n),
                                         ("pika", pika_case, pika_count)):
                    if who == "c" and client is None:
                        continue
                    rates[name][who].append(case(bench, count))
                    cpu[name][who].append({k: v / count for k, v in meter.last.items()})
            for kind in ("lease", "pika"):
                rpc[kind].append(rpc_round(bench, kind, args.requests, args.warm_up))
            acquire.append(acquire_kzpool(bench, args.leases))
    finally:
        bench.close()
        pool.stop()
    print(f"# pika {pika.__version__}, kzpool {kzpool.__version__}, Python"
          f" {sys.version.split()[0]}" + (f", rabbitmq-c {bench.rabbitmq_c}" if client else ""))
    report_rates(args, rates, client is not None)
    report_cpu(args, cpu)
    report_rpc(args, rpc)
    report_acquire(args, acquire)


if __name__ == "__main__":
    main()
