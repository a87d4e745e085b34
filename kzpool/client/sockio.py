"""A lease's socket I/O: waits with ``poll`` and reads that keep the caller's exceptions.

``poll``, never ``select``: a process may hold leases on descriptors above 1,024.  A read
tells data, nothing yet (``None``) and the worker gone (``b""``).  An exception that the
caller's own code raises while a lease waits (a ``SIGALRM`` handler's ``TimeoutError``, a
``KeyboardInterrupt``) is the caller's: it is raised on, never taken for the worker going
away.  Pure plumbing: nothing here knows what a frame is.
"""

from __future__ import annotations

import math
import select
import socket


def readable(fds: list[int], timeout: float | None) -> list[int]:
    """The descriptors of ``fds`` with something to read (or hung up), waiting up to
    ``timeout`` seconds (``None``: until one has).  Blocks; a signal handler's exception
    goes through."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    millis = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return [fd for fd, _events in poller.poll(millis)]


def receive(sock: socket.socket, size: int, flags: int = 0) -> bytes | None:
    """Up to ``size`` bytes; ``b""`` when the peer is gone (EOF, or a socket error);
    ``None`` when nothing is there yet.  A ``TimeoutError`` is not the socket's (lease
    sockets have no timeout): it is the caller's, and raised on."""
    try:
        return sock.recv(size, flags)
    except (BlockingIOError, InterruptedError):
        return None
    except TimeoutError:
        raise
    except OSError:
        return b""
