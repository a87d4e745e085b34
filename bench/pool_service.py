"""Figures of the pool service: start-up to ready, worker respawn, memory.

    .venv/bin/python bench/pool_service.py [--runs 10] [--uri URI ...]

Starts real pools (`kzpool serve`) against real brokers; by default the local node on 5672
and a second broker on 5701 if one answers there (`python3 scripts/brokers.py up`), else a
second vhost on 5672.  Prints medians and worst cases next to what direct pika takes to open
one connection, for scale.  Not a test: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pika
import psutil

from kzpool import PoolClient
from kzpool.common.errors import KzpoolError

DEFAULT = "amqp://guest:guest@127.0.0.1:5672/%2F"
SECOND = "amqp://guest:guest@127.0.0.1:5701/%2F"
VHOST = "kzpool-bench"


def second_broker() -> str:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 5701)) == 0:
            return SECOND
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", VHOST], capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", VHOST, "guest", ".*", ".*",
                    ".*"], capture_output=True, check=True)
    return f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"


def poll(predicate: Any, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            if predicate():
                return time.perf_counter() - start
        except (OSError, KzpoolError):
            pass
        time.sleep(0.002)
    raise TimeoutError("condition not reached")


class Run:
    def __init__(self, uris: list[str], prechannels: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kzb-"))
        self.socket = str(self.dir / "kzpool.sock")
        self.prechannels = prechannels
        config = self.dir / "config.ini"
        config.write_text(f"[pool]\nsocket = {self.socket}\nprechannels = {prechannels}\n"
                          "[amqp]\n" + "".join(f"uri = {u}\n" for u in uris))
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "kzpool", "serve", "-c", str(config)],
                                     stderr=subprocess.DEVNULL, start_new_session=True)

    def status(self) -> dict[str, Any]:
        return PoolClient(self.socket).status()

    def full(self, exclude: int = 0) -> bool:
        rows = self.status()["connections"]
        return all(r["available"] and r["prechannels"] == self.prechannels and r["pid"] != exclude
                   for r in rows)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(15)


def ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:7.1f} ms   max {max(xs) * 1000:7.1f} ms"


def mb(xs: list[int]) -> str:
    return f"median {statistics.median(xs) / 2**20:6.1f} MB   max {max(xs) / 2**20:6.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--prechannels", type=int, default=10)
    parser.add_argument("--uri", action="append")
    args = parser.parse_args()
    uris = args.uri or [DEFAULT, second_broker()]
    ready, respawn, master_rss, worker_rss = [], [], [], []
    for _ in range(args.runs):
        run = Run(uris, args.prechannels)
        try:
            ready.append(poll(lambda r=run: r.status()["pool"]["state"] == "running", 30))
            poll(run.full, 10)
            rows = run.status()["connections"]
            master_rss.append(psutil.Process(run.proc.pid).memory_info().rss)
            worker_rss += [psutil.Process(r["pid"]).memory_info().rss for r in rows]
            victim = rows[0]["pid"]
            os.kill(victim, signal.SIGKILL)
            respawn.append(poll(lambda r=run, v=victim: r.full(exclude=v), 10))
        finally:
            run.stop()
    pika_open = []
    for _ in range(args.runs):
        start = time.perf_counter()
        pika.BlockingConnection(pika.URLParameters(DEFAULT)).close()
        pika_open.append(time.perf_counter() - start)
    print(f"brokers: {', '.join(u.split('@')[1] for u in uris)}; {args.runs} runs,"
          f" {args.prechannels} prechannels")
    print(f"kzpool serve -> ready ({len(uris)} brokers)     {ms(ready)}   (target <= 1500 ms)")
    print(f"worker kill -9 -> connected, full     {ms(respawn)}   (target <= 1000 ms)")
    print(f"master RSS                            {mb(master_rss)}   (target <= 40 MB)")
    print(f"connection worker RSS                 {mb(worker_rss)}   (target <= 35 MB)")
    print(f"for scale: pika BlockingConnection open+close  {ms(pika_open)}")


if __name__ == "__main__":
    main()
