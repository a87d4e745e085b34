"""The Celery app of the Celery tests: ``celery -A tests.celery_app worker`` takes its broker,
queue and settings from the environment, and its tasks write what they do to a record file.

``KZT_BROKER`` (``kzpool://...`` or ``amqp://...``), ``KZT_QUEUE``, ``KZT_RECORD`` (a file:
one line a task start or end, with the process id and whether the broker delivered the
task again), ``KZT_ACKS_LATE`` (1 or 0),
``KZT_HEARTBEAT`` (``broker_heartbeat``, seconds).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

import kzpool.kombu  # noqa: F401  (the kzpool:// scheme)


def make_app(broker: str, queue: str, acks_late: bool = True, heartbeat: float = 2.0) -> Celery:
    app = Celery("kzt")
    app.conf.update(
        broker_url=broker,
        broker_heartbeat=heartbeat,
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
        task_acks_late=acks_late,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


app = make_app(os.environ.get("KZT_BROKER", "kzpool://"), os.environ.get("KZT_QUEUE", "kzt"),
               os.environ.get("KZT_ACKS_LATE", "1") == "1",
               float(os.environ.get("KZT_HEARTBEAT", "2")))


def record(line: str, redelivered: bool = False) -> None:
    with open(os.environ["KZT_RECORD"], "a") as out:  # one short append: whole lines
        out.write(f"{line} {os.getpid()} {'redelivered' if redelivered else 'first'}\n")


@app.task(name="burn", bind=True)
def burn(self: Any, tag: str, seconds: float) -> str:
    """Hold the GIL for ``seconds`` (nothing else runs in the worker meanwhile)."""
    record(f"start {tag}", bool((self.request.delivery_info or {}).get("redelivered")))
    deadline = time.monotonic() + seconds
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    record(f"done {tag}")
    return tag


@app.task(name="spawn")
def spawn(tag: str) -> None:
    """Publish another task from the worker's process (a prefork child's, say)."""
    record(f"start {tag}")
    burn.delay(f"{tag}-child", 0)
    record(f"done {tag}")


def send(app: Celery, name: str, *args: Any) -> None:
    app.send_task(name, args=args)
