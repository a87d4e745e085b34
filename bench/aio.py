"""kzpool.aio next to aio-pika, on the same broker, in the same run.

    .venv/bin/python bench/aio.py [--messages 20000] [--runs 3] [--only CASE] [--uri URI]

Starts a real pool (``kzpool serve``, one broker: bench/leases.py's ``Pool``) and measures,
with 256-byte messages, the same aio-pika code on ``aio_pika.connect(uri)`` and on
``kzpool.aio.connect()``:

* ``confirm``: N publishes on a channel with publisher confirms (aio-pika's default), all
  at once: ``asyncio.gather`` of N ``default_exchange.publish(Message(body), queue)``, each
  returning after its broker confirm;
* ``consume``: N messages pre-filled with pika, then ``queue.consume(callback)`` with
  ``set_qos(prefetch_count=500)``, the callback acking each message, until all N arrived.

The cases run interleaved, ``--runs`` times; prints msg/s (median) and the ratio
kzpool.aio / aio-pika, with the target (1.5x).  Queues are deleted after each case.  Not a
test: the machine is shared and noisy, so run it a few times before believing a number.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aio_pika
import pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from leases import BODY, URI, Bench, Pool  # bench/leases.py

import kzpool
import kzpool.aio

PREFETCH = 500
CASES = ("confirm", "consume")
TARGET = 1.5  # kzpool.aio / aio-pika, both cases
Connect = Callable[[], Awaitable[Any]]


# ----- the same aio-pika code for both --------------------------------------------------------

async def publish_confirmed(connection: Any, queue_name: str, count: int) -> float:
    """``count`` confirmed publishes in flight at once; seconds until the last confirm."""
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue_name, passive=True)
        exchange = channel.default_exchange
        start = time.perf_counter()
        confirms = await asyncio.gather(*(
            exchange.publish(aio_pika.Message(BODY), routing_key=queue_name)
            for _ in range(count)))
        elapsed = time.perf_counter() - start
    not_acked = sum(type(c).__name__ != "Ack" for c in confirms)
    if not_acked:
        print(f"  !! {not_acked} publishes not acked", file=sys.stderr)
    return elapsed


async def consume_acked(connection: Any, queue_name: str, count: int) -> float:
    """Consume and ack ``count`` messages at prefetch 500; seconds until the last arrived."""
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.declare_queue(queue_name, passive=True)
        done = asyncio.get_running_loop().create_future()
        received = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if received == count:
                done.set_result(None)

        start = time.perf_counter()
        await queue.consume(on_message)
        await asyncio.wait_for(done, 120)
        return time.perf_counter() - start


# ----- the cases --------------------------------------------------------------------------------

def confirm_case(bench: Bench, connect: Connect, who: str, count: int) -> float:
    with bench.queue(f"aio-conf-{who}") as queue:
        elapsed = asyncio.run(_with(connect, publish_confirmed, queue, count))
        bench.check(queue, count, f"{who} confirm")
    return count / elapsed


def consume_case(bench: Bench, connect: Connect, who: str, count: int) -> float:
    with bench.queue(f"aio-cons-{who}") as queue:
        bench.fill(queue, count)
        elapsed = asyncio.run(_with(connect, consume_acked, queue, count))
        bench.check(queue, 0, f"{who} consume")
    return count / elapsed


async def _with(connect: Connect, program: Callable[[Any, str, int], Awaitable[float]],
                queue: str, count: int) -> float:
    return await program(await connect(), queue, count)


# ----- the report ---------------------------------------------------------------------------

def report(title: str, aio: list[float], kz: list[float], count: int) -> float:
    ratio = statistics.median(kz) / statistics.median(aio)
    print(f"\n{title}")
    for label, values in (("aio-pika connect()", aio), ("kzpool.aio connect()", kz)):
        runs = "  (runs " + ", ".join(f"{v:,.0f}" for v in values) + ")"
        print(f"  {label:<24} {count:>7,} msgs {statistics.median(values):>10,.0f} msg/s{runs}")
    verdict = "ok" if ratio >= TARGET else "MISSED"
    print(f"  kzpool.aio / aio-pika: {ratio:.2f}x   target >= {TARGET}x  {verdict}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000,
                        help="messages per case (default 20,000)")
    parser.add_argument("--only", choices=CASES, action="append",
                        help="run only this case (repeatable)")
    parser.add_argument("--runs", type=int, default=3, help="repeat each case, report the median")
    parser.add_argument("--prechannels", type=int, default=10)
    parser.add_argument("--uri", default=URI)
    args = parser.parse_args()
    cases = args.only or list(CASES)
    count = args.messages

    print(f"$ {shlex.join(['python', *sys.argv])}")
    print(f"# {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {os.cpu_count()} CPUs,"
          f" broker {args.uri.split('@')[-1]}, {len(BODY)}-byte messages, {args.runs} run(s),"
          f" median shown")
    print(f"# aio-pika {aio_pika.__version__} (aiormq {version('aiormq')}), pika"
          f" {pika.__version__}, kzpool {kzpool.__version__}, Python {sys.version.split()[0]}")
    pool = Pool(args.uri, args.prechannels)
    bench = Bench(args, pool)
    connects: dict[str, Connect] = {
        "aio-pika": lambda: aio_pika.connect(args.uri.replace("/%2F", "/")),
        "kzpool": lambda: kzpool.aio.connect(pool.socket)}
    results: dict[str, dict[str, list[float]]] = {c: {w: [] for w in connects} for c in cases}
    functions = {"confirm": confirm_case, "consume": consume_case}
    try:
        for _ in range(args.runs):  # interleaved, so that noise hits both alike
            for case in cases:
                for who, connect in connects.items():
                    results[case][who].append(functions[case](bench, connect, who, count))
        titles = {"confirm": "1. publish with confirms, pipelined (asyncio.gather of publishes)",
                  "consume": f"2. consume + ack one by one, prefetch {PREFETCH}"}
        ratios = [report(titles[c], results[c]["aio-pika"], results[c]["kzpool"], count)
                  for c in cases]
        print("\nratios: " + ", ".join(f"{c} {r:.2f}x" for c, r in zip(cases, ratios,
                                                                       strict=True)))
    finally:
        bench.close()
        pool.stop()


if __name__ == "__main__":
    main()
