"""How a lease keeps a channel: its link to the worker that owns the channel.

Frames in and out (:mod:`kzpool.protocol`), replies, deliveries, confirms and returns, and
moves: when the channel is lost (broker down, worker killed, moved back to the primary) the
link asks for a new one (first at the worker that served this kind of lease last, else at
the master), replays the topology and re-sends unconfirmed publishes before the next call.
Delivery tags stay unique across moves: an ack for a tag of a lost channel is dropped.

Hazards: not thread-safe (one lease per thread); every wait blocks its caller; nothing runs
in the background, so confirms and events are read while the owner is inside a lease call.
"""


from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pika import spec
from pika.adapters.blocking_connection import ReturnedMessage

from ..common import wire
from ..common.backoff import Backoff
from ..common.errors import (
    BrokerURIError,
    ChannelClosedByBroker,
    ConnectionBlockedTimeout,
    KzpoolError,
    LeaseClosed,
    LeaseRequestError,
    LeaseTimeout,
    NackError,
    UnroutableError,
    from_reply,
)
from ..common.uri import BrokerURI
from ..common.wire import Flag, Kind
from .topology import Topology

if TYPE_CHECKING:
    from .pool import PoolClient

log = logging.getLogger("kzpool.lease")

READ_SIZE = 256 << 10
REPLY_GRACE = 5.0  # the master answers a lease request within its timeout; allow this more
DRAIN_INTERVAL = 0.001  # seconds between two reads of confirms and events while publishing
SETTLE_BATCH = 64  # acks sent together at most
ABORT_POLL = 0.25  # seconds between two looks at a lease's abort callable while it waits
_DELIVER, _CONFIRM, _RETURN, _JSON = map(int, (Kind.DELIVER, Kind.CONFIRM, Kind.RETURN,
                                               Kind.JSON))
Delivery = tuple[Any, Any, bytes]
OnMessage = Callable[[Any, Any, Any, bytes], None]


@dataclass(frozen=True)
class MoveEvent:
    """Passed to ``on_move``: the lease now runs on ``new_broker``."""

    lease: str
    old_broker: str | None
    new_broker: str | None
    reason: str
    renamed: dict[str, str]  # server-named queues: old name → new name


class Confirm(Future[None]):
    """A pipelined publish confirm; ``result()`` reads the lease until it resolves."""

    def __init__(self, lease: LeaseLink) -> None:
        super().__init__()
        self._lease = lease

    def result(self, timeout: float | None = None) -> None:
        if not self.done() and not self._lease._wait(self.done, timeout):
            raise LeaseTimeout(f"no confirm within {timeout} s", lease=self._lease.id)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._lease._wait(self.done, timeout)
        return super().exception(0)


@dataclass
class Unconfirmed:
    future: Confirm
    data: bytes  # the PUBLISH frame, re-sent after a move
    exchange: str
    routing_key: str
    properties: Any
    body: bytes
    returned: Any = None


