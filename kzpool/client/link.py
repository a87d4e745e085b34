"""How a lease keeps a channel: its link to the worker that owns the channel.

Frames in and out (:mod:`kzpool.common.wire`), replies, deliveries, confirms, returns and
the broker's cancels, and moves: when the channel is lost (broker down, worker killed, moved
back to the primary) the link gets a new one (:mod:`.acquire`), replays the topology and
re-sends unconfirmed publishes before the next call.  Delivery tags stay unique across
moves (:mod:`.tags`).

What the caller did wrong stays with the caller: a call the broker answers by closing the
channel raises :class:`ChannelClosedByBroker`; one it answers by closing the whole
connection raises :class:`ConnectionClosedByBroker` in the lease that had it in flight, and
neither is sent again.  While the broker blocks the connection (flow control), a wait for a
reply or a confirm raises :class:`ConnectionBlockedTimeout` once it has waited the lease's
``timeout``.

The link hands what it reads to :class:`Hooks`: each delivery, cancel and return, and
``on_lost()`` when the deliveries read so far are void.

Hazards: not thread-safe (one lease per thread); every wait blocks its caller; nothing runs
in the background, so confirms and events are read while the owner is inside a lease call
or a dispatcher.  An exception raised by the caller's signal handler while the link sends
cuts the frame stream: the channel is given up (the next call gets a new one) and the
exception goes on to the caller.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pika import spec
from pika.adapters.blocking_connection import ReturnedMessage

from ..common import messages, props, wire
from ..common.errors import (
    ChannelClosedByBroker,
    ConnectionBlockedTimeout,
    ConnectionClosedByBroker,
    KzpoolError,
    LeaseClosed,
    LeaseTimeout,
)
from ..common.messages import Message, Reason, Reply
from ..common.wire import Flag, Kind
from .acquire import Acquiring, Loss
from .backend import Pool, route_key
from .confirms import ConfirmBook
from .replies import error_of
from .sockio import readable, receive
from .tags import TagMap
from .topology import Topology

log = logging.getLogger("kzpool.lease")

READ_SIZE = 256 << 10
SETTLE_BATCH = 64  # acks sent together at most
_DELIVER, _CONFIRM, _RETURN, _JSON = map(int, (Kind.DELIVER, Kind.CONFIRM, Kind.RETURN,
                                               Kind.JSON))
WORKER_GONE = Reason("ConnectionClosed", 0, "worker gone")
INTERRUPTED = Reason("Interrupted", 0, "interrupted while sending")
Delivery = tuple[Any, Any, bytes]


@dataclass(frozen=True)
class Hooks:
    """What the link tells its lease."""

    on_move: Callable[[str | None, str, dict[str, str]], None]
    on_delivery: Callable[[Delivery], None]
    on_cancelled: Callable[[str], None]
    on_returned: Callable[[ReturnedMessage], None]
    on_lost: Callable[[], None]


class LeaseLink(Acquiring):
    def __init__(self, pool: Pool, kind: str, zone: str | None, broker: str | None,
                 timeout: float, hooks: Hooks, federates: str | None = None,
                 handed: socket.socket | None = None,
                 abort: Callable[[], bool] | None = None) -> None:
        self.pool = pool
        self.kind = kind
        self.zone = zone
        self.timeout = timeout
        self.hooks = hooks
        self.on_move = hooks.on_move
        self.id: str | None = None
        self.broker: str | None = None  # the broker serving it now, password masked
        self.broker_zone: str | None = None  # and its zone
        self.federates = federates
        self.channel_number = 0
        self.generation = 0  # channels held so far
        self.topology = Topology()
        self.confirms = ConfirmBook()
        self.confirming = False
        self.blocked = False
        self.blocked_since = 0.0  # monotonic: when this lease heard of the block
        self.closed = False
        self.aborted = False  # closed because its abort callable said so
        self.owner = threading.get_ident()  # the thread that used it last
        self.tags = TagMap()
        self._sticky = broker
        self._route_key = route_key(kind, zone, broker)
        self._sock: socket.socket | None = None
        self._reader = wire.FrameReader(wire.MAX_DATA_FRAME)
        self._replies: dict[int, Reply] = {}
        self._rid = 0
        self._waiting: int | None = None  # the call in flight
        self._got: Delivery | None = None  # a basic.get's message, before its reply
        self._settles: list[bytes] = []  # acks batched while read deliveries wait
        self._leased = False
        self._refusal: messages.Refused | None = None
        self._lost: Loss | None = None
        self._handed = handed  # a socket on which the master asked for this lease already
        self._abort = abort  # asked while waiting: True gives up (LeaseClosed)
        self._acquire()

    # ----- calls ----------------------------------------------------------------------------

    def call(self, op: str, method: str, args: dict[str, Any]) -> Reply:
        """Send one call and wait for its reply, across moves; record it for replay."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.ready()
            self.drain()  # a loss already on the socket is not this call's doing
            self.ready()
            reply = self._send_call(op, method, args)
            if reply is not None:
                break
            if time.monotonic() > deadline:
                raise LeaseTimeout(f"{method} got no reply within {self.timeout} s",
                                   lease=self.id)
        if reply.error is not None:
            raise error_of(reply.error)
        if method == "queue_declare" and not args.get("queue"):
            args = {**args, "_name": reply.fields.get("queue")}  # to follow a rename
        self.topology.record(op, method, args)
        return reply

    def _send_call(self, op: str, method: str, args: dict[str, Any]) -> Reply | None:
        """One try: the reply, or ``None`` if the channel was lost for another reason."""
        self._rid += 1
        rid = self._waiting = self._rid
        sent = {k: self.topology.name(v) if k == "queue" else v for k, v in args.items()}
        try:
            self.send(messages.encode(messages.REQUESTS[op](id=rid, method=method, args=sent)))
            started = time.monotonic()
            while rid not in self._replies:
                if self._lost is not None:
                    error, self._lost.error = self._lost.error, None
                    return None if error is None else Reply(rid, error=self._lost.reason)
                self.pump(_least(self._check_abort(), self._blocked_left(started)))
                self._check_blocked(started, method, give_up=True)
            return self._replies.pop(rid)
        finally:
            self._waiting = None

    def take_get(self) -> Delivery | None:
        got, self._got = self._got, None
        return got

    def settle(self, delivery_tag: int, flags: int, more_coming: bool) -> None:
        """Ack, nack or reject; ``more_coming``: read deliveries wait, so batch it."""
        if self.closed:
            raise LeaseClosed("the lease is closed", lease=self.id)
        tag = None if self._lost is not None else self.tags.channel_tag(delivery_tag)
        if tag is None:
            log.debug("lease %s: dropping settle of tag %d from a lost channel", self.id,
                      delivery_tag)
            return
        self._settles.append(wire.tagged(Kind.SETTLE, tag, flags))
        if len(self._settles) >= SETTLE_BATCH or not more_coming:
            self.send(b"")  # sends the settles; while read deliveries wait, they batch up

    def send(self, data: bytes) -> None:
        """Send ``data``, after any batched settles (acks keep their order)."""
        sock = self._sock
        if sock is None:
            return  # lost: the next call recovers
        if self._settles:
            data = b"".join(self._settles) + data
            self._settles.clear()
        try:
            sock.sendall(data)
        except TimeoutError:
            self._on_lost(INTERRUPTED)
            raise
        except OSError:
            self._on_lost(WORKER_GONE)
        except BaseException:
            self._on_lost(INTERRUPTED)  # part of a frame may have gone: the stream is cut
            raise

    def publish(self, data: bytes) -> None:
        """A publish without confirms: sent again if the worker was gone before reading it."""
        self.send(data)
        if self._lost is not None:
            self.ready()
            self.send(data)

    @property
    def lost(self) -> bool:
        return self._lost is not None

    @property
    def failed(self) -> bool:
        """Lost, with an error the next call raises (the broker closed the channel)."""
        return self._lost is not None and self._lost.error is not None

    @property
    def sock(self) -> socket.socket | None:
        return self._sock

    def close(self, reply_code: int = 0, reply_text: str = "Normal shutdown") -> None:
        if self.closed:
            return
        self.closed = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.sendall(b"".join(self._settles) + messages.encode(
                    messages.Close(reply_code, reply_text)))
            self._sock.close()
            self._sock = None

    # ----- flow control ---------------------------------------------------------------------

    def _blocked_left(self, started: float) -> float | None:
        """Seconds a wait begun at ``started`` may still last while the broker blocks the
        connection (``None``: not blocked)."""
        if not self.blocked:
            return None
        return max(started, self.blocked_since) + self.timeout - time.monotonic()

    def _check_blocked(self, started: float, what: str, give_up: bool = False) -> None:
        left = self._blocked_left(started)
        if left is None or left > 0:
            return
        error = ConnectionBlockedTimeout(
            f"{what}: the broker {self.broker} blocked the connection (flow control) for"
            f" over {self.timeout} s", broker=self.broker, lease=self.id)
        if give_up:  # a call whose outcome is unknown: leave nothing of it on a channel
            self._on_lost(Reason("ConnectionBlockedTimeout", 0, str(error)))
        raise error

    # ----- reading --------------------------------------------------------------------------

    def wait(self, done: Callable[[], bool], timeout: float | None,
             what: str = "waiting") -> bool:
        """Read the socket (recovering across moves) until ``done()`` or ``timeout``.

        :class:`ConnectionBlockedTimeout` once it has waited ``self.timeout`` while the
        broker blocks the connection."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        while not done():
            self.ready()
            if done():  # a recovery may have read what we wait for
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._check_blocked(started, what)
            self.pump(_least(remaining, self._blocked_left(started)))
        return True

    def wait_confirm(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """A :class:`~kzpool.client.confirms.Confirm`'s wait."""
        return self.wait(done, timeout, "a publish's confirm")

    def pump(self, timeout: float | None) -> None:
        """Read once (waiting up to ``timeout``) and process every complete frame."""
        sock = self._sock
        if sock is None:
            return
        if self._settles:
            self.send(b"")
            if self._sock is None:
                return
        if timeout is not None and not readable([sock.fileno()], max(0.0, timeout)):
            return
        self._feed(receive(sock, READ_SIZE) or b"")

    def flush(self) -> None:
        """Send the batched settles now (before the owner waits for something else)."""
        if self._settles and self._sock is not None:
            self.send(b"")

    def drain(self) -> None:
        """Process what is already there, without waiting."""
        sock = self._sock
        while sock is not None and sock is self._sock:
            data = receive(sock, READ_SIZE, socket.MSG_DONTWAIT)
            if data is None:
                return
            self._feed(data)
            if len(data) < READ_SIZE:
                return

    def _feed(self, data: bytes) -> None:
        if not data:
            self._on_lost(WORKER_GONE)
            return
        try:
            for kind, flags, payload in self._reader.feed(data):
                self._process(kind, flags, payload)
        except KzpoolError as exc:
            log.error("lease %s: bad frame from the pool: %s", self.id, exc)
            self._on_lost(Reason("ProtocolError", 0, str(exc)))

    def _process(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == _DELIVER:
            self._on_deliver(flags, payload)
        elif kind == _CONFIRM:
            self.confirms.confirmed(wire.read_tag(payload), flags)
        elif kind == _RETURN:
            self._on_return(payload)
        elif kind == _JSON:
            self._on_event(messages.decode(payload, messages.TO_CLIENT))

    def _on_deliver(self, flags: int, payload: bytes) -> None:
        tag, count, ctag, exchange, routing_key, encoded, body = wire.read_deliver(payload)
        if self._lost is not None:
            return  # the broker redelivers it on the new channel
        tag = self.tags.shown(tag)
        redelivered = bool(flags & Flag.REDELIVERED)
        if flags & Flag.GET:
            method: Any = spec.Basic.GetOk(tag, redelivered, exchange, routing_key, count)
            self._got = (method, props.decode(encoded), body)
            return
        method = spec.Basic.Deliver(ctag, tag, redelivered, exchange, routing_key)
        self.hooks.on_delivery((method, props.decode(encoded), body))

    def _on_return(self, payload: bytes) -> None:
        code, text, exchange, routing_key, encoded, body = wire.read_return(payload)
        method = spec.Basic.Return(code, text, exchange, routing_key)
        returned = ReturnedMessage(method, props.decode(encoded), body)
        self.confirms.returned(exchange, routing_key, returned)
        self.hooks.on_returned(returned)

    def _on_event(self, event: Message) -> None:
        match event:
            case Reply():
                if event.id == self._waiting:  # a call given up on is answered late
                    self._replies[event.id] = event
            case messages.Leased():
                self._leased = True
                self.id, self.broker, self.broker_zone = event.lease, event.broker, event.zone
                self.channel_number = event.channel
                self._set_blocked(event.blocked)
                if event.route:
                    self.pool.routes[self._route_key] = event.route
            case messages.Cancelled(consumer_tag=tag):
                self.topology.record("call", "basic_cancel", {"consumer_tag": tag})
                self.hooks.on_cancelled(tag)
            case messages.Redirect():
                self._on_lost(Reason("Redirect", 0, "ask the master"))
            case messages.Lost(reason=reason):
                self._on_lost(reason)
            case messages.Move():
                self.send(messages.encode(messages.Bye()))
                self._on_lost(Reason("Moved", 0, "moved to the primary"))
            case messages.Blocked():
                self._set_blocked(True)
            case messages.Unblocked():
                self._set_blocked(False)
            case messages.Error(error=error):
                log.warning("lease %s: %s", self.id, error.text)
            case messages.Refused():
                self._refusal = event

    def _set_blocked(self, blocked: bool) -> None:
        if blocked and not self.blocked:
            self.blocked_since = time.monotonic()
        self.blocked = blocked

    # ----- losses ---------------------------------------------------------------------------

    def _on_lost(self, reason: Reason) -> None:
        if self._lost is not None:
            return
        had_channel, self._leased = self._leased, False
        self._lost = Loss(reason, self._error_of_loss(reason))
        self._settles.clear()  # acks for the lost channel: meaningless now
        self.hooks.on_lost()
        self._replies.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if had_channel:
            log.info("lease %s lost its channel on %s: %s", self.id, self.broker, reason.text)

    def _error_of_loss(self, reason: Reason) -> Exception | None:
        """What the caller hears of a loss: the broker's error if a call or a publish of its
        own caused it; nothing (the lease just moves) otherwise.  A call in flight is taken
        for the cause before pipelined publishes are."""
        if reason.channel_error:
            error: Exception = ChannelClosedByBroker(reason.code, reason.text)
            if self._waiting is None and self.confirms.pending:  # a publish: not re-sent
                self.confirms.fail_all(error)
                return None
            return error
        if reason.connection_error:
            error = ConnectionClosedByBroker(reason.code, reason.text)
            self.confirms.fault(error)  # a publish re-sent once after such a close fails
            return error if self._waiting is not None else None
        return None


def _least(*timeouts: float | None) -> float | None:
    """The shortest of the timeouts that are set (``None``: none is)."""
    set_ = [t for t in timeouts if t is not None]
    return min(set_) if set_ else None
