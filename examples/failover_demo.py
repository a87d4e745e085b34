"""Watch float leases fail over and back, with every message accounted for.

    .venv/bin/python examples/failover_demo.py -c config.ini.example --auto kzp1

Needs a running pool (``kzpool serve -c config.ini.example``) whose primary is a node you may
stop: in config.ini.example that is kzp1 on 5701 (``python3 scripts/brokers.py up``).  A
publisher (confirmed, persistent) and a CPU-heavy consumer, each on a float lease in its own
process, run for ``--seconds``.  With ``--auto NODE`` the demo stops that node's app after a
third of the run and starts it again after two thirds; without it, do it yourself:
``python3 scripts/brokers.py stop-app kzp1`` / ``start-app kzp1``.

At the end it drains what is left on every broker and prints: confirmed publishes, unique
messages seen, lost (must be 0) and duplicates (redeliveries across moves).
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import time
import uuid
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from typing import Any

import pika

import kzpool
from kzpool.common.config import load

ROOT = Path(__file__).resolve().parent.parent


def burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def publisher(socket: str, queue: str, seconds: float, out: SimpleQueue[Any]) -> None:
    lease = kzpool.connect(socket).lease("float", timeout=30,
                                         on_move=lambda e: out.put(("move", "publisher", e)))
    lease.queue_declare(queue, durable=True)
    lease.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=2)
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        lease.basic_publish("", queue, b"%d" % n, persistent)  # confirmed, or it raises
        out.put(("sent", n, lease.broker))
        n += 1
        time.sleep(0.005)
    lease.close()
    out.put(("done", "publisher", n))


def consumer(socket: str, queue: str, seconds: float, out: SimpleQueue[Any]) -> None:
    lease = kzpool.connect(socket).lease("float", timeout=30,
                                         on_move=lambda e: out.put(("move", "consumer", e)))
    lease.queue_declare(queue, durable=True)
    lease.basic_qos(prefetch_count=20)
    end = time.monotonic() + seconds
    for method, _props, body in lease.consume(queue, inactivity_timeout=1):
        if time.monotonic() > end:
            break
        if method is None:
            continue
        burn(0.004)  # CPU-heavy work: the worker keeps the heartbeats
        lease.basic_ack(method.delivery_tag)
        out.put(("got", int(body), lease.broker))
    lease.cancel()
    lease.close()
    out.put(("done", "consumer", 0))


def brokers(node: str, action: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "brokers.py"), action, node],
                   check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "config.ini.example"))
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--auto", metavar="NODE", help="stop and start this node's app")
    args = parser.parse_args()
    config = load(args.config)
    queue = f"kzpool-demo-{uuid.uuid4().hex[:6]}"
    context = multiprocessing.get_context("fork")
    out: SimpleQueue[Any] = context.SimpleQueue()
    procs = [context.Process(target=f, args=(config.settings.socket, queue, args.seconds, out))
             for f in (publisher, consumer)]
    for proc in procs:
        proc.start()
    start, sent, got, done = time.monotonic(), set(), [], 0
    fault = [(args.seconds / 3, "stop-app"), (2 * args.seconds / 3, "start-app")]
    while done < 2:
        if args.auto and fault and time.monotonic() - start > fault[0][0]:
            print(f"--- {fault[0][1]} {args.auto}", flush=True)
            brokers(args.auto, fault.pop(0)[1])
        while not out.empty():
            event = out.get()
            if event[0] == "sent":
                sent.add(event[1])
            elif event[0] == "got":
                got.append(event[1])
            elif event[0] == "move":
                e = event[2]
                print(f"{time.monotonic() - start:6.1f}s {event[1]} moved {e.old_broker} ->"
                      f" {e.new_broker} ({e.reason})", flush=True)
            elif event[0] == "done":
                done += 1
        time.sleep(0.05)
    left = []
    for broker in config.brokers:
        try:
            with pika.BlockingConnection(pika.URLParameters(broker.uri.uri)) as conn:
                channel = conn.channel()
                while (msg := channel.basic_get(queue, auto_ack=True))[0]:
                    left.append(int(msg[2]))
                channel.queue_delete(queue)
        except pika.exceptions.AMQPError:
            print(f"(could not drain {broker.uri.masked})")
    seen = set(got) | set(left)
    print(f"confirmed publishes {len(sent)}, consumed {len(got)}, left on brokers {len(left)},"
          f" unique {len(seen)}, lost {len(sent - seen)},"
          f" duplicates {len(got) + len(left) - len(seen)}")


if __name__ == "__main__":
    main()
