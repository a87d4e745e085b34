"""How an asyncio lease gets a channel, and gets another when it loses one.

As the blocking lease does (:meth:`kzpool.client.link.LeaseLink._acquire`): ask first at
the worker that served this kind of lease last (one round trip), else at the master, which
may hold the request until a broker can serve it.  On a new channel the topology is replayed
in order (exchanges, queues, bindings, QoS, consumers with their tags, confirm mode) and the
publishes not yet confirmed are sent again, renumbered; only then do calls go through.

A recovery runs as a task of its own, started the moment the channel is lost, and tries
until it succeeds or the lease is closed (backing off between tries); calls made meanwhile
wait up to the lease's ``timeout`` and then raise why the last try failed (a sticky lease's
:class:`~kzpool.BrokerUnavailable` names its broker).  An error no retry will mend (the pool
refusing the request as malformed or forbidden) ends the lease: calls raise it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ..common import messages
from ..common.backoff import Backoff
from ..common.errors import (
    KzpoolError,
    LeaseRequestError,
    LeaseTimeout,
    PoolAccessDenied,
    refusal_error,
)
from ..common.messages import Reason
from .errors import ChannelClosed, ChannelInvalidStateError, channel_error
from .link import LinkBase, LinkState
from .stream import attach

log = logging.getLogger("kzpool.aio")

REPLY_GRACE = 5.0  # the master answers a lease request within its timeout; allow this more
FATAL = (LeaseRequestError, PoolAccessDenied)  # a retry would be refused the same way


class AioLink(LinkBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recovery: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """The first channel: errors (no pool, refused, no broker in time) raise here."""
        await self._acquire()
        self.state = LinkState.READY
        self.changed()

    async def close(self) -> None:
        """Give the channel back (the worker cancels its consumers, unacked messages go back
        to their queues); publishes still unconfirmed fail."""
        if self.state is LinkState.CLOSED:
            return
        self.state = LinkState.CLOSED
        self.changed()
        recovery, self._recovery = self._recovery, None
        if recovery is not None and recovery is not asyncio.current_task():
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await recovery
        stream, self.stream = self.stream, None
        self.bound = False
        if stream is not None:
            stream.close(messages.encode(messages.Close()))
        self.fail_calls(ChannelInvalidStateError("the channel was closed", lease=self.id))
        self.confirms.fail_all(ChannelInvalidStateError("the channel was closed", lease=self.id))

    # ----- recovery -------------------------------------------------------------------------

    def recover(self, reason: Reason) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = self.loop.create_task(self._recover(reason),
                                                   name=f"kzpool lease {self.id} recovery")

    async def _recover(self, reason: Reason) -> None:
        old = self.broker
        retry = Backoff(0.05, 2.0)
        while self.state is LinkState.LOST:
            try:
                await self._acquire()
                if await self._replay():
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
        if self.state is not LinkState.LOST:
            return  # closed meanwhile
        self.state, self.failure = LinkState.READY, None
        self.changed()
        log.info("lease %s has a channel again, on %s (lost on %s: %s)", self.id, self.broker,
                 old, reason.text)
        self.owner.on_move(old, reason.text, {})

    def _failed(self, exc: BaseException, final: bool = False) -> None:
        log.warning("lease %s: no channel yet: %s", self.id, exc)
        self.failure = exc
        if final:
            self.state = LinkState.FAILED
            self.confirms.fail_all(exc)
        self.changed()

    async def _replay(self) -> bool:
        """Rebuild the topology on the new channel, then re-send unconfirmed publishes;
        ``False`` if the new channel was lost too.  Queues keep their names: kzpool.aio
        names server-named queues itself, as aio-pika's robust channel does."""
        for step in list(self.topology.steps):
            reply = await self.send_call(step.op, step.method, step.args)
            if reply is None:
                return False
            if reply.error is not None:
                raise channel_error(reply.error.code,
                                    f"replaying {step.method}: {reply.error.text}")
        for data in self.confirms.renumber():
            self.send(data)
        return self.bound

    # ----- a channel from the pool ------------------------------------------------------------

    async def _acquire(self) -> None:
        """Get a channel (new or resumed) and wait for a worker to bind it."""
        deadline = self.loop.time() + self.timeout
        retry = Backoff(0.005, 0.25)
        while True:
            route = self.pool.routes.get(self.route_key)
            sock = await self.pool.open_route(route) if route else None
            if sock is None:
                route = None
                sock = await self.pool.open_pool()  # PoolNotRunning: no channel this time
            self.refusal = None
            self._binding = self.loop.create_future()
            self.stream = await attach(sock, self.on_frame, self.lost)
            self.stream.write(messages.encode(messages.LeaseRequest(
                kind=self.kind, zone=self.zone, broker=self.sticky,
                broker_id=self.route_key[1] if self.sticky else None, lease=self.id,
                timeout=max(0.0, deadline - self.loop.time()))))
            refusal = await self._wait_bound(deadline)
            if refusal is not None:
                error = refusal_error(refusal.code, refusal.error)
                self.lost(Reason(type(error).__name__, 0, str(error)))
                raise error
            if self.bound:
                self.tags.new_channel()
                return
            if route is not None:  # that worker would not: ask the master, at once
                self.pool.routes.pop(self.route_key, None)
                continue
            if self.loop.time() > deadline:
                raise LeaseTimeout(f"no channel within {self.timeout} s", lease=self.id)
            await asyncio.sleep(retry.next_delay())  # the worker had just lost its broker

    async def _wait_bound(self, deadline: float) -> messages.Refused | None:
        """Until the worker binds the stream, or it is lost or refused; the refusal."""
        binding = self._binding
        if binding is not None:
            try:
                async with asyncio.timeout(max(0.0, deadline + REPLY_GRACE - self.loop.time())):
                    await binding
            except TimeoutError:
                self.lost(Reason("Timeout", 0, "no reply"))
        return self.refusal
