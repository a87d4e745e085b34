"""Soak: publishers and consumers on float and sticky leases while faults keep coming.

    .venv/bin/python bench/soak.py --minutes 10 --fault-every 8

Needs root (it stops, kills and restarts kzp1 on 5701 through scripts/brokers.py, never the
default node).  A pool runs with kzp1 as primary and the default node as secondary.  Four
processes: a float publisher and a float consumer (they follow the primary), a sticky
publisher and a sticky consumer on the default node.  Publishes are confirmed (persistent,
durable queues).  Every ``--fault-every`` seconds one fault, at random: kzp1's app stopped
then started, kzp1 killed then restarted, a connection worker killed, a consumer process
killed (and started again), the registry killed.

At the end everything is drained and it prints confirmed publishes, unique messages
received, lost (must be 0), duplicates, the longest gap between two confirmed float
publishes (the longest failover) and between two sticky ones (a stall of the machine shows
in both), publish latency p50/p99, and the RSS of every pool process over time.  Not part
of CI: it takes minutes.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pika
import psutil
from nodes import load_brokers

import kzpool

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "amqp://guest:guest@127.0.0.1:5672/%2F"
QUEUES = {"float": "kzpool-soak-float", "sticky": "kzpool-soak-sticky"}
PERSISTENT = pika.BasicProperties(delivery_mode=2)


brokers = load_brokers()


def lease(socket_path: str, kind: str) -> kzpool.Lease:
    pool = kzpool.connect(socket_path)
    if kind == "float":
        return pool.lease("float", timeout=60)
    return pool.lease("sticky", broker=DEFAULT, timeout=60)


def publisher(socket_path: str, kind: str, out: str, stop: Any) -> None:
    channel = lease(socket_path, kind)
    channel.queue_declare(QUEUES[kind], durable=True)
    channel.confirm_delivery()
    with open(out, "a", buffering=1, encoding="ascii") as log:
        n = 0
        while not stop.is_set():
            start = time.monotonic()
            channel.basic_publish("", QUEUES[kind], f"{kind}-{n}".encode(), PERSISTENT)
            done = time.monotonic()
            log.write(f"{kind}-{n} {done:.4f} {done - start:.6f}\n")
            n += 1
            time.sleep(0.005)
    channel.close()


def consumer(socket_path: str, kind: str, out: str, stop: Any) -> None:
    channel = lease(socket_path, kind)
    channel.queue_declare(QUEUES[kind], durable=True)
    channel.basic_qos(prefetch_count=20)
    with open(out, "a", buffering=1, encoding="ascii") as log:
        for method, _props, body in channel.consume(QUEUES[kind], inactivity_timeout=1):
            if method is not None:
                log.write(f"{body.decode()}\n")
                channel.basic_ack(method.delivery_tag)
            elif stop.is_set():
                break
    channel.cancel()
    channel.close()


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="kzsoak-"))
        self.node = brokers.start_node("kzp1", 5701)
        self.socket = str(self.dir / "kzpool.sock")
        config = self.dir / "config.ini"
        config.write_text(f"[pool]\nsocket = {self.socket}\nheartbeat = 2\n"
                          "reconnect_backoff_max = 0.5\n[amqp]\n"
                          f"uri = {self.node.url}\nuri = {DEFAULT}\n")
        with open(self.dir / "pool.log", "wb") as log:
            self.pool = subprocess.Popen([sys.executable, "-m", "kzpool", "serve", "-c",
                                          str(config)], stderr=log, start_new_session=True)
        self.client = self._wait_pool()
        self.context = multiprocessing.get_context("fork")
        self.stop_publishing = self.context.Event()
        self.stop_consuming = self.context.Event()
        self.procs: dict[str, Any] = {}
        self.rss: dict[str, list[int]] = {}
        self.faults: list[str] = []

    def _wait_pool(self) -> kzpool.PoolClient:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                client = kzpool.connect(self.socket)
                if client.status()["pool"]["state"] == "running":
                    return client
            except kzpool.KzpoolError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the pool did not start")

    def start(self, name: str) -> None:
        role, kind = name.split("-")
        target = publisher if role == "pub" else consumer
        stop = self.stop_publishing if role == "pub" else self.stop_consuming
        proc = self.context.Process(target=target, args=(self.socket, kind,
                                                         str(self.dir / f"{name}.log"), stop))
        proc.start()
        self.procs[name] = proc

    def fault(self) -> None:
        choice = random.choice(["stop_app", "stop_app", "kill_node", "kill_worker",
                                "kill_worker", "kill_consumer", "kill_registry"])
        self.faults.append(choice)
        print(f"{time.strftime('%H:%M:%S')} fault: {choice}", flush=True)
        if choice == "stop_app":
            brokers.stop_app("kzp1")
            time.sleep(random.uniform(1, 3))
            brokers.start_app("kzp1")
        elif choice == "kill_node":
            brokers.kill_node("kzp1")
            brokers.start_node("kzp1", 5701)
        elif choice == "kill_worker":
            rows = [r for r in self.client.status()["connections"] if r["pid"]]
            if rows:
                os.kill(random.choice(rows)["pid"], signal.SIGKILL)
        elif choice == "kill_consumer":
            name = random.choice(["con-float", "con-sticky"])
            os.kill(self.procs[name].pid, signal.SIGKILL)
            self.procs[name].join(10)
            self.start(name)
        else:
            registry = [p for p in psutil.Process(self.pool.pid).children()
                        if "registry" in " ".join(p.cmdline())]
            if registry:
                registry[0].kill()

    def sample(self) -> None:
        for child in [psutil.Process(self.pool.pid), *psutil.Process(self.pool.pid).children()]:
            try:
                title = " ".join(child.cmdline()).strip()
                key = title.split(" [")[0] if "connection" in title else title
                self.rss.setdefault(key, []).append(child.memory_info().rss)
            except psutil.Error:
                continue

    def run(self) -> None:
        for name in ("con-float", "con-sticky", "pub-float", "pub-sticky"):
            self.start(name)
        end = time.monotonic() + self.args.minutes * 60
        next_fault = time.monotonic() + self.args.fault_every
        next_sample = time.monotonic()
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                self.sample()
                next_sample = now + 5
            if now >= next_fault:
                self.fault()
                next_fault = time.monotonic() + self.args.fault_every
            time.sleep(0.2)
        self.stop_publishing.set()
        for name in ("pub-float", "pub-sticky"):
            self.procs[name].join(120)
        time.sleep(5)  # consumers take what is left; then stop
        self.stop_consuming.set()
        for name in ("con-float", "con-sticky"):
            self.procs[name].join(60)

    def close(self) -> None:
        os.killpg(self.pool.pid, signal.SIGTERM)
        self.pool.wait(30)
        brokers.stop_node(self.node)

    def leftovers(self) -> list[str]:
        left = []
        for uri in (self.node.url, DEFAULT):
            with pika.BlockingConnection(pika.URLParameters(uri)) as conn:
                channel = conn.channel()
                for queue in QUEUES.values():
                    channel.queue_declare(queue, durable=True)
                    while (msg := channel.basic_get(queue, auto_ack=True))[0]:
                        left.append(msg[2].decode())
                    channel.queue_delete(queue)
        return left

    def report(self) -> None:
        sent = [line.split() for name in ("pub-float", "pub-sticky")
                for line in (self.dir / f"{name}.log").read_text().splitlines()]
        got = [line for name in ("con-float", "con-sticky")
               for line in (self.dir / f"{name}.log").read_text().splitlines()]
        got += self.leftovers()
        confirmed = {s[0] for s in sent}
        unique = set(got)
        times = {kind: sorted(float(s[1]) for s in sent if s[0].startswith(kind))
                 for kind in QUEUES}
        start = min((t[0] for t in times.values() if t), default=0.0)
        latency = sorted(float(s[2]) for s in sent)
        print(f"\n$ python bench/soak.py --minutes {self.args.minutes} --fault-every"
              f" {self.args.fault_every}")
        print(f"faults: {len(self.faults)} ({', '.join(sorted(set(self.faults)))})")
        print(f"confirmed publishes {len(confirmed)}, unique received {len(unique & confirmed)},"
              f" lost {len(confirmed - unique)}, duplicates {len(got) - len(unique)}")
        for kind, stamps in times.items():  # a gap in both at once is the machine, not a move
            gap, at = max(((b - a, a) for a, b in itertools.pairwise(stamps)), default=(0, start))
            print(f"longest gap between confirmed {kind} publishes: {gap:.2f} s,"
                  f" {at - start:.0f} s into the run")
        print(f"publish latency p50 {statistics.median(latency) * 1000:.2f} ms, p99"
              f" {latency[int(len(latency) * 0.99)] * 1000:.2f} ms")
        print("RSS (MB) after warm-up -> at the end:")
        for name, series in sorted(self.rss.items()):
            if len(series) >= 4:
                warm = series[len(series) // 4]
                print(f"  {name:50s} {warm / 2**20:6.1f} -> {series[-1] / 2**20:6.1f}"
                      f"  ({(series[-1] - warm) / warm:+.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--fault-every", type=float, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)
    soak = Soak(args)
    try:
        soak.run()
        soak.report()
    finally:
        soak.close()


if __name__ == "__main__":
    main()
