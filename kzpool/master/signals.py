"""The master's signals: handlers that only record, and a wake-up of the loop.

The handler appends the signal to :attr:`SignalQueue.pending` and nothing else; the wake-up
fd (``signal.set_wakeup_fd``) makes the master's ``select`` return, and the next tick acts
on what was recorded (gunicorn's arbiter does the same).  :func:`child_defaults` undoes it
all in a freshly forked child.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)


class SignalQueue:
    def __init__(self) -> None:
        self.pending: list[int] = []

    def install(self, selector: selectors.BaseSelector) -> None:
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(write_end)
        for sig in HANDLED:
            signal.signal(sig, self._record)
        selector.register(read_end, selectors.EVENT_READ, _drain)

    def _record(self, signum: int, _frame: Any) -> None:
        self.pending.append(signum)

    def take(self) -> int | None:
        """The oldest signal not yet acted on, if any."""
        return self.pending.pop(0) if self.pending else None


def child_defaults() -> None:
    """In a freshly forked child: the master's signal handling undone."""
    signal.set_wakeup_fd(-1)
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_DFL)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 4096)
