"""The master's side of leases: reservations, placement, moves, the assignments table.

A client asks the master for a lease on the lease socket.  The master picks a worker (float:
the zone's primary; sticky: the named broker, added as a hidden connection if unknown) and
passes the client's socket to it with SCM_RIGHTS; from then on the client talks to that
worker only.  When no worker can take it yet, the request waits as a reservation until one
can or the client's timeout passes.  Workers report what becomes of each lease.

Who may have a lease is :mod:`.admission`'s: per-process and per-uid limits, the lease id's
owner, hidden brokers.  A lease a worker served directly that puts its client over a limit
(its other leases being on other workers) is moved: the client comes back here, and is
refused.  The book never waits on a client: refusals go out without waiting
(:func:`~.control.refuse`), and a client's socket passes to a worker through the link's
outbox.
"""

from __future__ import annotations

import functools
import logging
import os
import selectors
import socket
from dataclasses import dataclass
from typing import Any, Protocol

from ..common import access, messages
from ..common.config import Broker, Config
from ..common.errors import BrokerUnavailable, KzpoolError, LeaseRequestError
from ..common.messages import LeaseEvent, LeaseNews, LeaseRequest
from ..common.options import MAX_TIMEOUT, LeaseOptions
from ..common.uri import MASK, BrokerURI
from . import control
from .admission import UNKNOWN_UID, Holdings, check_owner, hidden_to_retire
from .assign import Assignment, RowState, choose_slot, new_lease_id, target_of, to_move
from .metrics import Tally
from .slots import Slot, broker_key
from .system import System

log = logging.getLogger("kzpool.leasebook")

@dataclass
class Reservation:
    assignment: Assignment
    sock: socket.socket
    deadline: float  # monotonic
    watched: bool = False  # in the master's selector, which tells when the client hangs up


class Workers(Protocol):
    """What the lease book needs of the master's workers."""

    config: Config

    def live(self) -> list[Slot]: ...

    def find(self, uri: BrokerURI) -> Slot | None: ...

    def add_hidden(self, uri: BrokerURI) -> Broker: ...

    def remove(self, slot: Slot) -> None: ...

    def drain(self) -> None: ...

    def send(self, slot: Slot, message: messages.Message) -> None: ...

    def pass_socket(self, slot: Slot, sock: socket.socket, adopt: messages.Adopt) -> bool: ...


