"""A channel's consumers: what a delivery goes to.

A :class:`CallbackConsumer` (``queue.consume(callback)``) runs each message in a task of its
own, as aio-pika does, so callbacks run side by side up to the prefetch count; a queue
iterator (:mod:`.iterator`) buffers it.  A :class:`Cancelled` consumer stands in for one
whose cancel is on its way: what comes for it meanwhile goes back to the queue.  Not
thread-safe: the loop's thread only.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from .incoming import IncomingMessage

log = logging.getLogger("kzpool.aio")


class Consumer(Protocol):
    no_ack: bool

    def deliver(self, message: IncomingMessage) -> None: ...

    def lost(self) -> None:
        """The messages delivered so far are void: the broker gives them again."""

    def closed(self) -> None:
        """The channel is closed: no more messages."""


class CallbackConsumer:
    """``queue.consume(callback)``: each message in a task of its own."""

    def __init__(self, callback: Callable[[IncomingMessage], Any], no_ack: bool) -> None:
        self.callback = callback
        self.no_ack = no_ack
        self.tasks: set[asyncio.Task[Any]] = set()

    def deliver(self, message: IncomingMessage) -> None:
        try:
            result = self.callback(message)
        except Exception:
            log.exception("consumer callback failed")
            return
        if isinstance(result, Coroutine) or inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self.tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("consumer callback failed", exc_info=task.exception())

    def lost(self) -> None:
        pass

    def closed(self) -> None:
        pass


class Cancelled:
    """A cancelled consumer: its late deliveries go back to the queue."""

    def __init__(self, no_ack: bool) -> None:
        self.no_ack = no_ack
