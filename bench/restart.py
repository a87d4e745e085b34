"""A pool restarted under a confirmed publisher: from ``kill -9`` of the master to the first
confirmed publish on the new pool, the restart itself included.

    .venv/bin/python bench/restart.py [--runs 5]

Each run starts a pool on the default node (127.0.0.1:5672) and a publisher thread on a
float lease of its own, publishing with confirms, one at a time (``wait=True``), as fast as
they are confirmed.  Once it has published for a moment the master gets SIGKILL; as soon as
the master has exited and its children (connection worker, registry) have followed it, the
pool is started again on the same config (what systemd's ``Restart=`` does, with
``RestartSec=0``).  The lease meanwhile waits for the pool, gets a new channel, replays its
topology and re-sends what was unconfirmed: the figure is the time from the SIGKILL to the
first publish the broker confirmed on the new pool's channel.  Its parts: the pool's last
process gone, the new pool serving (``kzpool status`` says running).

Afterwards the queue is read back: every confirmed body must be there (``lost`` must be 0);
``dupes`` counts bodies there twice (a publish re-sent whose first confirm was lost with the
channel).  The publisher must have seen no exception.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pika

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kzpool  # noqa: E402
from kzpool.testing import DEFAULT_URI, Pool, drain, wait_for  # noqa: E402

WARM_UP = 200  # confirmed publishes before the kill
AFTER = 200  # confirmed publishes on the new pool before the run ends


@dataclass
class Run:
    gone: float  # seconds from SIGKILL to the pool's last process gone
    ready: float  # to the new pool serving
    first: float  # to the first publish confirmed on the new pool
    confirmed: int
    lost: int
    dupes: int
    reasons: list[str]  # what on_move said
    error: BaseException | None


class Publisher(threading.Thread):
    """Confirmed publishes one at a time; ``confirms``: (when, moves so far) of each."""

    def __init__(self, socket: str, queue: str) -> None:
        super().__init__(daemon=True)
        self.socket, self.queue = socket, queue
        self.confirms: list[tuple[float, int]] = []
        self.bodies: list[bytes] = []
        self.moves: list[kzpool.MoveEvent] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            with kzpool.connect(self.socket).lease("float", on_move=self.moves.append) as lease:
                lease.queue_declare(self.queue)
                lease.confirm_delivery()
                n = 0
                while not self.halt.is_set():
                    body = b"%d" % n
                    lease.basic_publish("", self.queue, body)  # returns once confirmed
                    self.confirms.append((time.monotonic(), len(self.moves)))
                    self.bodies.append(body)
                    n += 1
        except BaseException as exc:  # reported: a restart must raise nothing
            self.error = exc


def one_run(directory: Path) -> Run:
    queue = f"kzb-restart-{uuid.uuid4().hex[:8]}"
    pool = Pool(directory, [DEFAULT_URI])
    publisher = Publisher(pool.socket, queue)
    try:
        pool.start()
        pool.wait_ready()
        publisher.start()
        wait_for(lambda: len(publisher.confirms) >= WARM_UP or publisher.error, 20,
                 "publishes before the kill")
        killed = time.monotonic()
        pool.signal(signal.SIGKILL)
        pool.wait_exit(10)
        wait_for(lambda: not pool.group(), 10, "the pool's children to follow the master",
                 interval=0.002)
        gone = time.monotonic()
        pool.start()
        pool.wait_ready()
        ready = time.monotonic()
        wait_for(lambda: sum(m > 0 for _t, m in publisher.confirms) >= AFTER
                 or publisher.error, 30, "publishes on the new pool")
        publisher.halt.set()
        publisher.join(30)
        first = min(t for t, moves in publisher.confirms if moves > 0)
        stored = drain(DEFAULT_URI, queue)
        confirmed = set(publisher.bodies)
        return Run(gone - killed, ready - killed, first - killed, len(confirmed),
                   len(confirmed - set(stored)), len(stored) - len(set(stored)),
                   [m.reason for m in publisher.moves], publisher.error)
    except BaseException:
        print(f"--- log of the failed run ({pool.log}):\n{pool.logs()}", file=sys.stderr)
        raise
    finally:
        publisher.halt.set()
        pool.close()
        with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
            conn.channel().queue_delete(queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"$ python bench/restart.py --runs {args.runs}")
    base = Path(tempfile.mkdtemp(prefix="kzb-restart-"))
    runs: list[Run] = []
    try:
        print(" run   -> pool gone   -> pool ready   -> first confirm   confirmed  lost  dupes"
              "   on_move")
        for n in range(1, args.runs + 1):
            directory = base / f"run{n}"
            directory.mkdir()
            run = one_run(directory)
            runs.append(run)
            print(f"{n:4d}   {run.gone * 1000:8.0f} ms   {run.ready * 1000:9.0f} ms"
                  f"   {run.first * 1000:11.0f} ms   {run.confirmed:9d}  {run.lost:4d}"
                  f"  {run.dupes:5d}   {', '.join(run.reasons)}"
                  + (f"   ERROR {run.error!r}" if run.error else ""), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for label, values in (("kill -9 -> first confirmed publish on the new pool",
                           [r.first for r in runs]),
                          ("  of which: kill -9 -> the new pool ready", [r.ready for r in runs]),
                          ("  of which: kill -9 -> the old pool's processes gone",
                           [r.gone for r in runs])):
        print(f"{label}: median {statistics.median(values) * 1000:.0f} ms"
              f"   worst {max(values) * 1000:.0f} ms")
    print(f"confirmed publishes: {sum(r.confirmed for r in runs)}, lost:"
          f" {sum(r.lost for r in runs)}, duplicates: {sum(r.dupes for r in runs)};"
          f" runs whose publisher saw an exception: {sum(r.error is not None for r in runs)}")


if __name__ == "__main__":
    main()
