"""aio-pika's callback collections: ``close_callbacks``, ``return_callbacks``, ...

Each callback is called with the sender (the channel or connection) first, then the event's
arguments; a coroutine function's result runs as a task.  What a callback raises is logged,
never passed on.  Calling a collection returns an awaitable that completes when every
coroutine it started has (as aio-pika's does), so a caller may wait for them.  Not
thread-safe: the loop's thread only.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any

log = logging.getLogger("kzpool.aio")

Callback = Callable[..., Any]


class _Done:
    """An awaitable that is done at once: what calling a collection gives when no callback
    started a coroutine."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


class CallbackCollection:
    def __init__(self, sender: Any) -> None:
        self.sender = sender
        self._callbacks: list[Callback] = []
        self._tasks: set[asyncio.Future[Any]] = set()

    def add(self, callback: Callback, weak: bool = False) -> None:
        """Add ``callback`` (``weak`` is accepted for aio-pika's sake: references are
        strong)."""
        if not callable(callback):
            raise ValueError(f"callback {callback!r} is not callable")
        if callback not in self._callbacks:
            self._callbacks.append(callback)

    def remove(self, callback: Callback) -> None:
        self._callbacks.remove(callback)

    def discard(self, callback: Callback) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def clear(self) -> None:
        self._callbacks.clear()

    def __len__(self) -> int:
        return len(self._callbacks)

    def __contains__(self, callback: object) -> bool:
        return callback in self._callbacks

    def __iter__(self) -> Iterator[Callback]:
        return iter(list(self._callbacks))

    def __bool__(self) -> bool:
        return True

    def __call__(self, *args: Any) -> Awaitable[Any]:
        started: list[asyncio.Future[Any]] = []
        for callback in list(self._callbacks):
            try:
                result = callback(self.sender, *args)
            except Exception:
                log.exception("callback %r failed", callback)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._finished)
                started.append(task)
        if not started:
            return _Done()
        return asyncio.gather(*started, return_exceptions=True)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("callback failed", exc_info=task.exception())


class Ending:
    """How a channel or a connection ends: ``closed`` as soon as its close begins; then its
    ``callbacks`` hear why, and the future :meth:`future` gave completes.  A channel that is
    reopened (:meth:`reopen`) may end again."""

    def __init__(self, sender: Any) -> None:
        self.callbacks = CallbackCollection(sender)
        self.closed = False
        self.finished = False  # its close has completed
        self._future: asyncio.Future[bool] | None = None

    def begin(self) -> bool:
        """Mark it closed; ``False`` if it was already (nothing more to do)."""
        if self.closed:
            return False
        self.closed = True
        return True

    def finish(self, exc: BaseException | None) -> Awaitable[Any]:
        """Tell the callbacks, complete the future; what the callbacks started."""
        started = self.callbacks(exc)
        self.resolve()
        return started

    def resolve(self) -> None:
        """Complete the future :meth:`future` gave (the channel is closed, for now)."""
        self.finished = True
        if self._future is not None and not self._future.done():
            self._future.set_result(True)

    def reopen(self) -> None:
        """Open again: no longer closed, and a new future for the next close."""
        self.closed = self.finished = False
        if self._future is not None and self._future.done():
            self._future = None

    def future(self) -> asyncio.Future[bool]:
        """Completes when its close has completed (at once if it has)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if self.finished:
                self._future.set_result(True)
        return self._future
