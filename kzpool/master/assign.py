"""Lease assignment: the rows of the assignments table and the decisions about them.

Kazoo's ``kz_amqp_assignments`` in Python.  A row is a *reservation* while its client waits
for a channel, an *assignment* once a worker has bound the client's socket to a channel.
Pure data and decisions, no I/O: the master acts on what these functions say.
"""

from __future__ import annotations

import enum
import functools
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..common.options import Kind, LeaseOptions
from ..common.uri import BrokerURI
from .slots import Slot, broker_key


class RowState(enum.Enum):
    WAITING = "waiting"  # a reservation: the client waits for a channel
    ASSIGNING = "assigning"  # socket passed to a worker, not yet bound
    ASSIGNED = "assigned"
    MOVING = "moving"  # the worker was told to move it (fail-back)
    LOST = "lost"  # channel lost; the client will come back to resume

    @property
    def placed(self) -> bool:
        return self in (RowState.ASSIGNING, RowState.ASSIGNED, RowState.MOVING)


@dataclass
class Assignment:
    """A lease as the master knows it: its client's options, whole, and where it is."""

    lease: str
    options: LeaseOptions
    zone: str  # the zone it serves in: its own, else the pool's local zone
    client_pid: int
    broker: str | None = None  # sticky: the broker key it is pinned to
    state: RowState = RowState.WAITING
    slot: Slot | None = None
    channel: int | None = None
    since: float = field(default_factory=time.time)
    moves: int = 0
    placed_once: bool = False
    client_uid: int = -1  # the client's uid (its peer credentials); -1: not known

    @property
    def kind(self) -> Kind:
        return self.options.kind

    @property
    def federates(self) -> str | None:
        """A federator's: the queue of the listener it feeds."""
        return self.options.federates

    def row(self) -> dict[str, Any]:
        slot = self.slot if self.state.placed else None
        return {
            "lease": self.lease,
            "kind": self.kind,
            "zone": self.zone,
            "state": self.state.value,
            "client_pid": self.client_pid,
            "broker": slot.spec.broker.uri.masked if slot else None,
            "pid": slot.pid if slot else None,
            "channel": self.channel if slot else None,
            "since": round(self.since, 3),
            "moves": self.moves,
            "federates": self.federates,
            "pinned": _masked(self.broker) if self.broker else None,
        }


@functools.lru_cache(maxsize=256)
def _masked(key: str) -> str:
    """A broker key (its full URI) as status may show it."""
    return BrokerURI.parse(key).masked


def new_lease_id() -> str:
    return uuid.uuid4().hex[:12]


def zone_primary(slots: Iterable[Slot], zone: str) -> str | None:
    """Key of the first available, not hidden broker of ``zone`` in config order (a worker
    that connects again at once after a client's call made the broker close its connection
    keeps the role meanwhile: :attr:`~.slots.Slot.holds_role`)."""
    ordered = sorted((s for s in slots if s.spec.broker.zone == zone and not s.spec.broker.hidden
                      and not s.removed), key=lambda s: (s.spec.broker.order, s.spec.index))
    return next((broker_key(s.spec.broker) for s in ordered if s.holds_role), None)


def choose_slot(slots: Iterable[Slot], target: str | None,
                load: Callable[[], dict[str, int]]) -> Slot | None:
    """The available worker of broker ``target`` with the fewest leases.

    ``load`` (leases per worker id) is only asked for when there is a choice to make.
    """
    if target is None:
        return None
    candidates = [s for s in slots if s.has_room and broker_key(s.spec.broker) == target]
    if len(candidates) < 2:
        return candidates[0] if candidates else None
    counts = load()
    return min(candidates, key=lambda s: counts.get(s.spec.id, 0))


def target_of(assignment: Assignment, slots: Iterable[Slot]) -> str | None:
    """The broker an assignment should be on now."""
    if assignment.kind == "sticky":
        return assignment.broker
    return zone_primary(slots, assignment.zone)


def to_move(assignments: Iterable[Assignment], slots: list[Slot]) -> list[Assignment]:
    """Float leases that sit on another broker than their zone's primary (fail-back)."""
    primaries: dict[str, str | None] = {}
    moves = []
    for a in assignments:
        if a.kind != "float" or a.state is not RowState.ASSIGNED or a.slot is None:
            continue
        if a.zone not in primaries:
            primaries[a.zone] = zone_primary(slots, a.zone)
        primary = primaries[a.zone]
        if primary is not None and broker_key(a.slot.spec.broker) != primary:
            moves.append(a)
    return moves
