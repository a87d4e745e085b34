"""What a lease keeps across its channels, shared by the blocking and the asyncio link.

A :class:`LeaseState` is what the lease asks for (kind, zone or sticky broker, timeout),
who serves it now (lease id, broker, channel number, flow control), and the pure
bookkeeping that outlives every channel: delivery tags (:mod:`.tags`), unconfirmed
publishes (:mod:`.confirms`) and what to replay (:mod:`.topology`).  The link holds it;
the short-lived object of each bound socket writes into it what its worker says.  Pure:
no I/O, not thread-safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..common import messages
from .backend import RouteKey, route_key
from .confirms import ConfirmBook
from .tags import TagMap
from .topology import Topology


@dataclass
class LeaseState:
    kind: str
    zone: str | None
    sticky: str | None  # the broker a sticky lease asked for
    timeout: float
    federates: str | None = None
    id: str | None = None  # the pool's name for the lease, from its first channel on
    broker: str | None = None  # the broker serving it now, password masked
    broker_zone: str | None = None  # and its zone
    channel_number: int = 0
    blocked: bool = False  # the broker blocks the connection (flow control)
    blocked_since: float = 0.0  # monotonic: when this lease heard of the block
    topology: Topology = field(default_factory=Topology)
    confirms: ConfirmBook = field(default_factory=ConfirmBook)
    tags: TagMap = field(default_factory=TagMap)
    route_key: RouteKey = field(init=False)

    def __post_init__(self) -> None:
        self.route_key = route_key(self.kind, self.zone, self.sticky)  # bad URI: raised here

    def request(self, left: float) -> messages.LeaseRequest:
        """The lease request for a new channel, waiting at most ``left`` seconds."""
        return messages.LeaseRequest(
            kind=self.kind, zone=self.zone, broker=self.sticky,
            broker_id=self.route_key[1] if self.sticky else None, lease=self.id,
            federates=self.federates, timeout=max(0.0, left))

    def bound(self, event: messages.Leased, routes: dict[RouteKey, str]) -> None:
        """A worker bound the lease to a channel: who serves it now; ``routes`` (the
        client's route cache) learns where to ask next time."""
        self.id, self.broker, self.broker_zone = event.lease, event.broker, event.zone
        self.channel_number = event.channel
        self.set_blocked(event.blocked)
        if event.route:
            routes[self.route_key] = event.route

    def set_blocked(self, blocked: bool) -> None:
        if blocked and not self.blocked:
            self.blocked_since = time.monotonic()
        self.blocked = blocked
