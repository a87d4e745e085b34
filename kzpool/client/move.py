"""What a lease's ``on_move`` callback gets: :class:`MoveEvent`.

Both clients pass it, the blocking lease and the asyncio channel, so it lives here on its
own.  ``reason`` says why the old channel went (the broker's or the worker's reason, e.g.
``"worker gone"``, ``"moved to the primary"``), or :data:`POOL_RESTARTED` when the pool's
own socket went away and the lease waited for the pool to come back.  Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

POOL_RESTARTED = "pool restarted"


@dataclass(frozen=True)
class MoveEvent:
    """Passed to ``on_move``: the lease now runs on ``new_broker``."""

    lease: str
    old_broker: str | None
    new_broker: str | None
    reason: str
    renamed: dict[str, str]  # server-named queues: old name → new name
