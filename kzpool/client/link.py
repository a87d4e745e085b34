"""How a lease keeps a channel: its link to the worker that owns the channel.

Frames in and out (:mod:`kzpool.common.wire`), replies, deliveries, confirms and returns,
and moves: when the channel is lost (broker down, worker killed, moved back to the primary)
the link asks for a new one (first at the worker that served this kind of lease last, else
at the master), replays the topology and re-sends unconfirmed publishes before the next
call.  Delivery tags stay unique across moves (:mod:`.tags`).

The link opens its sockets through a :class:`Pool` (the client), hands each delivery to
``on_delivery``, says ``on_lost()`` when the deliveries read so far are void and
``on_move(old_broker, reason, renamed)`` when it runs on a new channel.

Hazards: not thread-safe (one lease per thread); every wait blocks its caller; nothing runs
in the background, so confirms and events are read while the owner is inside a lease call.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pika import spec
from pika.adapters.blocking_connection import ReturnedMessage

from ..common import messages, props, wire
from ..common.backoff import Backoff
from ..common.errors import (
    ChannelClosedByBroker,
    KzpoolError,
    LeaseClosed,
    LeaseTimeout,
    refusal_error,
)
from ..common.messages import Message, Reason, Reply
from ..common.sockets import receive
from ..common.wire import Flag, Kind
from .backend import Pool, route_key
from .confirms import ConfirmBook
from .tags import TagMap
from .topology import Topology

log = logging.getLogger("kzpool.lease")

READ_SIZE = 256 << 10
REPLY_GRACE = 5.0  # the master answers a lease request within its timeout; allow this more
SETTLE_BATCH = 64  # acks sent together at most
ABORT_POLL = 0.25  # seconds between two looks at a lease's abort callable while it waits
_DELIVER, _CONFIRM, _RETURN, _JSON = map(int, (Kind.DELIVER, Kind.CONFIRM, Kind.RETURN,
                                               Kind.JSON))
WORKER_GONE = Reason("ConnectionClosed", 0, "worker gone")
Delivery = tuple[Any, Any, bytes]


@dataclass
class Loss:
    reason: Reason
    reported: bool = False  # the owner has been told (a channel error raises once)


class LeaseLink:
    def __init__(self, pool: Pool, kind: str, zone: str | None, broker: str | None,
                 timeout: float, on_move: Callable[[str | None, str, dict[str, str]], None],
                 federates: str | None, handed: socket.socket | None,
                 abort: Callable[[], bool] | None, on_delivery: Callable[[Delivery], None],
                 on_lost: Callable[[], None]) -> None:
        self.pool = pool
        self.kind = kind
        self.zone = zone
        self.timeout = timeout
        self.on_move = on_move
        self.on_delivery = on_delivery
        self.on_lost = on_lost
        self.id: str | None = None
        self.broker: str | None = None  # the broker serving it now, password masked
        self.broker_zone: str | None = None  # and its zone
        self.federates = federates
        self.channel_number = 0
        self.topology = Topology()
        self.confirms = ConfirmBook()
        self.confirming = False
        self.blocked = False
        self.closed = False
        self.tags = TagMap()
        self._sticky = broker
        self._route_key = route_key(kind, zone, broker)
        self._sock: socket.socket | None = None
        self._reader = wire.FrameReader(wire.MAX_DATA_FRAME)
        self._replies: dict[int, Reply] = {}
        self._rid = 0
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
            reply = self._send_call(op, method, args)
            if reply is not None:
                break
            if time.monotonic() > deadline:
                raise LeaseTimeout(f"{method} got no reply within {self.timeout} s",
                                   lease=self.id)
        if reply.error is not None:
            raise ChannelClosedByBroker(reply.error.code, reply.error.text)
        if method == "queue_declare" and not args.get("queue"):
            args = {**args, "_name": reply.fields.get("queue")}  # to follow a rename
        self.topology.record(op, method, args)
        return reply

    def _send_call(self, op: str, method: str, args: dict[str, Any]) -> Reply | None:
        """One try: the reply, or ``None`` if the channel was lost for another reason."""
        self._rid += 1
        rid = self._rid
        sent = {k: self.topology.name(v) if k == "queue" else v for k, v in args.items()}
        self.send(messages.encode(messages.REQUESTS[op](id=rid, method=method, args=sent)))
        while rid not in self._replies:
            if self._lost is not None:
                if self._lost.reason.channel_error:
                    self._lost.reported = True
                    return Reply(rid, error=self._lost.reason)
                return None
            self.pump(self._check_abort())
        return self._replies.pop(rid)

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
        assert self._sock is not None
        if self._settles:
            data = b"".join(self._settles) + data
            self._settles.clear()
        try:
            self._sock.sendall(data)
        except OSError:
            self._on_lost(WORKER_GONE)

    def publish(self, data: bytes) -> None:
        """A publish without confirms: sent again if the worker was gone before reading it."""
        self.send(data)
        if self._lost is not None:
            self.ready()
            self.send(data)

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.sendall(b"".join(self._settles) + messages.encode(messages.Close()))
            self._sock.close()
            self._sock = None

    # ----- reading --------------------------------------------------------------------------

    def wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Read the socket (recovering across moves) until ``done()`` or ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            self.ready()
            if done():  # a recovery may have read what we wait for
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self.pump(remaining)
        return True

    def pump(self, timeout: float | None) -> None:
        """Read once (waiting up to ``timeout``) and process every complete frame."""
        sock = self._sock
        if sock is None:
            return
        if self._settles:
            self.send(b"")
            if self._sock is None:
                return
        if timeout is not None and not select.select([sock], [], [], max(0.0, timeout))[0]:
            return
        self._feed(receive(sock, READ_SIZE) or b"")

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
        self.on_delivery((method, props.decode(encoded), body))

    def _on_return(self, payload: bytes) -> None:
        code, text, exchange, routing_key, encoded, body = wire.read_return(payload)
        method = spec.Basic.Return(code, text, exchange, routing_key)
        returned = ReturnedMessage(method, props.decode(encoded), body)
        if not self.confirms.returned(exchange, routing_key, returned):
            log.warning("lease %s: message returned by the broker: %d %s", self.id, code, text)

    def _on_event(self, event: Message) -> None:
        match event:
            case Reply():
                self._replies[event.id] = event
            case messages.Leased():
                self._leased = True
                self.id, self.broker, self.broker_zone = event.lease, event.broker, event.zone
                self.channel_number, self.blocked = event.channel, event.blocked
                if event.route:
                    self.pool.routes[self._route_key] = event.route
            case messages.Redirect():
                self._on_lost(Reason("Redirect", 0, "ask the master"))
            case messages.Lost(reason=reason):
                self._on_lost(reason)
            case messages.Move():
                self.send(messages.encode(messages.Bye()))
                self._on_lost(Reason("Moved", 0, "moved to the primary"))
            case messages.Blocked():
                self.blocked = True
            case messages.Unblocked():
                self.blocked = False
            case messages.Error(error=error):
                log.warning("lease %s: %s", self.id, error.text)
            case messages.Refused():
                self._refusal = event

    # ----- moves ----------------------------------------------------------------------------

    def _on_lost(self, reason: Reason) -> None:
        if self._lost is not None:
            return
        had_channel, self._leased = self._leased, False
        self._lost = Loss(reason)
        self._settles.clear()  # acks for the lost channel: meaningless now
        if reason.channel_error and self.confirms.pending:
            # caused by a publish: not re-sent
            self.confirms.fail_all(ChannelClosedByBroker(reason.code, reason.text))
            self._lost.reported = True
        self.on_lost()
        self._replies.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if had_channel:
            log.info("lease %s lost its channel on %s: %s", self.id, self.broker, reason.text)

    def ready(self) -> None:
        """Make sure the lease has a channel: recover (resume and replay) if it lost it."""
        if self.closed:
            raise LeaseClosed("the lease is closed", lease=self.id)
        if self._lost is None:
            return
        reason = self._lost.reason
        if not self._lost.reported and reason.channel_error:
            self._lost.reported = True  # say once that the broker closed the channel
            raise ChannelClosedByBroker(reason.code, reason.text)
        old = self.broker
        renamed: dict[str, str] = {}
        while True:
            self._acquire()
            if self._replay(renamed):
                break
        log.info("lease %s moved from %s to %s (%s)", self.id, old, self.broker, reason.text)
        self.on_move(old, reason.text, renamed)

    def _acquire(self) -> None:
        """Get a channel (new or resumed) and wait for a worker to bind it.

        First at the worker that served this kind of lease last (the client's route cache):
        one round trip.  If that worker is gone or no longer the right one, at the master,
        which may keep the request waiting until a broker can serve it.  A lease the master
        asked for on our behalf (``handed``) only waits for its answer.
        """
        deadline = time.monotonic() + self.timeout
        retry = Backoff(0.005, 0.25)
        while True:
            handed, self._handed = self._handed, None
            route = None if handed else self.pool.routes.get(self._route_key)
            sock = handed or (self.pool.open_route(route) if route else None)
            if sock is None:
                route = None
                sock = self.pool.open_pool()  # PoolNotRunning: the lease stays lost
            self._sock, self._lost, self._refusal = sock, None, None
            self._reader = wire.FrameReader(wire.MAX_DATA_FRAME)
            if handed is None:
                self._ask(sock, deadline)
            refusal = self._wait_leased(deadline)
            if refusal is not None:
                error = refusal_error(refusal.code, refusal.error)
                self._give_up(error)
                raise error
            if self._leased:
                self.tags.new_channel()
                return
            if route is not None:  # that worker would not: ask the master, at once
                self.pool.routes.pop(self._route_key, None)
                continue
            if time.monotonic() > deadline:
                error = LeaseTimeout(f"no channel within {self.timeout} s", lease=self.id)
                self._give_up(error)
                raise error
            time.sleep(retry.next_delay())  # the worker had just lost its broker

    def _ask(self, sock: socket.socket, deadline: float) -> None:
        request = messages.LeaseRequest(
            kind=self.kind, zone=self.zone, broker=self._sticky,
            broker_id=self._route_key[1] if self._sticky else None, lease=self.id,
            federates=self.federates, timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(messages.encode(request))  # a refusal may be waiting: read on

    def _wait_leased(self, deadline: float) -> messages.Refused | None:
        """Read until the lease is bound, lost or refused; the refusal, if refused."""
        while not self._leased and self._lost is None and self._refusal is None:
            if time.monotonic() > deadline + REPLY_GRACE:
                self._on_lost(Reason("Timeout", 0, "no reply"))
                break
            self.pump(min(deadline + REPLY_GRACE - time.monotonic(),
                          self._check_abort() or REPLY_GRACE))
        return self._refusal

    def _check_abort(self) -> float | None:
        """Raise :class:`LeaseClosed` if the owner gave up; else how long a wait may last
        before asking again (``None``: as long as it takes)."""
        if self._abort is None:
            return None
        if self._abort():
            error = LeaseClosed("given up: its owner is stopping", lease=self.id)
            self._give_up(error)
            self.closed = True
            raise error
        return ABORT_POLL

    def _give_up(self, error: KzpoolError) -> None:
        """No channel this time: stay lost, so the next call asks again."""
        self._on_lost(Reason(type(error).__name__, 0, str(error)))

    def _replay(self, renamed: dict[str, str]) -> bool:
        """Rebuild the topology on the new channel, then re-send unconfirmed publishes.

        ``False``: the new channel was lost too; acquire another and replay again.
        """
        if not self.topology.replay(self._send_call, renamed):
            return False
        self.confirming = self.topology.confirming
        for data in self.confirms.renumber():
            self.send(data)
        return self._lost is None
