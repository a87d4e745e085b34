"""How the client reaches the pool: the one seam through which it opens sockets.

A :class:`Backend` connects to a Unix socket path: the pool's lease socket or a worker's.
:class:`UnixBackend` is the real one; a test gives a lease a backend that returns one end of
a socket pair, with a scripted worker at the other end.  :func:`call` is one request to the
pool and its answer (``ping``, ``status``, ``brokers``); :func:`read_answer` reads that
answer, for the asyncio client too.  A lease reaches sockets through a
:class:`Pool` (the client): the pool's, or the worker's that served the same kind of lease
last (its *route*, by :func:`route_key`).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import Any, Protocol

from ..common import messages, wire
from ..common.errors import (
    BrokerURIError,
    LeaseRequestError,
    PoolAccessDenied,
    PoolNotRunning,
    ProtocolError,
    refusal_error,
)
from ..common.messages import Message
from ..common.uri import BrokerURI
from .dispatch import Dispatcher

RouteKey = tuple[str, str | None]  # (kind, zone or broker without credentials)


class Backend(Protocol):
    def connect(self, path: str) -> socket.socket:
        """A connected stream socket to ``path``; :class:`OSError` if nothing answers."""
        ...


class UnixBackend:
    def connect(self, path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return sock


class Pool(Protocol):
    """What a lease needs of its client: sockets, the route cache, the dispatcher."""

    routes: dict[RouteKey, str]
    dispatcher: Dispatcher

    def open_pool(self) -> socket.socket: ...

    def open_route(self, path: str) -> socket.socket | None: ...


def route_key(kind: str, zone: str | None, broker: str | None) -> RouteKey:
    """What the route cache knows a lease by: its kind, and its zone or sticky broker."""
    if not broker:
        return kind, zone
    try:
        return kind, BrokerURI.parse(broker).short
    except BrokerURIError as exc:
        raise LeaseRequestError(str(exc)) from exc


def call(backend: Backend, path: str, request: Message, timeout: float = 5.0) -> dict[str, Any]:
    """One request to the pool at ``path`` and its answer, a document.

    :class:`PoolNotRunning` if nothing answers; the error a refusal names if refused;
    ``TimeoutError`` or ``ConnectionError`` if the pool does not answer in time.
    """
    try:
        sock = backend.connect(path)
    except OSError as exc:
        raise not_running(path, exc) from exc
    with sock:
        sock.settimeout(timeout)
        # the pool may have answered (a refusal) and hung up before reading: read on
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(messages.encode(request))
        reader = wire.FrameReader()
        while (answer := read_answer(reader, sock.recv(65536))) is None:
            pass
    return answer


def read_answer(reader: wire.FrameReader, data: bytes) -> dict[str, Any] | None:
    """The pool's answer to one request, once ``data`` completes its frame (``None``: not
    yet).  Raises the error a refusal names, :class:`ProtocolError` for a frame that is no
    answer, ``ConnectionError`` if the pool hung up (``data`` empty).  Both clients' own."""
    if not data:
        raise ConnectionError("the pool closed the connection")
    for kind, _flags, payload in reader.feed(data):
        if kind != wire.Kind.JSON:
            raise ProtocolError(f"unexpected frame kind {kind}")
        answer = wire.read_document(payload)
        if answer.get("op") == messages.Refused.OP:
            refused = messages.from_wire(answer, messages.accepts(messages.Refused))
            assert isinstance(refused, messages.Refused)
            raise refusal_error(refused.code, refused.error)
        return answer
    return None


def not_running(path: str, exc: OSError) -> PoolNotRunning:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PoolAccessDenied(f"access to the pool at {path} is refused (permission denied)",
                                socket=path)
    reason = "no such socket" if exc.errno == errno.ENOENT else (exc.strerror or str(exc)).lower()
    return PoolNotRunning(f"no pool is running at {path} ({reason})", socket=path)
