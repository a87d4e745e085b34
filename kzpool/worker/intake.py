"""How a client's socket reaches a worker directly: the worker's own lease socket.

The client connects to the worker's socket, which it learned from an earlier lease
(``route``), and asks for a *new* lease there.  The worker serves it if it still is what the
client wants (connected; for a float lease, the primary of the zone asked for); else it
answers ``redirect`` and the client asks the master.  A resume (a request naming a lease id)
is always redirected: the master checks whose lease it is.  The other way in, a socket the
master passes over the link (``adopt``), does not come through here.

Runs in the worker's loop only and never blocks on a client.  Whatever a client sends, only
that client is dropped: a request is one JSON frame of at most
:data:`~kzpool.common.wire.MAX_REQUEST` bytes that must arrive whole within
:data:`REQUEST_TIMEOUT`; a client past a limit (its leases here, ``max_peers``, the file
limit) is told which one, naming the ``[pool]`` setting.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from typing import Protocol

from pika.adapters.select_connection import IOLoop

from ..common import messages, wire
from ..common.access import Access, peer
from ..common.errors import KzpoolError, LimitExceeded, PoolAccessDenied, ProtocolError
from ..common.messages import LeaseRequest, Message
from ..common.options import LeaseOptions
from ..common.sockets import Acceptor, LimitEpisode, file_limit, receive, send_final

log = logging.getLogger("kzpool.intake")

REQUEST_TIMEOUT = 5.0  # seconds a client has to send its whole request
SWEEP_INTERVAL = 1.0
PAUSE = 0.5  # seconds the listener rests when even the spare descriptor is gone


class IntakeHost(Protocol):
    """What the intake needs of its worker."""

    ioloop: IOLoop

    def serves(self, request: LeaseRequest) -> bool: ...

    def admit(self, lease: str, sock: socket.socket, options: LeaseOptions,
              ids: tuple[int, int] | None = None) -> None:
        """``ids``: the client's (pid, uid), when they were read already."""

    def refusal(self, pid: int, uid: int) -> KzpoolError | None:
        """Why this client may have no more leases here (a limit), or ``None``."""
        ...

    def room(self) -> KzpoolError | None:
        """Why the worker takes no more client connections now, or ``None``."""
        ...


