"""How many moves a quorum queue's message survives: the broker's rules, then kzpool's moves.

    .venv/bin/python bench/delivery_limit.py [--uri URI] [--cap 50]

RabbitMQ 4.x gives quorum queues a delivery limit (20 by default): a message given back to
its queue more often than that is dropped, or dead-lettered.  Which ways of giving it back
count differs between versions; this measures them on the broker at ``--uri`` (default: the
default broker of ``KZPOOL_TEST_RABBITMQ``'s layout, see kzpool/testing/nodes.py):

1. the broker's rules, with plain pika: a message is delivered, its consumer cancelled, and
   it is given back by closing its channel, closing its connection, ``basic.nack``
   (requeue), ``basic.reject`` (requeue) or ``basic.recover``; how many deliveries it gets
   before it is gone (``--cap`` at most), and the ``x-delivery-count`` it carries;
2. kzpool's moves: a lease's consumer holds the message and never acks it.  A TCP
   forwarder in front of the broker goes silent, so the primary's connection is lost and the
   lease fails over to the secondary (the same broker, straight), where the message comes
   again; the forwarder forwards again, and the lease fails back (the pool's own move, its
   ``move_grace`` 1 s).  How many such cycles the message survives, and the
   ``x-delivery-count`` it carries at each delivery, on the secondary (after a fail-over)
   and on the primary (after a fail-back).

Needs no root and starts no node; the queues are its own (``kzt-dl-...``), deleted after.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika

import kzpool
from kzpool.common.settings import BY_NAME
from kzpool.testing import DEFAULT_URI, Forwarder, Pool, wait_for

QUORUM = {"x-queue-type": "quorum"}


def fresh_queue(channel: Any) -> str:
    name = f"kzt-dl-{uuid.uuid4().hex[:8]}"
    channel.queue_declare(name, durable=True, arguments=QUORUM)
    channel.confirm_delivery()
    channel.basic_publish("", name, b"m")
    return name


def take(connection: Any, queue: str) -> tuple[Any, Any, Any] | None:
    """A channel of ``connection`` with the message delivered on it (``None``: it is gone)."""
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1)
    for method, properties, _body in channel.consume(queue, inactivity_timeout=1.0):
        if method is None:
            channel.close()
            return None
        return channel, method, (properties.headers or {}).get("x-delivery-count")
    return None


def broker_rule(uri: str, how: str, cap: int) -> tuple[int, list[Any]]:
    """Deliveries before the message is gone, giving it back ``how``; its x-delivery-counts."""
    params = pika.URLParameters(uri)
    connection = pika.BlockingConnection(params)
    queue = fresh_queue(connection.channel())
    counts: list[Any] = []
    while len(counts) < cap:
        taken = take(connection, queue)
        if taken is None:
            break
        channel, method, count = taken
        counts.append(count)
        channel.cancel()  # nothing more comes on this channel: one give-back a round
        if how == "nack":
            channel.basic_nack(method.delivery_tag, requeue=True)
        elif how == "reject":
            channel.basic_reject(method.delivery_tag, requeue=True)
        elif how == "recover":
            channel.basic_recover(requeue=True)
        if how == "connection":
            connection.close()
            connection = pika.BlockingConnection(params)
        else:
            channel.close()
    connection.channel().queue_delete(queue)
    connection.close()
    return len(counts), counts


def kzpool_moves(uri: str, cap: int) -> tuple[int, list[tuple[str, Any]]]:
    """Fail-over and fail-back cycles the held message survives; where each delivery came
    ("over": on the secondary, "back": on the primary) and its x-delivery-count."""
    host_port = uri.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    forwarder = Forwarder((host, int(port)))
    primary = uri.replace(host_port, f"127.0.0.1:{forwarder.port}")
    grace = {"move_grace": 1} if "move_grace" in BY_NAME else {}  # (a kzpool before it)
    pool = Pool(Path(tempfile.mkdtemp(prefix="kzt-dl-")), [primary, uri],
                reconnect_backoff_max=0.2, heartbeat=2, **grace)
    counts: list[tuple[str, Any]] = []
    cycles = 0
    try:
        pool.start().wait_ready()
        connection = kzpool.connect(pool.socket)
        lease = connection.channel(timeout=15)
        back = lease.broker
        queue = fresh_queue(lease)
        lease.basic_qos(prefetch_count=1)
        lease.basic_consume(queue, lambda _c, _m, p, _b: counts.append(
            ("back" if lease.broker == back else "over",
             (p.headers or {}).get("x-delivery-count"))))  # held: never acked
        pump(connection, lambda: counts, "the first delivery")
        while cycles < cap:
            try:
                for step, where in ((forwarder.silence, "over"), (forwarder.resume, "back")):
                    had = len(counts)
                    step()
                    pump(connection, again(counts, had, where), f"the message ({where})", 60)
            except TimeoutError:
                break  # dropped: its delivery limit is used up
            cycles += 1
        forwarder.resume()
        lease.queue_delete(queue)
        connection.close()
    finally:
        pool.close()
        forwarder.close()
    return cycles, counts


def again(counts: list[tuple[str, Any]], had: int, where: str) -> Callable[[], bool]:
    return lambda: len(counts) > had and counts[-1][0] == where


def pump(connection: Any, done: Callable[[], Any], what: str, timeout: float = 20) -> None:
    try:
        wait_for(lambda: connection.process_data_events(0.1) is None and done(), timeout,
                 what)
    except AssertionError as exc:
        raise TimeoutError(str(exc)) from exc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", default=DEFAULT_URI)
    parser.add_argument("--cap", type=int, default=50)
    args = parser.parse_args()
    with pika.BlockingConnection(pika.URLParameters(args.uri)) as conn:
        version = conn._impl.server_properties.get("version")
    version = version.decode() if isinstance(version, bytes) else version
    print(f"RabbitMQ {version} at {args.uri.split('@')[-1]}; a quorum queue, its default"
          f" delivery limit; at most {args.cap} deliveries")
    print("\ngiven back by         deliveries  x-delivery-count carried")
    for how in ("channel", "connection", "nack", "reject", "recover"):
        started = time.monotonic()
        got, counts = broker_rule(args.uri, how, args.cap)
        shown = ",".join("-" if c is None else str(c) for c in counts[:6])
        print(f"{how:<20} {got:>11}  {shown}{',...' if len(counts) > 6 else ''}"
              f"{' (last ' + str(counts[-1]) + ')' if counts else ''}"
              f"  [{time.monotonic() - started:.0f} s]")
    cycles, counts = kzpool_moves(args.uri, args.cap)
    print(f"\nkzpool: fail-over + fail-back cycles survived by a held message: {cycles}")
    print("x-delivery-count at each delivery (over: after a fail-over, back: after a"
          " fail-back): " + ", ".join(f"{where} {'-' if c is None else c}"
                                      for where, c in counts))


if __name__ == "__main__":
    main()
