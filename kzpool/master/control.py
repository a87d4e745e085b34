"""The lease socket: where clients and ``kzpool status`` reach the master.

The master owns the listening socket and serves each peer from its main loop.  A peer sends
one message (:mod:`kzpool.common.messages`): a :class:`~kzpool.common.messages.LeaseRequest`
hands its socket over to lease placement; ``ping``, ``status`` and ``brokers`` get a
document back.

Nothing here blocks on a peer: every peer socket is non-blocking, with its own frame reader
and :class:`~kzpool.common.sockets.Outbox`, and an answer the peer does not read yet waits
there.  What one peer may do is bounded, and past a bound only that peer is turned away,
told why (a :class:`~kzpool.common.messages.Refused` naming the ``[pool]`` setting):

* a request is one JSON frame of at most :data:`~kzpool.common.wire.MAX_REQUEST` bytes, and
  must arrive whole within :data:`REQUEST_TIMEOUT` of the connection (or of the last
  answer); an answer must be read within as long;
* ``max_pending_per_peer`` answers unread at most, :data:`OUT_LIMIT` bytes of them;
* ``max_peers`` connections at once, counting the lease requests that wait for a broker;
  at the process's file limit new peers are turned away too, and the others go on.

An exception raised while serving one peer drops that peer, logged with its pid; the loop
goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
from collections.abc import Callable
from typing import Any, Protocol

from ..common import messages, wire
from ..common.access import Access, peer
from ..common.errors import (
    BrokerUnavailable,
    KzpoolError,
    LimitExceeded,
    PoolAccessDenied,
    ProtocolError,
)
from ..common.messages import LeaseRequest, Message
from ..common.sockets import (
    READ_SIZE,
    Acceptor,
    Outbox,
    file_limit,
    raise_file_limit,
    receive,
    send_final,
)

log = logging.getLogger("kzpool.control")

MAX_PATH = 107  # sun_path is 108 bytes with its NUL
REQUEST_TIMEOUT = 5.0  # seconds a peer has to send a whole request, or to read an answer
OUT_LIMIT = 64 << 20  # bytes of answers one peer may leave unread
ACCEPT_BATCH = 64  # peers accepted per wake-up of the loop
FILE_HEADROOM = 64  # descriptors the master needs besides its clients and worker links
PAUSE = 0.5  # seconds the listener rests when even the spare descriptor is gone
LOG_EVERY = 10.0  # seconds between two log lines about peers turned away for one reason

Answer = Callable[[Message], dict[str, Any]]  # ping, status, brokers → a document
OnLease = Callable[[socket.socket, LeaseRequest], None]


class Limits(Protocol):
    """The ``[pool]`` settings the lease socket enforces (a reload may change them)."""

    @property
    def max_peers(self) -> int: ...

    @property
    def max_pending_per_peer(self) -> int: ...


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


def fit_file_limit(max_peers: int, workers: int) -> None:
    """Raise the soft file limit to fit ``max_peers`` client connections beside the
    master's own descriptors (two per worker); say so if the hard limit is too low for it.
    The workers, forked after, inherit it."""
    wanted = max_peers + FILE_HEADROOM + 2 * workers
    limit = raise_file_limit(wanted)
    if limit < wanted:
        log.warning("the file limit is %d, below the %d that [pool] max_peers = %d needs: new"
                    " clients are turned away at the limit (raise LimitNOFILE)", limit, wanted,
                    max_peers)


def refuse(sock: socket.socket, error: KzpoolError) -> None:
    """Tell a peer why it is turned away (``error``'s code, text and setting), then close;
    never waits (see :func:`~kzpool.common.sockets.send_final`)."""
    send_final(sock, messages.encode(messages.Refused.of(error)))


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def parse(reader: wire.FrameReader, data: bytes) -> list[Message]:
    """The requests in ``data`` (and what came before it); :class:`ProtocolError` if any
    frame or message is bad, a lease request's fields included."""
    requests = []
    for kind, _flags, payload in reader.feed(data):
        if kind != wire.Kind.JSON:
            raise ProtocolError(f"unexpected frame kind {kind}")
        requests.append(messages.decode(payload, messages.TO_MASTER_FROM_CLIENT))
    return requests


class Peer:
    """One accepted connection: its credentials, its reader, its unsent answers."""

    def __init__(self, sock: socket.socket, pid: int, deadline: float) -> None:
        self.sock = sock
        self.pid = pid
        self.reader = wire.FrameReader(wire.MAX_REQUEST, frozenset({wire.Kind.JSON}))
        self.outbox = Outbox(OUT_LIMIT)
        self.deadline = deadline  # monotonic: drop it if no progress by then
        self.events = selectors.EVENT_READ


class Throttle:
    """Log one line per reason at most every :data:`LOG_EVERY` seconds, with how many were
    left unsaid: a flood of bad peers must not flood the log too."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.last: dict[str, tuple[float, int]] = {}

    def warn(self, reason: str, text: str, *args: object) -> None:
        now = self.clock()
        at, unsaid = self.last.get(reason, (-LOG_EVERY, 0))
        if now - at < LOG_EVERY:
            self.last[reason] = (at, unsaid + 1)
            return
        self.last[reason] = (now, 0)
        more = f" (and {unsaid} more like it)" if unsaid else ""
        log.warning(text + more, *args)


class LeaseSocket:
    """The listening socket and its peers, in the master's selector.

    ``held()`` says how many client sockets the master holds elsewhere (lease requests
    waiting for a broker): they count towards ``max_peers``.  ``clock`` is the master's
    monotonic clock.  :meth:`sweep` must be called every tick (it drops peers past their
    deadline and wakes a paused listener); :meth:`next_deadline` says when it is next due.
    """

    def __init__(self, path: str, selector: selectors.BaseSelector, access: Access,
                 answer: Answer, on_lease: OnLease, limits: Limits,
                 held: Callable[[], int], clock: Callable[[], float],
                 refused: Callable[[str], None] = lambda _code: None) -> None:
        self.path = path
        self.refused = refused  # told the code of every client turned away
        self.selector = selector
        self.access = access
        self.answer = answer
        self.on_lease = on_lease
        self.limits = limits
        self.held = held
        self.clock = clock
        self.accepting_leases = True
        self.listener = bind(path)
        self.acceptor = Acceptor(self.listener, self._at_file_limit)
        self.peers: dict[int, Peer] = {}
        self.paused_until = 0.0  # monotonic; 0: listening
        self.throttle = Throttle(clock)
        selector.register(self.listener, selectors.EVENT_READ, self._accept)

    # ----- new peers ------------------------------------------------------------------------

    def _accept(self, _fd: int) -> None:
        for _ in range(ACCEPT_BATCH):
            sock = self.acceptor.accept()
            if sock is None:
                break
            self._admit(sock)
        if self.acceptor.full and self.acceptor.spare_lost:
            self.throttle.warn("pause", "at the file limit without a spare descriptor;"
                               " not accepting for %.1f s", PAUSE)
            self.selector.unregister(self.listener)
            self.paused_until = self.clock() + PAUSE

    def _at_file_limit(self, sock: socket.socket) -> None:
        error = LimitExceeded(f"the pool is at its limit of {file_limit()} open files; try"
                              f" again later ([pool] max_peers = {self.limits.max_peers},"
                              " systemd LimitNOFILE)", "max_peers")
        self.throttle.warn("files", "turning a client away: %s", error)
        self._refuse(sock, error)

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
            self.throttle.warn("access", "%s", refusal)
            self._refuse(sock, PoolAccessDenied(refusal))
            return
        busy = len(self.peers) + self.held()
        if busy >= self.limits.max_peers:
            error = LimitExceeded(f"the pool serves {busy} client connections already ([pool]"
                                  f" max_peers = {self.limits.max_peers}); try again later",
                                  "max_peers")
            self.throttle.warn("peers", "turning a client away (pid %d): %s", pid, error)
            self._refuse(sock, error)
            return
        self.peers[sock.fileno()] = Peer(sock, pid, self.clock() + REQUEST_TIMEOUT)
        self.selector.register(sock, selectors.EVENT_READ, self._serve)
        self._serve(sock.fileno())  # a client sends its request right after connecting

    # ----- serving --------------------------------------------------------------------------

    def _serve(self, fd: int) -> None:
        current = self.peers.get(fd)
        if current is None:
            return
        try:
            self._serve_peer(fd, current)
        except Exception:  # one peer's input must never end the master's loop
            log.exception("dropping a client (pid %d) after an error serving it", current.pid)
            if self.peers.get(fd) is current:
                self._drop(fd)

    def _serve_peer(self, fd: int, current: Peer) -> None:
        if current.outbox.pending and not self._flush(fd, current):
            return
        data = receive(current.sock, READ_SIZE)
        if data is None:
            return
        if not data:
            self._drop(fd)
            return
        try:
            requests = parse(current.reader, data)
        except KzpoolError as exc:  # malformed, or a lease's options that do not check
            self.throttle.warn("protocol", "dropping a client (pid %d): %s", current.pid, exc)
            self._turn_away(fd, exc)
            return
        if not requests:
            return
        limit = self.limits.max_pending_per_peer
        if len(requests) + len(current.outbox) > limit:
            self.throttle.warn("pending", "dropping a client (pid %d): over %d requests"
                               " unanswered", current.pid, limit)
            self._turn_away(fd, LimitExceeded(
                f"over {limit} requests unanswered ([pool] max_pending_per_peer = {limit}):"
                " read the answers first", "max_pending_per_peer"))
            return
        current.deadline = self.clock() + REQUEST_TIMEOUT
        for request in requests:
            if isinstance(request, LeaseRequest):
                self._lease(fd, current, request)
                return
            if not self._answer(fd, current, request):
                return
        self._flush(fd, current)

    def _lease(self, fd: int, current: Peer, request: LeaseRequest) -> None:
        if not self.accepting_leases:
            self._turn_away(fd, BrokerUnavailable("the pool is stopping"))
        elif current.outbox.pending:
            self._turn_away(fd, ProtocolError("a lease request came before the answers to"
                                              " earlier requests were read"))
        else:
            self._drop(fd, close=False)
            self.on_lease(current.sock, request)

    def _answer(self, fd: int, current: Peer, request: Message) -> bool:
        try:
            reply = wire.document({"ok": True, **self.answer(request)})
        except KzpoolError as exc:
            reply = messages.encode(messages.Refused.of(exc))
        if current.outbox.put(reply):
            return True
        self._turn_away(fd, LimitExceeded(f"over {OUT_LIMIT} bytes of answers unread", ""))
        return False

    def _flush(self, fd: int, current: Peer) -> bool:
        """Send what the peer takes; ``True`` once its answers are all sent."""
        before = current.outbox.size
        try:
            done = current.outbox.flush(current.sock)
        except OSError:
            self._drop(fd)
            return False
        if current.outbox.size < before:
            current.deadline = self.clock() + REQUEST_TIMEOUT  # it reads: progress
        events = selectors.EVENT_READ | (0 if done else selectors.EVENT_WRITE)
        if events != current.events:
            self.selector.modify(current.sock, events, self._serve)
            current.events = events
        return done

    # ----- dropping -------------------------------------------------------------------------

    def _turn_away(self, fd: int, error: KzpoolError) -> None:
        """Drop a peer, telling it why, unless an answer is half sent (then only close)."""
        current = self.peers.pop(fd)
        self.selector.unregister(current.sock)
        if current.outbox.pending:
            current.outbox.close()
            current.sock.close()
        else:
            self._refuse(current.sock, error)

    def _refuse(self, sock: socket.socket, error: KzpoolError) -> None:
        self.refused(error.code)
        refuse(sock, error)

    def _drop(self, fd: int, close: bool = True) -> None:
        current = self.peers.pop(fd)
        self.selector.unregister(current.sock)
        current.outbox.close()
        if close:
            current.sock.close()

    def sweep(self, now: float) -> None:
        """Drop peers past their deadline; listen again after a pause."""
        for fd, current in list(self.peers.items()):
            if now >= current.deadline:
                self.throttle.warn("slow", "dropping a client (pid %d): nothing for %.0f s",
                                   current.pid, REQUEST_TIMEOUT)
                self._turn_away(fd, ProtocolError(f"no whole request (or no answer read)"
                                                  f" within {REQUEST_TIMEOUT:g} s"))
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            self.selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def next_deadline(self) -> float | None:
        deadlines = [p.deadline for p in self.peers.values()]
        if self.paused_until:
            deadlines.append(self.paused_until)
        return min(deadlines, default=None)

    def close(self) -> None:
        self.listener.close()
        self.acceptor.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        for current in self.peers.values():
            current.outbox.close()
            current.sock.close()
