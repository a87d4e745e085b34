"""How every client asks the pool: for a channel, and for a document (``ping``, ``status``).

What one answer to a lease request comes to (:func:`answered`), how long it may take past
the lease's own timeout, the reason a channel is given up for, and :class:`PoolWait`: when
the pool's socket is gone (its master killed, or restarted by systemd), a lease that had a
channel waits for the pool to come back, up to its ``timeout``; a first lease does not, nor
an in-service consumer's.  :func:`read_answer` reads the pool's answer to a one-shot
request; :func:`not_running` says why no pool answers at a path.  Pure: the clients do the
I/O and the waiting.
"""

from __future__ import annotations

import enum
import errno
from typing import Any, Protocol

from ..common import messages, wire
from ..common.backoff import Backoff
from ..common.errors import (
    KzpoolError,
    LeaseTimeout,
    PoolAccessDenied,
    PoolNotRunning,
    ProtocolError,
)
from ..common.messages import Reason
from .state import LeaseState, RouteKey

REPLY_GRACE = 5.0  # the master answers a lease request within its timeout; allow this more
POOL_RETRY = (0.005, 0.25)  # first and longest wait between two looks for a pool restarting


class Asked(Protocol):
    """A socket of either link, once its lease request was answered (or given up)."""

    @property
    def has_channel(self) -> bool: ...

    @property
    def route(self) -> str | None:
        """The worker's own socket, once bound: the next such lease asks there first."""
        ...

    def lose(self, reason: Reason) -> None: ...


class Next(enum.Enum):
    """What a lease does after one answer to its request."""

    BOUND = "bound"  # it has its channel
    MASTER = "master"  # the worker of its route would not: ask the master, at once
    RETRY = "retry"  # no channel yet (the worker had just lost its broker): wait, ask again


def answered(asked: Asked, refusal: messages.Refused | None, route: str | None,
             state: LeaseState, routes: dict[RouteKey, str], late: bool) -> Next:
    """What one answer to ``state``'s request on ``asked`` comes to (``route``: the worker
    asked directly, if one was; ``late``: past the lease's deadline).  Raises the refusal's
    error (giving the socket up), or :class:`LeaseTimeout`.  Both links' rule."""
    if refusal is not None:
        error = refusal.exception()
        asked.lose(gave_up(error))
        raise error
    if asked.has_channel:
        state.tags.new_channel()
        if asked.route:
            routes[state.route_key] = asked.route
        return Next.BOUND
    if route is not None:
        routes.pop(state.route_key, None)
        return Next.MASTER
    if late:
        raise LeaseTimeout(f"no channel within {state.timeout} s", lease=state.id)
    return Next.RETRY


def gave_up(error: KzpoolError) -> Reason:
    """The reason a channel is given up for ``error`` (no channel this time: the lease
    stays lost, so the next call asks again)."""
    return Reason(type(error).__name__, 0, str(error))


class PoolWait:
    """While the pool's socket is gone: a lease that had a channel waits for the pool to
    come back (a restart), a first lease does not, nor one that is not ``patient`` (an
    in-service consumer's: a child of the master, it goes with it).  Both links' rule;
    pure."""

    def __init__(self, state: LeaseState, patient: bool = True) -> None:
        self.state = state
        self.patient = patient
        self.waited = False  # the pool was gone since this was last reset (a restart)
        self._retry = Backoff(*POOL_RETRY)

    def start(self) -> None:
        """A new look for the pool: the first wait is short again."""
        self._retry = Backoff(*POOL_RETRY)

    def after(self, error: PoolNotRunning, left: float) -> float:
        """How long to wait before looking again, ``left`` seconds before the deadline;
        raises ``error`` if the lease may not wait (a first lease, access refused, no
        time left)."""
        if (isinstance(error, PoolAccessDenied) or not self.patient or self.state.new
                or left <= 0):
            raise error
        self.waited = True
        return min(self._retry.next_delay(), left)


def read_answer(reader: wire.FrameReader, data: bytes) -> dict[str, Any] | None:
    """The pool's answer to one request, once ``data`` completes its frame (``None``: not
    yet).  Raises the error a refusal names, :class:`ProtocolError` for a frame that is no
    answer, ``ConnectionError`` if the pool hung up (``data`` empty)."""
    if not data:
        raise ConnectionError("the pool closed the connection")
    for kind, _flags, payload in reader.feed(data):
        if kind != wire.Kind.JSON:
            raise ProtocolError(f"unexpected frame kind {kind}")
        answer = wire.read_document(payload)
        if answer.get("op") == messages.Refused.OP:
            refused = messages.from_wire(answer, messages.accepts(messages.Refused))
            assert isinstance(refused, messages.Refused)
            raise refused.exception()
        return answer
    return None


def not_running(path: str, exc: OSError) -> PoolNotRunning:
    """Why no pool answers at ``path``, as the error a client raises."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PoolAccessDenied(f"access to the pool at {path} is refused (permission denied)",
                                socket=path)
    reason = "no such socket" if exc.errno == errno.ENOENT else (exc.strerror or str(exc)).lower()
    return PoolNotRunning(f"no pool is running at {path} ({reason})", socket=path)
