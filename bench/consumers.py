"""In-service consumers under CPU-heavy work: throughput against what the cores allow, and
the pool's own CPU per message against what direct pika spends per message.

    .venv/bin/python bench/consumers.py [--messages 6000] [--processes 8] [--uri URI]

A [consumer:bench] section runs `processes` consumer processes whose handler burns about
1 ms of CPU per message (bench/cpu_handler.py); the clock starts once they have handled
the first 200 (forked, imported, consuming).  With C cores the best possible throughput
is C x 1,000 msg/s; the run reports the share reached.  Side by side, the same number of
plain pika processes (BlockingConnection, same prefetch, same handler, ack per message) run
the same load: their share is what this machine allows once the broker has taken its part,
and the broker's CPU per message (the process listening on its port) is measured in both
runs.  The pool's CPU (master, registry, connection workers: everything but the consumers)
per message is compared with the CPU a plain pika consumer with an empty callback spends
per message.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pika
import psutil
from leases import broker_process

import kzpool

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = URI = "amqp://guest:guest@127.0.0.1:5672/%2F"
QUEUE = "kzpool-bench-consumers"
WARM_UP = 200  # messages handled before the clock starts: steady state only


def fill(count: int) -> None:
    with pika.BlockingConnection(pika.URLParameters(URI)) as conn:
        channel = conn.channel()
        channel.queue_declare(QUEUE)
        channel.queue_purge(QUEUE)
        for i in range(count):
            channel.basic_publish("", QUEUE, b"%d" % i)


def cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def pool_run(count: int, processes: int) -> tuple[float, float, float]:
    """Seconds to handle ``count`` messages, the pool's and the broker's CPU seconds."""
    directory = Path(tempfile.mkdtemp(prefix="kzc-"))
    trace = directory / "trace"
    trace.touch()
    config = directory / "config.ini"
    config.write_text(f"[pool]\nsocket = {directory}/kzpool.sock\n[amqp]\nuri = {URI}\n"
                      f"[consumer:bench]\nhandler = cpu_handler:burn\nqueue = {QUEUE}\n"
                      f"processes = {processes}\nprefetch = 10\n")
    fill(count + WARM_UP)
    env = {**os.environ, "KZB_TRACE": str(trace), "PYTHONPATH": str(ROOT / "bench")}
    proc = subprocess.Popen([sys.executable, "-m", "kzpool", "serve", "-c", str(config)],
                            env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        client = wait(lambda: kzpool.connect(f"{directory}/kzpool.sock"))
        status = wait(lambda: (s := client.status())["pool"]["state"] == "running" and s)
        pool_pids = [proc.pid] + [r["pid"] for r in status["connections"]]
        pool_pids += [p.pid for p in psutil.Process(proc.pid).children()
                      if "registry" in " ".join(p.cmdline())]
        while trace.stat().st_size < 2 * WARM_UP:  # consumers forked, imported, consuming
            time.sleep(0.001)
        start, cpu_start, broker_start = time.monotonic(), cpu(pool_pids), cpu(broker_pids())
        while trace.stat().st_size < 2 * (count + WARM_UP):
            time.sleep(0.01)
        return (time.monotonic() - start, cpu(pool_pids) - cpu_start,
                cpu(broker_pids()) - broker_start)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def broker_pids() -> list[int]:
    broker = broker_process(URI)
    return [broker.pid] if broker is not None else []


def pika_procs_run(count: int, processes: int) -> tuple[float, float]:
    """The same load on ``processes`` plain pika consumers: seconds, broker CPU seconds."""
    directory = Path(tempfile.mkdtemp(prefix="kzc-"))
    trace = directory / "trace"
    trace.touch()
    fill(count + WARM_UP)
    os.environ["KZB_TRACE"] = str(trace)
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _pika_consumer()
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    try:
        while trace.stat().st_size < 2 * WARM_UP:
            time.sleep(0.001)
        start, broker_start = time.monotonic(), cpu(broker_pids())
        while trace.stat().st_size < 2 * (count + WARM_UP):
            time.sleep(0.01)
        return time.monotonic() - start, cpu(broker_pids()) - broker_start
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _pika_consumer() -> None:
    from cpu_handler import burn_pika

    with pika.BlockingConnection(pika.URLParameters(URI)) as conn:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=10)
        channel.basic_consume(QUEUE, burn_pika)
        channel.start_consuming()


def pika_cpu_per_message(count: int) -> float:
    fill(count)
    me = psutil.Process()
    with pika.BlockingConnection(pika.URLParameters(URI)) as conn:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=10)
        seen = 0

        def on_message(ch: object, method: object, _props: object, _body: bytes) -> None:
            nonlocal seen
            channel.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
            seen += 1
            if seen == count:
                channel.stop_consuming()
        before = sum(me.cpu_times()[:2])
        channel.basic_consume(QUEUE, on_message)
        channel.start_consuming()
        return (sum(me.cpu_times()[:2]) - before) / count


def wait(probe: object, timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = probe()  # type: ignore[operator]
            if value:
                return value
        except kzpool.KzpoolError:
            pass
        time.sleep(0.05)
    raise TimeoutError("the pool did not start")


def main() -> None:
    global URI
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--uri", default=DEFAULT, help="the broker (a node serving nothing else"
                        " measures best: its CPU per message is reported)")
    args = parser.parse_args()
    URI = args.uri  # the module's broker, for every step below
    cores = os.cpu_count() or 1
    print(f"$ python bench/consumers.py --messages {args.messages} --processes {args.processes}"
          + (f" --uri {args.uri}" if args.uri != DEFAULT else ""))
    elapsed, pool_cpu, broker_cpu = pool_run(args.messages, args.processes)
    best = cores / 0.001
    rate = args.messages / elapsed
    sys.path.insert(0, str(ROOT / "bench"))
    pika_elapsed, pika_broker_cpu = pika_procs_run(args.messages, args.processes)
    pika_rate = args.messages / pika_elapsed
    direct = pika_cpu_per_message(args.messages)
    with pika.BlockingConnection(pika.URLParameters(URI)) as conn:
        conn.channel().queue_delete(QUEUE)
    print(f"{args.processes} consumers, 1 ms CPU/message, {cores} cores: {rate:,.0f} msg/s ="
          f" {rate / best:.0%} of the {best:,.0f} msg/s the cores allow (target >= 90%)")
    print(f"{args.processes} plain pika consumers, same load: {pika_rate:,.0f} msg/s ="
          f" {pika_rate / best:.0%} of the cores; kzpool / pika = {rate / pika_rate:.2f}")
    print(f"broker CPU per message: {broker_cpu / args.messages * 1e6:.0f} us under kzpool,"
          f" {pika_broker_cpu / args.messages * 1e6:.0f} us under plain pika")
    print(f"pool CPU per message {pool_cpu / args.messages * 1e6:.0f} us (master, registry,"
          f" workers); direct pika consumer {direct * 1e6:.0f} us per message in-process"
          f" (target: pool <= pika)")


if __name__ == "__main__":
    main()
