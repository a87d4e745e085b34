"""One stream of an asyncio lease to a worker, bound (or being bound) to a channel.

An :class:`Bound` is made anew on every acquire and lives until its channel is lost or
the lease closes: the :class:`~kzpool.aio.stream.FrameStream`, whether the worker bound it
(or refused), the calls waiting for their replies, and the ``basic.get`` messages read
before their replies.  Each frame goes, from the loop's read callback, to the shared
:class:`~kzpool.lease.frames.Frames`, which writes into the lease's lasting
:class:`~kzpool.lease.state.LeaseState`; deliveries and returns go to the channel
(:class:`LinkOwner`).  When it is lost it closes its stream, settles its calls, and tells
its ``on_lost`` once.  Not thread-safe: the loop's thread only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

from ..common import messages
from ..common.messages import Reason, Reply
from ..lease.frames import Frames, ends_close
from ..lease.state import LeaseState
from .stream import FrameStream, attach

log = logging.getLogger("kzpool.aio")

OnLost = Callable[[Reason, bool, bool], None]  # (reason, a call raised it, was bound)
Got = tuple[Any, ...]  # a basic.get's (tag, redelivered, exchange, key, props, body, count)


class LinkOwner(Protocol):
    """What a link tells its channel."""

    def on_delivery(self, tag: int, redelivered: bool, consumer_tag: str, exchange: str,
                    routing_key: str, encoded: bytes, body: bytes) -> None: ...

    def on_return(self, code: int, text: str, exchange: str, routing_key: str,
                  encoded: bytes, body: bytes) -> Any: ...

    def on_lost(self, reason: Reason) -> None: ...

    async def recovering(self, reason: Reason) -> None:
        """Before the link gets another channel (a channel error: the close callbacks)."""

    def on_cancelled(self, consumer_tag: str) -> None: ...

    def on_move(self, old_broker: str | None, reason: str, renamed: dict[str, str]) -> None: ...


class Bound:
    """A stream to a worker and the calls on it (see the module); :meth:`attach` first."""

    def __init__(self, state: LeaseState, owner: LinkOwner, on_lost: OnLost,
                 on_unblocked: Callable[[], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.state = state
        self.owner = owner
        self.on_lost = on_lost
        self.on_unblocked = on_unblocked
        self.frames = Frames(self, state, log)
        self.stream: FrameStream | None = None
        self.has_channel = False  # the worker bound this stream to a channel
        self.route: str | None = None  # that worker's own socket, once bound
        self.refusal: messages.Refused | None = None
        self.dead = False  # lost or closed: nothing more is read or sent
        self.binding: asyncio.Future[None] = self.loop.create_future()  # bound, lost, refused
        self.replies: dict[int, asyncio.Future[Reply | None]] = {}
        self._got: list[Got] = []  # basic.get messages, before their replies
        self._got_for: dict[int, Got] = {}  # reply id -> its message

    async def attach(self, sock: socket.socket) -> None:
        self.stream = await attach(sock, self.frames.process, self.lose)

    @property
    def live(self) -> bool:
        """Bound to a channel, and not lost: calls and publishes go through."""
        return self.has_channel and not self.dead

    def send(self, data: bytes) -> None:
        if self.stream is not None and not self.dead:
            self.stream.write(data)

    async def call(self, rid: int, request: messages.Message) -> Reply | None:
        """Send a call and wait for its reply; ``None`` if the channel was lost (the broker's
        error instead, if it closed the channel)."""
        future: asyncio.Future[Reply | None] = self.loop.create_future()
        self.replies[rid] = future
        self.send(messages.encode(request))
        try:
            return await future
        finally:
            self.replies.pop(rid, None)

    def take_get(self, reply: Reply) -> Got | None:
        """The message a ``basic.get`` reply is for."""
        return self._got_for.pop(reply.id, None)

    # ----- ending ---------------------------------------------------------------------------

    def after_fork(self) -> None:
        """In a child of ``fork()``: the socket is the parent's conversation, and the event
        loop's selector is shared with the parent's (an unregister here would unregister it
        there).  So the child's descriptor is pointed at ``/dev/null`` rather than closed:
        the parent's socket is out of reach, nothing is said on it, no call reaches the
        loop, and the number stays taken until the transport closes it."""
        self.dead, self.has_channel = True, False
        stream = self.stream
        sock = None if stream is None or stream.transport is None else (
            stream.transport.get_extra_info("socket"))
        if sock is not None and sock.fileno() >= 0:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            os.dup2(null, sock.fileno())
            os.close(null)

    def lose(self, reason: Reason) -> None:
        """The channel (or the stream to its worker) is gone: close, tell ``on_lost`` once."""
        if self.dead:
            return
        self.dead = True
        had_channel, self.has_channel = self.has_channel, False
        if self.stream is not None:
            self.stream.close()
        self._resolve_binding()
        reported = self._fail_calls(reason)
        self._got.clear()
        self._got_for.clear()
        self.on_lost(reason, reported, had_channel)

    async def close(self, last: bytes, error: BaseException, wait: float = 0.0) -> None:
        """Closed by the lease's owner: calls in flight raise ``error``; send ``last`` and,
        with ``wait``, wait until the worker answers it (:func:`~kzpool.lease.frames.
        ends_close`), hangs up, or ``wait`` seconds pass, dropping what else comes
        (deliveries of a closing lease go back to their queues); then close the stream."""
        self.dead = True
        self.has_channel = False
        replies, self.replies = self.replies, {}
        for future in replies.values():
            if not future.done():
                future.set_exception(error)
        self._resolve_binding()
        stream = self.stream
        if stream is None or stream.closed:
            return
        if wait <= 0:
            stream.close(last)
            return
        answered: asyncio.Future[None] = self.loop.create_future()

        def answer(*_args: object) -> None:
            if not answered.done():
                answered.set_result(None)

        def on_frame(kind: int, _flags: int, payload: bytes) -> None:
            if ends_close(kind, payload):
                answer()
        stream.on_frame, stream.on_close = on_frame, answer  # a hang-up: as good as closed
        stream.write(last)
        try:
            async with asyncio.timeout(wait):
                await answered
        except TimeoutError:
            pass
        finally:
            stream.close()

    def _fail_calls(self, reason: Reason) -> bool:
        """Calls in flight: the broker's error if it closed the channel, else tried again;
        whether a call got that error."""
        replies, self.replies = self.replies, {}
        for rid, future in replies.items():
            if not future.done():
                future.set_result(Reply(rid, error=reason) if reason.channel_error else None)
        return bool(replies) and reason.channel_error

    def _resolve_binding(self) -> None:
        if not self.binding.done():
            self.binding.set_result(None)

    # ----- what the frames say (FrameSink) --------------------------------------------------

    @property
    def accepting(self) -> bool:
        return not self.dead

    def delivered(self, tag: int, redelivered: bool, consumer_tag: str, exchange: str,
                  routing_key: str, encoded: bytes, body: bytes) -> None:
        self.owner.on_delivery(tag, redelivered, consumer_tag, exchange, routing_key, encoded,
                               body)

    def got(self, tag: int, redelivered: bool, exchange: str, routing_key: str,
            encoded: bytes, body: bytes, count: int) -> None:
        self._got.append((tag, redelivered, exchange, routing_key, encoded, body, count))

    def returned(self, code: int, text: str, exchange: str, routing_key: str,
                 encoded: bytes, body: bytes) -> Any:
        return self.owner.on_return(code, text, exchange, routing_key, encoded, body)

    def unclaimed(self, code: int, text: str) -> None:
        log.warning("lease %s: message returned by the broker: %d %s", self.state.id, code,
                    text)

    def replied(self, reply: Reply) -> None:
        if reply.method == "Basic.GetOk" and self._got:
            self._got_for[reply.id] = self._got.pop(0)
        future = self.replies.get(reply.id)
        if future is not None and not future.done():
            future.set_result(reply)

    def leased(self, event: messages.Leased) -> None:
        self.has_channel, self.route = True, event.route
        self.state.bound(event)
        self._resolve_binding()

    def cancelled(self, consumer_tag: str) -> None:
        """The broker cancelled a consumer (its queue was deleted): not replayed after a move."""
        self.state.topology.record("call", "basic_cancel", {"consumer_tag": consumer_tag})
        self.owner.on_cancelled(consumer_tag)

    def lost(self, reason: Reason) -> None:
        self.lose(reason)

    def set_blocked(self, blocked: bool) -> None:
        self.state.set_blocked(blocked)
        if not blocked:
            self.on_unblocked()

    def refused(self, event: messages.Refused) -> None:
        self.refusal = event
        self._resolve_binding()
