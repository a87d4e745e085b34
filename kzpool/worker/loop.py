"""The worker's IOLoop, guarded: an exception raised by one client's handler drops that
client, never the worker.  Signals reach it through a pipe (:meth:`GuardedLoop.watch_signals`).

pika's ``IOLoop`` lets an exception from a handler end ``start()``, and with it the worker
and every lease on it.  :class:`GuardedLoop` wraps each handler it is given: when one raises,
``on_fault(fd, exc)`` is asked whether ``fd`` is a client's (it then drops that client, and
the loop goes on) or not (the AMQP connection, the link to the master: the exception goes
on up, as before).  The broker's socket, which pika makes in a callback of its own, may meet
the file limit: that is told to ``on_file_limit`` (the worker tries again later).  Not
thread-safe, like the loop itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from pika.adapters.select_connection import IOLoop

from ..common.sockets import at_file_limit
from ..common.wakeup import SignalPipe

log = logging.getLogger("kzpool.worker")

Handler = Callable[[int, int], None]
OnFault = Callable[[int, Exception], bool]  # fd, what it raised → it was a client's


class GuardedLoop(IOLoop):  # type: ignore[misc]
    def __init__(self, on_fault: OnFault,
                 on_file_limit: Callable[[OSError], None] = lambda exc: None) -> None:
        super().__init__()
        self.on_fault = on_fault
        self.on_file_limit = on_file_limit

    def add_callback(self, callback: Callable[[], None]) -> None:
        """pika's callbacks from its other threads (the broker's address, resolved): the
        one that makes the broker's socket meets the file limit there, which is told to
        ``on_file_limit(exc)`` rather than ending the loop."""
        def guarded() -> None:
            try:
                callback()
            except OSError as exc:
                if not at_file_limit(exc):
                    raise
                self.on_file_limit(exc)
        super().add_callback_threadsafe(guarded)

    def add_handler(self, fd: int, handler: Handler, events: int) -> None:
        def guarded(fileno: int, happened: int) -> None:
            try:
                handler(fileno, happened)
            except Exception as exc:
                if not self.on_fault(fileno, exc):
                    raise
        super().add_handler(fd, guarded, events)

    def watch_signals(self, signals: Iterable[int], on_signal: Callable[[int], None]) -> None:
        """Signal handlers that only record (:class:`~kzpool.common.wakeup.SignalPipe`):
        ``on_signal(signum)`` is called from the loop."""
        pipe = SignalPipe(signals)

        def woken(_fd: int, _events: int) -> None:
            pipe.drain()
            while (signum := pipe.take()) is not None:
                on_signal(signum)
        self.add_handler(pipe.install(), woken, self.READ)
