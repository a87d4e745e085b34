"""Who may have one more lease: the per-client limits, lease ownership, hidden brokers.

Pure decisions on the lease book's rows, no I/O; each refusal is an error that names the
``[pool]`` setting at fault, for the client to read:

* ``max_leases_per_process`` and ``max_leases_per_uid``: leases that hold a channel or
  wait for one (a lost lease holds nothing until it comes back: it is counted again then);
* a lease id belongs to the process that got it (pid and uid, from its peer credentials):
  a request naming another process's lease is :class:`~kzpool.common.errors.LeaseNotYours`;
* ``hidden_brokers``: how many brokers the config does not list a sticky lease may name.

Runs in the master's loop only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from ..common.errors import LeaseNotYours, LimitExceeded
from ..common.settings import PoolSettings
from ..worker.clients import lease_limit
from .assign import Assignment, RowState
from .slots import Slot, broker_key

UNKNOWN_UID = -1  # a row whose client's uid could not be read (it died first)


class Holdings:
    """The lease ids of each client process and of each uid, kept with the rows."""

    def __init__(self) -> None:
        self.by_pid: dict[int, set[str]] = defaultdict(set)
        self.by_uid: dict[int, set[str]] = defaultdict(set)

    def add(self, row: Assignment) -> None:
        self.by_pid[row.client_pid].add(row.lease)
        self.by_uid[row.client_uid].add(row.lease)

    def drop(self, row: Assignment) -> None:
        for index, key in ((self.by_pid, row.client_pid), (self.by_uid, row.client_uid)):
            leases = index.get(key)
            if leases is not None:
                leases.discard(row.lease)
                if not leases:
                    del index[key]

    def refusal(self, rows: Mapping[str, Assignment], pid: int, uid: int,
                settings: PoolSettings, exclude: str | None = None) -> LimitExceeded | None:
        """Why process ``pid`` of ``uid`` may not hold one more lease (besides ``exclude``,
        the one it asks for again), or ``None``."""
        return lease_limit(
            pid, uid,
            _holding(rows, self.by_pid.get(pid, set()), settings.max_leases_per_process, exclude),
            _holding(rows, self.by_uid.get(uid, set()), settings.max_leases_per_uid, exclude),
            settings)

    def over(self, rows: Mapping[str, Assignment], row: Assignment,
             settings: PoolSettings) -> LimitExceeded | None:
        """Why ``row``, bound already, is one lease too many for its client (a lease a
        worker served directly, while the client's other leases were on other workers)."""
        return self.refusal(rows, row.client_pid, row.client_uid, settings, exclude=row.lease)


def _holding(rows: Mapping[str, Assignment], leases: set[str], limit: int,
             exclude: str | None) -> int:
    """How many of ``leases`` but ``exclude`` hold a channel or wait for one (a count below
    ``limit`` may be rough: all it is compared with is ``limit``)."""
    others = len(leases) - (exclude in leases)
    if others < limit:
        return others  # the common case: no need to look at their states
    return sum(1 for lease in leases
               if lease != exclude and rows[lease].state is not RowState.LOST)


def check_owner(row: Assignment, pid: int, uid: int) -> None:
    """A request names ``row``'s lease: it must come from the process that got it."""
    same_uid = row.client_uid in (uid, UNKNOWN_UID)
    if row.client_pid != pid or not same_uid:
        raise LeaseNotYours(f"lease {row.lease} belongs to another process (pid"
                            f" {row.client_pid}): a lease id serves only the process it was"
                            " given to", lease=row.lease)


def hidden_to_retire(slots: Iterable[Slot], rows: Iterable[Assignment], masked: str,
                     limit: int) -> list[Slot]:
    """Room for one more hidden broker: the workers of an unused one to remove first (none
    if there is room already); :class:`LimitExceeded` naming ``hidden_brokers`` if none may
    go (``masked``: the broker asked for, password masked)."""
    if limit == 0:
        raise LimitExceeded(f"broker {masked} is not in the pool's config, and [pool]"
                            " hidden_brokers = 0 lets a sticky lease name only a broker of"
                            " the config", "hidden_brokers")
    hidden: dict[str, list[Slot]] = {}
    for slot in sorted(slots, key=lambda s: s.spec.broker.order):
        if slot.spec.broker.hidden and not slot.removed:
            hidden.setdefault(broker_key(slot.spec.broker), []).append(slot)
    if len(hidden) < limit:
        return []
    used = {row.broker for row in rows if row.broker is not None}
    unused = [key for key in hidden if key not in used]
    if not unused:
        raise LimitExceeded(f"broker {masked} is not in the pool's config, and the"
                            f" {limit} hidden broker(s) that [pool] hidden_brokers = {limit}"
                            " allows are all in use", "hidden_brokers")
    return hidden[unused[0]]  # the oldest unused one
