"""kzpool's JSON messages: every JSON frame one kzpool process sends another, declared once.

A message is a frozen dataclass; its class says its ``op`` (the JSON key that names it) and
its fields are the other keys.  :func:`encode` makes a JSON frame of one; :func:`decode`
reads a frame's payload against the ops one end of a link accepts, checks every field's
type, and raises :class:`~kzpool.common.errors.ProtocolError` naming what is wrong.  Readers
dispatch on the class with ``match``.  The frame around the JSON is :mod:`kzpool.common.wire`;
the field checks are :mod:`kzpool.common.codec`'s.

Who sends what:

==========================  ===========================================================
link                        messages
==========================  ===========================================================
master → worker             :class:`Role`, :class:`ReportNow`, :class:`Adopt` (with the
                            client's fd), :class:`MoveLease`
worker → master             :class:`Report`, :class:`Beat`, :class:`LeaseNews`
client → master or worker   :class:`LeaseRequest`; to the master also :class:`Ping`,
                            :class:`StatusRequest`, :class:`BrokersRequest`
client → worker (bound)     :class:`Call`, :class:`Consume`, :class:`ConfirmSelect`,
                            :class:`Get`, :class:`Bye`, :class:`Close`
worker → client             :class:`Leased`, :class:`Redirect`, :class:`Lost`,
                            :class:`Move`, :class:`Blocked`, :class:`Unblocked`,
                            :class:`Error`, :class:`Reply`, :class:`Cancelled`,
                            :class:`Closed` (the answer to :class:`Close`)
master or worker → client   :class:`Refused` (then the socket is closed)
==========================  ===========================================================

Answers to ``ping``, ``status`` and ``brokers`` are documents (the status JSON), not
messages: ``{"ok": true, ...}``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .codec import build, to_wire
from .errors import KzpoolError, ProtocolError, refusal_error
from .options import LeaseOptions
from .wire import document, lease_id, read_document


class LeaseEvent(enum.Enum):
    """What became of a lease on a worker, as the worker tells the master."""

    ASSIGNED = "assigned"  # bound to a channel
    RELEASED = "released"  # the client closed the lease or died
    LOST = "lost"  # channel or connection lost; the client will resume elsewhere
    MOVED = "moved"  # the master moved it; the client resumes on the new broker


FORCED = 320  # AMQP's CONNECTION_FORCED: the broker closed the connection on purpose


class Message:
    """Base of every message; ``OP`` is its ``op`` on the wire."""

    OP: ClassVar[str] = ""


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a channel was lost or a call failed (``class`` on the wire is ``kind`` here)."""

    kind: str = field(metadata={"wire": "class"})
    code: int = 0
    text: str = ""

    @property
    def channel_error(self) -> bool:
        """The broker closed the channel because of something the client did."""
        return self.kind == "ChannelClosedByBroker" and self.code > 0

    @property
    def connection_error(self) -> bool:
        """The broker closed the whole connection for a fault of a call on it (503
        ``COMMAND_INVALID``, 540 ``NOT_IMPLEMENTED``, ...), not because it was told to close
        it (320 ``CONNECTION_FORCED``: the broker stopping, an operator)."""
        return self.kind == "ConnectionClosedByBroker" and self.code not in (0, FORCED)


# ----- master → worker ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Role(Message):
    OP = "role"
    primary: bool


@dataclass(frozen=True, slots=True)
class ReportNow(Message):
    OP = "report"


@dataclass(frozen=True, slots=True)
class Adopt(Message):
    """A client's socket rides along (SCM_RIGHTS): bind it to a channel for ``lease``."""

    OP = "adopt"
    lease: str
    options: LeaseOptions


@dataclass(frozen=True, slots=True)
class MoveLease(Message):
    OP = "move"
    lease: str


# ----- worker → master ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Report(Message):
    OP = "report"
    state: str
    since: float
    error: str | None = None
    blocked: bool = False
    full: bool = False  # the connection reached channel_max
    counters: dict[str, Any] = field(default_factory=dict)
    prechannels: int = 0
    channels: int = 0


@dataclass(frozen=True, slots=True)
class Beat(Message):
    OP = "beat"


@dataclass(frozen=True, slots=True)
class LeaseNews(Message):
    OP = "lease"
    event: LeaseEvent
    lease: str
    channel: int | None = None
    options: LeaseOptions | None = None  # assigned: the lease's, whichever way it came
    client_pid: int = 0
    client_uid: int = -1  # from the socket's peer credentials; -1: not known


# ----- client → master or worker -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LeaseRequest(Message):
    """A new lease, or the resume of ``lease`` after its channel was lost."""

    OP = "lease"
    options: LeaseOptions = field(default_factory=LeaseOptions)
    lease: str | None = None
    wait: float = 10.0  # seconds the client waits for the answer

    def __post_init__(self) -> None:
        lease_id(self.lease)


@dataclass(frozen=True, slots=True)
class Ping(Message):
    OP = "ping"


@dataclass(frozen=True, slots=True)
class StatusRequest(Message):
    OP = "status"


@dataclass(frozen=True, slots=True)
class BrokersRequest(Message):
    OP = "brokers"


