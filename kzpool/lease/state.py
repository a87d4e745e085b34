"""What a lease keeps across its channels, for every client: blocking, asyncio, kombu.

A :class:`LeaseState` is what the lease asks for (its
:class:`~kzpool.common.options.LeaseOptions`, whole), who serves it now (lease id, broker,
channel number, flow control), and the pure bookkeeping that outlives every channel:
delivery tags (:class:`TagMap`), unconfirmed publishes (:mod:`.confirms`), what to
replay (:mod:`.topology`) and the deliveries the broker took back (:mod:`.takeback`).  A
client's link holds it; the short-lived object of each bound socket writes into it what its
worker says.  :class:`MoveEvent` is what a lease's ``on_move`` callback gets.  Pure: no
I/O, not thread-safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..common import messages
from ..common.options import LeaseOptions
from .confirms import ConfirmBook
from .forks import forked_error
from .takeback import TakenBack
from .topology import Topology

POOL_RESTARTED = "pool restarted"  # a move's reason when the pool's own socket went away
RouteKey = tuple[str, str | None]  # (kind, zone or broker without credentials)


@dataclass(frozen=True)
class MoveEvent:
    """Passed to ``on_move``: the lease now runs on ``new_broker``.  ``reason`` says why the
    old channel went (the broker's or the worker's reason, e.g. ``"worker gone"``, ``"moved
    to the primary"``), or :data:`POOL_RESTARTED`."""

    lease: str
    old_broker: str | None
    new_broker: str | None
    reason: str
    renamed: dict[str, str]  # server-named queues: old name → new name


class TagMap:
    """Delivery tags that stay unique across a lease's channels.

    Each new channel numbers its deliveries from 1 again.  The lease shows its owner
    ``channel tag + base``, where ``base`` is the highest tag shown before the move, so a tag
    never means two messages; a settle of a tag from an earlier channel is dropped (the
    broker redelivers that message on the new channel), never applied to another message.
    """

    __slots__ = ("base", "highest")

    def __init__(self) -> None:
        self.base = 0  # tags up to here belong to earlier channels
        self.highest = 0  # the highest tag shown so far

    def shown(self, channel_tag: int) -> int:
        """The tag the owner sees for a delivery of the current channel."""
        tag = channel_tag + self.base
        if tag > self.highest:
            self.highest = tag
        return tag

    def channel_tag(self, tag: int) -> int | None:
        """The current channel's tag for a tag the owner settles; ``None`` if it belongs to
        an earlier channel.  ``0`` (every unsettled delivery, with ``multiple``) stays 0."""
        if not tag:
            return 0
        return tag - self.base if tag > self.base else None

    def new_channel(self) -> None:
        self.base = self.highest


@dataclass
class LeaseState:
    options: LeaseOptions
    id: str | None = None  # the pool's name for the lease, from its first channel on
    fresh: bool = False  # a copy made by fork(): its next channel is a new lease's
    broker: str | None = None  # the broker serving it now, password masked
    broker_zone: str | None = None  # and its zone
    channel_number: int = 0
    blocked: bool = False  # the broker blocks the connection (flow control)
    blocked_since: float = 0.0  # monotonic: when this lease heard of the block
    topology: Topology = field(default_factory=Topology)
    confirms: ConfirmBook = field(default_factory=ConfirmBook)
    tags: TagMap = field(default_factory=TagMap)
    taken_back: TakenBack = field(default_factory=TakenBack)  # settles of these raise
    read_at: float = 0.0  # monotonic: when the lease last read a frame of its worker's

    @property
    def timeout(self) -> float:
        return self.options.timeout

    @property
    def route_key(self) -> RouteKey:
        return self.options.route_key

    def request(self, left: float) -> messages.LeaseRequest:
        """The lease request for a new channel, waiting at most ``left`` seconds."""
        return messages.LeaseRequest(self.options, lease=None if self.fresh else self.id,
                                     wait=max(0.0, left))

    @property
    def new(self) -> bool:
        """No channel of its own yet: a first lease (or a fork's copy) does not wait for a
        pool that is gone."""
        return self.id is None or self.fresh

    def bound(self, event: messages.Leased) -> None:
        """A worker bound the lease to a channel: who serves it now."""
        self.id, self.broker, self.broker_zone = event.lease, event.broker, event.zone
        self.fresh = False
        self.channel_number = event.channel
        self.set_blocked(event.blocked)

    def forked(self, parent: int, connection_id: str) -> None:
        """In a child of ``fork()``: the lease is a new one here from its next channel on
        (the id, until then, is the parent's), of the child's copy of its connection
        (``connection_id``: the parent's exclusive queues are not the child's); the
        publishes not confirmed yet are the parent's, whose worker confirms them to it
        alone: they fail here, never sent again."""
        self.fresh, self.blocked = True, False
        if self.options.connection_id is not None:
            self.options = self.options.for_connection(connection_id)
        self.confirms.fail_all(forked_error(
            "this publish", parent, "its confirm goes to that process"))

    def set_blocked(self, blocked: bool) -> None:
        if blocked and not self.blocked:
            self.blocked_since = time.monotonic()
        self.blocked = blocked
