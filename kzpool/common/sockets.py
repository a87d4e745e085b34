"""Socket plumbing every process shares: one read that tells data, nothing yet, and EOF."""

from __future__ import annotations

import socket


def receive(sock: socket.socket, size: int, flags: int = 0) -> bytes | None:
    """Up to ``size`` bytes; ``b""`` when the peer is gone (EOF, or any socket error, which
    means the same to every caller here); ``None`` when nothing is there yet."""
    try:
        return sock.recv(size, flags)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