# ----- client → worker, on a bound lease ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class Call(Message):
    """A synchronous channel method (``exchange_declare``, ``queue_bind``, ...)."""

    OP = "call"
    id: int
    method: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Consume(Message):
    OP = "consume"
    id: int
    method: str = "basic_consume"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConfirmSelect(Message):
    OP = "confirm"
    id: int
    method: str = "confirm_delivery"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Get(Message):
    OP = "get"
    id: int
    method: str = "basic_get"
    args: dict[str, Any] = field(default_factory=dict)


Request = Call | Consume | ConfirmSelect | Get
REQUESTS: dict[str, type[Call] | type[Consume] | type[ConfirmSelect] | type[Get]] = {
    cls.OP: cls for cls in (Call, Consume, ConfirmSelect, Get)}


@dataclass(frozen=True, slots=True)
class Bye(Message):
    """The client heard :class:`Move` and lets go of the channel."""

    OP = "bye"


@dataclass(frozen=True, slots=True)
class Close(Message):
    """The client gives the channel back; if the worker closes it (rather than handing it
    to the next lease), it closes it with this code and text."""

    OP = "close"
    reply_code: int = 0
    reply_text: str = "Normal shutdown"


# ----- worker → client ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Leased(Message):
    OP = "leased"
    lease: str
    broker: str  # password masked
    zone: str
    channel: int
    worker: int  # pid
    blocked: bool = False
    route: str | None = None  # the worker's own socket: the next lease asks there first


@dataclass(frozen=True, slots=True)
class Redirect(Message):
    """This worker will not serve the request: ask the master."""

    OP = "redirect"


@dataclass(frozen=True, slots=True)
class Lost(Message):
    """The lease's channel is gone; ``taken_back``: the delivery tags of that channel the
    broker took back with it when it closed the channel (unsettled, to be delivered again)."""

    OP = "lost"
    reason: Reason
    taken_back: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Move(Message):
    """The master moves the lease (fail-back): say :class:`Bye` and resume."""

    OP = "move"


@dataclass(frozen=True, slots=True)
class Blocked(Message):
    OP = "blocked"


@dataclass(frozen=True, slots=True)
class Unblocked(Message):
    OP = "unblocked"


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A publish or settle the broker refused; nothing waits for it."""

    OP = "error"
    error: Reason


@dataclass(frozen=True, slots=True)
class Closed(Message):
    """The answer to :class:`Close`: the channel is closed (the broker confirmed it, so its
    unacked deliveries are back in their queues), or it was handed on clean; the worker then
    closes the socket."""

    OP = "closed"


@dataclass(frozen=True, slots=True)
class Cancelled(Message):
    """The broker cancelled consumer ``consumer_tag`` (its queue was deleted, or a consumer
    timeout elapsed); it comes after every delivery the consumer got before.
    ``taken_back``: the delivery tags of that consumer the broker took back with it
    (unsettled, to be delivered again)."""

    OP = "cancelled"
    consumer_tag: str
    taken_back: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply(Message):
    """The answer to request ``id``: a method and its fields, or an error."""

    OP = "reply"
    id: int
    method: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    error: Reason | None = None


@dataclass(frozen=True, slots=True)
class Refused(Message):
    """Why the pool turns a request away (``code`` is an error's stable code)."""

    OP = "refused"
    code: str
    error: str
    setting: str | None = None  # the [pool] setting whose limit was met, if one was

    @classmethod
    def of(cls, error: KzpoolError) -> Refused:
        return cls(error.code, str(error), getattr(error, "setting", None))

    def exception(self) -> KzpoolError:
        """The error this refusal names, as the client raises it."""
        return refusal_error(self.code, self.error, self.setting)


# ----- which end accepts what -------------------------------------------------------------

Accepts = dict[str, type[Message]]


def accepts(*classes: type[Message]) -> Accepts:
    return {cls.OP: cls for cls in classes}


TO_WORKER_FROM_MASTER = accepts(Role, ReportNow, Adopt, MoveLease)
TO_MASTER_FROM_WORKER = accepts(Report, Beat, LeaseNews)
TO_MASTER_FROM_CLIENT = accepts(LeaseRequest, Ping, StatusRequest, BrokersRequest)
TO_WORKER_FROM_CLIENT = accepts(LeaseRequest)
TO_SESSION = accepts(Call, Consume, ConfirmSelect, Get, Bye, Close)
TO_CLIENT = accepts(Leased, Redirect, Lost, Move, Blocked, Unblocked, Error, Reply, Refused,
                    Cancelled, Closed)


# ----- encoding and decoding --------------------------------------------------------------

def encode(message: Message) -> bytes:
    """One JSON frame."""
    return document(to_wire(message))


def decode(payload: bytes, accepted: Accepts) -> Message:
    """The message in a JSON payload, if its op is one of ``accepted`` and its fields check."""
    return from_wire(read_document(payload), accepted)


def from_wire(obj: dict[str, Any], accepted: Accepts) -> Message:
    op = obj.get("op")
    cls = accepted.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"unexpected message {str(op)[:40]!r} (expected one of"
                            f" {', '.join(accepted)})")
    return build(cls, obj, str(op))
