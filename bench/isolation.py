"""What one client that does not read does to the others on its worker: figures, not a test.

    .venv/bin/python bench/isolation.py [--seconds 10] [--only auto_ack,returns]

One pool, one worker (``lease_buffer`` 4M, ``worker_max_rss`` 256M: the defaults;
``lease_buffer_grace`` 30 s so that the run stays short).  A bystander on two other leases
of that worker publishes with confirms, one by one, and takes each message back on a
consumer.  For each attack (a row of the byte budget's table, run by ``tests/unread.py`` in
its own process) the bystander runs ``--seconds`` while the hostile client reads nothing,
then the hostile client reads what it asked for.  Printed per attack: the worker's peak RSS,
whether it is the same process after, the bystander's p99 confirm and delivery times and
their ratio to the quiet run's, the bystander's moves, and what the hostile client got.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pika
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kzpool  # noqa: E402
from kzpool.testing import DEFAULT_URI, Pool  # noqa: E402
from kzpool.testing.amqp import fill  # noqa: E402

KB, MB = 1 << 10, 1 << 20
ATTACKS: dict[str, tuple[str, int, int]] = {  # name -> unread.py mode, count, size
    "quiet": ("", 0, 0),
    "auto_ack, 150,000 x 2 KB, never read": ("auto_ack", 150_000, 2 * KB),
    "default prefetch, 300 KB messages, never read": ("default", 200, 300 * KB),
    "basic_qos(0), read every 5 s": ("every", 60_000, 1 * KB),
    "200 leases, basic_qos(0), never read": ("many", 30_000, 1 * KB),
    "basic_qos(0), 200,000 x 1 KB, never read": ("prefetch0", 200_000, 1 * KB),
    "40 x 8 MB mandatory returns, never read": ("returns", 40, 8 * MB),
    "quiet, after": ("", 0, 0),
}



def delete(queue: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        conn.channel().queue_delete(queue)


class Bystander:
    """Two leases of the worker: a publish with confirm, then its delivery, round after
    round; the worker's RSS read each round."""

    def __init__(self, pool: Pool, pid: int) -> None:
        self.client = kzpool.connect(pool.socket)
        self.moves: list[kzpool.MoveEvent] = []
        self.publisher = self.client.lease("float", on_move=self.moves.append)
        self.consumer = self.client.lease("float", on_move=self.moves.append)
        self.queue = f"kzb-bystander-{os.getpid()}"
        self.publisher.queue_declare(self.queue, auto_delete=True)
        self.publisher.confirm_delivery()
        self.got: list[float] = []
        self.consumer.basic_consume(self.queue, lambda *_a: self.got.append(time.monotonic()),
                                    auto_ack=True)
        self.process = psutil.Process(pid)

    def run(self, seconds: float) -> dict[str, Any]:
        confirms: list[float] = []
        deliveries: list[float] = []
        peak = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            peak = max(peak, self.process.memory_info().rss)
            started = time.monotonic()
            self.publisher.basic_publish("", self.queue, b"x")
            confirms.append(time.monotonic() - started)
            self.got.clear()
            while not self.got:
                self.client.process_data_events(1)
            deliveries.append(self.got[0] - started)
        return {"confirm_p99": p99(confirms), "delivery_p99": p99(deliveries), "peak": peak,
                "rounds": len(confirms)}

    def close(self) -> None:
        self.client.close()


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def attack(pool: Pool, name: str, seconds: float) -> dict[str, Any]:
    mode, count, size = ATTACKS[name]
    pid = int(pool.connections()[0]["pid"])
    queue = f"kzb-hostile-{os.getpid()}"
    if mode not in ("", "returns"):
        fill(queue, count, size)
    hostile = None
    if mode:
        arg = str(size) if mode == "returns" else queue
        hostile = subprocess.Popen([sys.executable, "-m", "tests.unread", pool.socket, mode,
                                    arg, str(count)], cwd=ROOT, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert hostile.stdout is not None
        hostile.stdout.readline()  # ready
    bystander = Bystander(pool, pid)
    try:
        figures = bystander.run(seconds)
        figures["held_back"] = int(pool.connections()[0]["held_back"])
        got = ""
        if hostile is not None:
            out, _ = hostile.communicate("read\n", timeout=120)
            got = " / ".join(out.strip().splitlines())
        figures.update(moves=len(bystander.moves), got=got,
                       same_worker=pool.connections()[0]["pid"] == pid)
        return figures
    finally:
        bystander.close()
        if mode not in ("", "returns"):
            delete(queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", default="", help="attacks whose name holds one of these")
    args = parser.parse_args()
    chosen = [n for n in ATTACKS if n.startswith("quiet") or not args.only or
              any(word in n for word in args.only.split(","))]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()},"
          f" {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| attack | worker peak RSS | same worker | bystander p99 confirm | ratio |"
          " p99 delivery | ratio | bystander moves | held back | what the hostile got |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    tmp = Path(tempfile.mkdtemp(prefix="kzb-isolation-"))
    pool = Pool(tmp, [DEFAULT_URI], prechannels=4, lease_buffer_grace="30").start()
    try:
        pool.wait_ready()
        quiet: dict[str, Any] = {}
        for name in chosen:
            f = attack(pool, name, args.seconds)
            quiet = quiet or f
            print(f"| {name} | {f['peak'] / MB:.0f} MiB | {'yes' if f['same_worker'] else 'NO'}"
                  f" | {f['confirm_p99'] * 1e3:.2f} ms"
                  f" | {f['confirm_p99'] / quiet['confirm_p99']:.1f}x"
                  f" | {f['delivery_p99'] * 1e3:.2f} ms"
                  f" | {f['delivery_p99'] / quiet['delivery_p99']:.1f}x | {f['moves']}"
                  f" | {f['held_back']} | {f['got'] or '-'} |", flush=True)
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
