"""Time from SIGTERM to exit of ``kzpool serve`` with a silent federated broker and a stuck
handler, and whether both held messages are back on their queues afterwards.

    .venv/bin/python bench/shutdown.py [--runs 5] [--shutdown-timeout 3] [--keep]

Needs rabbitmqctl (each run adds a vhost to the default node and deletes it after).  The
scenario is tests/test_federation.py's
``test_stop_is_bounded_with_a_silent_federated_broker_and_a_stuck_handler``, timed.  Each run:

1. zone ``east`` is the default node's ``/``; zone ``west`` is a fresh vhost of the same node
   reached through a TCP forwarder (tests/forwarder.py) that can go silent;
2. a pool in zone east runs a [consumer:...] section with handler ``tests.handlers:stuck``,
   prefetch 1 and ``federate = true``: its federator consumes ``QUEUE-east`` on west;
3. ``billing.forever`` published on east gets the handler stuck forever (CPU-bound, never
   returns); ``billing.remote`` published on west is then held, unacked, by the federator;
4. the forwarder goes silent (packets vanish both ways, nothing is closed), SIGTERM goes to
   the master: the time until it exits is measured (target <= shutdown_timeout + 1 s);
5. east's queue must hold the stuck message again; once the forwarder is closed (the broker
   sees west's connection end) the federated queue must hold its message again.

``left`` counts processes of the pool's process group still alive when the master has exited
(must be 0).  With ``--keep`` the pool's logs are kept and their directory printed.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the stuck handler is tests.handlers

from kzpool.testing import (  # noqa: E402
    DEFAULT_URI,
    Forwarder,
    Pool,
    consumer_count,
    publish,
    queue_counts,
    wait_for,
)

BROKER = ("127.0.0.1", 5672)
MARGIN = 30.0  # seconds past shutdown_timeout before a pool that did not exit is killed


@dataclass
class Run:
    elapsed: float  # seconds from SIGTERM to the master's exit (or to giving up)
    exited: bool
    returncode: int | None
    left: int  # live processes of the pool's group once the master had exited
    east_requeued: bool  # the stuck message back on east's queue
    west_requeued: bool  # the federator's message back on the federated queue
    west_after: float  # seconds from closing the forwarder to seeing it back


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def depth(uri: str, queue: str) -> int | None:
    counts = queue_counts(queue, uri)
    return None if counts is None else counts[0]


def federator_assigned(pool: Pool) -> dict[str, Any] | None:
    rows: list[dict[str, Any]] = pool.status()["federators"]
    return next((r for r in rows if r["state"] == "assigned"), None)


def stuck(trace: Path) -> bool:
    return any(line.split(" ")[1:2] == ["stuck"] for line in trace.read_text().splitlines())


def one_run(directory: Path, shutdown_timeout: float) -> Run:
    tag = uuid.uuid4().hex[:8]
    vhost, queue, exchange = f"kzb-shutdown-{tag}", f"kzb-s-{tag}", f"kzb-sx-{tag}"
    federated = f"{queue}-east"
    remote = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        forwarder = Forwarder(BROKER)
        silent = remote.replace("127.0.0.1:5672", f"127.0.0.1:{forwarder.port}")
        pool = Pool(directory, {"east": [DEFAULT_URI], "west": [silent]}, zone="east",
                    shutdown_timeout=shutdown_timeout)
        try:
            return scenario(pool, forwarder, directory, remote, queue, exchange, federated,
                            shutdown_timeout)
        except BaseException:
            print(f"--- log of the failed run ({pool.log}):\n{pool.logs()}", file=sys.stderr)
            raise
        finally:
            pool.close()
            forwarder.close()  # a second close is harmless
            with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
                channel = conn.channel()
                channel.queue_delete(queue)
                channel.exchange_delete(exchange)  # west's go with its vhost
    finally:
        rabbitmqctl("delete_vhost", vhost)


def scenario(pool: Pool, forwarder: Forwarder, directory: Path, remote: str, queue: str,
             exchange: str, federated: str, shutdown_timeout: float) -> Run:
    pool.config.write_text(pool.config.read_text() + "\n".join([
        "[consumer:billing]", "handler = tests.handlers:stuck", f"queue = {queue}",
        f"exchange = {exchange}", "bindings = billing.*", "prefetch = 1", "federate = true",
    ]) + "\n")
    trace = directory / "trace.txt"
    trace.touch()
    pool.start(env={"KZT_TRACE": str(trace), "PYTHONPATH": str(ROOT)})
    pool.wait_ready()
    wait_for(lambda: federator_assigned(pool), 15, "a federator assigned on west")
    wait_for(lambda: consumer_count(federated, remote) >= 1, 10,
             "the federator consuming")
    publish(DEFAULT_URI, exchange, "billing.forever", b"stuck here")
    wait_for(lambda: stuck(trace), 10, "the handler to be stuck")
    publish(remote, exchange, "billing.remote", b"waits its turn")
    wait_for(lambda: depth(remote, federated) == 0, 10, "the federator to hold a message")
    forwarder.silence()  # no close, no reset: packets to and from west just vanish

    assert pool.proc is not None
    started = time.monotonic()
    pool.signal(signal.SIGTERM)
    try:
        pool.proc.wait(shutdown_timeout + MARGIN)
        exited = True
    except subprocess.TimeoutExpired:
        exited = False
    elapsed = time.monotonic() - started
    left = len(pool.group()) if exited else -1

    east_requeued = depth(DEFAULT_URI, queue) == 1
    forwarder.close()  # the broker sees west's connection end: it requeues what it held
    closed = time.monotonic()
    try:
        wait_for(lambda: depth(remote, federated) == 1, 10, "the federated message requeued")
        west_requeued = True
    except AssertionError:
        west_requeued = False
    return Run(elapsed, exited, pool.proc.returncode, left, east_requeued, west_requeued,
               time.monotonic() - closed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shutdown-timeout", type=float, default=3.0)
    parser.add_argument("--keep", action="store_true", help="keep the pools' logs")
    args = parser.parse_args()
    timeout: float = args.shutdown_timeout
    target = timeout + 1
    print(f"$ python bench/shutdown.py --runs {args.runs} --shutdown-timeout {timeout:g}")
    base = Path(tempfile.mkdtemp(prefix="kzb-shutdown-"))
    runs: list[Run] = []
    try:
        print(" run   SIGTERM -> exit    rc  left   east requeued   west requeued")
        for n in range(1, args.runs + 1):
            directory = base / f"run{n}"
            directory.mkdir()
            run = one_run(directory, timeout)
            runs.append(run)
            took = f"{run.elapsed:7.3f} s" if run.exited else f"> {run.elapsed:5.1f} s"
            west = f"yes ({run.west_after:.2f} s)" if run.west_requeued else "NO"
            print(f"{n:4d}   {took:>14}  {run.returncode!s:>4}  {run.left:4d}"
                  f"   {'yes' if run.east_requeued else 'NO':>13}   {west:>13}", flush=True)
    finally:
        if args.keep:
            print(f"logs: {base}/run*/pool.log")
        else:
            shutil.rmtree(base, ignore_errors=True)
    times = [r.elapsed for r in runs]
    worst = max(times)
    print(f"SIGTERM -> exit: median {statistics.median(times):.3f} s   max {worst:.3f} s"
          f"   (target <= shutdown_timeout + 1 s = {target:g} s)")
    print(f"max / (shutdown_timeout + 1 s) = {worst / target:.2f}   (target <= 1.00)")
    lost = sum(not (r.east_requeued and r.west_requeued) for r in runs)
    print(f"runs that did not exit: {sum(not r.exited for r in runs)}; runs with processes"
          f" left: {sum(r.left != 0 for r in runs)}; runs with a message not requeued: {lost}")


if __name__ == "__main__":
    main()
