"""Process plumbing shared by the master and its children: titles, parent death, fds, RSS.

Reading another process's memory opens files under ``/proc``: at the file limit that
reading is skipped (``None``), never raised.
"""

from __future__ import annotations

import ctypes
import os
import signal

import psutil
import setproctitle

from .sockets import FILE_LIMIT_ERRORS

_PR_SET_PDEATHSIG = 1


def set_title(title: str) -> None:
    """Show ``title`` in ps/top; it must never hold a password."""
    setproctitle.setproctitle(title)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (prctl PDEATHSIG).

    Races with a parent that died before the call: callers also compare ``os.getppid()``
    with the parent pid they expect.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def close_fds_except(*keep: int) -> None:
    """Close every inherited descriptor above stderr but ``keep``.

    Used right after fork, before the child opens anything: the child must not hold the
    master's sockets, the other workers' links or the registry's connection.
    """
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def rss_and_cpu(proc: psutil.Process) -> tuple[int, float] | None:
    """Resident bytes and CPU percent since the last call; (0, 0.0) if it is gone; ``None``
    if they cannot be read now (``/proc`` cannot be opened at the file limit: the caller
    skips this reading, see :class:`~kzpool.common.sockets.LimitEpisode`)."""
    try:
        with proc.oneshot():
            return proc.memory_info().rss, proc.cpu_percent(None)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0, 0.0
    except OSError as exc:
        if exc.errno in FILE_LIMIT_ERRORS:
            return None
        raise
