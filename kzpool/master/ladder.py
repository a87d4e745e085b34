"""The shutdown ladder, as decisions: who gets which signal when, and when it is over.

SIGTERM to the consumers first (they finish the message in hand); once they are gone, or
``grace`` before the deadline, SIGKILL to those still busy (their unacked messages go back
to the queue) and SIGTERM to the workers (they close their connections); once the workers
are gone the registry goes; at the deadline SIGKILL to everyone left.  A second signal moves
the deadline to now.  Pure: the master sends what :meth:`Ladder.step` says.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field


@dataclass
class Step:
    signals: list[tuple[list[int], int]] = field(default_factory=list)  # (pids, signal)
    stop_registry: bool = False
    final_reap: bool = False  # the deadline passed: reap what was SIGKILLed, blocking
    done: bool = False


class Ladder:
    def __init__(self, timeout: float, now: float) -> None:
        self.deadline = now + timeout
        self.grace = min(1.0, timeout / 3)  # left for the workers to close
        self.workers_told = False

    def begin(self, consumers: list[int]) -> Step:
        return Step(signals=[(consumers, signal.SIGTERM)])

    def hurry(self, now: float) -> None:
        """A second signal: stop now."""
        self.deadline = min(self.deadline, now)

    def step(self, now: float, consumers: list[int], workers: list[int], registry: int,
             registry_open: bool) -> Step:
        step = Step()
        if not self.workers_told and (not consumers or now >= self.deadline - self.grace):
            if consumers:
                step.signals.append((consumers, signal.SIGKILL))
            step.signals.append((workers, signal.SIGTERM))
            self.workers_told = True
        step.stop_registry = not workers and registry_open
        if not workers and not consumers and not registry:
            step.done = True
        elif now >= self.deadline:
            step.signals.append(([*consumers, *workers, *([registry] if registry else [])],
                                 signal.SIGKILL))
            step.final_reap = step.done = True
        return step
