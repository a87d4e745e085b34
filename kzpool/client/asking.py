"""What both links follow when they ask the pool for a channel, blocking or asyncio.

How long the pool's answer may take past the lease's own timeout, the reason a channel is
given up for, and :class:`PoolWait`: when the pool's socket is gone (its master killed, or
restarted by systemd), a lease that had a channel waits for the pool to come back, up to
its ``timeout``; a first lease does not, nor an in-service consumer's.  Pure: the links
do the waiting.
"""

from __future__ import annotations

from ..common.backoff import Backoff
from ..common.errors import KzpoolError, PoolAccessDenied, PoolNotRunning
from ..common.messages import Reason
from .state import LeaseState

REPLY_GRACE = 5.0  # the master answers a lease request within its timeout; allow this more
POOL_RETRY = (0.005, 0.25)  # first and longest wait between two looks for a pool restarting


def gave_up(error: KzpoolError) -> Reason:
    """The reason a channel is given up for ``error`` (no channel this time: the lease
    stays lost, so the next call asks again)."""
    return Reason(type(error).__name__, 0, str(error))


class PoolWait:
    """While the pool's socket is gone: a lease that had a channel waits for the pool to
    come back (a restart), a first lease does not, nor one that is not ``patient`` (an
    in-service consumer's: a child of the master, it goes with it).  Both links' rule;
    pure."""

    def __init__(self, state: LeaseState, patient: bool = True) -> None:
        self.state = state
        self.patient = patient
        self.waited = False  # the pool was gone since this was last reset (a restart)
        self._retry = Backoff(*POOL_RETRY)

    def start(self) -> None:
        """A new look for the pool: the first wait is short again."""
        self._retry = Backoff(*POOL_RETRY)

    def after(self, error: PoolNotRunning, left: float) -> float:
        """How long to wait before looking again, ``left`` seconds before the deadline;
        raises ``error`` if the lease may not wait (a first lease, access refused, no
        time left)."""
        if (isinstance(error, PoolAccessDenied) or not self.patient or self.state.id is None
                or left <= 0):
            raise error
        self.waited = True
        return min(self._retry.next_delay(), left)
