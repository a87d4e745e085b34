"""The master's seam to the operating system: fork, reap, signal, clocks, process handles.

Everything the master decides about its children goes through a :class:`System`, so the
decisions (respawn, backoff, the stop ladder) can be tested with a fake one that forks
nothing and reaps what the test says, on a clock the test moves.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Protocol

import psutil

from ..common.wakeup import defaults

# the master's signals: recorded by its loop (kzpool.common.wakeup), held around a fork
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)


class System(Protocol):
    def fork(self) -> int: ...

    def waitpid(self, pid: int, options: int) -> tuple[int, int]: ...

    def kill(self, pid: int, sig: int) -> None: ...

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    def process(self, pid: int) -> psutil.Process | None: ...

    def pid_exists(self, pid: int) -> bool: ...


class OsSystem:
    """The real one."""

    def fork(self) -> int:
        """``os.fork``, the master's signals held until the child has undone the master's
        handling of them: one sent at once (a worker replaced as it starts) reaches the
        child with its default action, never the copy of the master's recorder."""
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
            if pid == 0:
                defaults(HANDLED)
            return pid
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        return os.waitpid(pid, options)

    def kill(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def process(self, pid: int) -> psutil.Process | None:
        """A handle to read ``pid``'s memory; ``None`` if it is gone, or if ``/proc`` cannot
        be read now (the file limit: the caller tries again later)."""
        try:
            return psutil.Process(pid)
        except (psutil.Error, OSError):
            return None

    def pid_exists(self, pid: int) -> bool:
        """Signal 0, no file opened (psutil's reads ``/proc``, which the file limit fails)."""
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
