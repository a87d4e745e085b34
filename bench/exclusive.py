"""How soon an exclusive queue goes with its client: kzpool's worker next to the broker.

    .venv/bin/python bench/exclusive.py [--runs 20]

A client process declares an exclusive, server-named queue and waits; then it goes, one of
two ways: ``kill -9`` (the process gone), or ``connection.close()`` (the process lives on).
The figure is the time from that moment to the queue gone, as plain pika sees it (a passive
declare answered 404 instead of 405, tried back to back).  Side by side, in alternating
rounds: the client on a kzpool lease (the pool's worker learns of it and deletes the queue
on a channel of its own), and the client on a pika ``BlockingConnection`` of its own (the
broker deletes the queue when the connection goes).  Each look costs a pika connection
(a few milliseconds), in both columns alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kzpool.testing import DEFAULT_URI, Pool  # noqa: E402
from kzpool.testing.amqp import queue_exists  # noqa: E402

CLIENT = """
import sys, time
import pika
import kzpool
if sys.argv[1] == "kzpool":
    connection = kzpool.connect()
else:
    connection = pika.BlockingConnection(pika.URLParameters(sys.argv[2]))
channel = connection.channel()
print(channel.queue_declare("", exclusive=True).method.queue, flush=True)
if sys.stdin.readline().strip() == "close":
    connection.close()
time.sleep(600)
"""


def one(client: str, how: str, socket: str) -> float:
    """Seconds from the client's going to its queue gone."""
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, client, DEFAULT_URI],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "KZPOOL_SOCKET": socket})
    assert proc.stdin is not None and proc.stdout is not None
    try:
        queue = proc.stdout.readline().strip()
        assert queue_exists(queue), queue
        started = time.monotonic()
        if how == "kill -9":
            proc.kill()
        else:
            proc.stdin.write("close\n")
            proc.stdin.flush()
        while queue_exists(queue):
            if time.monotonic() - started > 30:
                raise RuntimeError(f"{client}: queue {queue} still there after 30 s")
        return time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    pool = Pool(Path(tempfile.mkdtemp(prefix="kzbench-")), [DEFAULT_URI], prechannels=4)
    try:
        pool.start().wait_ready()
        print(f"{args.runs} runs each; milliseconds from the client's going to its queue gone")
        print("| the client | kzpool lease p50 / max | pika connection p50 / max |")
        print("|---|---|---|")
        for how in ("kill -9", "close"):
            times: dict[str, list[float]] = {"kzpool": [], "pika": []}
            for _ in range(args.runs):
                for client in times:
                    times[client].append(one(client, how, pool.socket) * 1000)
            cells = [f"{statistics.median(t):.0f} / {max(t):.0f}" for t in times.values()]
            print(f"| {how} | {cells[0]} | {cells[1]} |")
    finally:
        pool.close()


if __name__ == "__main__":
    main()
