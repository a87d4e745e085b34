"""Deliveries the broker took back from a lease, so that settling one raises in its caller.

The broker takes a lease's unsettled deliveries back when it cancels their consumer
(RabbitMQ 4.x does so for a quorum queue's consumer timeout; any version when the queue is
deleted) or closes their channel (RabbitMQ 3.x's answer to a consumer timeout: ``406
PRECONDITION_FAILED - delivery acknowledgement on channel N timed out``), and delivers them
again.  An ack of one of them would do nothing, quietly: the task it finished will run
again.  The worker names the tags it took back in its ``cancelled`` and ``lost`` events;
:class:`TakenBack` keeps them (as the lease shows them), and :meth:`TakenBack.check` turns a
settle of one into a :class:`~kzpool.common.errors.DeliveryTakenBack` (the asyncio twin
raises its own class of the same name).  A channel the pool itself gives up (a move, the
broker lost) takes nothing back in this sense: the lease moves, and a settle of a tag of
the old channel is dropped as before.  Pure, not thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECONDITION_FAILED = 406
LIMIT = 100_000  # tags kept at most (the oldest go first): a lease that never settles them


@dataclass(frozen=True, slots=True)
class Why:
    """Why a delivery was taken back: the consumer the broker cancelled, or the broker's
    reply code and text when it closed the channel."""

    consumer_tag: str
    code: int = PRECONDITION_FAILED
    text: str = ""

    def describe(self, tag: int) -> str:
        if self.text:
            cause = f"the broker closed its channel: {self.code} {self.text}"
        else:
            cause = (f"the broker cancelled its consumer {self.consumer_tag!r} (a consumer"
                     " timeout elapsed, or its queue was deleted)")
        return (f"PRECONDITION_FAILED - delivery {tag} is no longer held by the broker: {cause};"
                " it goes back to its queue, to be delivered again, and this settle did"
                " nothing (a long task: raise the lease's consumer_timeout)")


class TakenBack:
    """The tags taken back, as the lease's owner knows them."""

    __slots__ = ("tags",)

    def __init__(self) -> None:
        self.tags: dict[int, Why] = {}

    def add(self, tags: tuple[int, ...], base: int, why: Why) -> None:
        """``tags`` of the current channel (shown to the owner as tag + ``base``)."""
        for tag in tags:
            self.tags[tag + base] = why
        while len(self.tags) > LIMIT:
            del self.tags[next(iter(self.tags))]

    def check(self, tag: int, multiple: bool) -> tuple[int, Why] | None:
        """A settle of ``tag`` (``multiple``: every tag up to it; with 0, every one): the
        first taken-back tag it covers, and why, or ``None``; those it covers are
        forgotten (a second settle of one does not raise again)."""
        tags = self.tags
        if not tags:
            return None
        if not multiple:
            why = tags.pop(tag, None)
            return None if why is None else (tag, why)
        covered = [t for t in tags if not tag or t <= tag]
        if not covered:
            return None
        first = min(covered)
        found = (first, tags[first])
        for t in covered:
            del tags[t]
        return found
