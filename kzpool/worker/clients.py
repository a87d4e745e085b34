"""Whose leases a worker holds: the client process (pid and uid, its peer credentials) of
every lease bound to one of its channels or waiting for one, and the limits on them
(leases per process and per uid; ``max_peers`` client sockets, below the file limit).

The master holds the same limits over every worker (:mod:`kzpool.master.admission`); a
worker checks the requests it serves directly against its own leases, so that a client
leasing in a loop at a worker is stopped there.  Pure bookkeeping, no I/O.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass

from ..common.errors import LimitExceeded
from ..common.options import LeaseOptions
from ..common.settings import PoolSettings
from ..common.sockets import file_limit

FILE_HEADROOM = 32  # descriptors a worker needs besides its clients'


@dataclass(frozen=True)
class Waiting:
    """A client whose lease waits for a channel to open."""

    lease: str
    sock: socket.socket
    options: LeaseOptions
    pid: int
    uid: int


class Clients:
    def __init__(self) -> None:
        self.owners: dict[str, tuple[int, int]] = {}  # lease → (pid, uid)
        self.per_pid: Counter[int] = Counter()
        self.per_uid: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self.owners)

    def hold(self, lease: str, pid: int, uid: int) -> None:
        self.drop(lease)
        self.owners[lease] = (pid, uid)
        self.per_pid[pid] += 1
        self.per_uid[uid] += 1

    def drop(self, lease: str) -> None:
        owner = self.owners.pop(lease, None)
        if owner is None:
            return
        for counts, key in ((self.per_pid, owner[0]), (self.per_uid, owner[1])):
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]

    def refusal(self, pid: int, uid: int, settings: PoolSettings) -> LimitExceeded | None:
        """Why process ``pid`` of ``uid`` may not have one more lease here, or ``None``."""
        return lease_limit(pid, uid, self.per_pid[pid], self.per_uid[uid], settings)


def full(peers: int, settings: PoolSettings) -> LimitExceeded | None:
    """Why a worker holding ``peers`` client sockets takes no more: ``max_peers``, kept
    :data:`FILE_HEADROOM` below the file limit; ``None`` if it has room."""
    limit = file_limit()
    if peers < min(settings.max_peers, limit - FILE_HEADROOM):
        return None
    return LimitExceeded(f"this connection serves {peers} clients already ([pool] max_peers ="
                         f" {settings.max_peers}, file limit {limit}); try again later",
                         "max_peers")


def lease_limit(pid: int, uid: int, by_pid: int, by_uid: int,
                settings: PoolSettings) -> LimitExceeded | None:
    """The limit that process ``pid`` of ``uid`` meets, holding ``by_pid`` leases itself and
    its uid ``by_uid``, when it asks for one more; ``None`` if it meets none."""
    limit = settings.max_leases_per_process
    if by_pid >= limit:
        return LimitExceeded(f"this process (pid {pid}) holds {limit} leases already ([pool]"
                             f" max_leases_per_process = {limit}); close one first",
                             "max_leases_per_process")
    limit = settings.max_leases_per_uid
    if by_uid >= limit:
        return LimitExceeded(f"the processes of uid {uid} hold {limit} leases already ([pool]"
                             f" max_leases_per_uid = {limit}); close one first",
                             "max_leases_per_uid")
    return None
