"""A Celery app whose broker is the kzpool pool on this machine: ``broker_url = "kzpool://"``.

    export KZPOOL_SOCKET=/tmp/kzpool/kzpool.sock      # the pool of config.ini.example
    cd examples/celery && ../../.venv/bin/celery -A tasks worker --pool=solo -l INFO
    # in another terminal, from the same directory:
    ../../.venv/bin/python send.py

``crunch`` holds the GIL for as long as it is asked to, minutes if you like: the worker
cannot answer the broker's heartbeats meanwhile, and on ``amqp://`` the broker would drop
its connection (and deliver the task again).  Here the pool's worker keeps the heartbeats.
"""

from __future__ import annotations

import time

from celery import Celery

import kzpool.kombu  # noqa: F401  (registers kzpool:// with kombu)

app = Celery("tasks")
app.conf.update(
    broker_url="kzpool://",  # $KZPOOL_SOCKET, else /run/kzpool/kzpool.sock
    broker_transport_options={"confirm_publish": True, "timeout": 30.0},
    task_acks_late=True,  # acked when done: a crash mid-task gives it back to the broker
    worker_prefetch_multiplier=1,  # take one task at a time
)


@app.task
def crunch(seconds: float) -> int:
    """Compute for ``seconds`` in pure Python (nothing else in the process runs)."""
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
    print(f"crunched for {seconds} s: {rounds} rounds")
    return rounds