class LeaseBook:
    """Every lease the master knows of.  Runs in the master's loop only.

    ``selector`` is the master's: a waiting client's socket is watched there, to notice a
    client that gives up.
    """

    def __init__(self, workers: Workers, selector: selectors.BaseSelector,
                 system: System, tally: Tally | None = None) -> None:
        self.workers = workers
        self.tally = tally or Tally()  # refusals by code, for the metrics
        self.selector = selector
        self.system = system
        self.rows: dict[str, Assignment] = {}
        self.holdings = Holdings()  # lease ids by client pid and uid
        self.waiting: list[Reservation] = []
        self.dirty: set[str] = set()
        self.dropped: set[str] = set()
        self.check_moves = False  # a primary changed or a lease was placed: look for moves
        self.moves = 0  # every lease move so far, for the metrics

    # ----- requests -------------------------------------------------------------------------

    def request(self, sock: socket.socket, request: LeaseRequest,
                client_pid: int | None = None) -> None:
        """A lease (or resume) request; the socket is ours until placed or refused.

        ``client_pid``: the process the lease is for, when the master asks on its behalf
        (an in-service consumer's first lease, handed to it through a socket pair).
        """
        self.workers.drain()  # the freshest worker reports and lease news first
        try:
            assignment, timeout = self._admit(sock, request, client_pid)
        except KzpoolError as exc:
            self._refuse(sock, exc)
            return
        except OSError:  # its peer credentials cannot be read: the client is gone
            sock.close()
            return
        reservation = Reservation(assignment, sock, self.system.monotonic() + timeout)
        if not self._place(reservation):
            self.waiting.append(reservation)
            self._watch(reservation)

    def _watch(self, reservation: Reservation) -> None:
        if not reservation.watched:
            self.selector.register(reservation.sock, selectors.EVENT_READ,
                                   functools.partial(self._on_hang_up, reservation))
            reservation.watched = True

    def _on_hang_up(self, reservation: Reservation, _fd: int) -> None:
        """A waiting client's socket is readable: it sends nothing while it waits, so this is
        the client giving up (or one sending out of turn: that one is no longer watched)."""
        self._unwatch(reservation)
        if _hung_up(reservation.sock):
            reservation.sock.close()
            self.waiting.remove(reservation)
            self._drop(reservation.assignment.lease)

    def _unwatch(self, reservation: Reservation) -> None:
        if reservation.watched:
            self.selector.unregister(reservation.sock)
            reservation.watched = False

    def _admit(self, sock: socket.socket, request: LeaseRequest,
               client_pid: int | None) -> tuple[Assignment, float]:
        options = request.options
        timeout = _timeout(request.wait)
        config = self.workers.config
        zone = options.zone or config.local_zone
        if zone not in config.zones:
            raise LeaseRequestError(f"unknown zone {zone[:40]!r} (zones:"
                                    f" {', '.join(config.zones)})")
        pid, uid = (client_pid, os.getuid()) if client_pid else access.peer(sock)[:2]
        row = self.rows.get(request.lease) if request.lease else None
        if row is not None:
            check_owner(row, pid, uid)
        refusal = self.holdings.refusal(self.rows, pid, uid, config.settings, request.lease)
        if refusal is not None:
            raise refusal
        if row is None:
            broker = self._sticky_broker(options)
            row = Assignment(request.lease or new_lease_id(), options, zone, pid, broker,
                             client_uid=uid)
            self._add(row)
        # a resume: the client knows its channel is gone before its worker's report arrives
        row.state, row.slot = RowState.WAITING, None
        self._touch(row)
        return row, timeout

    def _sticky_broker(self, options: LeaseOptions) -> str | None:
        """The key of the broker a sticky lease is pinned to (added as a hidden broker if
        the config does not list it and ``hidden_brokers`` allows); ``None`` for a float."""
        if options.kind == "float" or options.broker is None:
            return None
        uri = BrokerURI.parse_client(options.broker)  # checked with the options already
        slot = self.workers.find(uri)
        if slot is not None:
            return broker_key(slot.spec.broker)
        if uri.password == MASK:
            raise LeaseRequestError(f"unknown broker {uri.masked}: a URI with a masked password"
                                    " names only a broker of the pool's config")
        retire = hidden_to_retire(self.workers.live(), self.rows.values(), uri.masked,
                                  self.workers.config.settings.hidden_brokers)
        for old in retire:
            log.info("retiring hidden broker %s (no lease uses it) to make room",
                     old.spec.broker.uri.masked)
            self.workers.remove(old)
        return broker_key(self.workers.add_hidden(uri))

    # ----- placement ----------------------------------------------------------------------------

    def _place(self, reservation: Reservation) -> bool:
        """Pass the client's socket to the worker it should be on, if one can take it now
        (the socket is the worker link's from then on)."""
        row = reservation.assignment
        slots = self.workers.live()
        watched = reservation.watched
        while True:
            slot = choose_slot(slots, target_of(row, slots), self._load)
            if slot is None:
                if watched:
                    self._watch(reservation)
                return False
            self._unwatch(reservation)  # before the link owns (and closes) the socket
            adopt = messages.Adopt(row.lease, row.options)
            if self.workers.pass_socket(slot, reservation.sock, adopt):
                break
            slots.remove(slot)  # its link is broken: the worker is dying
        if row.placed_once:
            row.moves += 1
            self.moves += 1
        row.placed_once = True
        row.state, row.slot, row.since = RowState.ASSIGNING, slot, self.system.time()
        self._touch(row)
        return True

    def _load(self) -> dict[str, int]:
        load: dict[str, int] = {}
        for row in self.rows.values():
            if row.slot is not None and row.state.placed:
                load[row.slot.spec.id] = load.get(row.slot.spec.id, 0) + 1
        return load

    def place_waiting(self, now: float) -> None:
        """Place what can be placed; refuse what waited too long."""
        if not self.waiting:
            return
        still = []
        for reservation in self.waiting:
            if self._place(reservation):
                continue
            elif now >= reservation.deadline:
                self._expire(reservation)
            else:
                still.append(reservation)
        self.waiting = still

    def _expire(self, reservation: Reservation) -> None:
        row = reservation.assignment
        if row.kind == "sticky":
            slot = next((s for s in self.workers.live()
                         if broker_key(s.spec.broker) == row.broker), None)
            name = slot.spec.broker.uri.masked if slot else "?"
            why = slot.error if slot and slot.error else "not connected"
            text = f"broker {name} is not available ({why})"
        else:
            text = f"no broker of zone {row.zone!r} is available"
        self._unwatch(reservation)
        self._refuse(reservation.sock, BrokerUnavailable(text))
        if not row.placed_once:
            self._drop(row.lease)

    def _refuse(self, sock: socket.socket, error: KzpoolError) -> None:
        self.tally.inc("lease_requests_refused", reason=error.code)
        control.refuse(sock, error)

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self.waiting), default=None)

    # ----- what workers report ------------------------------------------------------------------

    def on_news(self, slot: Slot, news: LeaseNews) -> None:
        row = self.rows.get(news.lease)
        if news.event is LeaseEvent.ASSIGNED:
            self._assigned(slot, row, news)
            return
        if row is None or row.slot is not slot:
            return  # news of an earlier placement
        if news.event is LeaseEvent.RELEASED:
            self._drop(row.lease)
            return
        row.state = RowState.LOST  # lost, moved: the client comes back to resume
        self._touch(row)

    def _assigned(self, slot: Slot, row: Assignment | None, news: LeaseNews) -> None:
        """A worker bound a lease: placed by us, or asked for at the worker directly."""
        direct = row is None
        if row is None:
            options = news.options or LeaseOptions()
            broker = broker_key(slot.spec.broker) if options.kind == "sticky" else None
            uid = news.client_uid if news.client_uid >= 0 else (
                access.uid_of(news.client_pid) if news.client_pid else None)
            row = Assignment(news.lease, options, options.zone or slot.spec.broker.zone,
                             news.client_pid, broker,
                             client_uid=UNKNOWN_UID if uid is None else uid)  # checked by intake
            self._add(row)
        elif row.placed_once and row.state is not RowState.ASSIGNING:
            row.moves += 1
            self.moves += 1  # a resume the client made at the worker directly
        row.placed_once = True
        row.state, row.slot, row.since = RowState.ASSIGNED, slot, self.system.time()
        row.channel = news.channel
        self.check_moves = row.kind == "float" or self.check_moves
        self._touch(row)
        if direct:
            self._evict_if_over(slot, row)

    def _evict_if_over(self, slot: Slot, row: Assignment) -> None:
        """A lease a worker served directly put its client over a limit (the client's other
        leases are on other workers): move it, so that it comes back here to be refused."""
        over = self.holdings.over(self.rows, row, self.workers.config.settings)
        if over is not None:
            log.warning("lease %s of pid %d is over a limit (%s); moving it", row.lease,
                        row.client_pid, over.setting)
            self.workers.send(slot, messages.MoveLease(row.lease))
            row.state = RowState.MOVING
            self._touch(row)

    def on_worker_exit(self, slot: Slot) -> None:
        for row in self.rows.values():
            if row.slot is slot and row.state.placed:
                row.state = RowState.LOST
                self._touch(row)

    def fail_back(self) -> None:
        """Tell workers to move float leases to their zone's primary."""
        if not self.check_moves:
            return
        self.check_moves = False
        for row in to_move(self.rows.values(), self.workers.live()):
            assert row.slot is not None
            self.workers.send(row.slot, messages.MoveLease(row.lease))
            row.state = RowState.MOVING
            self._touch(row)

    def forget_dead_clients(self) -> None:
        """Rows waiting for a client that died will never be resumed: drop them."""
        waiting = {id(r.assignment) for r in self.waiting}
        for row in list(self.rows.values()):
            if not row.state.placed and id(row) not in waiting and not self.system.pid_exists(
                    row.client_pid):
                self._drop(row.lease)

    # ----- the table --------------------------------------------------------------------------

    def _touch(self, row: Assignment) -> None:
        self.dirty.add(row.lease)

    def _add(self, row: Assignment) -> None:
        self.rows[row.lease] = row
        self.holdings.add(row)

    def _drop(self, lease: str) -> None:
        row = self.rows.pop(lease, None)
        if row is not None:
            self.holdings.drop(row)
        self.dirty.discard(lease)
        self.dropped.add(lease)

    def changes(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Rows to write and leases to drop since the last call."""
        put = {k: self.rows[k].row() for k in self.dirty if k in self.rows}
        drop = list(self.dropped)
        self.dirty.clear()
        self.dropped.clear()
        return put, drop

    def table(self) -> list[dict[str, Any]]:
        return [row.row() for row in self.rows.values()]


def _hung_up(sock: socket.socket) -> bool:
    """The peer of a readable socket closed its end."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _timeout(timeout: float) -> float:
    if not 0 <= timeout <= MAX_TIMEOUT:
        raise LeaseRequestError(f"timeout {timeout:g} is not between 0 and {MAX_TIMEOUT:g} s")
    return timeout
