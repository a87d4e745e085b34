"""A client that does not read what it asked for, run as its own process by
``tests/test_budgets.py`` and ``bench/isolation.py``:

    python -m tests.unread SOCKET MODE QUEUE COUNT

MODE: ``auto_ack`` (one consumer with auto_ack), ``prefetch0`` (basic_qos(0), acks),
``every`` (as ``prefetch0``, reading what is there every 5 s until told to read all),
``default`` (the pool's default prefetch, acks), ``many`` (200 leases, each basic_qos(0) on
QUEUE), ``returns`` (COUNT mandatory publishes of QUEUE bytes that no queue takes).  It
prints ``ready`` once set up, then reads nothing until a line comes on stdin; then it reads
until it has COUNT messages (or returns) or none came for 5 s, makes a call on each lease,
prints ``got N distinct M`` and ``moves N`` (its leases' moves), and exits.  An error is
printed first, as ``error: TYPE: TEXT``.
"""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Any

import kzpool


def main(socket_path: str, mode: str, queue: str, count: int) -> None:
    client = kzpool.connect(socket_path)
    got: list[Any] = []
    moves: list[kzpool.MoveEvent] = []
    leases = [client.lease("float", on_move=moves.append)
              for _ in range(200 if mode == "many" else 1)]
    try:
        if mode == "returns":  # its publishes may wait: its client's socket is not read
            print("ready", flush=True)
            leases[0].add_on_return_callback(lambda _ch, _m, _p, body: got.append(body))
            body = os.urandom(int(queue))
            for _ in range(count):
                leases[0].basic_publish("", "kzt-nowhere-at-all", body, mandatory=True)
        for lease in leases if mode != "returns" else ():
            if mode != "default":
                lease.basic_qos(prefetch_count=0)
            auto_ack = mode == "auto_ack"
            lease.basic_consume(queue, lambda ch, m, _p, body, a=auto_ack: got.append(body) or (
                None if a else ch.basic_ack(m.delivery_tag)), auto_ack=auto_ack)
    except Exception as exc:  # told to the test as text
        print(f"error: {type(exc).__name__}: {exc}", flush=True)
    if mode != "returns":
        print("ready", flush=True)
    stdin = select.poll()
    stdin.register(sys.stdin, select.POLLIN)
    while mode == "every" and len(got) < count and not stdin.poll(5000):
        client.process_data_events(0)  # what is there, every 5 s
    sys.stdin.readline()
    try:
        idle = time.monotonic()
        while len(got) < count and time.monotonic() - idle < 5:
            before = len(got)
            client.process_data_events(0.2)
            idle = time.monotonic() if len(got) > before else idle
        for lease in leases:  # a call: it raises what closed its lease, if something did
            lease.exchange_declare("amq.direct", passive=True)
    except Exception as exc:  # told to the test as text
        print(f"error: {type(exc).__name__}: {exc}", flush=True)
    print(f"got {len(got)} distinct {len(set(map(bytes, got)))}", flush=True)
    print(f"moves {len(moves)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
