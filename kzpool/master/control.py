"""The lease socket: where clients and ``kzpool status`` reach the master.

The master owns the listening socket and serves each peer from its main loop.  A peer sends
one message (:mod:`kzpool.common.messages`): a :class:`~kzpool.common.messages.LeaseRequest`
hands its socket over to lease placement; ``ping``, ``status`` and ``brokers`` get a
document back.  A peer that sends a bad frame is told why and dropped; nobody else notices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
from collections.abc import Callable
from typing import Any

from ..common import messages, wire
from ..common.access import Access
from ..common.errors import KzpoolError, ProtocolError
from ..common.messages import LeaseRequest, Message
from ..common.sockets import receive

log = logging.getLogger("kzpool.control")

MAX_PATH = 107  # sun_path is 108 bytes with its NUL
MAX_REQUEST = 1 << 20
REPLY_TIMEOUT = 2.0

Answer = Callable[[Message], dict[str, Any]]  # ping, status, brokers → a document
OnLease = Callable[[socket.socket, LeaseRequest], None]


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
    sock = _listen(path)
    sock.setblocking(False)
    return sock


def bind_worker(path: str) -> socket.socket:
    """A worker's own lease socket (0660), made by the master before the fork."""
    if len(os.fsencode(path)) > MAX_PATH:
        raise KzpoolError(f"worker socket path {path} is over {MAX_PATH} bytes", socket=path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return _listen(path)


def _listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def refuse(sock: socket.socket, code: str, text: str) -> None:
    """Tell a peer why it is turned away, then close (never blocks for long)."""
    with contextlib.suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(messages.encode(messages.Refused(code, text)))
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
        self.reader = wire.FrameReader(max_frame=MAX_REQUEST)
        sock.settimeout(REPLY_TIMEOUT)

    def read(self) -> list[Message] | None:
        """The requests that arrived; ``None``: the peer is gone or broke the protocol."""
        data = receive(self.sock, 65536, socket.MSG_DONTWAIT)
        if data is None:
            return []
        if not data:
            return None
        try:
            return [_request(kind, payload) for kind, _flags, payload in self.reader.feed(data)]
        except ProtocolError as exc:
            log.warning("dropping a client: %s", exc)
            self.send(messages.encode(messages.Refused(exc.code, str(exc))))
            return None

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def answer(self, handler: Answer, request: Message) -> bool:
        try:
            reply = wire.document({"ok": True, **handler(request)})
        except KzpoolError as exc:
            reply = messages.encode(messages.Refused(exc.code, str(exc)))
        return self.send(reply)


def _request(kind: int, payload: bytes) -> Message:
    if kind != wire.Kind.JSON:
        raise ProtocolError(f"unexpected frame kind {kind}")
    return messages.decode(payload, messages.TO_MASTER_FROM_CLIENT)


class LeaseSocket:
    """The listening socket and its peers, in the master's selector."""

    def __init__(self, path: str, selector: selectors.BaseSelector, access: Access,
                 answer: Answer, on_lease: OnLease) -> None:
        self.path = path
        self.selector = selector
        self.access = access
        self.answer = answer
        self.on_lease = on_lease
        self.accepting_leases = True
        self.listener = bind(path)
        self.peers: dict[int, Peer] = {}
        selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def _accept(self, _fd: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        refusal = self.access.refusal(sock)
        if refusal is not None:
            log.warning("%s", refusal)
            refuse(sock, "access", refusal)
            return
        self.peers[sock.fileno()] = Peer(sock)
        self.selector.register(sock, selectors.EVENT_READ, self._serve)
        self._serve(sock.fileno())  # a client sends its request right after connecting

    def _serve(self, fd: int) -> None:
        peer = self.peers[fd]
        requests = peer.read()
        if requests is None:
            self._drop(fd)
            return
        for request in requests:
            if isinstance(request, LeaseRequest) and self.accepting_leases:
                self._drop(fd, close=False)
                self.on_lease(peer.sock, request)
                return
            if not peer.answer(self.answer, request):
                self._drop(fd)
                return

    def _drop(self, fd: int, close: bool = True) -> None:
        peer = self.peers.pop(fd)
        self.selector.unregister(peer.sock)
        if close:
            peer.sock.close()

    def close(self) -> None:
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        for peer in self.peers.values():
            peer.sock.close()
