"""An asyncio lease's link to the worker that owns its channel: calls, losses, recovery.

The event loop's counterpart of :class:`kzpool.client.link.LeaseLink`, on the same wire and
the same pure pieces: the lasting :class:`~kzpool.lease.state.LeaseState` (tags unique
across channels, the confirm book, the topology to replay) and the frame dispatch
(:mod:`kzpool.lease.frames`).  The stream of the channel now is an
:class:`~kzpool.aio.bound.Bound`, made anew on every acquire; frames are handled as they
are read, from the loop's read callback: a delivery goes to the owner, a confirm resolves
its future, a reply wakes its call.

When the channel is lost the link says so at once (pending calls are tried again on the new
channel; a call the broker refused gets that error) and recovers in a task of its own
(:mod:`.recovery`: acquire, replay, re-send), so consumers come back without anyone calling;
the owner is heard first (:meth:`LinkOwner.recovering`: a channel error's close callbacks).
It tries until it succeeds or the lease is closed, backing off between tries; calls made
meanwhile wait up to the lease's ``timeout`` and then raise why the last try failed (a
sticky lease's :class:`~kzpool.BrokerUnavailable` names its broker; a pool that is gone,
:class:`~kzpool.PoolNotRunning`).  An error no retry will mend (the pool refusing the
request as malformed or forbidden) ends the lease: calls raise it.  Not thread-safe: the
loop's thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from typing import Any

from ..common import messages, wire
from ..common.backoff import Backoff
from ..common.errors import (
    ChannelClosedByBroker,
    ConnectionBlockedTimeout,
    KzpoolError,
    LeaseRequestError,
    LeaseTimeout,
    PoolAccessDenied,
)
from ..common.messages import Reason, Reply
from ..common.options import LeaseOptions
from ..common.wire import Flag, Kind
from ..lease import forks
from ..lease.state import POOL_RESTARTED, LeaseState
from .bound import Bound, Got, LinkOwner
from .errors import ChannelClosed, ChannelInvalidStateError, DeliveryTakenBack, channel_error
from .pool import PoolClient
from .recovery import Recovery

log = logging.getLogger("kzpool.aio")

FATAL = (LeaseRequestError, PoolAccessDenied)  # a retry would be refused the same way
STALE = 1.0  # seconds unread after which a settle lets the loop read first


class Phase(enum.Enum):
    """Where a link is in its life."""

    OPENING = "opening"  # no channel yet
    READY = "ready"  # a channel, its topology replayed: calls go through
    LOST = "lost"  # getting another channel (and replaying)
    FAILED = "failed"  # a recovery met an error no retry will mend
    CLOSED = "closed"  # closed by its owner


class LeaseLink:
    def __init__(self, pool: PoolClient, owner: LinkOwner, options: LeaseOptions) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = pool
        self.owner = owner
        self.state = LeaseState(options)
        self.phase = Phase.OPENING
        self.current: Bound | None = None  # the stream of the channel now
        self.failure: BaseException | None = None  # why the last recovery try failed
        self.generation = 0  # channels held so far
        self._changed: asyncio.Future[None] | None = None  # resolved on each state change
        self._rid = 0
        self._recovery: asyncio.Task[None] | None = None
        self.recovery = Recovery(pool, self.state, self._attach)
        self.pid = os.getpid()  # the process it was made in
        self.forked: KzpoolError | None = None  # in a child of fork(): why it is unusable
        forks.watch(self)

    async def _attach(self, sock: socket.socket) -> Bound:
        bound = Bound(self.state, self.owner, self._on_lost, self.changed)
        self.current = bound
        await bound.attach(sock)
        return bound

    # ----- what the lease is ----------------------------------------------------------------

    @property
    def id(self) -> str | None:
        return self.state.id

    @property
    def broker(self) -> str | None:
        return self.state.broker

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def paused(self) -> bool:
        """The stream's buffer is over its high mark: writers wait (:meth:`writable`)."""
        current = self.current
        return current is not None and current.stream is not None and current.stream.paused

    async def writable(self) -> None:
        """Until the stream's buffer is below its low mark again."""
        current = self.current
        if current is not None and current.stream is not None:
            await current.stream.drain()

    # ----- life -----------------------------------------------------------------------------

    def after_fork(self) -> None:
        """In a child of ``fork()``: an event loop does not survive a fork (its selector is
        shared with the parent's, its futures are the parent's), so neither does a channel:
        its calls raise why, its close does nothing but mark it closed, and its socket is put
        out of the child's reach without a word on it nor a touch of the loop
        (:meth:`Bound.after_fork`).  The parent's channel goes on as before."""
        self.forked = forks.forked_error(
            "this channel", self.pid, "open a channel in this process, on its own event loop"
            " (the connection made before the fork may still open it)")
        current, self.current = self.current, None
        if current is not None:
            current.after_fork()
        self.phase, self.failure, self._recovery, self._changed = (
            Phase.FAILED, self.forked, None, None)

    async def open(self) -> None:
        """The first channel: errors (no pool, refused, no broker in time) raise here."""
        await self.recovery.acquire()
        self.phase = Phase.READY
        self.generation = 1
        self.changed()

    async def close(self) -> None:
        """Give the channel back (the worker cancels its consumers, unacked messages go back
        to their queues) and wait, up to the lease's timeout, until the worker says the
        broker closed it, or handed it on; publishes still unconfirmed fail."""
        if self.phase is Phase.CLOSED:
            return
        if self.forked is not None:  # the parent's loop and socket are left alone
            self.phase = Phase.CLOSED
            return
        self.phase = Phase.CLOSED
        self.changed()
        recovery, self._recovery = self._recovery, None
        if recovery is not None and recovery is not asyncio.current_task():
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await recovery
        current, self.current = self.current, None
        error = ChannelInvalidStateError("the channel was closed", lease=self.id)
        if current is not None:
            await current.close(messages.encode(messages.Close()), error, self.state.timeout)
        self.state.confirms.fail_all(ChannelInvalidStateError("the channel was closed",
                                                              lease=self.id))

    # ----- calls ----------------------------------------------------------------------------

    async def call(self, op: str, method: str, args: dict[str, Any],
                   record: bool = True) -> Reply:
        """One call and its reply, across moves (up to the lease's timeout); recorded for
        replay.  A call the broker refuses raises aiormq's error for its code."""
        deadline = self.loop.time() + self.state.timeout
        while True:
            await self.ready(deadline)
            reply = await self.send_call(op, method, args)
            if reply is not None:
                break
            if self.loop.time() > deadline:
                raise LeaseTimeout(f"{method} got no reply within {self.state.timeout} s",
                                   lease=self.id)
        if reply.error is not None:
            raise channel_error(reply.error.code, reply.error.text)
        if record:
            self.state.topology.record(op, method, args)
        return reply

    async def send_call(self, op: str, method: str, args: dict[str, Any]) -> Reply | None:
        """One try on the current channel: its reply, ``None`` if the channel was lost."""
        current = self.current
        if current is None or not current.live:
            return None
        self._rid += 1
        return await current.call(self._rid, messages.REQUESTS[op](id=self._rid, method=method,
                                                                   args=args))

    def take_get(self, reply: Reply) -> Got | None:
        """The message a ``basic.get`` reply is for."""
        current = self.current
        return None if current is None else current.take_get(reply)

    async def ready(self, deadline: float | None = None) -> None:
        """Until the link has a channel (replayed).  After ``deadline``: why the last try
        failed, or LeaseTimeout."""
        if deadline is None:
            deadline = self.loop.time() + self.state.timeout
        while self.phase is not Phase.READY:
            if self.phase is Phase.CLOSED:
                raise ChannelInvalidStateError("the channel is closed", lease=self.id)
            if self.phase is Phase.FAILED:
                assert self.failure is not None
                raise self.failure
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                if self.failure is not None:
                    raise self.failure
                raise LeaseTimeout(f"no channel within {self.state.timeout} s", lease=self.id)
            await self._wait_change(remaining)

    async def wait_unblocked(self) -> None:
        deadline = self.loop.time() + self.state.timeout
        while self.state.blocked:
            await self.ready(deadline)
            if self.loop.time() > deadline:
                raise ConnectionBlockedTimeout(f"the broker {self.broker} blocked publishing"
                                               f" for over {self.state.timeout} s",
                                               broker=self.broker)
            await self._wait_change(deadline - self.loop.time())

    async def _wait_change(self, timeout: float) -> None:
        if self._changed is None:
            self._changed = self.loop.create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._changed)

    def changed(self) -> None:
        """Wake whoever waits for the state (ready, failed, closed, unblocked)."""
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    def send(self, data: bytes) -> None:
        """Queue frames on the channel; dropped if there is none now (a publish with
        confirms is in the book, and sent again on the next channel)."""
        current = self.current
        if current is not None and current.live:
            current.send(data)

    async def read_up(self) -> None:
        """Before a settle: if a coroutine held the loop (nothing read for :data:`STALE`
        seconds), let the loop read what the worker sent meanwhile (a cancel, a loss), so
        the settle knows what the broker took back.  Two passes of the loop: one polls the
        socket, the next has read it."""
        if time.monotonic() - self.state.read_at > STALE:
            for _ in range(2):
                await asyncio.sleep(0)

    def settle(self, delivery_tag: int, flags: int) -> None:
        """Ack, nack or reject; a tag of a lost channel is dropped (the broker redelivers);
        :class:`DeliveryTakenBack` if the broker took the delivery back."""
        taken = self.taken_back(delivery_tag, flags)
        current = self.current
        live = current is not None and current.live
        tag = self.state.tags.channel_tag(delivery_tag) if live else None
        if tag is not None:
            self.send(wire.tagged(Kind.SETTLE, tag, flags))
        elif taken is None:
            log.debug("lease %s: dropping settle of tag %d from a lost channel", self.id,
                      delivery_tag)
        if taken is not None:
            raise taken

    def taken_back(self, delivery_tag: int, flags: int) -> DeliveryTakenBack | None:
        """The error of a settle of ``delivery_tag`` (``flags``: multiple or not) if it
        covers a delivery the broker took back; told once."""
        found = self.state.taken_back.check(delivery_tag, bool(flags & Flag.MULTIPLE))
        if found is None:
            return None
        tag, why = found
        log.warning("lease %s: settle of delivery %d, which the broker took back", self.id, tag)
        return DeliveryTakenBack(why.describe(tag), delivery_tag=tag,
                                 consumer_tag=why.consumer_tag, lease=self.id)

    # ----- losses and recovery --------------------------------------------------------------

    def _on_lost(self, reason: Reason, reported: bool, had_channel: bool) -> None:
        """What an :class:`Bound` says when its channel is gone (once)."""
        if self.forked is not None:
            return
        confirms = self.state.confirms
        if reason.channel_error and confirms.pending:
            confirms.fail_all(ChannelClosedByBroker(reason.code, reason.text))
            reported = True  # caused by a publish: not re-sent
        if reason.channel_error and not reported and had_channel:
            log.warning("lease %s: the broker closed the channel: %d %s", self.id, reason.code,
                        reason.text)
        was_ready = self.phase is Phase.READY
        if self.phase is not Phase.CLOSED and had_channel:
            self.phase = Phase.LOST
        if had_channel:
            log.info("lease %s lost its channel on %s: %s", self.id, self.broker, reason.text)
            self.owner.on_lost(reason)
        if was_ready:
            self.recover(reason)

    def recover(self, reason: Reason) -> None:
        """Get another channel in the background."""
        if self._recovery is None or self._recovery.done():
            self._recovery = self.loop.create_task(self._recover(reason),
                                                   name=f"kzpool lease {self.id} recovery")

    async def _recover(self, reason: Reason) -> None:
        old = self.broker
        retry = Backoff(0.05, 2.0)
        recovery = self.recovery
        await self.owner.recovering(reason)
        while self.phase is Phase.LOST:
            try:
                if await recovery.replay(await recovery.acquire(), self.send_call):
                    break
            except FATAL as exc:
                self._failed(exc, final=True)
                return
            except (KzpoolError, ChannelClosed, OSError) as exc:
                self._failed(exc)
                await asyncio.sleep(retry.next_delay())
            except Exception as exc:  # a fault of ours: say so, and try again all the same
                log.exception("lease %s: recovery failed", self.id)
                self._failed(exc)
                await asyncio.sleep(retry.next_delay())
        if self.phase is not Phase.LOST:
            return  # closed meanwhile
        self.phase, self.failure = Phase.READY, None
        self.generation += 1
        self.changed()
        why = POOL_RESTARTED if recovery.pool_wait.waited else reason.text
        recovery.pool_wait.waited = False
        log.info("lease %s has a channel again, on %s (lost on %s: %s)", self.id, self.broker,
                 old, why)
        self.owner.on_move(old, why, {})

    def _failed(self, exc: BaseException, final: bool = False) -> None:
        log.warning("lease %s: no channel yet: %s", self.id, exc)
        self.failure = exc
        if final:
            self.phase = Phase.FAILED
            self.state.confirms.fail_all(exc)
        self.changed()
