"""How a blocking lease keeps a channel: its link to the worker that owns the channel.

A :class:`LeaseLink` holds what lasts across the lease's channels (its
:class:`~kzpool.lease.state.LeaseState`: options, id, broker, tags, confirms, topology; and
what was lost, and why) and the :class:`~kzpool.client.bound.Bound` socket of its channel
now, which reads frames, replies, deliveries, confirms, returns and the broker's cancels.
When the channel is lost (broker down, worker killed, moved back to the primary, the pool
restarted) the next call gets a new one (:class:`~kzpool.client.recovery.Recovery`),
replays the topology and re-sends unconfirmed publishes before it goes on.  Delivery tags
stay unique across moves.  The asyncio twin, :class:`kzpool.aio.link.LeaseLink`, recovers
in a task of its own instead of in the next call.

What the caller did wrong stays with the caller: a call the broker answers by closing the
channel raises :class:`ChannelClosedByBroker`; one it answers by closing the whole
connection raises :class:`ConnectionClosedByBroker` in the lease that had it in flight, and
neither is sent again.  While the broker blocks the connection (flow control), a wait for a
reply or a confirm raises :class:`ConnectionBlockedTimeout` once it has waited the lease's
``timeout``.

The link tells :class:`~kzpool.client.bound.Hooks` of each delivery, cancel and return, of
``on_lost()`` when the deliveries read so far are void, and of each move.

Hazards: not thread-safe (one lease per thread); every wait blocks its caller; nothing runs
in the background, so confirms and events are read while the owner is inside a lease call
or a dispatcher.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..common import messages, wire
from ..common.errors import (
    ChannelClosedByBroker,
    ConnectionBlockedTimeout,
    ConnectionClosedByBroker,
    DeliveryTakenBack,
    DuplicateConsumerTag,
    KzpoolError,
    LeaseClosed,
    LeaseTimeout,
    LimitExceeded,
)
from ..common.messages import Reason, Reply
from ..common.options import LeaseOptions
from ..common.wire import Flag, Kind
from ..lease.forks import FORKED_REASON
from ..lease.state import POOL_RESTARTED, LeaseState
from .bound import Bound, Delivery, Hooks
from .recovery import Abort, Loss, Recovery, Sockets

log = logging.getLogger("kzpool.lease")

_monotonic = time.monotonic
_tagged = wire.tagged
_SETTLE = Kind.SETTLE
SETTLE_BATCH = 64  # acks sent together at most
STALE = 1.0  # seconds unread after which a settle reads what the worker sent first


class LeaseLink:
    """A lease's link; :meth:`open` gets its first channel."""

    def __init__(self, pool: Sockets, options: LeaseOptions,
                 handed: socket.socket | None = None,
                 abort: Callable[[], bool] | None = None) -> None:
        self.pool = pool
        self.state = LeaseState(options)
        self.generation = 0  # channels held so far
        self.confirming = False
        self.thread = threading.get_ident()  # the thread that used it last
        self.loss: Loss | None = None
        self.hooks: Hooks
        self.bound: Bound  # the socket of the channel now (or of the one lost last)
        self._closed = False
        self._rid = 0
        self._abort = Abort(abort)  # asked while waiting: True gives up (LeaseClosed)
        self.recovery = Recovery(pool, self.state, self._bound, self._abort, handed)

    def open(self, hooks: Hooks) -> None:
        """Get the first channel; the link tells ``hooks`` from now on.  Raises why there
        is none (no pool: :class:`PoolNotRunning` at once)."""
        self.hooks = hooks
        self.bound = self.recovery.acquire()
        self.loss = None
        self.generation = 1

    def _bound(self, sock: socket.socket) -> Bound:
        return Bound(sock, self.state, self.hooks, self._on_lost)

    # ----- what the lease is ----------------------------------------------------------------

    @property
    def id(self) -> str | None:
        return self.state.id

    @property
    def broker(self) -> str | None:
        return self.state.broker

    @property
    def closed(self) -> bool:
        return self._closed or self._abort.aborted

    @property
    def aborted(self) -> bool:
        """Closed because its abort callable said so."""
        return self._abort.aborted

    @property
    def lost(self) -> bool:
        return self.loss is not None

    @property
    def failed(self) -> bool:
        """Lost, with an error the next call raises (the broker closed the channel)."""
        return self.loss is not None and self.loss.error is not None

    @property
    def sock(self) -> socket.socket | None:
        return self.bound.sock

    def after_fork(self, parent: int, connection_id: str) -> None:
        """In a child of ``fork()``: the lease is the child's own from its next use on: a new
        channel (a new lease id), its topology replayed (``on_move`` hears
        :data:`~kzpool.lease.forks.FORKED`); the parent's socket is left to the parent, its
        unconfirmed publishes too (they fail here), its unacked deliveries too (dropped)."""
        self.thread = threading.get_ident()
        self.bound.after_fork()
        self.loss = Loss(FORKED_REASON)  # whatever the parent had still to raise is its own
        self.state.forked(parent, connection_id)
        self.recovery.handed = None

    # ----- recovering -----------------------------------------------------------------------

    def ready(self) -> None:
        """Make sure the lease has a channel: raise a loss's error once, else recover."""
        self.thread = threading.get_ident()
        if self.closed:
            raise LeaseClosed("the lease is closed", lease=self.id)
        lost = self.loss
        if lost is None:
            return
        if lost.error is not None:
            error, lost.error = lost.error, None
            raise error
        old = self.broker
        renamed: dict[str, str] = {}
        recovery = self.recovery
        while True:
            self.bound = recovery.acquire()
            self.loss = None
            self.generation += 1
            if recovery.replay(self.bound, self._send_call, renamed):
                break
        self.confirming = self.state.topology.confirming
        reason = POOL_RESTARTED if recovery.pool_wait.waited else lost.reason.text
        recovery.pool_wait.waited = False
        log.info("lease %s moved from %s to %s (%s)", self.id, old, self.broker, reason)
        self.hooks.on_move(old, reason, renamed)

    # ----- calls ----------------------------------------------------------------------------

    def call(self, op: str, method: str, args: dict[str, Any]) -> Reply:
        """Send one call and wait for its reply, across moves; record it for replay."""
        deadline = time.monotonic() + self.state.timeout
        while True:
            self.ready()
            self.drain()  # a loss already on the socket is not this call's doing
            self.ready()
            reply = self._send_call(op, method, args)
            if reply is not None:
                break
            if time.monotonic() > deadline:
                raise LeaseTimeout(f"{method} got no reply within {self.state.timeout} s",
                                   lease=self.id)
        if reply.error is not None:
            raise error_of(reply.error)
        if method == "queue_declare" and not args.get("queue"):
            args = {**args, "_name": reply.fields.get("queue")}  # to follow a rename
        self.state.topology.record(op, method, args)
        return reply

    def _send_call(self, op: str, method: str, args: dict[str, Any]) -> Reply | None:
        """One try: the reply, or ``None`` if the channel was lost for another reason."""
        bound = self.bound
        self._rid += 1
        rid = bound.waiting = self._rid
        topology = self.state.topology
        sent = {k: topology.name(v) if k == "queue" else v for k, v in args.items()}
        try:
            bound.send(messages.encode(messages.REQUESTS[op](id=rid, method=method, args=sent)))
            started = time.monotonic()
            while rid not in bound.replies:
                if self.loss is not None:
                    error, self.loss.error = self.loss.error, None
                    return None if error is None else Reply(rid, error=self.loss.reason)
                bound.pump(_least(self._abort.check(bound, self.id),
                                  self._blocked_left(started)))
                self._check_blocked(started, method, give_up=True)
            return bound.replies.pop(rid)
        finally:
            bound.waiting = None

    def take_get(self) -> Delivery | None:
        got, self.bound.got_message = self.bound.got_message, None
        return got

    def settle(self, delivery_tag: int, flags: int, more_coming: bool) -> None:
        """Ack, nack or reject; ``more_coming``: read deliveries wait, so batch it.
        :class:`DeliveryTakenBack` if the broker took the delivery back (after a long
        callback, what the worker said meanwhile is read first)."""
        if self._closed or self._abort.aborted:
            raise LeaseClosed("the lease is closed", lease=self.id)
        state = self.state
        if _monotonic() - state.read_at > STALE:
            self.drain()
        # (once per delivery: the common case, nothing taken back, stays short)
        taken = self.taken_back(delivery_tag, flags) if state.taken_back.tags else None
        tag = None if self.loss is not None else state.tags.channel_tag(delivery_tag)
        if tag is not None:
            bound = self.bound
            settles = bound.settles
            settles.append(_tagged(_SETTLE, tag, flags))
            if not more_coming or len(settles) >= SETTLE_BATCH:
                bound.send(b"")  # sends the settles; while deliveries wait, they batch
        elif taken is None:
            log.debug("lease %s: dropping settle of tag %d from a lost channel", self.id,
                      delivery_tag)
        if taken is not None:
            raise taken

    def taken_back(self, delivery_tag: int, flags: int) -> DeliveryTakenBack | None:
        """The error of a settle of ``delivery_tag`` (``flags``: multiple or not) if it
        covers a delivery the broker took back; told once.  The loss it came with (RabbitMQ
        3.x's channel close) is told by it, not again by the next call."""
        found = self.state.taken_back.check(delivery_tag, bool(flags & Flag.MULTIPLE))
        if found is None:
            return None
        tag, why = found
        loss = self.loss
        if loss is not None and isinstance(loss.error, ChannelClosedByBroker) and \
                loss.error.reply_code == why.code:
            loss.error = None
        log.warning("lease %s: settle of delivery %d, which the broker took back", self.id, tag)
        return DeliveryTakenBack(why.code, why.describe(tag), delivery_tag=tag,
                                 consumer_tag=why.consumer_tag, lease=self.id)

    def send(self, data: bytes) -> None:
        """Send ``data`` on the channel now, after any batched settles."""
        self.bound.send(data)

    def publish(self, data: bytes) -> None:
        """A publish without confirms: sent again if the worker was gone before reading it."""
        self.bound.send(data)
        if self.loss is not None:
            self.ready()
            self.bound.send(data)

    def close(self, reply_code: int = 0, reply_text: str = "Normal shutdown") -> None:
        """Give the channel back and wait, up to the lease's timeout, until the worker says
        the broker closed it (unacked deliveries back in their queues) or handed it on."""
        if self.closed:
            return
        self._closed = True
        self.bound.close(messages.encode(messages.Close(reply_code, reply_text)),
                         wait=self.state.timeout, stop=self._abort.abort)

    # ----- flow control ---------------------------------------------------------------------

    def _blocked_left(self, started: float) -> float | None:
        """Seconds a wait begun at ``started`` may still last while the broker blocks the
        connection (``None``: not blocked)."""
        state = self.state
        if not state.blocked:
            return None
        return max(started, state.blocked_since) + state.timeout - time.monotonic()

    def _check_blocked(self, started: float, what: str, give_up: bool = False) -> None:
        left = self._blocked_left(started)
        if left is None or left > 0:
            return
        error = ConnectionBlockedTimeout(
            f"{what}: the broker {self.broker} blocked the connection (flow control) for"
            f" over {self.state.timeout} s", broker=self.broker, lease=self.id)
        if give_up:  # a call whose outcome is unknown: leave nothing of it on a channel
            self.bound.lose(Reason("ConnectionBlockedTimeout", 0, str(error)))
        raise error

    # ----- reading --------------------------------------------------------------------------

    def wait(self, done: Callable[[], bool], timeout: float | None,
             what: str = "waiting") -> bool:
        """Read the socket (recovering across moves) until ``done()`` or ``timeout``.

        :class:`ConnectionBlockedTimeout` once it has waited the lease's timeout while the
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
            self.bound.pump(_least(remaining, self._blocked_left(started)))
        return True

    def wait_confirm(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """A :class:`~kzpool.client.confirms.Confirm`'s wait."""
        return self.wait(done, timeout, "a publish's confirm")

    def pump(self, timeout: float | None) -> None:
        """Read once (waiting up to ``timeout``) and process every complete frame."""
        self.bound.pump(timeout)

    def flush(self) -> None:
        """Send the batched settles now (before the owner waits for something else)."""
        self.bound.flush()

    def drain(self) -> None:
        """Process what is already there, without waiting."""
        self.bound.drain()

    # ----- losses ---------------------------------------------------------------------------

    def _on_lost(self, reason: Reason, calling: bool, had_channel: bool) -> None:
        """What a :class:`Bound` says when its channel is gone (once)."""
        self.loss = Loss(reason, self._error_of_loss(reason, calling))
        self.hooks.on_lost()
        if had_channel:
            log.info("lease %s lost its channel on %s: %s", self.id, self.broker, reason.text)

    def _error_of_loss(self, reason: Reason, calling: bool) -> Exception | None:
        """What the caller hears of a loss: the broker's error if a call or a publish of its
        own caused it; nothing (the lease just moves) otherwise.  A call in flight is taken
        for the cause before pipelined publishes are."""
        confirms = self.state.confirms
        if reason.kind == LimitExceeded.__name__:  # held back, unread: closed by the worker
            return LimitExceeded(reason.text, "lease_buffer")
        if reason.channel_error:
            error: Exception = ChannelClosedByBroker(reason.code, reason.text)
            if not calling and confirms.pending:  # a publish: not re-sent
                confirms.fail_all(error)
                return None
            return error
        if reason.connection_error:
            error = ConnectionClosedByBroker(reason.code, reason.text)
            confirms.fault(error)  # a publish re-sent once after such a close fails
            return error if calling else None
        return None


def _least(*timeouts: float | None) -> float | None:
    """The shortest of the timeouts that are set (``None``: none is)."""
    set_ = [t for t in timeouts if t is not None]
    return min(set_) if set_ else None


def error_of(reason: Reason) -> Exception:
    """The exception pika raises for a call that failed for ``reason``."""
    if reason.kind == "ConnectionClosedByBroker":
        return ConnectionClosedByBroker(reason.code, reason.text)
    if reason.kind == "TypeError":
        return TypeError(reason.text)
    if reason.kind == "ValueError":
        return ValueError(reason.text)
    if reason.kind == "DuplicateConsumerTag":
        return DuplicateConsumerTag(reason.text)
    if reason.kind == "ChannelClosedByBroker" or reason.code:
        return ChannelClosedByBroker(reason.code, reason.text)
    return KzpoolError(f"{reason.kind}: {reason.text}", reason=reason.kind)
