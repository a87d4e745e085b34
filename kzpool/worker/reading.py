"""The read side of a session: a lease's client socket read in turn with the others, and
held back in its own client when its share of the way to the broker is full.

Each read's publishes and settles go to the broker together, once the read is handed on
(its acks of the oldest held deliveries in turn as one, :mod:`.holding`), its calls to the
session after what came before them.  Then, if its channel's lane holds its share
(:mod:`.turns`) or a large frame waits for the worker's budget (:mod:`.inbox`), the session
stops reading its socket (the client's sends then wait in its own process, as on a blocked
pika connection) until there is room again.  A frame that does not arrive whole within
:data:`~kzpool.worker.inbox.FRAME_TIME` of reading drops that lease alone.

Not thread-safe: the worker's loop only.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Protocol

from pika.adapters.select_connection import IOLoop

from ..common import messages, wire
from ..common.errors import ProtocolError
from ..common.messages import LeaseEvent
from ..common.sockets import receive
from . import amqp
from .bulk import Bulk, barrier
from .calls import CHANNEL_CLOSED
from .handover import Handover
from .holding import Holding
from .inbox import FRAME_TIME, Frame, Inbox
from .turns import Content, Turns

log = logging.getLogger("kzpool.session")

_PUBLISH, _SETTLE, _JSON = int(wire.Kind.PUBLISH), int(wire.Kind.SETTLE), int(wire.Kind.JSON)
_MANDATORY = wire.Flag.MANDATORY
_NOT_ACK = wire.Flag.SETTLE_NACK | wire.Flag.SETTLE_REJECT


class ReadHost(Protocol):
    """What the read side needs of its session."""

    ioloop: IOLoop
    sock: socket.socket
    fd: int
    lease: str
    number: int
    connection: Any  # a BatchedConnection
    channel: Any  # its own pika channel
    lane: tuple[Any, int]  # where its publishes go: a connection, a channel number
    bulk_channel: Any  # its channel on the bulk connection, while it publishes there
    bulk_ok: bool  # no confirms, transactions or mandatory publishes: it may move there
    writing: bool
    moving: bool
    unsure: bool  # published or settled: the broker may still close the channel
    counters: dict[str, int]
    holding: Holding  # the deliveries the broker holds for it
    handover: Handover | None  # moved: settling what it holds first
    outbox: Any  # its way to the client (:mod:`.outbox`): ``reading`` while it has room

    @property
    def bulk(self) -> Bulk: ...

    @property
    def done(self) -> bool: ...

    def watch(self) -> None: ...  # its socket watched for what both sides want

    def request(self, payload: bytes) -> None: ...  # a JSON frame

    def event(self, message: messages.Message) -> None: ...

    def on_channel_closed(self, reason: BaseException) -> None: ...

    def publish_content(self, flags: int, properties: bytes) -> bool: ...

    def end(self, how: LeaseEvent, why: str, answer: bool = False) -> None: ...


class Reading:
    def __init__(self, session: ReadHost) -> None:
        self.session = session
        self.budget = session.connection.turns.budget
        self.inbox = Inbox(self.budget, self._room)
        self.events = IOLoop.READ  # what the session's socket is watched for, besides WRITE
        self.timer: object | None = None
        self.switching = False  # its publishes moving to or from the bulk connection
        self.stash: list[Frame] = []  # frames read, waiting for the move back
        self.out: list[bytes] = []  # frames for the broker of the read under way

    @property
    def held(self) -> bool:
        return not self.events

    @property
    def turns(self) -> Turns:
        turns: Turns = self.session.lane[0].turns
        return turns

    def on_readable(self) -> None:
        session = self.session
        if self.held:  # a hang-up is reported even unasked: see whether the client left
            if receive(session.sock, 1, socket.MSG_PEEK) == b"":
                self._gone()
            return
        frames = self.inbox.read(session.sock)
        if frames is None:
            self._gone()
        elif self._dispatch(frames):
            self._after_read()

    def _dispatch(self, frames: list[Frame]) -> bool:
        """Hand ``frames`` on; ``False``: the session ended, or waits for its move back."""
        session = self.session
        try:
            for at, (kind, flags, payload, reserved) in enumerate(frames):
                if session.bulk_channel is not None and (
                        kind == _JSON or (flags & wire.Flag.MANDATORY and kind == _PUBLISH)):
                    self.stash = frames[at:]  # a call, or a return to wait for: back first
                    self._to_main()
                    return False
                if kind == _SETTLE:
                    self._settle(wire.read_tag(bytes(payload)), flags)
                elif kind == _PUBLISH and not reserved:
                    self._publish(flags, bytes(payload))
                elif kind == _PUBLISH:
                    self.pass_on()
                    self._content(flags, payload, reserved)
                elif kind == _JSON:
                    self.pass_on()  # what the read had before it goes first
                    session.request(bytes(payload))
                    if reserved:
                        self.budget.unreserve(reserved)
                else:
                    raise ProtocolError(f"unexpected frame kind {kind} from a client")
                if session.done:
                    return False
        except (ProtocolError, TypeError, ValueError, KeyError, AttributeError) as exc:
            # whatever a client sends, it must not take the worker down: drop that client
            log.warning("lease %s: dropping the client: %s", session.lease, exc)
            session.end(LeaseEvent.RELEASED, f"protocol error: {exc}")
            return False
        finally:
            if not session.done:
                self.pass_on()
        return True

    def _publish(self, flags: int, payload: bytes) -> None:
        """A client's publish, its properties checked and passed on as they are."""
        session = self.session
        names, properties, start = wire.read_publish_head(payload)
        if session.publish_content(flags, properties):
            connection, number = session.lane
            frames = amqp.publish(number, names, properties, memoryview(payload)[start:],
                                  bool(flags & _MANDATORY), connection.body_max)
            if connection is not session.connection:  # the bulk connection's
                connection.send_raw(frames)
                return
            self._end_acks()
            self.out.append(frames)

    def _settle(self, tag: int, flags: int) -> None:
        session = self.session
        if not session.channel.is_open:
            session.event(messages.Error(CHANNEL_CLOSED))
            return
        session.unsure = True  # an unknown tag closes the channel, later
        session.counters["acks"] += not flags & _NOT_ACK
        handover = session.handover
        frames = session.holding.settle(tag, flags, alone=handover is not None)
        if frames:  # an ack may wait for the acks read after it (:mod:`.holding`)
            self.out.append(frames)
        if handover is not None:
            self.pass_on()
            handover.check()

    def pass_on(self) -> None:
        """What the read brought for the broker, sent at once: its publishes and settles in
        order, the acks that waited among them as one."""
        self._end_acks()
        if self.out:
            out, self.out = self.out, []
            if self.session.channel.is_open:
                self.session.connection.send_raw(b"".join(out))

    def _end_acks(self) -> None:
        """The acks waiting to go as one, next in line (what comes after follows them)."""
        if self.session.holding.acks:
            self.out.append(self.session.holding.run())

    def close(self) -> None:
        """The session ends (its bulk channel closes behind what it published there)."""
        self.inbox.close()
        self.turns.forget(self.session.lane[1])
        channel, self.session.bulk_channel = self.session.bulk_channel, None
        if channel is not None and channel.is_open:
            channel.close()
        if self.timer is not None:
            self.session.ioloop.remove_timeout(self.timer)
            self.timer = None

    def _gone(self) -> None:
        session = self.session
        session.end(LeaseEvent.MOVED if session.moving else LeaseEvent.RELEASED, "client closed")

    def _content(self, flags: int, payload: bytes | bytearray, reserved: int) -> None:
        """A large publish: sent to the broker from its own buffer, a frame at a time."""
        try:
            names, properties, start = wire.read_publish_head(payload)
            sent = self.session.publish_content(flags, properties)
        except Exception:
            self.budget.unreserve(reserved)
            raise
        if not sent:
            self.budget.unreserve(reserved)
            return
        connection, number = self.session.lane
        head = amqp.publish_head(number, names, properties, len(payload) - start,
                                 bool(flags & _MANDATORY))
        connection.send_content(Content(number, head, memoryview(payload)[start:],
                                        connection.body_max, reserved))

    def _after_read(self) -> None:
        session = self.session
        over = self.turns.over(session.lane[1])
        if over and session.bulk_ok and session.bulk_channel is None and not self.switching:
            self._to_bulk()
        elif over or self.inbox.stalled:
            if over:
                self.turns.wait(session.lane[1], self._room)
            self._watch(0)
        if self.inbox.partial and self.timer is None:
            self.timer = session.ioloop.call_later(1.0, self._check_frame)

    def _room(self) -> None:
        """The lane has room again, or the budget may: read again (in the next loop pass)."""
        self.session.ioloop.call_later(0, self._again)

    def _again(self) -> None:
        if self.session.done or not self.held or self.switching:
            return
        if self.turns.over(self.session.lane[1]):
            self.turns.wait(self.session.lane[1], self._room)
            return
        self._watch(IOLoop.READ)
        self.inbox.restart_clock()
        if self.session.outbox.reading:  # else it reads on once its client has read
            self.on_readable()

    # ----- to the bulk connection and back (:mod:`.bulk`) --------------------------------

    def _to_bulk(self) -> None:
        self.switching = True
        self._watch(0)
        self.session.bulk.channel(self._bulk_ready, self._bulk_closed)

    def _bulk_ready(self, channel: Any) -> None:
        session = self.session
        if channel is None or session.done or not session.channel.is_open:
            if channel is not None:
                channel.close()
            session.bulk_ok = False  # it stays on its own channel
            self._switched()
            return
        barrier(session.channel, lambda: self._in_bulk(channel))

    def _in_bulk(self, channel: Any) -> None:
        session = self.session
        if session.done or not channel.is_open:
            if channel.is_open:
                channel.close()
            session.bulk_ok = False
        else:
            log.debug("lease %s publishes on the bulk connection", session.lease)
            session.lane, session.bulk_channel = (channel.connection, channel.channel_number), \
                channel
        self._switched()

    def _to_main(self) -> None:
        self.switching = True
        self._watch(0)
        barrier(self.session.bulk_channel, self._back)

    def _back(self) -> None:
        session = self.session
        channel, session.bulk_channel = session.bulk_channel, None
        session.lane = (session.connection, session.number)
        if channel is not None and channel.is_open:
            channel.close()
        frames, self.stash = self.stash, []
        self.switching = False
        if not session.done and self._dispatch(frames):
            self._watch(IOLoop.READ)
            self._after_read()

    def _switched(self) -> None:
        self.switching = False
        self._room()

    def _bulk_closed(self, channel: Any, reason: BaseException) -> None:
        """The broker closed the lease's bulk channel (or the bulk connection went)."""
        session = self.session
        if session.bulk_channel is channel and not session.done:
            session.on_channel_closed(reason)

    def _watch(self, events: int) -> None:
        self.events = events
        self.session.watch()  # with what the way to its client wants (:mod:`.outbox`)

    def _check_frame(self) -> None:
        self.timer = None
        session = self.session
        if session.done:
            return
        if not self.held and self.inbox.late(time.monotonic()):
            log.warning("lease %s: dropping the client: no whole frame within %g s",
                        session.lease, FRAME_TIME)
            session.end(LeaseEvent.RELEASED, f"protocol error: no whole frame within "
                                             f"{FRAME_TIME:g} s")
        elif self.inbox.partial:
            self.timer = session.ioloop.call_later(1.0, self._check_frame)
