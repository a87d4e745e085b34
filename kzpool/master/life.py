"""A supervised child's life cycle, and the one rule for what follows its exit.

Connection workers and consumer processes are both kept alive the same way: a child that
crashed is started again after a backoff (reset once it had lived :data:`STABLE_AFTER`
seconds), one that was recycled on purpose at once, and one that exited with its *fatal*
code (a restart will not fix it: bad credentials, a handler that cannot load) not at all.
Pure decisions: the master acts on the :class:`Verdict`.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import psutil

from ..common import exitcodes
from ..common.backoff import Backoff

STABLE_AFTER = 30.0  # a child that lived this long resets its respawn backoff


@dataclass
class Life:
    """The current process of one child slot, and when the next one may start."""

    backoff: Backoff
    pid: int = 0
    process: psutil.Process | None = field(default=None, repr=False)
    started: float = 0.0  # monotonic
    respawn_at: float = 0.0  # monotonic; 0: not waiting
    restarts: int = 0

    def born(self, pid: int, process: psutil.Process | None, now: float) -> None:
        self.pid, self.process, self.started, self.respawn_at = pid, process, now, 0.0

    def died(self) -> None:
        self.pid, self.process = 0, None

    def due(self, now: float) -> bool:
        """No process, and its respawn time has come."""
        return not self.pid and bool(self.respawn_at) and now >= self.respawn_at


@dataclass(frozen=True)
class Verdict:
    respawn: bool
    delay: float
    why: str  # "was killed by SIGKILL (out of memory?)", for the log
    code: int | None  # the exit code, if it exited


def judge(life: Life, status: int, now: float, fatal: int, recycled: bool) -> Verdict:
    """What follows a child's exit with wait ``status``; ``recycled``: replaced on purpose."""
    why = exit_reason(status)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if code == fatal:
        return Verdict(False, 0.0, why, code)
    life.restarts += 1
    if recycled:
        life.backoff.reset()
        return Verdict(True, 0.0, why, code)
    if now - life.started > STABLE_AFTER:
        life.backoff.reset()
    return Verdict(True, life.backoff.next_delay(), why, code)


def exit_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        hint = " (out of memory?)" if sig == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return exitcodes.describe(os.WEXITSTATUS(status))
