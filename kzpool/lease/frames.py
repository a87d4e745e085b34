"""What a worker's frames mean to a lease, for every client: the dispatch that does no I/O.

:class:`Frames` turns each frame read on a lease's socket into what it is for: a delivery
(its tag made unique across channels, :class:`~.state.TagMap`) or a ``basic.get``'s message, a
confirm (:mod:`.confirms`), a returned message (matched to the publish it fails), or one of
the worker's JSON events (a reply, the lease bound, cancelled by the broker, lost, moved,
blocked, refused), with the deliveries the broker took back (:mod:`.takeback`).  What each
becomes for the caller is the :class:`FrameSink`'s: the blocking link makes pika's objects,
the asyncio one aio-pika's.  Pure: no I/O (a move asked for is answered through the sink's
``send``), not thread-safe.
"""

from __future__ import annotations

import logging
from time import monotonic as _monotonic
from typing import Any, Protocol

from ..common import messages, wire
from ..common.errors import KzpoolError
from ..common.messages import Reason, Reply
from ..common.wire import Flag, Kind
from .state import LeaseState
from .takeback import Why

_DELIVER, _CONFIRM, _RETURN, _JSON = map(int, (Kind.DELIVER, Kind.CONFIRM, Kind.RETURN,
                                               Kind.JSON))
_GET, _REDELIVERED = int(Flag.GET), int(Flag.REDELIVERED)
REDIRECTED = Reason("Redirect", 0, "ask the master")
MOVED = Reason("Moved", 0, "moved to the primary")


def ends_close(kind: int, payload: bytes) -> bool:
    """A frame a closing lease waits for: the worker's answer to its close
    (:class:`~kzpool.common.messages.Closed`: the broker confirmed the channel's close), or
    the channel lost meanwhile (which requeues as much).  Other frames mean nothing now."""
    if kind != _JSON:
        return False
    try:
        op = wire.read_document(payload).get("op")
    except KzpoolError:
        return True  # a worker that speaks nonsense is as good as gone
    return op in (messages.Closed.OP, messages.Lost.OP)


class FrameSink(Protocol):
    """What the frames of one bound socket tell it."""

    @property
    def accepting(self) -> bool:
        """Deliveries still count (``False`` once the channel is lost: the broker gives
        them again on the next)."""
        ...

    def delivered(self, tag: int, redelivered: bool, consumer_tag: str, exchange: str,
                  routing_key: str, encoded: bytes, body: bytes) -> None: ...

    def got(self, tag: int, redelivered: bool, exchange: str, routing_key: str,
            encoded: bytes, body: bytes, count: int) -> None:
        """A ``basic.get``'s message; its reply follows."""

    def returned(self, code: int, text: str, exchange: str, routing_key: str,
                 encoded: bytes, body: bytes) -> Any:
        """A returned message: the object a waiting publish's confirm fails with."""

    def unclaimed(self, code: int, text: str) -> None:
        """The message just returned was no unconfirmed publish's."""

    def replied(self, reply: Reply) -> None: ...

    def leased(self, event: messages.Leased) -> None: ...

    def cancelled(self, consumer_tag: str) -> None:
        """The broker cancelled a consumer (its queue deleted), after its last delivery."""

    def lost(self, reason: Reason) -> None: ...

    def send(self, data: bytes) -> None: ...

    def set_blocked(self, blocked: bool) -> None: ...

    def refused(self, event: messages.Refused) -> None: ...


class Frames:
    """The frames of one bound socket of the lease whose ``state`` it is, for ``sink``;
    ``log`` hears the worker's warnings."""

    __slots__ = ("confirms", "log", "sink", "state", "tags")

    def __init__(self, sink: FrameSink, state: LeaseState, log: logging.Logger) -> None:
        self.sink, self.state, self.log = sink, state, log
        self.tags, self.confirms = state.tags, state.confirms

    def process(self, kind: int, flags: int, payload: bytes) -> None:
        self.state.read_at = _monotonic()
        if kind == _DELIVER:
            self._deliver(flags, payload)
        elif kind == _CONFIRM:
            self.confirms.confirmed(wire.read_tag(payload), flags)
        elif kind == _RETURN:
            code, text, exchange, routing_key, encoded, body = wire.read_return(payload)
            message = self.sink.returned(code, text, exchange, routing_key, encoded, body)
            if not self.confirms.returned(exchange, routing_key, message):
                self.sink.unclaimed(code, text)
        elif kind == _JSON:
            self.event(messages.decode(payload, messages.TO_CLIENT))

    def _deliver(self, flags: int, payload: bytes) -> None:
        tag, count, ctag, exchange, routing_key, encoded, body = wire.read_deliver(payload)
        sink = self.sink
        if not sink.accepting:
            return  # the broker redelivers it on the new channel
        tag = self.tags.shown(tag)
        redelivered = bool(flags & _REDELIVERED)
        if flags & _GET:
            sink.got(tag, redelivered, exchange, routing_key, encoded, body, count)
        else:
            sink.delivered(tag, redelivered, ctag, exchange, routing_key, encoded, body)

    def event(self, event: messages.Message) -> None:
        sink = self.sink
        match event:
            case Reply():
                sink.replied(event)
            case messages.Leased():
                sink.leased(event)
            case messages.Cancelled(consumer_tag=tag, taken_back=taken):
                if taken:
                    self.state.taken_back.add(taken, self.tags.base, Why(tag))
                sink.cancelled(tag)
            case messages.Redirect():
                sink.lost(REDIRECTED)
            case messages.Lost(reason=reason, taken_back=taken):
                if taken:
                    self.state.taken_back.add(taken, self.tags.base,
                                              Why("", reason.code, reason.text))
                sink.lost(reason)
            case messages.Move():
                sink.send(messages.encode(messages.Bye()))
                sink.lost(MOVED)
            case messages.Blocked():
                sink.set_blocked(True)
            case messages.Unblocked():
                sink.set_blocked(False)
            case messages.Error(error=error):
                self.log.warning("lease %s: %s", self.state.id, error.text)
            case messages.Refused():
                sink.refused(event)
