"""The lease socket: where clients and ``kzpool status`` reach the master.

The master owns the listening socket and serves each request from its main loop; a request
is one frame (see :mod:`kzpool.protocol`) and gets one reply.  A peer that sends a bad frame
is dropped; nobody else notices.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from ..common import wire
from ..common.errors import KzpoolError, PoolAccessDenied, PoolNotRunning, ProtocolError, from_reply

log = logging.getLogger("kzpool.control")

Handler = Callable[[dict[str, Any]], dict[str, Any]]
REPLY_TIMEOUT = 2.0
MAX_PATH = 107  # sun_path is 108 bytes with its NUL


def bind(path: str) -> socket.socket:
    """Listen on ``path`` (directory 0750, socket 0660); refuse if a pool already answers."""
    if len(os.fsencode(path)) > MAX_PATH:
        raise KzpoolError(f"socket path {path} is {len(os.fsencode(path))} bytes long; AF_UNIX"
                          f" allows {MAX_PATH}", socket=path)
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    if os.path.exists(path):
        if _answers(path):
            raise KzpoolError(f"another pool is already running at {path}", socket=path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o660)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def bind_worker(path: str) -> socket.socket:
    """A worker's own lease socket (0660), made by the master before the fork."""
    if len(os.fsencode(path)) > MAX_PATH:
        raise KzpoolError(f"worker socket path {path} is over {MAX_PATH} bytes", socket=path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def refuse(sock: socket.socket, code: str, text: str) -> None:
    """Tell a peer why it is turned away, then close (never blocks for long)."""
    with contextlib.suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(wire.encode({"ok": False, "code": code, "error": text}))
    sock.close()


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class Peer:
    """One accepted connection, read from the master's loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = wire.FrameReader(max_frame=1 << 20)
        sock.settimeout(REPLY_TIMEOUT)

    def read(self) -> list[dict[str, Any]] | None:
        """The requests that arrived; ``None``: the peer is gone or broke the protocol."""
        try:
            data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            if not data:
                return None
            return list(self.reader.messages(data))
        except (BlockingIOError, InterruptedError):
            return []
        except ProtocolError as exc:
            log.warning("dropping a client: %s", exc)
            self.reply({"ok": False, "code": exc.code, "error": str(exc)})
            return None
        except OSError:
            return None

    def reply(self, obj: dict[str, Any]) -> bool:
        try:
            self.sock.sendall(wire.encode(obj))
            return True
        except OSError:
            return False

    def answer(self, handler: Handler, request: dict[str, Any]) -> bool:
        try:
            reply = {"ok": True, **handler(request)}
        except KzpoolError as exc:
            reply = {"ok": False, "code": exc.code, "error": str(exc)}
        return self.reply(reply)


def call(path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request to the pool at ``path``; :class:`PoolNotRunning` if nothing answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise not_running(path, exc) from exc
        reply = wire.request(sock, request, timeout)
    finally:
        sock.close()
    if not reply.get("ok"):
        raise from_reply(reply)
    return reply


def not_running(path: str, exc: OSError) -> PoolNotRunning:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PoolAccessDenied(f"access to the pool at {path} is refused (permission denied)",
                                socket=path)
    reason = "no such socket" if exc.errno == errno.ENOENT else (exc.strerror or str(exc)).lower()
    return PoolNotRunning(f"no pool is running at {path} ({reason})", socket=path)
