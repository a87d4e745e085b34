"""The worker's own channel for housekeeping on its broker: is a queue there; delete one.

No lease holds this channel.  :mod:`.exclusive` deletes here the exclusive queues of a
client connection that left, and asks here whether a queue another client connection
holds is still there before it refuses a lease access to it.  Jobs run one at a time, in
order; a check of a queue that is gone makes the broker close the channel (404), and the
next job opens another.  The channel is opened when the first job comes, and again after a
close; a broker connection lost takes every job with it (and every exclusive queue: the
broker deleted them).  Runs on the worker's loop; nothing blocks.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika.exceptions

log = logging.getLogger("kzpool.worker")

RETRY = 1.0  # seconds before trying again to open the channel at channel_max
NOT_FOUND = 404


@dataclass(frozen=True)
class Job:
    queue: str
    delete: bool  # else a check
    then: Callable[[bool], None] | None  # told whether it is there (a check) or gone (delete)


class Janitor:
    """Checks and deletes on a channel of the worker's connection (see the module)."""

    def __init__(self, ioloop: Any) -> None:
        self.ioloop = ioloop
        self.connection: Any = None  # the open connection; None while there is none
        self.channel: Any = None
        self.opening = False
        self.jobs: deque[Job] = deque()
        self.busy: Job | None = None  # the job the broker has not answered yet
        self.deleted = 0  # queues deleted so far

    def start(self, connection: Any) -> None:
        """The broker connection is open: jobs may run on it."""
        self.connection = connection
        self._next()

    def stop(self) -> None:
        """The broker connection is gone: so are the jobs (and the queues they were for)."""
        self.connection = self.channel = self.busy = None
        self.opening = False
        self.jobs.clear()

    def check(self, queue: str, then: Callable[[bool], None]) -> None:
        """Tell ``then`` whether ``queue`` is on the broker (a passive declare)."""
        self.jobs.append(Job(queue, False, then))
        self._next()

    def delete(self, queue: str, then: Callable[[bool], None] | None = None) -> None:
        """Delete ``queue`` (the broker cancels its consumers; one already gone is fine),
        then tell ``then`` whether it is gone."""
        self.jobs.append(Job(queue, True, then))
        self._next()

    def _next(self) -> None:
        if self.busy is not None or not self.jobs or self.connection is None:
            return
        channel = self.channel
        if channel is None or not channel.is_open:
            self._open()
            return
        job = self.busy = self.jobs.popleft()
        if job.delete:
            channel.queue_delete(job.queue, callback=self._done)
        else:
            channel.queue_declare(job.queue, passive=True, callback=self._done)

    def _open(self) -> None:
        if self.opening or not self.connection.is_open:
            return
        try:
            self.connection.channel(on_open_callback=self._opened)
        except pika.exceptions.NoFreeChannels:
            log.warning("channel_max reached: exclusive queues wait %.0f s for housekeeping",
                        RETRY)
            self.ioloop.call_later(RETRY, self._next)
            return
        self.opening = True

    def _opened(self, channel: Any) -> None:
        self.opening = False
        if channel.connection is not self.connection:  # a connection lost since
            return
        self.channel = channel
        channel.add_on_close_callback(self._closed)
        self._next()

    def _done(self, _frame: Any) -> None:
        job, self.busy = self.busy, None
        if job is not None and job.delete:
            self.deleted += 1
        if job is not None and job.then is not None:
            job.then(True)
        self._next()

    def _closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self.channel:
            return
        self.channel = None
        job, self.busy = self.busy, None
        code = getattr(reason, "reply_code", 0)
        if job is not None and job.delete:
            log.warning("could not delete queue %s: %s", job.queue, reason)
        if job is not None and job.then is not None:
            job.then(code != NOT_FOUND if not job.delete else False)
        self._next()
