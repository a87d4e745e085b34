"""The Celery app bench/celery.py runs: ``celery -A celery_app worker``, configured from the
environment (``KZB_BROKER``, ``KZB_QUEUE``, ``KZB_RECORD``); its one task, ``tiny``, appends
the time it ran to the record file."""

from __future__ import annotations

import os
import time

from celery import Celery

import kzpool.kombu  # noqa: F401  (the kzpool:// scheme)

app = Celery("kzb")
app.conf.update(broker_url=os.environ.get("KZB_BROKER", "kzpool://"),
                task_default_queue=os.environ.get("KZB_QUEUE", "kzb"),
                broker_connection_retry_on_startup=True)


@app.task(name="tiny", ignore_result=True)
def tiny() -> None:
    with open(os.environ["KZB_RECORD"], "a") as record:
        record.write(f"{time.time()}\n")
