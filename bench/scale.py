"""Many client processes on one pool against as many with their own pika connections.

    .venv/bin/python bench/scale.py [--n 1,8,64,256] [--duration 8] [--prefetch 100]
                                    [--node NAME:PORT | --uri URI --node-name NAME]

A pool exists so that many processes share few broker connections.  For each N, N client
processes (forked from this one) each open a channel, on a lease of one pool (``kzpool
serve``, one broker, one connection) or on a pika ``BlockingConnection`` of its own, and in
the same run, pool and pika alternating which goes first:

* ``publish``: each process publishes 256-byte messages with confirms, one by one, to a
  queue of its own for ``--duration`` seconds: the aggregate confirmed msg/s, and p50/p99
  of one ``basic_publish`` (its round trip to the confirm), all processes' together;
* then, all N still connected: the broker's memory for client connections and channels
  (``rabbitmq-diagnostics memory_breakdown``: connection_readers + connection_writers +
  connection_channels + connection_other, not RSS), the connections and channels it lists,
  and the pool's RSS (master and connection workers); then the same memory again after a
  garbage collection of every process of the node (at rest: what the connections and
  channels hold, not heaps that traffic grew);
* ``consume``: each process consumes what it published, prefetch ``--prefetch``, each
  message acked on its own: the aggregate msg/s (all messages over the time to the last
  one's ack) and p50/p99 of the time between one process's consecutive deliveries.

The broker figures are the client's own: for the pool, everything on the node against the
node before the pool started (its connection and every channel it holds count); for pika,
against the node just before that phase's processes connected (the idle pool's part left
out).  So the node must serve nothing else: by default this starts an extra node of its
own, kzscale on 5811 (scripts/brokers.py; needs root), and stops it after unless it was
running before.  Targets: at every N the pool's aggregate rates are at least pika's, and at
N = 256 the broker's connection and channel memory for the pool is at most a tenth of
pika's.  Not a test: the machine is shared and noisy; run it more than once.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import datetime
import multiprocessing
import queue as queue_module
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pika
from leases import BODY, Pool, percentile
from nodes import load_brokers

import kzpool

ROOT = Path(__file__).resolve().parent.parent
brokers = load_brokers()
NODE = ("kzscale", 5811)
KINDS = ("pool", "pika")
CONNECT_TIMEOUT = 120.0  # every process connected and ready (N = 256 on 2 cores)
MEMORY_TARGET = 10.0  # pika's connection+channel memory / the pool's, at N = MEMORY_AT
MEMORY_AT = 256
# the pool's defaults that bound N: every process is this user's (max_leases_per_uid 4096)
# and a client of the one connection worker (max_peers 4000); each process holds one lease
MAX_N = 4000


@dataclass
class Phase:
    """One kind at one N: what its processes reported and what the broker showed."""
    kind: str
    n: int
    published: int = 0
    publish_seconds: float = 0.0
    publish_lat: list[float] = field(default_factory=list)
    consumed: int = 0
    consume_seconds: float = 0.0
    consume_lat: list[float] = field(default_factory=list)
    memory: int = 0  # bytes: the kind's connections and channels on the broker
    parts: dict[str, int] = field(default_factory=dict)  # the same by memory_breakdown key
    rest: int = 0  # bytes: the same after a garbage collection of the node
    connections: int = 0
    channels: int = 0
    pool_rss: int = 0

    def rate(self, what: str) -> float:
        count, seconds = ((self.published, self.publish_seconds) if what == "publish"
                          else (self.consumed, self.consume_seconds))
        return count / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class Plan:
    kind: str
    socket: str
    uri: str
    duration: float
    prefetch: int


def open_channel(plan: Plan) -> tuple[Any, Any]:
    """(the channel, what to close): a lease of the pool, or a pika connection's channel."""
    if plan.kind == "pool":
        lease = kzpool.connect(plan.socket).lease("float", timeout=CONNECT_TIMEOUT)
        return lease, lease
    connection = pika.BlockingConnection(pika.URLParameters(plan.uri))
    return connection.channel(), connection


