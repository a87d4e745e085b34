"""The deliveries the broker holds for one lease's channel, and those it took back.

A delivery of a consumer that acks (or a ``basic.get`` without ``auto_ack``) is *held*
until the lease settles it.  The broker takes held deliveries back, to deliver them again,
when it cancels their consumer (RabbitMQ 4.x: a consumer timeout on a quorum queue, or the
queue deleted) or closes their channel (RabbitMQ 3.x: ``406 PRECONDITION_FAILED - delivery
acknowledgement ... timed out``).  The session tells the lease which ones (in its
``cancelled`` and ``lost`` events), so that the lease's ack, nack or reject of one of them
raises in its caller instead of doing nothing.

A consumer the broker cancelled is cancelled again by the session: RabbitMQ 4.3 gives a
quorum queue's consumer that timed out its deliveries again if its channel settles one of
the taken-back ones, under the cancelled consumer tag.  Such a late delivery is nacked
back to its queue (a nack, not a reject: RabbitMQ 4.3 counts a reject toward a quorum
queue's delivery limit, not a nack).

Acks a lease sends one by one, of its oldest held deliveries in turn, go to the broker as
one ``multiple`` ack for each read of the client's socket (:meth:`Holding.settle`, then
:meth:`Holding.run`): the broker settles them in one step instead of one each.  It is the
same ack, since nothing else up to its tag is held.  Acks go one by one on a channel where
what is held may not be what the broker holds: once the broker took deliveries back (it
may still count them as its own), once a transaction began (a rollback makes the settles it
held back unsettled again) or after a ``basic.recover`` (deliveries already on their way
come with tags the broker no longer holds).  Pure bookkeeping on the worker's loop.
"""

from __future__ import annotations

import logging

from pika.exceptions import ChannelClosedByBroker

from ..common.wire import Flag
from . import amqp

log = logging.getLogger("kzpool.session")


class Holding:
    """One channel's held deliveries, by delivery tag (see the module)."""

    __slots__ = ("acked", "acks", "cancelled", "held", "no_ack", "number", "singly")

    def __init__(self, number: int) -> None:
        self.number = number  # the channel's
        self.held: dict[int, str] = {}  # delivery tag -> consumer tag ("" for a basic.get)
        self.no_ack: set[str] = set()  # consumers whose deliveries need no settle
        self.cancelled: set[str] = set()  # consumers the broker cancelled
        self.singly = False  # acks go one by one from now on (see the module)
        self.acked, self.acks = 0, 0  # acks waiting to go as one: the last tag, how many

    def consuming(self, consumer_tag: str, auto_ack: bool) -> str:
        """A consumer began (a tag the broker cancelled may be used again); its tag."""
        self.cancelled.discard(consumer_tag)
        if auto_ack:
            self.no_ack.add(consumer_tag)
        else:
            self.no_ack.discard(consumer_tag)
        return consumer_tag

    def delivered(self, tag: int, consumer_tag: str) -> None:
        if consumer_tag not in self.no_ack:
            self.held[tag] = consumer_tag

    def got(self, tag: int, auto_ack: bool) -> None:
        """A ``basic.get``'s message (held unless ``auto_ack``)."""
        if not auto_ack:
            self.held[tag] = ""

    def settle(self, tag: int, flags: int, alone: bool = False) -> bytes:
        """The frames that pass the lease's settle of ``tag`` (its wire ``flags``) on to the
        broker; none yet if it is an ack that waits to go with the next (``alone``: it may
        not), the acks waiting first otherwise."""
        held = self.held
        if not (flags or alone or self.singly) and held and next(iter(held)) == tag:
            del held[tag]
            self.acked = tag
            self.acks += 1
            return b""
        multiple = bool(flags & Flag.MULTIPLE)
        self.settled(tag, multiple)
        method = amqp.REJECT if flags & Flag.SETTLE_REJECT else \
            amqp.NACK if flags & Flag.SETTLE_NACK else amqp.ACK
        return self.run() + amqp.settle(self.number, method, tag, multiple,
                                        bool(flags & Flag.REQUEUE))

    def run(self) -> bytes:
        """The frame of the acks waiting to go as one (``multiple`` if more than one)."""
        if not self.acks:
            return b""
        tag, multiple = self.acked, self.acks > 1
        self.acked = self.acks = 0
        return amqp.settle(self.number, amqp.ACK, tag, multiple, False)

    def settled(self, tag: int, multiple: bool) -> None:
        """An ack, nack or reject the lease sent (``multiple``: every tag up to ``tag``;
        with tag 0, every one)."""
        held = self.held
        if not multiple:
            held.pop(tag, None)
        elif not tag:
            held.clear()
        else:
            for done in [t for t in held if t <= tag]:
                del held[done]

    def cancel(self, consumer_tag: str, counters: dict[str, int],
               lease: str) -> tuple[int, ...]:
        """The broker cancelled ``consumer_tag`` of ``lease``: the tags it took back with it
        (counted and logged)."""
        self.cancelled.add(consumer_tag)
        self.no_ack.discard(consumer_tag)
        taken = tuple(tag for tag, ctag in self.held.items() if ctag == consumer_tag)
        for tag in taken:
            del self.held[tag]
        self.singly = self.singly or bool(taken)
        counters["consumers_cancelled"] += 1
        taken_back(counters, lease, taken, f"the broker cancelled consumer {consumer_tag}")
        return taken

    def closed(self, reason: BaseException, counters: dict[str, int],
               lease: str) -> tuple[int, ...]:
        """The channel of ``lease`` closed for ``reason``: the tags the broker took back
        with it if it closed it (counted and logged); none if it was lost otherwise."""
        if not isinstance(reason, ChannelClosedByBroker):
            return ()
        taken = self.take_all()
        taken_back(counters, lease, taken, f"the broker closed the channel ({reason})")
        return taken

    def take_all(self) -> tuple[int, ...]:
        """Every held tag, held no more (the channel is gone, or they were nacked)."""
        taken = tuple(self.held)
        self.held.clear()
        return taken


def taken_back(counters: dict[str, int], lease: str, tags: tuple[int, ...], why: str) -> None:
    """Count and log the deliveries the broker took back from ``lease`` (``why``)."""
    if tags:
        counters["deliveries_taken_back"] += len(tags)
        log.warning("lease %s: %s and took back %d unsettled deliveries (they go back to"
                    " their queue)", lease, why, len(tags))
