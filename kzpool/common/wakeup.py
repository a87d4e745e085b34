"""Signals for a process's loop: handlers that only record, and a pipe that wakes the loop.

A handler appends its signal to :attr:`SignalPipe.pending` and does nothing else;
``signal.set_wakeup_fd`` writes a byte to a pipe whose read end the loop watches, so the
loop wakes and acts on what was recorded, in order (gunicorn's arbiter does the same).  The
master and every connection worker use it; :func:`defaults` undoes it in a freshly forked
child.  Not thread-safe: the main thread's loop only (where Python runs signal handlers).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from typing import Any


class SignalPipe:
    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = tuple(signals)
        self.pending: list[int] = []
        self.fd = -1  # the read end, once installed

    def install(self) -> int:
        """Record :attr:`signals` from now on; the descriptor the loop watches."""
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(write_end)
        for sig in self.signals:
            signal.signal(sig, self._record)
        self.fd = read_end
        return read_end

    def _record(self, signum: int, _frame: Any) -> None:
        self.pending.append(signum)

    def drain(self) -> None:
        """Empty the pipe (the loop woke: what woke it is in :attr:`pending`)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 4096):
                pass

    def take(self) -> int | None:
        """The oldest signal not yet acted on, if any."""
        return self.pending.pop(0) if self.pending else None


def defaults(signals: Iterable[int]) -> None:
    """In a freshly forked child: the parent's recording of ``signals`` undone."""
    signal.set_wakeup_fd(-1)
    for sig in signals:
        signal.signal(sig, signal.SIG_DFL)
