"""How a blocking lease gets a channel, and gets one again after it lost one.

:class:`Recovery` asks for a channel: first at the worker that served this kind of lease
last (the client's route cache: one round trip), else at the master, which may keep the
request waiting until a broker can serve it.  Each socket it opens becomes a new
:class:`~kzpool.client.bound.Bound` (made by the link, which it tells of losses), bound
once the worker says so.  On a new channel :meth:`Recovery.replay` rebuilds the lease's
topology and re-sends its unconfirmed publishes, renumbered.  It works on the lease's
lasting :class:`~kzpool.lease.state.LeaseState`; the link decides when to recover.  The
asyncio twin is :class:`kzpool.aio.recovery.Recovery`.

A pool restart is a move too: when the pool's socket is gone (its master killed, or
restarted by systemd), a lease that had a channel waits for the pool to come back, up to
its ``timeout``, then raises :class:`PoolNotRunning`; a first lease with no pool fails at
once, and so does an in-service consumer's (the master's child: it goes with it, and the
next master starts its own).

Hazards: blocks up to the lease's ``timeout`` (then :class:`BrokerUnavailable`,
:class:`LeaseTimeout` or :class:`PoolNotRunning`); not thread-safe.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..common import messages
from ..common.backoff import Backoff
from ..common.errors import LeaseClosed, PoolNotRunning
from ..common.messages import Reason
from ..lease.asking import REPLY_GRACE, Next, PoolWait, answered, gave_up
from ..lease.state import LeaseState, RouteKey
from ..lease.topology import Send
from .bound import Bound

ABORT_POLL = 0.25  # seconds between two looks at a lease's abort callable while it waits


@dataclass
class Loss:
    """Why the lease has no channel now; ``error``: what its next call raises, once."""

    reason: Reason
    error: Exception | None = None


class Abort:
    """The owner's abort callable, asked while a lease waits (``None``: never asked)."""

    def __init__(self, abort: Callable[[], bool] | None) -> None:
        self.abort = abort
        self.aborted = False  # it said so: the lease is closed

    def check(self, bound: Bound | None, lease: str | None) -> float | None:
        """Raise :class:`LeaseClosed` (giving ``bound`` up) if the owner gave up; else how
        long a wait may last before asking again (``None``: as long as it takes)."""
        if self.abort is None:
            return None
        if self.abort():
            error = LeaseClosed("given up: its owner is stopping", lease=lease)
            if bound is not None:
                bound.lose(gave_up(error))
            self.aborted = True
            raise error
        return ABORT_POLL


class Sockets(Protocol):
    """What getting a channel needs of the client: its sockets and its route cache."""

    routes: dict[RouteKey, str]

    def open_pool(self) -> socket.socket: ...

    def open_route(self, path: str) -> socket.socket | None: ...


class Recovery:
    """Getting a channel for the lease whose ``state`` it is; ``make`` turns a socket into
    the lease's :class:`Bound`.  ``handed``: a socket on which the master asked for this
    lease already (an in-service consumer's first), whose answer is only waited for; such a
    lease goes with its master, and does not wait for the next one."""

    def __init__(self, pool: Sockets, state: LeaseState, make: Callable[[socket.socket], Bound],
                 abort: Abort, handed: socket.socket | None = None) -> None:
        self.pool = pool
        self.state = state
        self.make = make
        self.abort = abort
        self.handed = handed
        self.pool_wait = PoolWait(state, patient=handed is None)

    def acquire(self) -> Bound:
        """A socket bound to a channel (new or resumed); raises why there is none."""
        state = self.state
        deadline = time.monotonic() + state.timeout
        retry = Backoff(0.005, 0.25)
        while True:
            handed, self.handed = self.handed, None
            route = None if handed else self.pool.routes.get(state.route_key)
            sock = handed or (self.pool.open_route(route) if route else None)
            if sock is None:
                route = None
                sock = self._open_pool(deadline)
            bound = self.make(sock)
            if handed is None:
                _ask(sock, state.request(deadline - time.monotonic()))
            refusal = self._wait_leased(bound, deadline)
            step = answered(bound, refusal, route, state, self.pool.routes,
                            time.monotonic() > deadline)
            if step is Next.BOUND:
                return bound
            if step is Next.RETRY:
                time.sleep(retry.next_delay())

    def replay(self, bound: Bound, send_call: Send, renamed: dict[str, str]) -> bool:
        """Rebuild the topology on ``bound``'s new channel (``send_call``: one call on it),
        then re-send unconfirmed publishes.  ``False``: that channel was lost too; acquire
        another and replay again."""
        if not self.state.topology.replay(send_call, renamed):
            return False
        for data in self.state.confirms.renumber():
            bound.send(data)
        return not bound.dead

    def _open_pool(self, deadline: float) -> socket.socket:
        """The pool's socket; while it is gone, wait for it (:class:`PoolWait`)."""
        self.pool_wait.start()
        while True:
            try:
                return self.pool.open_pool()
            except PoolNotRunning as exc:
                delay = self.pool_wait.after(exc, deadline - time.monotonic())
            self.abort.check(None, self.state.id)
            time.sleep(delay)

    def _wait_leased(self, bound: Bound, deadline: float) -> messages.Refused | None:
        """Read until the socket is bound, lost or refused; the refusal, if refused."""
        while not bound.has_channel and not bound.dead and bound.refusal is None:
            if time.monotonic() > deadline + REPLY_GRACE:
                bound.lose(Reason("Timeout", 0, "no reply"))
                break
            bound.pump(min(deadline + REPLY_GRACE - time.monotonic(),
                           self.abort.check(bound, self.state.id) or REPLY_GRACE))
        return bound.refusal


def _ask(sock: socket.socket, request: messages.LeaseRequest) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(messages.encode(request))  # a refusal may be waiting: read on
