"""How a lease gets a channel, and gets one again after it lost one.

:class:`Acquiring` is the part of :class:`~kzpool.client.link.LeaseLink` that asks for a
channel (first at the worker that served this kind of lease last, else at the master, which
may keep the request waiting until a broker can serve it), and that recovers after a loss:
a new channel, the topology replayed, unconfirmed publishes sent again, then the call goes
on.  A loss whose error is the caller's (the broker closed the channel, or the connection,
because of a call) is raised once first, by the next call.

Hazards: blocks up to the lease's ``timeout`` (then :class:`BrokerUnavailable` or
:class:`LeaseTimeout`); not thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..common import messages, wire
from ..common.backoff import Backoff
from ..common.errors import KzpoolError, LeaseClosed, LeaseTimeout, refusal_error
from ..common.messages import Reason, Reply
from .backend import Pool, RouteKey
from .confirms import ConfirmBook
from .tags import TagMap
from .topology import Topology

log = logging.getLogger("kzpool.lease")

REPLY_GRACE = 5.0  # the master answers a lease request within its timeout; allow this more
ABORT_POLL = 0.25  # seconds between two looks at a lease's abort callable while it waits


@dataclass
class Loss:
    """Why the lease has no channel now; ``error``: what its next call raises, once."""

    reason: Reason
    error: Exception | None = None


class Acquiring:
    """Getting a channel; the link's state it reads and writes is declared here."""

    pool: Pool
    kind: str
    zone: str | None
    federates: str | None
    timeout: float
    id: str | None
    broker: str | None
    closed: bool
    aborted: bool
    owner: int
    generation: int
    confirming: bool
    tags: TagMap
    topology: Topology
    confirms: ConfirmBook
    on_move: Callable[[str | None, str, dict[str, str]], None]
    _sticky: str | None
    _route_key: RouteKey
    _handed: socket.socket | None
    _abort: Callable[[], bool] | None
    _sock: socket.socket | None
    _reader: wire.FrameReader
    _leased: bool
    _lost: Loss | None
    _refusal: messages.Refused | None

    def pump(self, timeout: float | None) -> None:
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def _on_lost(self, reason: Reason) -> None:
        raise NotImplementedError

    def _send_call(self, op: str, method: str, args: dict[str, object]) -> Reply | None:
        raise NotImplementedError

    # ----- recovering -----------------------------------------------------------------------

    def ready(self) -> None:
        """Make sure the lease has a channel: raise a loss's error once, else recover."""
        self.owner = threading.get_ident()
        if self.closed:
            raise LeaseClosed("the lease is closed", lease=self.id)
        lost = self._lost
        if lost is None:
            return
        if lost.error is not None:
            error, lost.error = lost.error, None
            raise error
        old = self.broker
        renamed: dict[str, str] = {}
        while True:
            self._acquire()
            if self._replay(renamed):
                break
        log.info("lease %s moved from %s to %s (%s)", self.id, old, self.broker,
                 lost.reason.text)
        self.on_move(old, lost.reason.text, renamed)

    def _replay(self, renamed: dict[str, str]) -> bool:
        """Rebuild the topology on the new channel, then re-send unconfirmed publishes.

        ``False``: the new channel was lost too; acquire another and replay again.
        """
        if not self.topology.replay(self._send_call, renamed):
            return False
        self.confirming = self.topology.confirming
        for data in self.confirms.renumber():
            self.send(data)
        return self._lost is None

    # ----- acquiring ------------------------------------------------------------------------

    def _acquire(self) -> None:
        """Get a channel (new or resumed) and wait for a worker to bind it.

        First at the worker that served this kind of lease last (the client's route cache):
        one round trip.  If that worker is gone or no longer the right one, at the master,
        which may keep the request waiting until a broker can serve it.  A lease the master
        asked for on our behalf (``handed``) only waits for its answer.
        """
        deadline = time.monotonic() + self.timeout
        retry = Backoff(0.005, 0.25)
        while True:
            handed, self._handed = self._handed, None
            route = None if handed else self.pool.routes.get(self._route_key)
            sock = handed or (self.pool.open_route(route) if route else None)
            if sock is None:
                route = None
                sock = self.pool.open_pool()  # PoolNotRunning: the lease stays lost
            self._sock, self._lost, self._refusal = sock, None, None
            self._reader = wire.FrameReader(wire.MAX_DATA_FRAME)
            if handed is None:
                self._ask(sock, deadline)
            refusal = self._wait_leased(deadline)
            if refusal is not None:
                error = refusal_error(refusal.code, refusal.error)
                self._give_up(error)
                raise error
            if self._leased:
                self.tags.new_channel()
                self.generation += 1
                return
            if route is not None:  # that worker would not: ask the master, at once
                self.pool.routes.pop(self._route_key, None)
                continue
            if time.monotonic() > deadline:
                error = LeaseTimeout(f"no channel within {self.timeout} s", lease=self.id)
                self._give_up(error)
                raise error
            time.sleep(retry.next_delay())  # the worker had just lost its broker

    def _ask(self, sock: socket.socket, deadline: float) -> None:
        request = messages.LeaseRequest(
            kind=self.kind, zone=self.zone, broker=self._sticky,
            broker_id=self._route_key[1] if self._sticky else None, lease=self.id,
            federates=self.federates, timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(messages.encode(request))  # a refusal may be waiting: read on

    def _wait_leased(self, deadline: float) -> messages.Refused | None:
        """Read until the lease is bound, lost or refused; the refusal, if refused."""
        while not self._leased and self._lost is None and self._refusal is None:
            if time.monotonic() > deadline + REPLY_GRACE:
                self._on_lost(Reason("Timeout", 0, "no reply"))
                break
            self.pump(min(deadline + REPLY_GRACE - time.monotonic(),
                          self._check_abort() or REPLY_GRACE))
        return self._refusal

    def _check_abort(self) -> float | None:
        """Raise :class:`LeaseClosed` if the owner gave up; else how long a wait may last
        before asking again (``None``: as long as it takes)."""
        if self._abort is None:
            return None
        if self._abort():
            error = LeaseClosed("given up: its owner is stopping", lease=self.id)
            self._give_up(error)
            self.closed = self.aborted = True
            raise error
        return ABORT_POLL

    def _give_up(self, error: KzpoolError) -> None:
        """No channel this time: stay lost, so the next call asks again."""
        self._on_lost(Reason(type(error).__name__, 0, str(error)))
