"""A client that does not read what it asked for, run as its own process by
``tests/test_budgets.py`` and ``bench/isolation.py``:

    python -m tests.unread SOCKET MODE QUEUE COUNT

MODE: ``auto_ack`` (one consumer with auto_ack), ``prefetch0`` (basic_qos(0), acks),
``default`` (the pool's default prefetch, acks), ``many`` (200 leases, each basic_qos(0) on
QUEUE), ``returns`` (COUNT mandatory publishes of QUEUE bytes that no queue takes).  It
prints ``ready`` once set up, then reads nothing until a line comes on stdin; then it reads
until it has COUNT messages (or returns) or 60 s pass, prints ``got N`` and exits.  Any
error is printed as ``error: TYPE: TEXT``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import kzpool


def main(socket_path: str, mode: str, queue: str, count: int) -> None:
    client = kzpool.connect(socket_path)
    got: list[Any] = []
    leases = [client.lease("float") for _ in range(200 if mode == "many" else 1)]
    try:
        for lease in leases:
            if mode == "returns":
                lease.add_on_return_callback(lambda *a: got.append(1))
                body = b"r" * int(queue)
                for _ in range(count):
                    lease.basic_publish("", "kzt-nowhere-at-all", body, mandatory=True)
                continue
            if mode != "default":
                lease.basic_qos(prefetch_count=0)
            auto_ack = mode == "auto_ack"
            lease.basic_consume(queue, lambda ch, m, _p, body, a=auto_ack: got.append(body) or (
                None if a else ch.basic_ack(m.delivery_tag)), auto_ack=auto_ack)
        print("ready", flush=True)
        sys.stdin.readline()
        deadline = time.monotonic() + 60
        while len(got) < count and time.monotonic() < deadline:
            client.process_data_events(0.2)
        print(f"got {len(got)} distinct {len(set(map(bytes, got)))}", flush=True)
    except Exception as exc:  # told to the test as text
        print(f"error: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
