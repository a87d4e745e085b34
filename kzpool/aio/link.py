"""An asyncio lease's link to the worker that owns its channel: frames, calls, losses.

The twin of :class:`kzpool.client.link.LeaseLink` for the event loop, on the same wire
(:mod:`kzpool.common.wire`, :mod:`kzpool.common.messages`) and the same pure bookkeeping:
:class:`~kzpool.client.tags.TagMap` (delivery tags unique across channels),
:class:`~kzpool.client.confirms.ConfirmBook` (which publish a confirm is for, what to send
again) and :class:`~kzpool.client.topology.Topology` (what to replay).  Frames are handled
as they are read, from the loop's read callback: a delivery goes to the owner, a confirm
resolves its future, a reply wakes its call.

When the channel is lost the link says so at once (pending calls are tried again on the new
channel; a call the broker refused gets that error) and :mod:`.moves` gets another in the
background, so consumers come back without anyone calling.  Calls made meanwhile wait for
it, up to the lease's ``timeout``.  Not thread-safe: the loop's thread only.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any, Protocol

from ..client.backend import route_key
from ..client.confirms import ConfirmBook
from ..client.tags import TagMap
from ..client.topology import Topology
from ..common import messages, wire
from ..common.errors import ChannelClosedByBroker, ConnectionBlockedTimeout, LeaseTimeout
from ..common.messages import Reason, Reply
from ..common.wire import Kind
from .client import AioPoolClient
from .errors import ChannelInvalidStateError, channel_error
from .stream import FrameStream

log = logging.getLogger("kzpool.aio")

_DELIVER, _CONFIRM, _RETURN, _JSON = map(int, (Kind.DELIVER, Kind.CONFIRM, Kind.RETURN,
                                               Kind.JSON))
_GET = int(wire.Flag.GET)
_REDELIVERED = int(wire.Flag.REDELIVERED)


class LinkState(enum.Enum):
    OPENING = "opening"  # no channel yet
    READY = "ready"  # a channel, its topology replayed: calls go through
    LOST = "lost"  # getting another channel (and replaying)
    FAILED = "failed"  # a recovery met an error no retry will mend
    CLOSED = "closed"  # closed by its owner


class LinkOwner(Protocol):
    """What a link tells its channel."""

    def on_delivery(self, tag: int, redelivered: bool, consumer_tag: str, exchange: str,
                    routing_key: str, encoded: bytes, body: bytes) -> None: ...

    def on_return(self, code: int, text: str, exchange: str, routing_key: str,
                  encoded: bytes, body: bytes) -> Any: ...

    def on_lost(self) -> None: ...

    def on_move(self, old_broker: str | None, reason: str, renamed: dict[str, str]) -> None: ...


class LinkBase:
    def __init__(self, pool: AioPoolClient, owner: LinkOwner, kind: str, zone: str | None,
                 broker: str | None, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = pool
        self.owner = owner
        self.kind = kind
        self.zone = zone
        self.sticky = broker
        self.timeout = timeout
        self.route_key = route_key(kind, zone, broker)
        self.state = LinkState.OPENING
        self.id: str | None = None
        self.broker: str | None = None  # the broker serving it now, password masked
        self.broker_zone: str | None = None
        self.channel_number = 0
        self.blocked = False
        self.topology = Topology()
        self.confirms = ConfirmBook()
        self.tags = TagMap()
        self.stream: FrameStream | None = None
        self.bound = False  # the worker bound this stream to a channel
        self.refusal: messages.Refused | None = None
        self.failure: BaseException | None = None  # why the last recovery try failed
        self._binding: asyncio.Future[None] | None = None  # resolved: bound, lost or refused
        self._changed: asyncio.Future[None] | None = None  # resolved on each state change
        self.unreported: Reason | None = None  # a channel error no call has raised yet
        self._replies: dict[int, asyncio.Future[Reply | None]] = {}
        self._rid = 0
        self._got: list[tuple[Any, ...]] = []  # basic.get messages, before their replies
        self._got_for: dict[int, tuple[Any, ...]] = {}  # reply id -> its message

    @property
    def closed(self) -> bool:
        return self.state is LinkState.CLOSED

    @property
    def ready(self) -> bool:
        return self.state is LinkState.READY

    # ----- calls ----------------------------------------------------------------------------

    async def call(self, op: str, method: str, args: dict[str, Any],
                   record: bool = True) -> Reply:
        """One call and its reply, across moves (up to the lease's timeout); recorded for
        replay.  A call the broker refuses raises aiormq's error for its code."""
        deadline = self.loop.time() + self.timeout
        while True:
            await self.wait_ready(deadline)
            reply = await self.send_call(op, method, args)
            if reply is not None:
                break
            if self.loop.time() > deadline:
                raise LeaseTimeout(f"{method} got no reply within {self.timeout} s",
                                   lease=self.id)
        if reply.error is not None:
            raise channel_error(reply.error.code, reply.error.text)
        if record:
            self.topology.record(op, method, args)
        return reply

    async def send_call(self, op: str, method: str, args: dict[str, Any]) -> Reply | None:
        """One try on the current channel: its reply, ``None`` if the channel was lost."""
        stream = self.stream
        if stream is None or not self.bound:
            return None
        self._rid += 1
        rid = self._rid
        future: asyncio.Future[Reply | None] = self.loop.create_future()
        self._replies[rid] = future
        stream.write(messages.encode(messages.REQUESTS[op](id=rid, method=method, args=args)))
        try:
            return await future
        finally:
            self._replies.pop(rid, None)

    def take_get(self, reply: Reply) -> tuple[Any, ...] | None:
        """The message a ``basic.get`` reply is for."""
        return self._got_for.pop(reply.id, None)

    async def wait_ready(self, deadline: float | None = None) -> None:
        """Until the link has a channel (replayed); a channel error no call raised yet is
        raised here, once.  After ``deadline``: why the last try failed, or LeaseTimeout."""
        if self.unreported is not None:
            reason, self.unreported = self.unreported, None
            raise channel_error(reason.code, reason.text)
        if deadline is None:
            deadline = self.loop.time() + self.timeout
        while self.state is not LinkState.READY:
            if self.state is LinkState.CLOSED:
                raise ChannelInvalidStateError("the channel is closed", lease=self.id)
            if self.state is LinkState.FAILED:
                assert self.failure is not None
                raise self.failure
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                if self.failure is not None:
                    raise self.failure
                raise LeaseTimeout(f"no channel within {self.timeout} s", lease=self.id)
            if self._changed is None:
                self._changed = self.loop.create_future()
            try:
                async with asyncio.timeout(remaining):
                    await asyncio.shield(self._changed)
            except TimeoutError:
                continue

    async def wait_unblocked(self) -> None:
        deadline = self.loop.time() + self.timeout
        while self.blocked:
            await self.wait_ready(deadline)
            if self.loop.time() > deadline:
                raise ConnectionBlockedTimeout(f"the broker {self.broker} blocked publishing"
                                               f" for over {self.timeout} s",
                                               broker=self.broker)
            if self._changed is None:
                self._changed = self.loop.create_future()
            try:
                async with asyncio.timeout(deadline - self.loop.time()):
                    await asyncio.shield(self._changed)
            except TimeoutError:
                continue

    def changed(self) -> None:
        """Wake whoever waits for the state (ready, failed, closed, unblocked)."""
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    def send(self, data: bytes) -> None:
        """Queue frames on the channel; dropped if there is none now (a publish with
        confirms is in the book, and sent again on the next channel)."""
        if self.stream is not None and self.bound:
            self.stream.write(data)

    def settle(self, delivery_tag: int, flags: int) -> None:
        """Ack, nack or reject; a tag of a lost channel is dropped (the broker redelivers)."""
        tag = self.tags.channel_tag(delivery_tag) if self.bound else None
        if tag is None:
            log.debug("lease %s: dropping settle of tag %d from a lost channel", self.id,
                      delivery_tag)
            return
        self.send(wire.tagged(Kind.SETTLE, tag, flags))

    # ----- reading --------------------------------------------------------------------------

    def on_frame(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == _DELIVER:
            self._on_deliver(flags, payload)
        elif kind == _CONFIRM:
            self.confirms.confirmed(wire.read_tag(payload), flags)
        elif kind == _RETURN:
            code, text, exchange, routing_key, encoded, body = wire.read_return(payload)
            returned = self.owner.on_return(code, text, exchange, routing_key, encoded, body)
            if not self.confirms.returned(exchange, routing_key, returned):
                log.warning("lease %s: message returned by the broker: %d %s", self.id,
                            code, text)
        elif kind == _JSON:
            self._on_event(messages.decode(payload, messages.TO_CLIENT))

    def _on_deliver(self, flags: int, payload: bytes) -> None:
        if self.stream is None:
            return  # the broker redelivers it on the new channel
        tag, count, ctag, exchange, routing_key, encoded, body = wire.read_deliver(payload)
        tag = self.tags.shown(tag)
        if flags & _GET:
            self._got.append((tag, bool(flags & _REDELIVERED), exchange, routing_key,
                              encoded, body, count))
            return
        self.owner.on_delivery(tag, bool(flags & _REDELIVERED), ctag, exchange, routing_key,
                               encoded, body)

    def _on_event(self, event: messages.Message) -> None:
        match event:
            case Reply():
                if event.method == "Basic.GetOk" and self._got:
                    self._got_for[event.id] = self._got.pop(0)
                future = self._replies.get(event.id)
                if future is not None and not future.done():
                    future.set_result(event)
            case messages.Leased():
                self.bound = True
                self.id, self.broker, self.broker_zone = event.lease, event.broker, event.zone
                self.channel_number, self.blocked = event.channel, event.blocked
                if event.route:
                    self.pool.routes[self.route_key] = event.route
                self._resolve_binding()
            case messages.Redirect():
                self.lost(Reason("Redirect", 0, "ask the master"))
            case messages.Lost(reason=reason):
                self.lost(reason)
            case messages.Move():
                if self.stream is not None:
                    self.stream.write(messages.encode(messages.Bye()))
                self.lost(Reason("Moved", 0, "moved to the primary"))
            case messages.Blocked():
                self.blocked = True
            case messages.Unblocked():
                self.blocked = False
                self.changed()
            case messages.Error(error=error):
                log.warning("lease %s: %s", self.id, error.text)
            case messages.Refused():
                self.refusal = event
                self._resolve_binding()

    def _resolve_binding(self) -> None:
        binding, self._binding = self._binding, None
        if binding is not None and not binding.done():
            binding.set_result(None)

    # ----- losses ---------------------------------------------------------------------------

    def lost(self, reason: Reason) -> None:
        """The channel (or the stream to its worker) is gone: say so, start recovering."""
        stream, self.stream = self.stream, None
        if stream is None:
            return
        had_channel, self.bound = self.bound, False
        stream.close()
        self._resolve_binding()
        reported = self._fail_calls(reason)
        if reason.channel_error and self.confirms.pending:
            self.confirms.fail_all(ChannelClosedByBroker(reason.code, reason.text))
            reported = True  # caused by a publish: not re-sent
        if reason.channel_error and not reported and had_channel:
            log.warning("lease %s: the broker closed the channel: %d %s", self.id, reason.code,
                        reason.text)
            self.unreported = reason
        self._got.clear()
        self._got_for.clear()
        was_ready = self.state is LinkState.READY
        if self.state is not LinkState.CLOSED and had_channel:
            self.state = LinkState.LOST
        if had_channel:
            log.info("lease %s lost its channel on %s: %s", self.id, self.broker, reason.text)
            self.owner.on_lost()
        if was_ready:
            self.recover(reason)

    def _fail_calls(self, reason: Reason) -> bool:
        """Calls in flight: the broker's error if it closed the channel, else tried again."""
        replies, self._replies = self._replies, {}
        for rid, future in replies.items():
            if not future.done():
                future.set_result(Reply(rid, error=reason) if reason.channel_error else None)
        return bool(replies) and reason.channel_error

    def fail_calls(self, error: BaseException) -> None:
        """The link is closed: calls in flight raise ``error``; a wait for a binding ends."""
        replies, self._replies = self._replies, {}
        for future in replies.values():
            if not future.done():
                future.set_exception(error)
        self._resolve_binding()

    def recover(self, reason: Reason) -> None:
        """Get another channel in the background (:mod:`.moves`)."""
        raise NotImplementedError
