"""Socket plumbing every process shares: reads that tell data from nothing-yet and EOF,
a wait for readable sockets, writes that never block (:class:`Outbox`), an accept that
survives the file limit (:class:`Acceptor`), and the process's file limit.

Nothing here blocks but :func:`readable`, which a blocking client waits in: every other
socket it is given must be non-blocking (``Outbox``) or is only tried once
(:func:`send_final`).  Not thread-safe; each object belongs to one loop.

Waits use ``poll``, never ``select``: a process may hold sockets on descriptors above 1,024.
An exception that the caller's own code raises while it waits or reads (a ``SIGALRM``
handler's ``TimeoutError``, a ``KeyboardInterrupt``) is the caller's: it is raised on, never
taken for the peer going away.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import resource
import select
import socket
from collections import deque
from collections.abc import Callable

FILE_LIMIT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def at_file_limit(exc: BaseException) -> bool:
    """``exc`` says the process (or the system) has no descriptor left for a new file or
    socket: what a loop skips for now, never a reason to stop."""
    return isinstance(exc, OSError) and exc.errno in FILE_LIMIT_ERRORS


def out_of_files() -> bool:
    """No descriptor can be opened now (one is tried, and closed at once)."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        return at_file_limit(exc)
    return False


class LimitEpisode:
    """Say once that something was skipped at the file limit, and once that it works again:
    a loop that meets the limit on every tick must not log on every tick."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what  # "the memory readings of the processes", ...
        self.skipped = 0  # in the episode now (0: none)

    def hit(self, why: object = "too many open files") -> None:
        """Skipped once more at the file limit (``why``: the error, for the first line)."""
        if not self.skipped:
            self.log.warning("at the file limit (%s): skipping %s until descriptors are"
                             " free again", why, self.what)
        self.skipped += 1

    def clear(self) -> None:
        """It worked: the episode, if there was one, is over."""
        if self.skipped:
            self.log.info("descriptors are free again: %s resumed after %d skip(s)",
                          self.what, self.skipped)
            self.skipped = 0


READ_SIZE = 64 << 10
"""Bytes one read of a socket takes at most.  No more: ``recv(n)`` allocates ``n`` bytes for
every read, and above glibc's mmap threshold (128 KiB) that is an ``mmap``, a page fault and
an ``mremap`` or ``munmap`` a read, about 14 µs, though most reads bring a few hundred
bytes; below it, a read of 64 KiB costs what one of 4 KiB does."""


def receive(sock: socket.socket, size: int, flags: int = 0) -> bytes | None:
    """Up to ``size`` bytes; ``b""`` when the peer is gone (EOF, or any socket error, which
    means the same to every caller here); ``None`` when nothing is there yet.  A
    ``TimeoutError`` is not the socket's (none here has a timeout): it is the caller's, and
    raised on."""
    try:
        return sock.recv(size, flags)
    except (BlockingIOError, InterruptedError):
        return None
    except TimeoutError:
        raise
    except OSError:
        return b""


def readable(fds: list[int], timeout: float | None) -> list[int]:
    """The descriptors of ``fds`` with something to read (or hung up), waiting up to
    ``timeout`` seconds (``None``: until one has).  Blocks; a signal handler's exception
    goes through."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    millis = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return [fd for fd, _events in poller.poll(millis)]


def send_final(sock: socket.socket, data: bytes) -> None:
    """Say one last short thing to a peer, then close: tried once, without waiting.

    A fresh socket's send buffer is empty, so a short message goes in whole; whatever does
    not go (a peer that filled its own buffer, a peer already gone) is dropped.
    """
    with contextlib.suppress(OSError):
        sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    sock.close()


class Outbox:
    """What one non-blocking socket still has to send, in order, at most ``limit`` bytes.

    A chunk may carry a socket to pass (SCM_RIGHTS): it rides on the chunk's first byte, and
    the outbox owns it until then (and closes it once it is sent, or with :meth:`close`).
    A partial write keeps the rest for the next :meth:`flush`, so the stream never loses
    its frame boundaries.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0  # bytes not yet sent
        self._chunks: deque[tuple[memoryview, socket.socket | None]] = deque()

    def __len__(self) -> int:
        """Chunks (messages) not wholly sent."""
        return len(self._chunks)

    @property
    def pending(self) -> bool:
        return bool(self._chunks)

    def put(self, data: bytes, passing: socket.socket | None = None) -> bool:
        """Queue ``data`` (and ``passing``); ``False``, nothing queued, past the limit."""
        if self.size + len(data) > self.limit:
            return False
        self._chunks.append((memoryview(data), passing))
        self.size += len(data)
        return True

    def flush(self, sock: socket.socket) -> bool:
        """Send what the socket takes now; ``True`` once nothing is left.

        Raises :class:`OSError` when the peer is gone (``EPIPE``, ``ECONNRESET``, ...).
        """
        while self._chunks:
            data, passing = self._chunks[0]
            try:
                if passing is not None:
                    sent = socket.send_fds(sock, [data], [passing.fileno()],
                                           socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                else:
                    sent = sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return False
            self.size -= sent
            if passing is not None and sent:
                passing.close()  # the receiver holds it now
                passing = None
            if sent < len(data):
                self._chunks[0] = (data[sent:], passing)
                return False
            self._chunks.popleft()
        return True

    def close(self) -> None:
        """Drop what was not sent; sockets waiting to be passed are closed."""
        for _data, passing in self._chunks:
            if passing is not None:
                passing.close()
        self._chunks.clear()
        self.size = 0


class Acceptor:
    """``accept`` on a non-blocking listening socket that survives the file limit.

    At ``EMFILE`` (or ``ENFILE``) the listener stays readable and a plain loop would spin:
    one spare descriptor is kept open, closed to take the waiting peer, which ``on_full``
    is given to turn away (it must close it), then opened again.  :attr:`full` says the last
    accept met the limit.
    """

    def __init__(self, listener: socket.socket, on_full: Callable[[socket.socket], None]) -> None:
        self.listener = listener
        self.on_full = on_full
        self.full = False
        self._spare: int | None = None
        self._reserve()

    def accept(self) -> socket.socket | None:
        """A new peer, non-blocking; ``None`` when none waits (or one was turned away)."""
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno not in FILE_LIMIT_ERRORS:
                raise
            self.full = True
            self._turn_away()
            return None
        self.full = False
        sock.setblocking(False)
        return sock

    def _turn_away(self) -> None:
        if self._spare is None:
            return  # the caller pauses the listener (see ``spare_lost``)
        os.close(self._spare)
        self._spare = None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            sock = None
        if sock is not None:
            self.on_full(sock)
        self._reserve()

    @property
    def spare_lost(self) -> bool:
        """No spare descriptor: at the limit, the listener must be paused for a while."""
        return self._spare is None

    def _reserve(self) -> None:
        try:
            self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._spare = None

    def close(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None


def file_limit() -> int:
    """The process's soft limit on open descriptors."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_file_limit(wanted: int) -> int:
    """Raise the soft limit on open descriptors towards ``wanted`` (never above the hard
    limit, never lowering it); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