class LeaseLink:
    """The machinery under :class:`kzpool.lease.Lease`; see the module docstring."""

    def __init__(self, client: PoolClient, kind: str, zone: str | None, broker: str | None,
                 timeout: float, on_move: Callable[[MoveEvent], None] | None,
                 federates: str | None = None, handed: socket.socket | None = None,
                 abort: Callable[[], bool] | None = None) -> None:
        self.client = client
        self.kind = kind
        self.zone = zone
        self.timeout = timeout
        self.on_move = on_move
        self.id: str | None = None
        self.broker: str | None = None  # the broker serving it now, password masked
        self.broker_zone: str | None = None  # and its zone
        self.federates = federates  # a federator's: the queue of the listener it feeds
        self.channel_number = 0
        self._sticky = broker
        # what the client's route cache knows this lease by
        self._route_key = (kind, _broker_id(broker) if broker else zone)
        self._sock: socket.socket | None = None
        self._reader = wire.FrameReader(wire.MAX_DATA_FRAME)
        self._topology = Topology()
        self._replies: dict[int, dict[str, Any]] = {}
        self._rid = 0
        self._deliveries: deque[Delivery] = deque()
        self._generator: deque[Delivery] = deque()
        self._generator_tag: str | None = None
        self._generator_auto_ack = False
        self._consumers: dict[str, OnMessage | None] = {}
        self._stop_consuming = False
        self._get: Delivery | None = None
        self._confirming = False
        self._seq = 0
        self._unconfirmed: dict[int, Unconfirmed] = {}
        self._next_drain = 0.0
        self._settles: list[bytes] = []  # acks batched while read deliveries wait
        self._tag_base = 0
        self._tag_max = 0
        self._blocked = False
        self._leased = False
        self._refusal: dict[str, Any] | None = None
        self._lost: dict[str, Any] | None = None
        self._closed = False
        self._handed = handed  # a socket on which the master asked for this lease already
        self._abort = abort  # asked while waiting: True gives up (LeaseClosed)
        self._acquire()

    def _call(self, op: str, method: str, args: dict[str, Any]) -> dict[str, Any]:
        """Send one call and wait for its reply, across moves; record it for replay."""
        deadline = time.monotonic() + self.timeout
        while True:
            self._ready()
            reply = self._send_call(op, method, args)
            if reply is not None:
                break
            if time.monotonic() > deadline:
                raise LeaseTimeout(f"{method} got no reply within {self.timeout} s",
                                   lease=self.id)
        if "error" in reply:
            error = reply["error"]
            raise ChannelClosedByBroker(int(error.get("code") or 0), str(error.get("text")))
        if method == "queue_declare" and not args.get("queue"):
            args = {**args, "_name": reply["fields"].get("queue")}  # to follow a rename
        self._topology.record(op, method, args)
        return reply

    def _send_call(self, op: str, method: str, args: dict[str, Any]) -> dict[str, Any] | None:
        """One try: the reply, or ``None`` if the channel was lost for another reason."""
        self._rid += 1
        rid = self._rid
        sent = {k: self._topology.name(v) if k == "queue" else v for k, v in args.items()}
        self._send(wire.encode({"op": op, "id": rid, "method": method, "args": sent}))
        while rid not in self._replies:
            if self._lost is not None:
                error = self._lost["reason"]
                if _is_channel_error(error):
                    self._lost["reported"] = True
                    return {"error": error}
                return None
            self._pump(self._check_abort())
        return self._replies.pop(rid)

    def _settle(self, delivery_tag: int, flags: int) -> None:
        if self._closed:
            raise LeaseClosed("the lease is closed", lease=self.id)
        if self._lost is not None or (delivery_tag and delivery_tag <= self._tag_base):
            log.debug("lease %s: dropping settle of tag %d from a lost channel", self.id,
                      delivery_tag)
            return
        tag = delivery_tag - self._tag_base if delivery_tag else 0
        self._settles.append(wire.tagged(Kind.SETTLE, tag, flags))
        if len(self._settles) >= SETTLE_BATCH or not (self._deliveries or self._generator):
            self._send(b"")  # sends the settles; while read deliveries wait, they batch up

    def _send(self, data: bytes) -> None:
        """Send ``data``, after any batched settles (acks keep their order)."""
        assert self._sock is not None
        if self._settles:
            data = b"".join(self._settles) + data
            self._settles.clear()
        try:
            self._sock.sendall(data)
        except OSError:
            self._on_lost({"class": "ConnectionClosed", "code": 0, "text": "worker gone"})

    # ----- reading --------------------------------------------------------------------------

    def _wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Read the socket (recovering across moves) until ``done()`` or ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            self._ready()
            if done():  # a recovery may have read what we wait for
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._pump(remaining)
        return True

    def _pump(self, timeout: float | None) -> None:
        """Read once (waiting up to ``timeout``) and process every complete frame."""
        sock = self._sock
        if sock is None:
            return
        if self._settles:
            self._send(b"")
            if self._sock is None:
                return
        if timeout is not None and not select.select([sock], [], [], max(0.0, timeout))[0]:
            return
        try:
            data = sock.recv(READ_SIZE)
        except OSError:
            data = b""
        self._feed(data)

    def _drain(self) -> None:
        """Process what is already there, without waiting."""
        sock = self._sock
        while sock is not None and sock is self._sock:
            try:
                data = sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            self._feed(data)
            if len(data) < READ_SIZE:
                return

    def _feed(self, data: bytes) -> None:
        if not data:
            self._on_lost({"class": "ConnectionClosed", "code": 0, "text": "worker gone"})
            return
        try:
            for kind, flags, payload in self._reader.feed(data):
                self._process(kind, flags, payload)
        except KzpoolError as exc:
            log.error("lease %s: bad frame from the pool: %s", self.id, exc)
            self._on_lost({"class": "ProtocolError", "code": 0, "text": str(exc)})

    def _process(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == _DELIVER:
            self._on_deliver(flags, payload)
        elif kind == _CONFIRM:
            self._on_confirm(wire.read_tag(payload), flags)
        elif kind == _RETURN:
            self._on_return(payload)
        elif kind == _JSON:
            self._on_event(wire.decode_json(payload))

    def _on_deliver(self, flags: int, payload: bytes) -> None:
        tag, count, ctag, exchange, routing_key, props, body = wire.read_deliver(payload)
        if self._lost is not None:
            return  # the broker redelivers it on the new channel
        tag += self._tag_base
        self._tag_max = max(self._tag_max, tag)
        redelivered = bool(flags & Flag.REDELIVERED)
        if flags & Flag.GET:
            method: Any = spec.Basic.GetOk(tag, redelivered, exchange, routing_key, count)
            self._get = (method, _decode_props(props), body)
            return
        method = spec.Basic.Deliver(ctag, tag, redelivered, exchange, routing_key)
        delivery = (method, _decode_props(props), body)
        if ctag == self._generator_tag:
            self._generator.append(delivery)
        else:
            self._deliveries.append(delivery)

    def _on_confirm(self, tag: int, flags: int) -> None:
        unconfirmed = self._unconfirmed
        if flags & Flag.MULTIPLE:  # sequence numbers were inserted in increasing order
            seqs = []
            for seq in unconfirmed:
                if seq > tag:
                    break
                seqs.append(seq)
        else:
            seqs = [tag]
        for seq in seqs:
            entry = unconfirmed.pop(seq, None)
            if entry is None:
                continue
            if flags & Flag.NACK:
                message = ReturnedMessage(spec.Basic.Publish(exchange=entry.exchange,
                                                             routing_key=entry.routing_key),
                                          entry.properties, entry.body)
                entry.future.set_exception(NackError([message]))
            elif entry.returned is not None:
                entry.future.set_exception(UnroutableError([entry.returned]))
            else:
                entry.future.set_result(None)

    def _on_return(self, payload: bytes) -> None:
        code, text, exchange, routing_key, props, body = wire.read_return(payload)
        method = spec.Basic.Return(code, text, exchange, routing_key)
        returned = ReturnedMessage(method, _decode_props(props), body)
        for entry in self._unconfirmed.values():  # the earliest unconfirmed one it matches
            if entry.returned is None and (entry.exchange, entry.routing_key) == (
                    exchange, routing_key):
                entry.returned = returned
                return
        log.warning("lease %s: message returned by the broker: %d %s", self.id, code, text)

    def _on_event(self, event: dict[str, Any]) -> None:
        op = event.get("op")
        if op == "reply":
            self._replies[int(event.get("id") or 0)] = event
        elif op == "leased":
            self._leased = True
            self.id, self.broker = event.get("lease"), event.get("broker")
            self.broker_zone = event.get("zone")
            self.channel_number = int(event.get("channel") or 0)
            self._blocked = bool(event.get("blocked"))
            if event.get("route"):
                self.client.routes[self._route_key] = str(event["route"])
        elif op == "redirect":
            self._on_lost({"class": "Redirect", "code": 0, "text": "ask the master"})
        elif op == "lost":
            self._on_lost(event.get("reason") or {})
        elif op == "move":
            self._send(wire.encode({"op": "bye"}))
            self._on_lost({"class": "Moved", "code": 0, "text": "moved to the primary"})
        elif op == "blocked":
            self._blocked = True
        elif op == "unblocked":
            self._blocked = False
        elif op == "error":
            log.warning("lease %s: %s", self.id, event.get("error"))
        elif event.get("ok") is False:
            self._refusal = event

    # ----- moves ----------------------------------------------------------------------------

    def _on_lost(self, reason: dict[str, Any]) -> None:
        if self._lost is not None:
            return
        had_channel, self._leased = self._leased, False
        self._lost = {"reason": reason}
        self._settles.clear()  # acks for the lost channel: meaningless now
        if _is_channel_error(reason) and self._unconfirmed:
            error = ChannelClosedByBroker(int(reason["code"]), str(reason.get("text")))
            for entry in self._unconfirmed.values():  # caused by a publish: not re-sent
                entry.future.set_exception(error)
            self._unconfirmed.clear()
            self._lost["reported"] = True
        self._deliveries.clear()
        self._generator.clear()
        self._replies.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if had_channel:
            log.info("lease %s lost its channel on %s: %s", self.id, self.broker,
                     reason.get("text"))

    def _ready(self) -> None:
        """Make sure the lease has a channel: recover (resume and replay) if it lost it."""
        if self._closed:
            raise LeaseClosed("the lease is closed", lease=self.id)
        if self._lost is None:
            return
        reason = self._lost["reason"]
        if not self._lost.get("reported") and _is_channel_error(reason):
            self._lost["reported"] = True  # say once that the broker closed the channel
            raise ChannelClosedByBroker(int(reason["code"]), str(reason.get("text")))
        old = self.broker
        renamed: dict[str, str] = {}
        while True:
            self._acquire()
            if self._replay(renamed):
                break
        log.info("lease %s moved from %s to %s (%s)", self.id, old, self.broker,
                 reason.get("text"))
        if self.on_move is not None:
            self.on_move(MoveEvent(str(self.id), old, self.broker, str(reason.get("text")),
                                   renamed))

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
            route = None if handed else self.client.routes.get(self._route_key)
            sock = handed or (self.client.open_socket(route) if route else None)
            if sock is None:
                route = None
                sock = self.client.open_socket()  # PoolNotRunning: the lease stays lost
            self._sock, self._lost, self._refusal = sock, None, None
            self._reader = wire.FrameReader(wire.MAX_DATA_FRAME)
            if handed is None:
                request = wire.encode({
                    "op": "lease", "kind": self.kind, "zone": self.zone, "broker": self._sticky,
                    "broker_id": self._route_key[1] if self._sticky else None,
                    "lease": self.id, "federates": self.federates,
                    "timeout": max(0.0, deadline - time.monotonic())})
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(request)  # a refusal may be waiting to be read: read on
            while not self._leased and self._lost is None and self._refusal is None:
                if time.monotonic() > deadline + REPLY_GRACE:
                    self._on_lost({"class": "Timeout", "code": 0, "text": "no reply"})
                    break
                self._pump(min(deadline + REPLY_GRACE - time.monotonic(),
                               self._check_abort() or REPLY_GRACE))
            refusal = self._refused()  # set by _pump: mypy cannot see that
            if refusal is not None:
                error = from_reply(refusal)
                self._give_up(error)
                raise error
            if self._leased:
                self._tag_base = self._tag_max
                return
            if route is not None:  # that worker would not: ask the master, at once
                self.client.routes.pop(self._route_key, None)
                continue
            if time.monotonic() > deadline:
                error = LeaseTimeout(f"no channel within {self.timeout} s", lease=self.id)
                self._give_up(error)
                raise error
            time.sleep(retry.next_delay())  # the worker had just lost its broker

    def _check_abort(self) -> float | None:
        """Raise :class:`LeaseClosed` if the owner gave up; else how long a wait may last
        before asking again (``None``: as long as it takes)."""
        if self._abort is None:
            return None
        if self._abort():
            error = LeaseClosed("given up: its owner is stopping", lease=self.id)
            self._give_up(error)
            self._closed = True
            raise error
        return ABORT_POLL

    def _refused(self) -> dict[str, Any] | None:
        return self._refusal

    def _give_up(self, error: KzpoolError) -> None:
        """No channel this time: stay lost, so the next call asks again."""
        self._on_lost({"class": type(error).__name__, "code": 0, "text": str(error)})

    def _replay(self, renamed: dict[str, str]) -> bool:
        """Rebuild the topology on the new channel, then re-send unconfirmed publishes.

        ``False``: the new channel was lost too; acquire another and replay again.
        """
        confirming = False
        for step in self._topology.steps:
            reply = self._send_call(step.op, step.method, step.args)
            if reply is None:
                return False
            if "error" in reply:
                error = reply["error"]
                raise ChannelClosedByBroker(int(error.get("code") or 0),
                                            f"replaying {step.method}: {error.get('text')}")
            old = step.args.get("_name")
            if step.method == "queue_declare" and old:
                new = str(reply["fields"].get("queue"))
                if new != old:
                    log.warning("lease %s: server-named queue %s is now %s", self.id, old, new)
                    self._topology.renamed(old, new)
                    renamed[old] = new
                    step.args["_name"] = new
            confirming = confirming or step.op == "confirm"
        self._confirming = confirming
        pending = list(self._unconfirmed.values())
        self._unconfirmed.clear()
        self._seq = 0
        for entry in pending:
            self._seq += 1
            self._unconfirmed[self._seq] = entry
            self._send(entry.data)
        return self._lost is None

    def _wait_unblocked(self) -> None:
        if not self._wait(lambda: not self._blocked, self.timeout):
            raise ConnectionBlockedTimeout(f"the broker {self.broker} blocked publishing for"
                                           f" over {self.timeout} s", broker=self.broker)


def _broker_id(uri: str) -> str:
    try:
        return BrokerURI.parse(uri).short
    except BrokerURIError as exc:
        raise LeaseRequestError(str(exc)) from exc


def _is_channel_error(reason: dict[str, Any]) -> bool:
    """The broker closed the channel because of something the client did."""
    return reason.get("class") == "ChannelClosedByBroker" and int(reason.get("code") or 0) > 0


def _decode_props(data: bytes) -> spec.BasicProperties:
    properties = spec.BasicProperties()
    if data:
        properties.decode(data)
    return properties
