"""A worker's prechannels: channels of its connection opened before a lease asks for one.

:class:`Prechannels` keeps ``target`` channels ready (plus one for each client waiting), so a
lease is bound without a broker round trip.  A channel taken is replaced at once when fewer
than half are left, else a moment later (:data:`FILL_DELAY`): a lease released within that
moment hands its channel back instead (when it left nothing on it), and the broker opens and
closes nothing for it.  A channel handed back beyond the target is closed, and so is one
that opens beyond it (it was opened for a client that a handed-back channel served first).

What a ready channel is for is the worker's: ``offer`` binds it to a waiting client
(``True``) or leaves it here (``False``).  Pure bookkeeping on the worker's loop: nothing
here blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pika.exceptions

log = logging.getLogger("kzpool.worker")

FILL_DELAY = 0.05  # seconds a taken channel waits to be replaced while half are still ready


class Prechannels:
    """The ready channels of one connection (see the module); ``name`` is the broker's, for
    the log; ``changed`` is told when what the worker reports changed."""

    def __init__(self, target: int, ioloop: Any, name: str, offer: Callable[[Any], bool],
                 waiting: Callable[[], int], changed: Callable[[], None]) -> None:
        self.target = target
        self.ioloop = ioloop
        self.name = name
        self.offer = offer
        self.waiting = waiting
        self.changed = changed
        self.ready: list[Any] = []
        self.opening = 0  # channels asked for, not yet open
        self.full = False  # the connection has channel_max channels
        self.connection: Any = None  # the open connection channels come from
        self.on_open: Callable[[Any], None] = lambda channel: None  # sets its callbacks
        self._due = False  # a fill is on the loop's timers
        self.reused = 0  # channels handed back and given out again

    def __len__(self) -> int:
        return len(self.ready)

    @property
    def exhausted(self) -> bool:
        """At ``channel_max`` with none ready: no lease can be bound on this connection."""
        return self.full and not self.ready

    def fill(self) -> None:
        """Open channels until ``target`` (and one per waiting client) are ready or opening."""
        connection = self.connection
        if connection is None or not connection.is_open:
            return
        for _ in range(self.target + self.waiting() - len(self.ready) - self.opening):
            try:
                connection.channel(on_open_callback=self._opened)
            except pika.exceptions.NoFreeChannels:  # channel_max: other connections serve
                if not self.full:
                    log.warning("%s: channel_max reached", self.name)
                    self.full = True
                    self.changed()
                return
            self.opening += 1

    def take(self) -> Any | None:
        """A ready channel, its replacement on its way (``None``: none is ready)."""
        if not self.ready:
            return None
        channel = self.ready.pop(0)
        if len(self.ready) * 2 < self.target:
            self.fill()
        elif not self._due:
            self._due = True
            self.ioloop.call_later(FILL_DELAY, self._fill_due)
        return channel

    def hand_back(self, channel: Any, settled_first: bool) -> None:
        """A released lease left nothing on ``channel``: it serves the next one as is, if a
        client waits or the ready ones are short of it; else it is closed.

        ``settled_first``: the lease published or settled, which the broker may still answer
        by closing the channel (a missing exchange, an unknown delivery tag).  A round trip
        first settles that (``basic.qos`` 0, a fresh channel's own prefetch): the channel
        is handed back on its answer; if the broker closes it instead, no lease gets it."""
        if settled_first:
            channel.basic_qos(prefetch_count=0,
                              callback=lambda _frame: self.hand_back(channel, False))
        elif not channel.is_open:
            return
        elif self.waiting() or len(self.ready) + self.opening < self.target:
            self.reused += 1
            self._give(channel)
        else:
            channel.close()

    def closed(self, channel: Any) -> bool:
        """A channel of the connection closed: ``True`` if it was a ready one (replaced)."""
        if self.full:
            self.full = False
            self.changed()
        if channel not in self.ready:
            return False
        self.ready.remove(channel)
        self.fill()
        self.changed()
        return True

    def clear(self) -> None:
        """The connection is gone, and its channels with it."""
        self.connection = None
        self.ready.clear()
        self.opening = 0

    def _opened(self, channel: Any) -> None:
        """A channel opened: to a waiting client, else ready; one opened for a client that
        a handed-back channel served meanwhile is closed if the target is met without it."""
        self.opening -= 1
        self.on_open(channel)
        if self.offer(channel):
            self.changed()
        elif len(self.ready) >= self.target:
            channel.close()
        else:
            self.ready.append(channel)
            self.changed()

    def _give(self, channel: Any) -> None:
        if not self.offer(channel):
            self.ready.append(channel)
        self.changed()

    def _fill_due(self) -> None:
        self._due = False
        self.fill()
