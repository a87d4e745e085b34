"""Failover, fail-back and worker-death figures, with every message accounted for.

    .venv/bin/python bench/failover.py [--rounds 3]

Needs root (it starts, stops and kills an extra RabbitMQ node, kzp1 on 5701, through
scripts/brokers.py; never the default node).  A pool runs with kzp1 as primary and the
default node as secondary.  With ``KZPOOL_TEST_RABBITMQ=4`` both are RabbitMQ 4 nodes of
their own (kz4p1 on 5721 and kz4 on 5720, kzpool/testing/nodes.py), started and stopped
here.  Each round:

1. a float lease publishes with confirms (persistent, durable queue) without pause; kzp1's
   app is stopped: time from ``stop_app`` returning to the first confirmed publish on the
   secondary; then started: time from ``start_app`` returning to the first confirmed publish
   back on kzp1 (fail-back);
2. a float lease consumes with unacked messages in flight; its worker is killed (kill -9):
   time from the kill to the next delivery.

At the end every queue is drained on both brokers: confirmed publishes lost (must be 0),
duplicates, and deliveries missing after the kills (must be 0).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pika
from nodes import load_brokers

import kzpool
from kzpool.testing import DEFAULT_URI, LAYOUT, drain

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = DEFAULT_URI
EXTRA = LAYOUT.extra[0]  # or --node's


brokers = load_brokers()


class Pool:
    def __init__(self, uris: list[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kzf-"))
        self.socket = str(self.dir / "kzpool.sock")
        config = self.dir / "config.ini"
        config.write_text(f"[pool]\nsocket = {self.socket}\nheartbeat = 2\n"
                          "reconnect_backoff_max = 0.5\n[amqp]\n"
                          + "".join(f"uri = {u}\n" for u in uris))
        with open(self.dir / "pool.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kzpool", "serve", "-c", str(config)], stderr=log,
                start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.client = kzpool.connect(self.socket)
                if self.client.status()["pool"]["state"] == "running":
                    return
            except kzpool.KzpoolError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the pool did not start")

    def worker_of(self, broker: str) -> int:
        rows = self.client.status()["connections"]
        return int(next(r["pid"] for r in rows if r["broker"] == broker))

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(20)


class Publisher(threading.Thread):
    """Publishes confirmed messages as fast as it can; notes where each one landed."""

    def __init__(self, pool: Pool, queue: str) -> None:
        super().__init__(daemon=True)
        self.lease = pool.client.lease("float", timeout=30)
        self.lease.queue_declare(queue, durable=True)
        self.lease.confirm_delivery()
        self.queue = queue
        self.sent: list[tuple[float, str | None, bytes]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        persistent = pika.BasicProperties(delivery_mode=2)
        n = 0
        while not self.halt.is_set():
            body = f"{self.queue}:{n}".encode()  # unique across rounds
            self.lease.basic_publish("", self.queue, body, persistent)
            self.sent.append((time.monotonic(), self.lease.broker, body))
            n += 1

    def first_on(self, broker: str, after: float, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, where, _body in reversed(self.sent):
                if when < after:
                    break
                if where == broker:
                    return min(w for w, b, _ in self.sent if w >= after and b == broker) - after
            time.sleep(0.005)
        raise TimeoutError(f"no confirmed publish on {broker}")


def failover_round(pool: Pool, primary: str, secondary: str,
                   queue: str) -> tuple[float, float, float, float]:
    """(stop_app -> first confirm on the secondary, start_app -> first on the primary, and
    the publisher's gaps: its last confirm on the one broker -> its first on the other)."""
    publisher = Publisher(pool, queue)
    publisher.start()
    time.sleep(0.5)
    stopping = time.monotonic()  # from the moment stop_app is issued
    brokers.stop_app(EXTRA)
    over = publisher.first_on(secondary, stopping)
    time.sleep(0.5)
    brokers.start_app(EXTRA)  # returns once the node accepts connections again
    started = time.monotonic()
    back = publisher.first_on(primary, started)
    time.sleep(0.3)
    publisher.halt.set()
    publisher.join(30)
    publisher.lease.close()
    sent.extend(body for _w, _b, body in publisher.sent)
    return over, back, gap(publisher, primary, stopping + over), gap(publisher, secondary,
                                                                       started + back)


def gap(publisher: Publisher, before: str, first: float) -> float:
    """From the publisher's last confirm on ``before`` to ``first``, its first elsewhere."""
    return first - max(w for w, b, _ in publisher.sent if b == before and w <= first)


def kill_round(pool: Pool, primary: str, queue: str) -> float:
    feeder = pool.client.lease("float")
    feeder.queue_declare(queue, durable=True)
    for i in range(200):
        feeder.basic_publish("", queue, b"%d" % i, pika.BasicProperties(delivery_mode=2))
    feeder.close()
    lease = pool.client.lease("float", timeout=30)
    lease.queue_declare(queue, durable=True)  # replayed wherever the lease goes
    lease.basic_qos(prefetch_count=20)
    stream = lease.consume(queue, inactivity_timeout=10)
    first = [next(stream) for _ in range(5)]  # in flight, not acked
    got = [body for _m, _p, body in first]
    old_tag = max(m.delivery_tag for m, _p, _b in first)
    os.kill(pool.worker_of(primary), signal.SIGKILL)
    killed = time.monotonic()
    resumed = None
    for method, _props, body in stream:
        if method is None:
            break
        if resumed is None and method.delivery_tag > old_tag + 15:  # past what was read before
            resumed = time.monotonic() - killed
        got.append(body)
        lease.basic_ack(method.delivery_tag)
    assert resumed is not None, "no delivery from a new channel after the kill"
    lease.cancel()
    lease.close()
    missing = {b"%d" % i for i in range(200)} - set(got)
    assert not missing, f"{len(missing)} deliveries never came back"
    return resumed


sent: list[bytes] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--node", metavar="NAME:PORT",
                        help=f"the primary node to start, stop and kill (default"
                             f" {LAYOUT.extra[0]}:{LAYOUT.extra[1]})")
    args = parser.parse_args()
    global EXTRA
    spec = (args.node.rpartition(":")[0], int(args.node.rpartition(":")[2])) if args.node \
        else LAYOUT.extra
    EXTRA = brokers.full_name(spec[0])
    print(f"$ python bench/failover.py --rounds {args.rounds}"
          + (f" --node {args.node}" if args.node else ""))
    default = None if LAYOUT.default_is_machines else brokers.start_node(
        *LAYOUT.default, rabbitmq=LAYOUT.rabbitmq)
    node = brokers.start_node(*spec, rabbitmq=LAYOUT.rabbitmq)
    print(f"RabbitMQ {brokers.install_version(node.root)}: {node.name} primary, "
          f"{LAYOUT.default[0]} secondary")
    pool = Pool([node.url, DEFAULT])
    primary = node.url.replace("guest:guest", "guest:***")
    secondary = DEFAULT.replace("guest:guest", "guest:***")
    overs, backs, kills, queues, gaps_over, gaps_back = [], [], [], [], [], []
    try:
        for _ in range(args.rounds):
            queue = f"kzpool-failover-{uuid.uuid4().hex[:6]}"
            queues.append(queue)
            over, back, gap_over, gap_back = failover_round(pool, primary, secondary, queue)
            overs.append(over)
            backs.append(back)
            gaps_over.append(gap_over)
            gaps_back.append(gap_back)
            kills.append(kill_round(pool, primary, f"{queue}-kill"))
        got = [b for q in queues for uri in (node.url, DEFAULT) for b in drain(uri, q)]
        for q in queues:
            for uri in (node.url, DEFAULT):
                drain(uri, f"{q}-kill")
    finally:
        pool.stop()
        brokers.stop_node(node)
        if default is not None:
            brokers.stop_node(default)
    lost = set(sent) - set(got)

    def fmt(xs: list[float]) -> str:
        return f"median {statistics.median(xs) * 1000:6.0f} ms   max {max(xs) * 1000:6.0f} ms"
    print(f"failover: stop_app -> confirmed publish on the secondary   {fmt(overs)}"
          "   (target <= 1000 ms)")
    print(f"fail-back: start_app -> confirmed publish on the primary   {fmt(backs)}"
          "   (target <= 2000 ms)")
    print(f"failover: last confirm on the primary -> first on the secondary {fmt(gaps_over)}")
    print(f"fail-back: last confirm on the secondary -> first on the primary {fmt(gaps_back)}")
    print(f"worker kill -9 -> consuming again                          {fmt(kills)}"
          "   (target <= 1000 ms)")
    print(f"confirmed publishes {len(sent)}, found on the brokers {len(got)}, lost {len(lost)},"
          f" duplicates {len(got) - len(set(got))}; deliveries missing after kills: 0")


if __name__ == "__main__":
    main()
