"""One client's publishes stay its own: a bystander's confirms beside a bulk loader, and
large or unfinished frames, kzpool's leases next to the same clients on pika connections.

    .venv/bin/python bench/fairness.py [--seconds 8] [--rows 1,7,8,10]

Row 1: three client processes, each with one channel: a *bystander* publishing 100 bytes
with confirms, one by one (its latency per publish recorded); a *loader* publishing 200
bytes flat out without confirms; a *consumer* consuming the loader's queue flat out (acks,
prefetch 200).  First the bystander alone, then with the other two; once on kzpool leases
(one pool, one worker: all three on one broker connection), once on a pika
``BlockingConnection`` each.  Printed: the bystander's p50/p99/max alone and under load,
the ratio, and the loader's and consumer's rates.

Rows 7, 8, 10 (kzpool only, beside a bystander publishing with confirms on the same
worker, in a process of its own): 7, four leases each sending 100 MiB of a frame announced
as 120 MiB, never finished; 8, a frame header announcing 129 MiB, then silence (how long
until the client's next call ends); 10, one 100 MB publish with confirms, then 20 x 10 MB.
Printed: the worker's peak RSS (sampled every 20 ms), the bystander's p99 next to its quiet
run, and whether the worker and the bystander's lease stayed the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kzpool  # noqa: E402
from kzpool.common import wire  # noqa: E402
from kzpool.testing import DEFAULT_URI, Pool  # noqa: E402

ROLE = r"""
import json, select, sys, time
import pika
import kzpool
role, system, queue, seconds, uri = sys.argv[1:6]
seconds = float(seconds)
connection = kzpool.connect() if system == "kzpool" else pika.BlockingConnection(
    pika.URLParameters(uri))
channel = connection.channel()
moves = []
if system == "kzpool":
    channel = connection.lease("float", on_move=moves.append)
print("ready", flush=True)
sys.stdin.readline()
end = time.monotonic() + seconds
result = {}
if role == "bystander":
    channel.queue_declare(queue, auto_delete=True)
    channel.confirm_delivery()
    lat = []
    while time.monotonic() < end and not (
            len(lat) % 10 == 0 and select.select([sys.stdin], [], [], 0)[0]):
        t = time.perf_counter()
        channel.basic_publish("", queue, b"b" * 100)
        lat.append(time.perf_counter() - t)
        if len(lat) % 100 == 0:
            channel.queue_purge(queue)
    result = {"lat": lat}
elif role == "loader":
    n = 0
    body = b"l" * 200
    while time.monotonic() < end:
        for _ in range(100):
            channel.basic_publish("", queue, body)
        n += 100
    result = {"n": n}
else:
    channel.basic_qos(prefetch_count=200)
    n = 0
    for method, _props, _body in channel.consume(queue, inactivity_timeout=0.2):
        if method is not None:
            channel.basic_ack(method.delivery_tag)
            n += 1
        if time.monotonic() >= end:
            break
    result = {"n": n}
result["moves"] = len(moves)
print(json.dumps(result), flush=True)
try:
    connection.close()
except Exception:
    pass
