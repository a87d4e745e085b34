"""How a client's socket reaches a worker and gets a channel.

Two ways in:

* **direct** (the fast path): the client connects to the worker's own socket, which it
  learned from the master (``route``), and asks for a lease there.  The worker serves it if
  it still is what the client wants: connected, and for a float lease the primary of the
  zone asked for; else it answers ``redirect`` and the client asks the master again.
* **adopted**: the master passes a socket it accepted (SCM_RIGHTS) after a reservation, for
  a request only the master can serve (waiting for a broker, a broker not yet connected).

Either way the socket is bound to a prechannel (or to the next channel that opens), the
client hears ``leased`` before anything else happens, and the master hears ``assigned``.
Runs in the worker's loop only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any

from ..common import wire
from ..common.access import Access, peer
from ..common.errors import ProtocolError
from ..common.states import ConnState
from .session import End, Session

if TYPE_CHECKING:
    from .worker import ConnectionWorker

log = logging.getLogger("kzpool.intake")

NOT_CONNECTED = {"class": "ConnectionClosed", "code": 0, "text": "broker not connected"}


class Intake:
    def __init__(self, worker: ConnectionWorker, listener: socket.socket | None) -> None:
        self.worker = worker
        self.listener = listener
        self.route = listener.getsockname() if listener is not None else None
        settings = worker.spec.settings
        self.access = Access(settings.allow_users, settings.allow_groups)
        self.pending: dict[int, tuple[socket.socket, wire.FrameReader]] = {}
        self.waiting: list[tuple[str, socket.socket, dict[str, Any]]] = []
        if listener is not None:
            listener.setblocking(False)
            worker.ioloop.add_handler(listener.fileno(), self._on_accept, worker.ioloop.READ)

    # ----- direct requests --------------------------------------------------------------------

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
                _answer(sock, {"ok": False, "code": "access", "error": refusal})
                continue
            sock.setblocking(False)
            self.pending[sock.fileno()] = (sock, wire.FrameReader(1 << 16))
            self.worker.ioloop.add_handler(sock.fileno(), self._on_request, self.worker.ioloop.READ)
            self._on_request(sock.fileno(), 0)  # the request is usually there already

    def _on_request(self, fd: int, _events: int) -> None:
        sock, reader = self.pending[fd]
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        try:
            frames = list(reader.feed(data)) if data else None
        except ProtocolError as exc:
            log.warning("dropping a client: %s", exc)
            frames = None
        if frames == []:
            return
        self.worker.ioloop.remove_handler(fd)
        del self.pending[fd]
        try:
            request = _request(frames)
        except ProtocolError as exc:
            log.warning("dropping a client: %s", exc)
            _answer(sock, {"ok": False, "code": exc.code, "error": str(exc)})
            return
        if self._serves(request):
            self.admit(str(request.get("lease") or uuid.uuid4().hex[:12]), sock, request)
        else:
            _answer(sock, {"op": "redirect"})

    def _serves(self, request: dict[str, Any]) -> bool:
        worker = self.worker
        broker = worker.spec.broker
        if request.get("op") != "lease" or worker.state is not ConnState.CONNECTED:
            return False
        if worker.full and not worker.prechannels:
            return False  # the master knows which other connection has room
        if request.get("kind") == "float":
            zone = request.get("zone")
            in_zone = broker.local if zone is None else zone == broker.zone
            return worker.primary and in_zone and not broker.hidden
        return request.get("kind") == "sticky" and request.get("broker_id") == broker.uri.short

    # ----- binding ----------------------------------------------------------------------------

    def admit(self, lease: str, sock: socket.socket, request: dict[str, Any]) -> None:
        """Bind ``sock`` to a channel for ``lease`` (now, or when the next one opens)."""
        worker = self.worker
        if worker.state is not ConnState.CONNECTED or worker.connection is None or (
                worker.full and not worker.prechannels):
            _answer(sock, {"op": "lost", "reason": NOT_CONNECTED})
            worker.lease_event({"event": End.LOST.value, "lease": lease})
            return
        if worker.prechannels:
            self.bind(lease, sock, request, worker.prechannels.pop(0))
        else:
            self.waiting.append((lease, sock, request))
        worker.fill_prechannels()

    def bind(self, lease: str, sock: socket.socket, request: dict[str, Any],
             channel: Any) -> None:
        worker = self.worker
        session = Session(worker, sock, lease, channel)
        worker.sessions[lease] = session
        worker.bound[channel.channel_number] = session
        session.event({"op": "leased", "lease": lease, "broker": worker.spec.broker.uri.masked,
                       "zone": worker.spec.broker.zone, "channel": channel.channel_number,
                       "worker": os.getpid(), "blocked": worker.blocked, "route": self.route})
        session.flush()  # the client waits for this: before anything else
        worker.lease_event({"event": "assigned", "lease": lease,
                     "channel": channel.channel_number, "kind": request.get("kind"),
                     "zone": request.get("zone") or worker.spec.broker.zone,
                     "client_pid": peer(sock)[0], "federates": request.get("federates")})
        worker.report_soon()

    def channel_opened(self, channel: Any) -> bool:
        """A channel opened: give it to a waiting client; ``False`` if none waits."""
        if not self.waiting:
            return False
        self.bind(*self.waiting.pop(0), channel)
        return True

    def connection_lost(self) -> None:
        """Nothing can be bound any more: tell whoever waits or is half-way in."""
        for lease, sock, _request in self.waiting:
            _answer(sock, {"op": "lost", "reason": NOT_CONNECTED})
            self.worker.lease_event({"event": End.LOST.value, "lease": lease})
        self.waiting.clear()


def _request(frames: list[wire.Frame] | None) -> dict[str, Any]:
    """The lease request a new client sent; anything else is a protocol error."""
    if not frames:
        raise ProtocolError("the client went away before asking")
    kind, _flags, payload = frames[0]
    if kind != wire.Kind.JSON:
        raise ProtocolError(f"expected a lease request, got a frame of kind {kind}")
    request = wire.decode_json(payload)
    for key in ("op", "kind", "zone", "lease", "federates"):
        if not isinstance(request.get(key), str | None):
            raise ProtocolError(f"malformed lease request: {key} is not a string")
    if len(request.get("federates") or "") > wire.MAX_NAME:
        raise ProtocolError(f"malformed lease request: federates is over {wire.MAX_NAME}"
                            " characters")
    return request


def _answer(sock: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        sock.setblocking(True)
        sock.settimeout(1.0)
        sock.sendall(wire.encode(message))
    sock.close()
