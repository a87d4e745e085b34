"""The states of kzpool's state machines."""

from __future__ import annotations

import enum


class ConnState(enum.Enum):
    """A connection worker's link to its broker, as the worker reports it."""

    STARTING = "starting"  # forked, not yet reporting
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # the broker closed the connection for a client's call
    # (503, 540, ...): the broker is up, and the worker connects again at once
    WAITING = "waiting"  # backing off before the next connect
    FAILED = "failed"  # a restart will not fix it (credentials, vhost)
    STOPPING = "stopping"
    DEAD = "dead"  # the worker process is gone; the master will respawn it

    @property
    def available(self) -> bool:
        return self is ConnState.CONNECTED

    @property
    def final(self) -> bool:
        return self is ConnState.FAILED

    @property
    def connecting(self) -> bool:
        """A connect attempt is under way."""
        return self in (ConnState.CONNECTING, ConnState.RECONNECTING)


class ProcState(enum.Enum):
    """An in-service consumer process, as the master sees it."""

    RUNNING = "running"
    DEAD = "dead"  # exited; a new one starts after a backoff
    FAILED = "failed"  # cannot start (handler); not restarted


class PoolState(enum.Enum):
    """The master's own life cycle."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