"""


def start(role: str, system: str, queue: str, seconds: float, sock: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", ROLE, role, system, queue, str(seconds),
                             DEFAULT_URI], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "KZPOOL_SOCKET": sock})
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def go(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.wait(30)
    return dict(json.loads(line))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def declare(queue: str) -> None:
    import pika
    connection = pika.BlockingConnection(pika.URLParameters(DEFAULT_URI))
    channel = connection.channel()
    channel.queue_declare(queue, arguments={"x-max-length": 200_000, "x-expires": 120_000})
    connection.close()


def row1(system: str, sock: str, seconds: float, consume: bool = True) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    bulk, mine = f"kzb-fair-bulk-{tag}", f"kzb-fair-by-{tag}"
    declare(bulk)
    alone = start("bystander", system, mine, seconds * 0.6, sock)
    go(alone)
    quiet = result(alone)["lat"]
    loader = start("loader", system, bulk, seconds + 1, sock)
    consumer = start("consumer", system, bulk, seconds + 1, sock) if consume else None
    bystander = start("bystander", system, mine, seconds, sock)
    go(loader, *([consumer] if consumer else []))
    time.sleep(1)  # the loader at full speed first
    go(bystander)
    loaded, loads = result(bystander), result(loader)
    eats = result(consumer) if consumer else {"n": 0}
    return {"quiet": quiet, "loaded": loaded["lat"], "moves": loaded["moves"],
            "loader": loads["n"] / (seconds + 1), "consumer": eats["n"] / (seconds + 1)}


def show1(name: str, r: dict[str, Any]) -> float:
    q99, l99 = pct(r["quiet"], 0.99), pct(r["loaded"], 0.99)
    print(f"{name:7} p50 {pct(r['quiet'], .5):6.2f} / {pct(r['loaded'], .5):7.2f} ms   "
          f"p99 {q99:6.2f} / {l99:8.2f} ms (x{l99 / q99:5.1f})   max {max(r['loaded']) * 1000:8.1f}"
          f" ms   n {len(r['quiet'])}/{len(r['loaded'])}   loader {r['loader']:7.0f}/s"
          f"   consumer {r['consumer']:6.0f}/s   moves {r['moves']}")
    return l99


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rows", default="1,7,8,10")
    parser.add_argument("--no-consumer", action="store_true",
                        help="row 1 with the loader alone beside the bystander")
    args = parser.parse_args()
    rows = {int(r) for r in args.rows.split(",")}
    tmp = Path(tempfile.mkdtemp(prefix="kzb-fair-"))
    pool = Pool(tmp, [DEFAULT_URI], prechannels=8, connections_per_broker=1).start()
    try:
        pool.wait_ready()
        if 1 in rows:
            print("row 1: bystander publishing with confirms one by one (alone / under load)")
            kz = row1("kzpool", pool.socket, args.seconds, not args.no_consumer)
            pk = row1("pika", pool.socket, args.seconds, not args.no_consumer)
            k99, p99 = show1("kzpool", kz), show1("pika", pk)
            print(f"kzpool under load / pika under load, p99: x{k99 / p99:.2f}")
        frames_rows(pool, rows, args.seconds)
    finally:
        pool.stop(10)


class Bystander:
    """A bystander process of :data:`ROLE` on a lease of ``pool``, until :meth:`finish`."""

    def __init__(self, pool: Pool) -> None:
        self.proc = start("bystander", "kzpool", f"kzb-fair-by-{uuid.uuid4().hex[:8]}", 600,
                          pool.socket)

    def start(self) -> None:
        go(self.proc)

    def finish(self) -> tuple[list[float], int]:
        """Its latencies, and how many times its lease moved."""
        go(self.proc)  # a second line: stop
        answer = result(self.proc)
        return answer["lat"], answer["moves"]


class Peak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process, self.peak, self.halt = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.process.memory_info().rss)

    def finish(self) -> int:
        self.halt.set()
        self.join(5)
        return self.peak


def announce(sock: socket.socket, size: int, then: bytes = b"") -> None:
    sock.setblocking(True)
    with contextlib.suppress(OSError):
        sock.sendall(wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.Kind.PUBLISH, 0, size)
                     + then)


def closed(sock: socket.socket) -> bool:
    try:
        return not sock.recv(65536, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True


def row7(pool: Pool) -> str:
    client = kzpool.connect(pool.socket)
    socks = [client.lease("float")._impl.sock for _ in range(4)]
    threads = [threading.Thread(target=announce, args=(s, 120 << 20, bytes(100 << 20)),
                                daemon=True) for s in socks]
    for thread in threads:
        thread.start()
    started, open_ones = time.monotonic(), list(socks)
    while open_ones and time.monotonic() - started < 120:
        open_ones = [s for s in open_ones if s is not None and not closed(s)]
        time.sleep(0.05)
    client.close()
    return f"4 leases dropped: {not open_ones}, in {time.monotonic() - started:.1f} s"


def row8(pool: Pool) -> str:
    client = kzpool.connect(pool.socket)
    lease = client.lease("float", timeout=10)
    sock = lease._impl.sock
    assert sock is not None
    announce(sock, 129 << 20)
    started = time.monotonic()
    try:
        lease.queue_declare(f"kzb-after-{uuid.uuid4().hex[:8]}", auto_delete=True)
        how = "answered"
    except Exception as exc:
        how = f"raised {type(exc).__name__}"
    took = time.monotonic() - started
    client.close()
    return f"next call {how} after {took:.1f} s (its timeout 10 s)"


def row10(pool: Pool) -> str:
    client = kzpool.connect(pool.socket)
    lease = client.lease("float", timeout=120)
    queue = f"kzb-large-{uuid.uuid4().hex[:8]}"
    lease.queue_declare(queue, auto_delete=True)
    lease.confirm_delivery()
    started = time.monotonic()
    lease.basic_publish("", queue, bytes(100_000_000))
    for _ in range(20):
        lease.basic_publish("", queue, bytes(10_000_000))
    took = time.monotonic() - started
    lease.queue_delete(queue)
    client.close()
    return f"300 MB confirmed in {took:.1f} s"


def frames_rows(pool: Pool, rows: set[int], seconds: float) -> None:
    attacks = {7: row7, 8: row8, 10: row10}
    chosen = [r for r in (7, 8, 10) if r in rows]
    if not chosen:
        return
    pid = int(pool.connections()[0]["pid"])
    quiet = Bystander(pool)
    quiet.start()
    time.sleep(seconds)
    q99 = pct(quiet.finish()[0], 0.99)
    print(f"rows 7, 8, 10: worker {pid}, bystander p99 quiet {q99:.2f} ms")
    for row in chosen:
        bystander, peak = Bystander(pool), Peak(pid)
        peak.start()
        bystander.start()
        what = attacks[row](pool)
        (lat, moves), top = bystander.finish(), peak.finish()
        now = int(pool.connections()[0]["pid"])
        print(f"row {row:2}: {what}; worker peak RSS {top >> 20} MiB, same worker: {now == pid};"
              f" bystander p99 {pct(lat, .99):.2f} ms (x{pct(lat, .99) / q99:.1f} of quiet),"
              f" max {max(lat) * 1000:.0f} ms, n {len(lat)}, moves {moves}")


if __name__ == "__main__":
    main()
