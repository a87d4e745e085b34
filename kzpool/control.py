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

from . import protocol
from .errors import KzpoolError, PoolNotRunning, ProtocolError

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
        self.reader = protocol.FrameReader(max_frame=1 << 20)
        sock.settimeout(REPLY_TIMEOUT)

    def serve(self, handler: Handler) -> bool:
        """Read what is there and answer each request; ``False``: drop this peer."""
        try:
            data = self.sock.recv(65536)
            if not data:
                return False
            for request in self.reader.messages(data):
                self.sock.sendall(protocol.encode(_answer(handler, request)))
        except ProtocolError as exc:
            log.warning("dropping a client: %s", exc)
            with contextlib.suppress(OSError):
                self.sock.sendall(protocol.encode({"ok": False, "code": exc.code,
                                                   "error": str(exc)}))
            return False
        except OSError:
            return False
        return True


def _answer(handler: Handler, request: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"ok": True, **handler(request)}
    except KzpoolError as exc:
        return {"ok": False, "code": exc.code, "error": str(exc)}


def call(path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request to the pool at ``path``; :class:`PoolNotRunning` if nothing answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise PoolNotRunning(f"no pool is running at {path} (no such socket)",
                                 socket=path) from None
        except OSError as exc:
            reason = "permission denied" if exc.errno == errno.EACCES else (
                exc.strerror or str(exc)).lower()
            raise PoolNotRunning(f"no pool is running at {path} ({reason})",
                                 socket=path) from exc
        reply = protocol.request(sock, request, timeout)
    finally:
        sock.close()
    if not reply.get("ok"):
        raise KzpoolError(str(reply.get("error")), code=reply.get("code"))
    return reply
