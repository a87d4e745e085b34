"""How an asyncio lease gets a channel, and what it sends again on a new one.

As the blocking lease does (:class:`kzpool.client.recovery.Recovery`): ask first at the
worker that served this kind of lease last (one round trip), else at the master, which may
hold the request until a broker can serve it.  Each stream it opens becomes a new
:class:`~kzpool.aio.bound.Bound` (made by the link).  On a new channel the topology is
replayed in order (exchanges, queues, bindings, QoS, consumers with their tags, confirm
mode) and the publishes not yet confirmed are sent again, renumbered; only then do calls
go through.  It works on the lease's lasting :class:`~kzpool.lease.state.LeaseState`; the
link (:mod:`.link`) runs it, in a task of its own after a loss.

A pool restart is a move too: while the pool's socket is gone, a lease that had a channel
waits for the pool to come back, up to its ``timeout`` (then
:class:`~kzpool.PoolNotRunning`); a first lease with no pool fails at once.  Nothing here
blocks the loop.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from ..common import messages
from ..common.backoff import Backoff
from ..common.errors import PoolNotRunning
from ..common.messages import Reason, Reply
from ..lease.asking import REPLY_GRACE, Next, PoolWait, answered
from ..lease.state import LeaseState
from .bound import Bound
from .errors import channel_error
from .pool import PoolClient

SendCall = Callable[[str, str, dict[str, Any]], Awaitable[Reply | None]]


class Recovery:
    """Getting a channel for the lease whose ``state`` it is; ``attach`` turns a socket
    into the lease's :class:`Bound`, reading."""

    def __init__(self, pool: PoolClient, state: LeaseState,
                 attach: Callable[[socket.socket], Awaitable[Bound]]) -> None:
        self.pool = pool
        self.state = state
        self.attach = attach
        self.pool_wait = PoolWait(state)

    async def acquire(self) -> Bound:
        """A stream bound to a channel (new or resumed); raises why there is none."""
        state = self.state
        loop = asyncio.get_running_loop()
        deadline = loop.time() + state.timeout
        retry = Backoff(0.005, 0.25)
        while True:
            route = self.pool.routes.get(state.route_key)
            sock = await self.pool.open_route(route) if route else None
            if sock is None:
                route = None
                sock = await self._open_pool(deadline)
            bound = await self.attach(sock)
            bound.send(messages.encode(state.request(deadline - loop.time())))
            refusal = await _wait_bound(bound, deadline)
            step = answered(bound, refusal, route, state, self.pool.routes,
                            loop.time() > deadline)
            if step is Next.BOUND:
                return bound
            if step is Next.RETRY:
                await asyncio.sleep(retry.next_delay())

    async def replay(self, bound: Bound, send_call: SendCall) -> bool:
        """Rebuild the topology on ``bound``'s new channel, then re-send unconfirmed
        publishes; ``False`` if that channel was lost too.  Queues keep their names:
        kzpool.aio names server-named queues itself, as aio-pika's robust channel does."""
        topology = self.state.topology
        for step in list(topology.steps):
            reply = await send_call(step.op, step.method, step.args)
            if reply is None:
                return False
            topology.replayed(step, reply, {}, channel_error)
        for data in self.state.confirms.renumber():
            bound.send(data)
        return bound.live

    async def _open_pool(self, deadline: float) -> socket.socket:
        """The pool's socket; while it is gone, wait for it (:class:`PoolWait`)."""
        loop = asyncio.get_running_loop()
        self.pool_wait.start()
        while True:
            try:
                return await self.pool.open_pool()
            except PoolNotRunning as exc:
                delay = self.pool_wait.after(exc, deadline - loop.time())
            await asyncio.sleep(delay)


async def _wait_bound(bound: Bound, deadline: float) -> messages.Refused | None:
    """Until the worker binds the stream, or it is lost or refused; the refusal."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(max(0.0, deadline + REPLY_GRACE - loop.time())):
            await bound.binding
    except TimeoutError:
        bound.lose(Reason("Timeout", 0, "no reply"))
    return bound.refusal
