"""How a client's socket reaches a worker directly: the worker's own lease socket.

The client connects to the worker's socket, which it learned from an earlier lease
(``route``), and asks for a lease there.  The worker serves it if it still is what the
client wants (connected; for a float lease, the primary of the zone asked for); else it
answers ``redirect`` and the client asks the master.  The other way in, a socket the master
passes over the link (``adopt``), does not come through here.

Runs in the worker's loop only; whatever a client sends, only that client is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import uuid
from typing import Protocol

from pika.adapters.select_connection import IOLoop

from ..common import messages, wire
from ..common.access import Access
from ..common.errors import ProtocolError
from ..common.messages import LeaseRequest, Message
from ..common.sockets import receive

log = logging.getLogger("kzpool.intake")

MAX_REQUEST = 1 << 16


class IntakeHost(Protocol):
    """What the intake needs of its worker."""

    ioloop: IOLoop

    def serves(self, request: LeaseRequest) -> bool: ...

    def admit(self, lease: str, sock: socket.socket, request: LeaseRequest) -> None: ...


class Intake:
    def __init__(self, host: IntakeHost, listener: socket.socket | None, access: Access) -> None:
        self.host = host
        self.listener = listener
        self.route = listener.getsockname() if listener is not None else None
        self.access = access
        self.pending: dict[int, tuple[socket.socket, wire.FrameReader]] = {}
        if listener is not None:
            listener.setblocking(False)
            host.ioloop.add_handler(listener.fileno(), self._on_accept, IOLoop.READ)

    def _on_accept(self, _fd: int, _events: int) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            refusal = self.access.refusal(sock)
            if refusal is not None:
                log.warning("%s", refusal)
                answer(sock, messages.Refused("access", refusal))
                continue
            sock.setblocking(False)
            self.pending[sock.fileno()] = (sock, wire.FrameReader(MAX_REQUEST))
            self.host.ioloop.add_handler(sock.fileno(), self._on_request, IOLoop.READ)
            self._on_request(sock.fileno(), 0)  # the request is usually there already

    def _on_request(self, fd: int, _events: int) -> None:
        sock, reader = self.pending[fd]
        data = receive(sock, 65536)
        if data is None:
            return
        try:
            frames = list(reader.feed(data)) if data else None
        except ProtocolError as exc:
            log.warning("dropping a client: %s", exc)
            frames = None
        if frames == []:
            return
        self.host.ioloop.remove_handler(fd)
        del self.pending[fd]
        try:
            request = first_request(frames)
        except ProtocolError as exc:
            log.warning("dropping a client: %s", exc)
            answer(sock, messages.Refused(exc.code, str(exc)))
            return
        if self.host.serves(request):
            self.host.admit(request.lease or uuid.uuid4().hex[:12], sock, request)
        else:
            answer(sock, messages.Redirect())


def first_request(frames: list[wire.Frame] | None) -> LeaseRequest:
    """The lease request a new client sent; anything else is a protocol error."""
    if not frames:
        raise ProtocolError("the client went away before asking")
    kind, _flags, payload = frames[0]
    if kind != wire.Kind.JSON:
        raise ProtocolError(f"expected a lease request, got a frame of kind {kind}")
    request = messages.decode(payload, messages.TO_WORKER_FROM_CLIENT)
    assert isinstance(request, LeaseRequest)
    if len(request.federates or "") > wire.MAX_NAME:
        raise ProtocolError(f"malformed lease request: federates is over {wire.MAX_NAME}"
                            " characters")
    return request


def answer(sock: socket.socket, message: Message) -> None:
    """Say one thing to a client that gets no channel here, and close."""
    with contextlib.suppress(OSError):
        sock.setblocking(True)
        sock.settimeout(1.0)
        sock.sendall(messages.encode(message))
    sock.close()