def client(plan: Plan, queue: str, out: Any, go_publish: Event, go_consume: Event,
           start: Any) -> None:
    """One client process: connect, publish with confirms, wait, consume, report."""
    try:
        channel, closer = open_channel(plan)
        channel.queue_declare(queue)
        channel.confirm_delivery()
        out.put(("ready", queue))
        go_publish.wait()
        begin = start.value
        time.sleep(max(begin - time.monotonic(), 0))
        end = begin + plan.duration
        lat = array.array("d")
        clock = time.perf_counter
        now = time.monotonic()
        while now < end:
            t0 = clock()
            channel.basic_publish("", queue, BODY)
            lat.append(clock() - t0)
            now = time.monotonic()
        out.put(("published", len(lat), lat.tobytes()))
        go_consume.wait()
        begin = start.value
        time.sleep(max(begin - time.monotonic(), 0))
        gaps = array.array("d")
        count = len(lat)
        last = [clock()]

        def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
            t = clock()
            gaps.append(t - last[0])
            last[0] = t
            ch.basic_ack(method.delivery_tag)
            if len(gaps) >= count:
                ch.stop_consuming()

        if count:
            channel.basic_qos(prefetch_count=plan.prefetch)
            channel.basic_consume(queue, on_message)
            channel.start_consuming()
        out.put(("consumed", len(gaps), time.monotonic() - begin, gaps.tobytes()))
        channel.queue_delete(queue)
        closer.close()
    except Exception as e:  # reported to the parent, which stops the run
        out.put(("error", f"{plan.kind} {queue}: {type(e).__name__}: {e}"))


def collect(out: Any, tag: str, n: int, timeout: float) -> list[tuple[Any, ...]]:
    """``n`` reports tagged ``tag`` from the processes; the first error stops the run."""
    rows: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + timeout
    while len(rows) < n:
        try:
            row = out.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue_module.Empty:
            raise TimeoutError(f"{len(rows)} of {n} processes reported {tag!r} within"
                               f" {timeout:.0f} s") from None
        if row[0] == "error":
            raise RuntimeError(row[1])
        rows.append(row)
    return rows


def latencies(rows: list[tuple[Any, ...]]) -> list[float]:
    values: list[float] = []
    for row in rows:
        values.extend(array.array("d", row[-1]))
    return values


class Broker:
    """The node's client memory and counts, by its CLI (a second or two each)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.collects = brokers.full_name(name) != brokers.DEFAULT_NODE

    def memory(self, rest: bool = False) -> dict[str, int]:
        """The client categories of memory_breakdown (bytes), and their "total"; ``rest``:
        after a garbage collection of the node's processes (an extra node only)."""
        if rest and self.collects:
            brokers.collect_garbage(self.name)
        breakdown = brokers.memory_breakdown(self.name)
        parts = {key: breakdown[key] for key in brokers.CLIENT_MEMORY}
        return {**parts, "total": sum(parts.values())}

    def counts(self) -> tuple[int, int]:
        connections, channels = brokers.client_counts(self.name)
        return int(connections), int(channels)


