"""A float lease on a quorum queue of a three-node cluster while its node stops and returns.

    .venv/bin/python bench/cluster.py [--rounds 5]

Needs root (it starts a cluster of three extra nodes, kzcl1..3 on 5751..5753, through
scripts/brokers.py, and stops it again unless it was running before; never the default
node).  With ``KZPOOL_TEST_RABBITMQ=4`` they are RabbitMQ 4 nodes, kz4cl1..3 on 5754..5756
(kzpool/testing/nodes.py).  A pool lists every node, the first one first.  A float lease
publishes persistent messages with confirms, one by one, without pause, to a quorum queue.
Each round stops the app of the node the lease is on: time from ``stop_app`` issued to the
first confirmed publish on another node; then starts it again: time from ``start_app``
returning to the first confirmed publish back on it (fail-back).  At the end the queue is
drained: confirmed publishes lost (must be 0) and duplicates (re-sent across a move whose
confirm was lost with the connection).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
from failover import Pool
from nodes import load_brokers

from kzpool.testing import LAYOUT, drain

brokers = load_brokers()
CLUSTER = list(LAYOUT.cluster)


class Publisher(threading.Thread):
    """Confirmed publishes as fast as one lease goes; notes when and where each landed."""

    def __init__(self, pool: Pool, queue: str) -> None:
        super().__init__(daemon=True)
        self.moved: list[float] = []  # when each move was seen
        self.lease = pool.client.lease("float", timeout=30,
                                       on_move=lambda _m: self.moved.append(time.monotonic()))
        self.lease.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        self.lease.confirm_delivery()
        self.queue = queue
        self.sent: list[tuple[float, str | None, bytes]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        persistent = pika.BasicProperties(delivery_mode=2)
        while not self.halt.is_set():
            body = b"%d" % len(self.sent)
            self.lease.basic_publish("", self.queue, body, persistent)  # confirmed, or raises
            self.sent.append((time.monotonic(), self.lease.broker, body))

    def first(self, after: float, where: Callable[[str], bool],
              timeout: float = 60) -> tuple[float, str]:
        """Seconds from ``after`` to the first confirmed publish for which ``where(broker)``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, broker, _body in list(self.sent):
                if when >= after and broker is not None and where(broker):
                    return when - after, broker
            time.sleep(0.005)
        raise TimeoutError("no confirmed publish where expected")


def closed_after_stop(node: Any) -> float:
    """For scale, with plain pika: a connection publishing to a quorum queue as the lease
    does; seconds from ``stop_app`` issued to the node closing it (started again after)."""
    queue = f"kzpool-cluster-pika-{uuid.uuid4().hex[:6]}"
    persistent = pika.BasicProperties(delivery_mode=2)
    with pika.BlockingConnection(pika.URLParameters(node.url)) as conn:
        channel = conn.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.confirm_delivery()
        stopper = threading.Thread(target=brokers.stop_app, args=(node.name,))
        issued = time.monotonic()
        stopper.start()
        try:
            while True:
                channel.basic_publish("", queue, b"x", persistent)
        except pika.exceptions.AMQPError:
            took = time.monotonic() - issued
    stopper.join()
    brokers.start_app(node.name)
    with pika.BlockingConnection(pika.URLParameters(node.url)) as conn:
        conn.channel().queue_delete(queue)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"$ python bench/cluster.py --rounds {args.rounds}")
    running = all(brokers.port_open(port) for _name, port in CLUSTER)
    nodes = brokers.start_cluster(CLUSTER, rabbitmq=LAYOUT.rabbitmq)
    print(f"RabbitMQ {brokers.install_version(nodes[0].root)}: {', '.join(n.name for n in nodes)}")
    names = {n.url.replace("guest:guest", "guest:***"): n.name for n in nodes}
    pool = Pool([n.url for n in nodes])
    queue = f"kzpool-cluster-{uuid.uuid4().hex[:6]}"
    publisher = Publisher(pool, queue)
    overs, backs, moves = [], [], []
    try:
        plain = [closed_after_stop(nodes[0]) for _ in range(args.rounds)]
        publisher.start()
        for _ in range(args.rounds):
            time.sleep(0.5)
            on = publisher.sent[-1][1]
            assert on is not None
            stopping = time.monotonic()
            brokers.stop_app(names[on])
            over, _to = publisher.first(stopping, lambda b, on=on: b != on)
            overs.append(over)
            moves.append(min(t for t in publisher.moved if t >= stopping) - stopping)
            time.sleep(0.5)
            brokers.start_app(names[on])
            started = time.monotonic()
            backs.append(publisher.first(started, lambda b, on=on: b == on)[0])
        publisher.halt.set()
        publisher.join(30)
        publisher.lease.close()
        got = drain(nodes[1].url, queue)
    finally:
        pool.stop()
        if not running:
            brokers.stop_cluster(nodes)
    sent = [body for _w, _b, body in publisher.sent]
    lost = set(sent) - set(got)

    def fmt(xs: list[float]) -> str:
        return f"median {statistics.median(xs) * 1000:6.0f} ms   max {max(xs) * 1000:6.0f} ms"
    print(f"stop_app of the lease's node -> confirmed publish on another node   {fmt(overs)}")
    print(f"stop_app of the lease's node -> the lease moved (on_move)            {fmt(moves)}")
    print(f"for scale, plain pika publishing likewise: stop_app -> connection closed"
          f"  {fmt(plain)}")
    print(f"start_app returned -> confirmed publish back on it (fail-back)     {fmt(backs)}")
    print(f"confirmed publishes {len(sent)}, received {len(got)}, lost {len(lost)},"
          f" duplicates {len(got) - len(set(got))}")
    if lost:
        raise SystemExit(f"{len(lost)} confirmed publishes lost")


if __name__ == "__main__":
    main()
