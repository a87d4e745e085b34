"""A lease the master moves (fail-back to the primary, a client over a limit): handed over
once what it holds is settled, so that the move gives no message back to its queue.

A channel closed with deliveries unsettled gives them back to their queues, and RabbitMQ
4.x counts that toward a quorum queue's delivery limit (20 by default): a message moved
that often is dropped or dead-lettered.  So a move first cancels the lease's consumers
(their deliveries in flight still reach the client), and lets the client, which is not
told yet, settle what it holds on the channel it has, for up to ``[pool] move_grace``
seconds.  Then what is still held is nacked back to its queue (RabbitMQ 4.3 does not count
a nack toward the delivery limit, unlike a reject or a closed channel), the client is told
to move, and its ``bye`` is waited for.  Runs on the worker's loop.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..common import messages
from ..common.messages import LeaseEvent, Message
from . import amqp
from .holding import Holding

BYE_GRACE = 5.0  # seconds a client told to move may take to say bye


class Moving(Protocol):
    """What a move needs of the lease's session."""

    channel: Any
    connection: Any  # its BatchedConnection
    ioloop: Any
    number: int
    consumers: set[str]
    holding: Holding
    moving: bool

    @property
    def ended(self) -> Any: ...

    def event(self, message: Message) -> None: ...

    def end(self, how: LeaseEvent, why: str) -> None: ...


class Handover:
    """The move of ``session``, begun when made (see the module)."""

    __slots__ = ("session",)

    def __init__(self, session: Moving, grace: float) -> None:
        self.session = session
        channel = session.channel
        for tag in list(getattr(channel, "consumer_tags", [])):
            channel.basic_cancel(tag, callback=self._cancel_ok)
        session.ioloop.call_later(grace, self.hand_over)
        self.check()

    def _cancel_ok(self, frame: Any) -> None:
        self.session.consumers.discard(str(frame.method.consumer_tag))  # nothing follows it
        self.check()

    def check(self) -> None:
        """Hand the lease over once nothing is held, and no consumer can deliver more."""
        session = self.session
        if not session.consumers and not session.holding.held:
            self.hand_over()

    def hand_over(self) -> None:
        session = self.session
        if session.moving or session.ended is not None:
            return
        session.moving = True
        if session.holding.take_all() and session.channel.is_open:
            session.connection.send_raw(amqp.settle(session.number, amqp.NACK, 0, True, True))
        session.consumers.clear()
        session.event(messages.Move())
        session.ioloop.call_later(BYE_GRACE,
                                  lambda: session.end(LeaseEvent.MOVED, "no bye in time"))