def run_phase(plan: Plan, n: int, pool: Pool, broker: Broker,
              empty: tuple[dict[str, int], int, int]) -> Phase:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    go_publish, go_consume = ctx.Event(), ctx.Event()
    start = ctx.Value("d", 0.0, lock=False)
    phase = Phase(plan.kind, n)
    # the pool's connection and every channel it holds are its own cost
    before = empty if plan.kind == "pool" else (broker.memory(rest=True), *broker.counts())
    tag = uuid.uuid4().hex[:6]
    procs = [ctx.Process(target=client, daemon=True,
                         args=(plan, f"kzscale-{plan.kind}-{n}-{tag}-{i}", out, go_publish,
                               go_consume, start))
             for i in range(n)]
    try:
        for proc in procs:
            proc.start()
        collect(out, "ready", n, CONNECT_TIMEOUT)
        start.value = time.monotonic() + 0.2
        go_publish.set()
        rows = collect(out, "published", n, plan.duration + 60)
        phase.published = sum(row[1] for row in rows)
        phase.publish_seconds = plan.duration
        phase.publish_lat = latencies(rows)
        during = broker.memory()
        phase.parts = {key: during[key] - before[0][key] for key in during}
        phase.memory = phase.parts["total"]
        phase.rest = broker.memory(rest=True)["total"] - before[0]["total"]
        connections, channels = broker.counts()
        phase.connections, phase.channels = connections - before[1], channels - before[2]
        phase.pool_rss = pool.rss()
        start.value = time.monotonic() + 0.2
        go_consume.set()
        rows = collect(out, "consumed", n, plan.duration * 10 + 120)
        phase.consumed = sum(row[1] for row in rows)
        phase.consume_seconds = max(row[2] for row in rows)
        phase.consume_lat = latencies(rows)
        for proc in procs:
            proc.join(30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return phase


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def report(phases: dict[tuple[str, int], Phase], ns: list[int]) -> bool:
    print("\n| N | client | publish msg/s | p50 / p99 ms | consume msg/s | p50 / p99 ms |"
          " broker conn+chan memory: after traffic / at rest | connections / channels |"
          " pool RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in ns:
        for kind in KINDS:
            p = phases[(kind, n)]
            pub = (f"{ms(percentile(p.publish_lat, 0.5))} / {ms(percentile(p.publish_lat, 0.99))}"
                   if p.publish_lat else "-")
            con = (f"{ms(percentile(p.consume_lat, 0.5))} / {ms(percentile(p.consume_lat, 0.99))}"
                   if p.consume_lat else "-")
            rss = f"{p.pool_rss / 2**20:.0f} MiB" if kind == "pool" else ""
            print(f"| {n} | {kind} | {p.rate('publish'):,.0f} | {pub} | {p.rate('consume'):,.0f}"
                  f" | {con} | {p.memory / 2**20:.2f} / {p.rest / 2**20:.2f} MiB"
                  f" | {p.connections} / {p.channels}"
                  f" | {rss} |")
    met = True
    print("\n| N | publish pool / pika | consume pool / pika | memory pika / pool: after"
          " traffic, at rest | targets |")
    print("|---|---|---|---|---|")
    for n in ns:
        pool, plain = phases[("pool", n)], phases[("pika", n)]
        pub_x = pool.rate("publish") / max(plain.rate("publish"), 1e-9)
        con_x = pool.rate("consume") / max(plain.rate("consume"), 1e-9)
        mem = plain.memory / max(pool.memory, 1)
        ok = pub_x >= 1.0 and con_x >= 1.0 and (n != MEMORY_AT or mem >= MEMORY_TARGET)
        met = met and ok
        goal = "rates >= 1.0x" + (f", memory >= {MEMORY_TARGET:.0f}x" if n == MEMORY_AT else "")
        rest = plain.rest / max(pool.rest, 1)
        print(f"| {n} | {pub_x:.2f}x | {con_x:.2f}x | {mem:.1f}x, {rest:.1f}x | {goal}:"
              f" **{'met' if ok else 'missed'}** |")
    return met


def commit() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="1,8,64,256", help="client process counts (1,8,64,256)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of publishing")
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--node", metavar="NAME:PORT", default=f"{NODE[0]}:{NODE[1]}",
                        help="the extra node to start (and stop after) and measure")
    parser.add_argument("--uri", help="a broker already running (then --node-name names its"
                                      " node, for its memory; nothing is started or stopped)")
    parser.add_argument("--node-name", help="with --uri: its node (rabbit@localhost: 5672's)")
    args = parser.parse_args()
    try:
        ns = sorted({int(x) for x in args.n.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--n {args.n!r}: comma-separated process counts, e.g. 1,8,64,256")
    if not ns or min(ns) < 1 or args.duration <= 0:
        parser.error("--n needs counts >= 1 and --duration a positive number of seconds")
    if max(ns) > MAX_N:
        parser.error(f"--n {max(ns)}: at most {MAX_N}, the clients one connection worker"
                     " serves at once (the pool's max_peers)")
    if args.uri and not args.node_name:
        parser.error("--uri needs --node-name (the node whose memory is measured)")
    print(f"$ python bench/scale.py --n {','.join(map(str, ns))} --duration {args.duration:g}"
          f" --prefetch {args.prefetch}" + (f" --uri {args.uri}" if args.uri else ""))
    node = None
    if args.uri:
        uri, name = args.uri, args.node_name
    else:
        spec = args.node.rpartition(":")
        name = brokers.full_name(spec[0])
        running = brokers.port_open(int(spec[2]))
        node = brokers.start_node(name, int(spec[2]))
        uri = node.url
    broker = Broker(name)
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit()},"
          f" node {name}, {multiprocessing.cpu_count()} cores")
    empty = (broker.memory(rest=True), *broker.counts())
    pool = Pool(uri, prechannels=10)
    phases: dict[tuple[str, int], Phase] = {}
    try:
        for index, n in enumerate(ns):
            for kind in KINDS if index % 2 == 0 else KINDS[::-1]:
                plan = Plan(kind, pool.socket, uri, args.duration, args.prefetch)
                phase = run_phase(plan, n, pool, broker, empty)
                phases[(kind, n)] = phase
                print(f"  N={n} {kind}: publish {phase.rate('publish'):,.0f} msg/s, consume"
                      f" {phase.rate('consume'):,.0f} msg/s, memory"
                      f" {phase.memory / 2**20:.2f} MiB, at rest {phase.rest / 2**20:.2f} MiB ("
                      + ", ".join(f"{k} {v / 2**10:,.0f} KiB" for k, v in phase.parts.items()
                                  if k != "total") + ")", flush=True)
    finally:
        pool.stop()
        if node is not None and not running:
            brokers.stop_node(node)
    met = report(phases, ns)
    print(f"\nall targets: {'met' if met else 'missed'}")


if __name__ == "__main__":
    main()
