"""The read side of a session: a lease's client socket read in turn with the others, and
held back in its own client when its share of the way to the broker is full.

After each read the session's frames are handed on (:meth:`ReadHost.dispatch`); then, if
its channel's lane holds its share (:mod:`.turns`) or a large frame waits for the worker's
budget (:mod:`.inbox`), the session stops reading its socket (the client's sends then wait
in its own process, as on a blocked pika connection) until there is room again.  A frame
that does not arrive whole within :data:`~kzpool.worker.inbox.FRAME_TIME` of reading drops
that lease alone.

Not thread-safe: the worker's loop only.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Protocol

from pika.adapters.select_connection import IOLoop

from ..common import wire
from ..common.errors import ProtocolError
from ..common.messages import LeaseEvent
from ..common.sockets import receive
from . import amqp
from .inbox import FRAME_TIME, Inbox
from .turns import Content

log = logging.getLogger("kzpool.session")

_PUBLISH = int(wire.Kind.PUBLISH)
_PUBLISH_HEAD = 1 + 255 + 1 + 255 + 2 + 65535  # a publish's names and properties, at most


class ReadHost(Protocol):
    """What the read side needs of its session."""

    ioloop: IOLoop
    sock: socket.socket
    fd: int
    lease: str
    number: int
    connection: Any  # a BatchedConnection
    writing: bool
    moving: bool

    @property
    def done(self) -> bool: ...

    def dispatch(self, kind: int, flags: int, payload: bytes) -> None: ...

    def publish_content(self, flags: int, exchange: str, routing_key: str,
                        properties: bytes) -> bool: ...

    def end(self, how: LeaseEvent, why: str, answer: bool = False) -> None: ...


class Reading:
    def __init__(self, session: ReadHost) -> None:
        self.session = session
        self.turns = session.connection.turns
        self.inbox = Inbox(self.turns, self._room)
        self.events = IOLoop.READ  # what the session's socket is watched for, besides WRITE
        self.timer: object | None = None

    @property
    def held(self) -> bool:
        return not self.events

    def on_readable(self) -> None:
        session = self.session
        if self.held:  # a hang-up is reported even unasked: see whether the client left
            if receive(session.sock, 1, socket.MSG_PEEK) == b"":
                self._gone()
            return
        try:
            frames = self.inbox.read(session.sock)
            if frames is None:
                self._gone()
                return
            for kind, flags, payload, reserved in frames:
                if reserved and kind == _PUBLISH:
                    self._content(flags, payload, reserved)
                else:
                    session.dispatch(kind, flags, bytes(payload))
                    if reserved:
                        self.turns.unreserve(reserved)
                if session.done:
                    return
        except (ProtocolError, TypeError, ValueError, KeyError, AttributeError) as exc:
            # whatever a client sends, it must not take the worker down: drop that client
            log.warning("lease %s: dropping the client: %s", session.lease, exc)
            session.end(LeaseEvent.RELEASED, f"protocol error: {exc}")
            return
        self._after_read()

    def close(self) -> None:
        """The session ends."""
        self.inbox.close()
        self.turns.forget(self.session.number)
        if self.timer is not None:
            self.session.ioloop.remove_timeout(self.timer)
            self.timer = None

    def _gone(self) -> None:
        session = self.session
        session.end(LeaseEvent.MOVED if session.moving else LeaseEvent.RELEASED, "client closed")

    def _content(self, flags: int, payload: bytes | bytearray, reserved: int) -> None:
        """A large publish: sent to the broker from its own buffer, a frame at a time."""
        view = memoryview(payload)
        try:
            cursor = wire.Cursor(bytes(view[:_PUBLISH_HEAD]))
            exchange, routing_key, properties = cursor.str8(), cursor.str8(), cursor.props()
            sent = self.session.publish_content(flags, exchange, routing_key, properties)
        except Exception:
            self.turns.unreserve(reserved)
            raise
        if not sent:
            self.turns.unreserve(reserved)
            return
        connection, number = self.session.connection, self.session.number
        head = amqp.publish_head(number, exchange, routing_key, properties,
                                 len(payload) - cursor.pos, bool(flags & wire.Flag.MANDATORY))
        connection.send_content(Content(number, head, view[cursor.pos:], connection.body_max,
                                        reserved))

    def _after_read(self) -> None:
        over = self.turns.over(self.session.number)
        if over or self.inbox.stalled:
            if over:
                self.turns.wait(self.session.number, self._room)
            self._watch(0)
        if self.inbox.partial and self.timer is None:
            self.timer = self.session.ioloop.call_later(1.0, self._check_frame)

    def _room(self) -> None:
        """The lane has room again, or the budget may: read again (in the next loop pass)."""
        self.session.ioloop.call_later(0, self._again)

    def _again(self) -> None:
        if self.session.done or not self.held:
            return
        if self.turns.over(self.session.number):
            self.turns.wait(self.session.number, self._room)
            return
        self._watch(IOLoop.READ)
        self.inbox.restart_clock()
        self.on_readable()

    def _watch(self, events: int) -> None:
        session = self.session
        self.events = events
        session.ioloop.update_handler(session.fd,
                                      events | (IOLoop.WRITE if session.writing else 0))

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
