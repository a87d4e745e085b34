"""Publisher confirms on a lease: which publish each broker confirm is for.

After ``confirm_delivery()`` every publish gets the next sequence number of the channel, as
the broker counts them, and a :class:`Confirm` (a ``Future``).  A ``basic.ack`` resolves it,
a ``basic.nack`` fails it with :class:`~kzpool.common.errors.NackError`, a ``basic.return``
before its ack fails it with :class:`~kzpool.common.errors.UnroutableError`.  On a move the
publishes not yet confirmed are numbered again, in order, and sent again on the new channel.
Pure bookkeeping: the lease sends and reads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from dataclasses import dataclass
from typing import Any, Protocol

from pika import spec
from pika.adapters.blocking_connection import ReturnedMessage

from ..common.errors import LeaseTimeout, NackError, UnroutableError
from ..common.wire import Flag

_DONE = (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED)
Waiter = Callable[[Callable[[], bool], float | None], bool]  # wait(done, timeout) -> done?


# One condition for every Confirm: a lease is one thread's, and making a Condition per
# publish (what Future() does) cost more than the rest of a pipelined publish.  It is
# reentrant, so concurrent.futures.wait() over several Confirms still takes it once each.
_CONDITION = threading.Condition(threading.RLock())


class Confirm(Future[None]):
    """A pipelined publish confirm; ``result()`` reads the lease until it resolves.

    A ``concurrent.futures.Future`` whose common path (resolved with nobody waiting on it
    from another thread, no done-callbacks) takes no lock."""

    def __init__(self, wait: Waiter, lease: str | None) -> None:
        # Future.__init__'s fields, with the shared condition
        self._condition = _CONDITION
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        self._wait_for = wait
        self._lease = lease

    def done(self) -> bool:
        return self._state in _DONE

    def set_result(self, result: None) -> None:
        if self._state != PENDING or self._waiters or self._done_callbacks:
            super().set_result(result)
        else:
            self._result, self._state = result, FINISHED

    def result(self, timeout: float | None = None) -> None:
        if self._state not in _DONE and not self._wait_for(self.done, timeout):
            raise LeaseTimeout(f"no confirm within {timeout} s", lease=self._lease)
        if self._state == FINISHED and self._exception is None:
            return self._result
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait_for(self.done, timeout)
        return super().exception(0)


class Outcome(Protocol):
    """What a confirm resolves: a :class:`Confirm`, or an asyncio channel's own."""

    def set_result(self, result: None, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass
class Unconfirmed:
    future: Outcome
    data: bytes  # the PUBLISH frame, sent again after a move
    exchange: str
    routing_key: str
    properties: Any
    body: bytes
    returned: Any = None
    faults: int = 0  # connections the broker closed on a fault while it was unconfirmed


class ConfirmBook:
    def __init__(self) -> None:
        self.seq = 0
        self.pending: dict[int, Unconfirmed] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, entry: Unconfirmed) -> None:
        self.seq += 1
        self.pending[self.seq] = entry

    def confirmed(self, tag: int, flags: int) -> None:
        """A broker's ack or nack of ``tag`` (and, with ``multiple``, of every one before)."""
        if flags & Flag.MULTIPLE:  # sequence numbers were inserted in increasing order
            seqs = []
            for seq in self.pending:
                if seq > tag:
                    break
                seqs.append(seq)
        else:
            seqs = [tag]
        for seq in seqs:
            entry = self.pending.pop(seq, None)
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

    def returned(self, exchange: str, routing_key: str, message: Any) -> bool:
        """A ``basic.return``: it belongs to the earliest unconfirmed publish it matches;
        ``False`` if none does."""
        for entry in self.pending.values():
            if entry.returned is None and (entry.exchange, entry.routing_key) == (
                    exchange, routing_key):
                entry.returned = message
                return True
        return False

    def fail_all(self, error: BaseException) -> None:
        for entry in self.pending.values():
            entry.future.set_exception(error)
        self.pending.clear()

    def fault(self, error: BaseException) -> None:
        """The broker closed the connection on a fault while these were unconfirmed: they
        are sent again once, but a publish in flight at a second such close may be its
        cause, and fails with ``error`` rather than close every next connection too."""
        for seq, entry in list(self.pending.items()):
            entry.faults += 1
            if entry.faults > 1:
                del self.pending[seq]
                entry.future.set_exception(error)

    def renumber(self) -> list[bytes]:
        """A new channel: number what is unconfirmed again, in order; the frames to resend."""
        pending, self.pending, self.seq = list(self.pending.values()), {}, 0
        for entry in pending:
            self.add(entry)
        return [entry.data for entry in pending]
