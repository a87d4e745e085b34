"""One socket of a blocking lease to a worker, bound (or being bound) to a channel.

A :class:`Bound` is made anew on every acquire and lives until its channel is lost or the
lease closes: the socket, its frame reader, the call in flight and the replies read,
whether the worker bound it (or refused), and the settles batched while read deliveries
wait.  It reads (:meth:`pump`, :meth:`drain`) and hands each frame to :class:`~kzpool.
lease.frames.Frames`, which writes into the lease's lasting
:class:`~kzpool.lease.state.LeaseState` and tells the lease's :class:`Hooks`.  When it is
lost it closes its socket and tells its ``on_lost`` once; after that it reads and sends
nothing.

Hazards: not thread-safe; :meth:`pump` blocks up to its timeout.  An exception raised by
the caller's signal handler while it sends cuts the frame stream: the channel is given up
(the next call gets a new one) and the exception goes on to the caller.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pika import spec
from pika.adapters.blocking_connection import ReturnedMessage

from ..common import messages, props, wire
from ..common.errors import KzpoolError
from ..common.messages import Reason, Reply
from ..common.sockets import READ_SIZE, readable, receive
from ..lease.forks import FORKED_REASON
from ..lease.frames import Frames, ends_close
from ..lease.state import LeaseState

log = logging.getLogger("kzpool.lease")

WORKER_GONE = Reason("ConnectionClosed", 0, "worker gone")
INTERRUPTED = Reason("Interrupted", 0, "interrupted while sending")
STOP_POLL = 0.25  # seconds between two looks at a closing lease's stop callable
Delivery = tuple[Any, Any, bytes]
OnLost = Callable[[Reason, bool, bool], None]  # (reason, a call was in flight, was bound)


@dataclass(frozen=True)
class Hooks:
    """What the link tells its lease."""

    on_move: Callable[[str | None, str, dict[str, str]], None]
    on_delivery: Callable[[Delivery], None]
    on_cancelled: Callable[[str], None]
    on_returned: Callable[[ReturnedMessage], None]
    on_lost: Callable[[], None]


class Bound:
    """A socket to a worker and what is read and sent on it (see the module)."""

    def __init__(self, sock: socket.socket, state: LeaseState, hooks: Hooks,
                 on_lost: OnLost) -> None:
        self.sock: socket.socket | None = sock  # None once lost or closed
        self.state = state
        self.hooks = hooks
        self.on_lost = on_lost
        self.reader = wire.FrameReader(wire.MAX_DATA_FRAME)
        self.frames = Frames(self, state, log)
        self.has_channel = False  # the worker bound this socket to a channel
        self.route: str | None = None  # that worker's own socket, once bound
        self.refusal: messages.Refused | None = None
        self.dead = False  # lost: nothing more is read or sent
        self.replies: dict[int, Reply] = {}
        self.waiting: int | None = None  # the call in flight
        self.got_message: Delivery | None = None  # a basic.get's, before its reply
        self.settles: list[bytes] = []  # acks batched while read deliveries wait

    # ----- sending --------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send ``data``, after any batched settles (acks keep their order)."""
        sock = self.sock
        if sock is None:
            return  # lost: the next call recovers
        if self.settles:
            data = b"".join(self.settles) + data
            self.settles.clear()
        try:
            sock.sendall(data)
        except TimeoutError:
            self.lose(INTERRUPTED)
            raise
        except OSError:
            self.lose(WORKER_GONE)
        except BaseException:
            self.lose(INTERRUPTED)  # part of a frame may have gone: the stream is cut
            raise

    def flush(self) -> None:
        """Send the batched settles now."""
        if self.settles and self.sock is not None:
            self.send(b"")

    def close(self, last: bytes, wait: float = 0.0,
              stop: Callable[[], bool] | None = None) -> None:
        """Send the batched settles and ``last``; with ``wait``, read until the worker
        answers it (:func:`~kzpool.lease.frames.ends_close`), hangs up, ``wait`` seconds
        pass or ``stop()`` (asked every :data:`STOP_POLL` s) says its owner is stopping,
        dropping what else comes (deliveries of a closing lease go back to their queues);
        then close.  A worker that is gone counts as closed."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            sock.sendall(b"".join(self.settles) + last)
            if wait > 0:
                self._await_answer(sock, time.monotonic() + wait, stop)
        except OSError:
            pass
        finally:
            sock.close()

    def _await_answer(self, sock: socket.socket, deadline: float,
                      stop: Callable[[], bool] | None) -> None:
        reader = self.reader  # frames already half read on this socket come first
        while (left := deadline - time.monotonic()) > 0:
            if stop is not None and stop():
                return  # a stopping owner does not wait for a broker that may be silent
            if not readable([sock.fileno()], left if stop is None else min(left, STOP_POLL)):
                continue
            data = receive(sock, READ_SIZE)
            if not data:
                if data is None:
                    continue
                return
            try:
                if any(ends_close(kind, payload) for kind, _flags, payload in reader.feed(data)):
                    return
            except KzpoolError:
                return

    # ----- reading --------------------------------------------------------------------------

    def pump(self, timeout: float | None) -> None:
        """Read once (waiting up to ``timeout``) and process every complete frame."""
        sock = self.sock
        if sock is None:
            return
        if self.settles:
            self.send(b"")
            if self.sock is None:
                return
        if timeout is not None and not readable([sock.fileno()], max(0.0, timeout)):
            return
        self._feed(receive(sock, READ_SIZE) or b"")

    def drain(self) -> None:
        """Process what is already there, without waiting."""
        sock = self.sock
        while sock is not None and sock is self.sock:
            data = receive(sock, READ_SIZE, socket.MSG_DONTWAIT)
            if data is None:
                return
            self._feed(data)
            if len(data) < READ_SIZE:
                return

    def _feed(self, data: bytes) -> None:
        if not data:
            self.lose(WORKER_GONE)
            return
        try:
            for kind, flags, payload in self.reader.feed(data):
                self.frames.process(kind, flags, payload)
        except KzpoolError as exc:
            log.error("lease %s: bad frame from the pool: %s", self.state.id, exc)
            self.lose(Reason("ProtocolError", 0, str(exc)))

    # ----- losing ---------------------------------------------------------------------------

    def after_fork(self) -> None:
        """In a child of ``fork()``: the socket is the parent's conversation; the child's
        copy is closed without a word on it (the parent's stays open), and the channel is
        lost here (:data:`~kzpool.lease.forks.FORKED`)."""
        self.lose(FORKED_REASON)

    def lose(self, reason: Reason) -> None:
        """The channel is gone (or was never had): close, and tell ``on_lost`` once."""
        if self.dead:
            return
        self.dead = True
        had_channel, self.has_channel = self.has_channel, False
        self.settles.clear()  # acks for the lost channel: meaningless now
        self.on_lost(reason, self.waiting is not None, had_channel)
        self.replies.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # ----- what the frames say (FrameSink) --------------------------------------------------

    @property
    def accepting(self) -> bool:
        return not self.dead

    def delivered(self, tag: int, redelivered: bool, consumer_tag: str, exchange: str,
                  routing_key: str, encoded: bytes, body: bytes) -> None:
        method = spec.Basic.Deliver(consumer_tag, tag, redelivered, exchange, routing_key)
        self.hooks.on_delivery((method, props.decode(encoded), body))

    def got(self, tag: int, redelivered: bool, exchange: str, routing_key: str,
            encoded: bytes, body: bytes, count: int) -> None:
        method = spec.Basic.GetOk(tag, redelivered, exchange, routing_key, count)
        self.got_message = (method, props.decode(encoded), body)

    def returned(self, code: int, text: str, exchange: str, routing_key: str,
                 encoded: bytes, body: bytes) -> ReturnedMessage:
        method = spec.Basic.Return(code, text, exchange, routing_key)
        message = ReturnedMessage(method, props.decode(encoded), body)
        self.hooks.on_returned(message)
        return message

    def unclaimed(self, code: int, text: str) -> None:
        pass  # the lease's return callbacks have it

    def replied(self, reply: Reply) -> None:
        if reply.id == self.waiting:  # a call given up on is answered late
            self.replies[reply.id] = reply

    def leased(self, event: messages.Leased) -> None:
        self.has_channel, self.route = True, event.route
        self.state.bound(event)

    def cancelled(self, consumer_tag: str) -> None:
        self.state.topology.record("call", "basic_cancel", {"consumer_tag": consumer_tag})
        self.hooks.on_cancelled(consumer_tag)

    def lost(self, reason: Reason) -> None:
        self.lose(reason)

    def set_blocked(self, blocked: bool) -> None:
        self.state.set_blocked(blocked)

    def refused(self, event: messages.Refused) -> None:
        self.refusal = event