class Pending:
    """A client that connected and has not sent its whole request yet."""

    def __init__(self, sock: socket.socket, pid: int, uid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.reader = wire.FrameReader(wire.MAX_REQUEST, frozenset({wire.Kind.JSON}))
        self.deadline = time.monotonic() + REQUEST_TIMEOUT
        self.watched = False  # its socket is on the loop (its request was not all there)


class Intake:
    def __init__(self, host: IntakeHost, listener: socket.socket | None, access: Access) -> None:
        self.host = host
        self.listener = listener
        self.route = listener.getsockname() if listener is not None else None
        self.access = access
        self.pending: dict[int, Pending] = {}
        self.sweeping = False
        self.full = LimitEpisode(log, "new clients")
        self.acceptor: Acceptor | None = None
        if listener is not None:
            listener.setblocking(False)
            self.acceptor = Acceptor(listener, self._at_file_limit)
            host.ioloop.add_handler(listener.fileno(), self._on_accept, IOLoop.READ)

    def _on_accept(self, _fd: int, _events: int) -> None:
        assert self.acceptor is not None
        while True:
            sock = self.acceptor.accept()
            if sock is None:
                break
            self._admit(sock)
        if self.acceptor.full and self.acceptor.spare_lost and self.listener is not None:
            log.warning("at the file limit without a spare descriptor: pausing the socket")
            self.host.ioloop.remove_handler(self.listener.fileno())
            self.host.ioloop.call_later(PAUSE, self._resume)

    def _resume(self) -> None:
        if self.listener is not None and self.listener.fileno() >= 0:
            self.host.ioloop.add_handler(self.listener.fileno(), self._on_accept, IOLoop.READ)

    def _at_file_limit(self, sock: socket.socket) -> None:
        error = LimitExceeded(f"the worker is at its limit of {file_limit()} open files; try"
                              " again later", "max_peers")
        self.full.hit(error)  # said once while the limit lasts
        answer(sock, messages.Refused.of(error))

    def _admit(self, sock: socket.socket) -> None:
        try:
            pid, uid, gid = peer(sock)
        except OSError:
            sock.close()
            return
        try:
            refusal = self.access.refusal_for(pid, uid, gid)
        except OSError:  # its groups cannot be read: the file limit
            self._at_file_limit(sock)
            return
        if refusal is not None:
            log.warning("%s", refusal)
            answer(sock, messages.Refused.of(PoolAccessDenied(refusal)))
            return
        self.full.clear()
        full = self.host.room()
        if full is not None:
            log.warning("turning a client away (pid %d): %s", pid, full)
            answer(sock, messages.Refused.of(full))
            return
        fd = sock.fileno()
        client = self.pending[fd] = Pending(sock, pid, uid)
        self._on_request(fd, 0)  # the request is usually there already
        if self.pending.get(fd) is not client:
            return
        client.watched = True
        self.host.ioloop.add_handler(fd, self._on_request, IOLoop.READ)
        if not self.sweeping:
            self.sweeping = True
            self.host.ioloop.call_later(SWEEP_INTERVAL, self._sweep)

    def _on_request(self, fd: int, _events: int) -> None:
        client = self.pending.get(fd)
        if client is None:
            return
        data = receive(client.sock, 65536)
        if data is None:
            return
        try:
            frames = list(client.reader.feed(data)) if data else None
        except ProtocolError as exc:
            self.drop(fd, exc)
            return
        if frames == []:
            return
        self._forget(fd)
        try:
            request = first_request(frames)
        except KzpoolError as exc:  # malformed, or options that do not check
            log.warning("dropping a client (pid %d): %s", client.pid, exc)
            answer(client.sock, messages.Refused.of(exc))
            return
        self._decide(client, request)

    def _decide(self, client: Pending, request: LeaseRequest) -> None:
        if not self.host.serves(request):
            answer(client.sock, messages.Redirect())
            return
        limit = self.host.refusal(client.pid, client.uid)
        if limit is not None:
            log.warning("refusing a lease to pid %d: %s", client.pid, limit)
            answer(client.sock, messages.Refused.of(limit))
            return
        lease = uuid.uuid4().hex[:12]
        log.debug("lease %s asked for here (pid %d)", lease, client.pid)
        self.host.admit(lease, client.sock, request.options, (client.pid, client.uid))

    def drop(self, fd: int, exc: Exception) -> bool:
        """Drop a client that has not asked yet, telling it why; ``False``: not one of ours."""
        client = self.pending.get(fd)
        if client is None:
            return False
        log.warning("dropping a client (pid %d): %s", client.pid, exc)
        self._forget(fd)
        answer(client.sock, messages.Refused.of(
            exc if isinstance(exc, KzpoolError) else ProtocolError(str(exc))))
        return True

    def _forget(self, fd: int) -> None:
        if self.pending.pop(fd).watched:
            self.host.ioloop.remove_handler(fd)

    def _sweep(self) -> None:
        now = time.monotonic()
        for fd, client in list(self.pending.items()):
            if now >= client.deadline:
                self.drop(fd, ProtocolError(f"no whole request within {REQUEST_TIMEOUT:g} s"))
        self.sweeping = bool(self.pending)
        if self.sweeping:
            self.host.ioloop.call_later(SWEEP_INTERVAL, self._sweep)


def first_request(frames: list[wire.Frame] | None) -> LeaseRequest:
    """The lease request a new client sent; anything else is a protocol error."""
    if not frames:
        raise ProtocolError("the client went away before asking")
    kind, _flags, payload = frames[0]
    if kind != wire.Kind.JSON:
        raise ProtocolError(f"expected a lease request, got a frame of kind {kind}")
    request = messages.decode(payload, messages.TO_WORKER_FROM_CLIENT)
    assert isinstance(request, LeaseRequest)
    return request


def answer(sock: socket.socket, message: Message) -> None:
    """Say one thing to a client that gets no channel here, and close; never waits (see
    :func:`~kzpool.common.sockets.send_final`)."""
    send_final(sock, messages.encode(message))
