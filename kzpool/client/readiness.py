"""One file descriptor that reads ready while a pool client has something for its thread.

An event loop that polls file descriptors (kombu's hub, which Celery's worker runs) needs
one descriptor to watch, but a pool client has a socket per lease, and a lease's socket
changes when the lease moves.  :class:`Readiness` is an epoll instance (itself pollable)
that holds, after each :meth:`Readiness.refresh`, the sockets of the calling thread's leases
and the client's wake pipe (another thread's ``add_callback_threadsafe``), plus an eventfd
raised while events already read wait to be dispatched (a lease call other than a dispatch
may read deliveries).  The loop calls ``refresh()`` before it polls and after it dispatches;
between two refreshes a lease that moved is watched from the next one.

Hazards: Linux only (epoll, eventfd).  Not thread-safe: the thread that dispatches the
leases refreshes.  After ``fork()`` the child shares the parent's epoll instance: a child
must never refresh it (that would change the parent's); closing it closes only the child's
copies.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading

from .dispatch import Dispatcher


class Readiness:
    """The readiness of the leases of ``dispatcher``'s client, for the refreshing thread."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._poll = select.epoll()
        self._pending = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._raised = False
        self._watched: set[int] = set()
        self._poll.register(self._pending, select.EPOLLIN)
        wake = dispatcher.wake_fd
        if wake is not None:
            self._poll.register(wake, select.EPOLLIN)

    def fileno(self) -> int:
        return self._poll.fileno()

    @property
    def closed(self) -> bool:
        return self._poll.closed

    def refresh(self, more: bool = False) -> None:
        """Watch the sockets the calling thread's leases have now, and stay readable while
        any of them has events waiting to be dispatched, or while ``more`` (the caller
        expects more: its last dispatch ran something)."""
        if self._poll.closed:
            return
        me = threading.get_ident()
        members = [m for m in self.dispatcher.snapshot() if m.owner == me]
        fds = {fd for m in members if (fd := m.wait_fd()) is not None}
        for fd in self._watched - fds:
            with contextlib.suppress(OSError):  # closed already: epoll forgot it then
                self._poll.unregister(fd)
        for fd in fds:  # a moved lease's new socket often gets its old number: always ask
            with contextlib.suppress(FileExistsError):
                self._poll.register(fd, select.EPOLLIN)
        self._watched = fds
        self._raise(more or any(m.has_events() for m in members))

    def _raise(self, pending: bool) -> None:
        if pending and not self._raised:
            os.eventfd_write(self._pending, 1)
        elif not pending and self._raised:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._pending)
        self._raised = pending

    def close(self) -> None:
        """Close both descriptors (in a forked child, its copies: the parent's stay as they
        are)."""
        if not self._poll.closed:
            self._poll.close()
            os.close(self._pending)
