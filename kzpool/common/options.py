"""A lease's options: one value, from the caller's ``channel()`` to the worker's session.

:class:`LeaseOptions` is what a client asks of a lease (float or sticky, its zone or its
broker, how long it waits, and whatever a worker honours for it).  It is made once, where a
lease is asked for (``connection.channel(...)``, ``PoolClient.lease(...)``, kzpool.aio's
``channel(...)``), and checked as it is made: a bad value is a
:class:`~kzpool.common.errors.LeaseRequestError` naming the option, in the caller.  It then
travels whole: in the lease request, in the master's assignment and its ``adopt``, in the
worker's session and its news to the master, and again on every move.  The pool decodes it
with the same checks (:mod:`.codec` builds it through its constructor), so what a client
sends is checked where it enters the pool.

To add an option: add its field here (with its check in :meth:`LeaseOptions.__post_init__`
and its keyword in :class:`OptionFields`), then read it where it is honoured.

One field is not the caller's: ``connection_id`` names the client connection object the
lease belongs to (``kzpool.connect()``'s ``Connection``, a ``PoolClient``, kzpool.aio's
``Connection``).  The connection sets it on every lease it makes (:meth:`LeaseOptions.of`
refuses it as a keyword); a worker scopes exclusive queues to it, as RabbitMQ scopes them to
the AMQP connection that declared them (:mod:`kzpool.worker.exclusive`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from .errors import BrokerURIError, LeaseRequestError
from .uri import BrokerURI
from .wire import LEASE_ID, MAX_LEASE_ID, MAX_NAME, MAX_URI, text_field

Kind = Literal["float", "sticky"]
KINDS: tuple[Kind, ...] = ("float", "sticky")
MAX_TIMEOUT = 3600.0
BY_CONNECTION = {"set_by": "connection"}  # a field's metadata: the connection sets it


class OptionFields(TypedDict, total=False):
    """The options as keywords (``channel(kind="sticky", broker=...)``)."""

    kind: Kind
    zone: str | None
    broker: str | None
    timeout: float
    federates: str | None


@dataclass(frozen=True, slots=True)
class LeaseOptions:
    """What a lease asks for; frozen, and valid from the moment it exists."""

    kind: Kind = "float"  # float: the zone's primary, fails over and back; sticky: one broker
    zone: str | None = None  # a float lease's zone (None: the pool's local zone)
    broker: str | None = None  # a sticky lease's broker URI (a client's URI: no options)
    timeout: float = 10.0  # seconds the lease waits for a channel, a reply, a blocked broker
    federates: str | None = None  # a federator's: the queue of the listener it feeds
    # the client connection object the lease belongs to (set by it; None: the lease alone)
    connection_id: str | None = field(default=None, repr=False, metadata=BY_CONNECTION)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LeaseRequestError(f"unknown lease kind {str(self.kind)[:40]!r} (float or"
                                    " sticky)", option="kind")
        for name, limit in (("zone", MAX_NAME), ("federates", MAX_NAME), ("broker", MAX_URI)):
            text_field(getattr(self, name), f"lease.{name}", limit, show=name != "broker")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float) or \
                not 0 <= self.timeout <= MAX_TIMEOUT:
            raise LeaseRequestError(f"timeout {self.timeout!r} is not between 0 and"
                                    f" {MAX_TIMEOUT:g} s", option="timeout")
        if self.connection_id is not None and not LEASE_ID.fullmatch(self.connection_id):
            raise LeaseRequestError(f"connection_id {self.connection_id[:40]!r} is not 1 to"
                                    f" {MAX_LEASE_ID} letters, digits, '-' or '_'",
                                    option="connection_id")
        if self.kind == "float" and self.broker:
            raise LeaseRequestError("a float lease takes no broker (use a sticky lease)",
                                    option="broker")
        if self.kind == "sticky":
            if not self.broker:
                raise LeaseRequestError("a sticky lease needs a broker URI", option="broker")
            broker_id(self.broker)  # a URI a client may name, or a clear error

    @property
    def broker_id(self) -> str | None:
        """A sticky lease's broker without credentials (what a worker compares)."""
        return broker_id(self.broker) if self.broker else None

    @property
    def route_key(self) -> tuple[str, str | None]:
        """What a client's route cache knows the lease by: its kind, and its zone or its
        sticky broker (the worker that served such a lease last is asked first)."""
        return self.kind, self.broker_id if self.kind == "sticky" else self.zone

    @classmethod
    def of(cls, base: LeaseOptions | str | None = None, /,
           **fields: object) -> LeaseOptions:
        """Options from what a caller gave: ``base`` (options, or a kind) with ``fields``
        over it; an unknown keyword is a :class:`LeaseRequestError` naming it."""
        names = {f.name for f in dataclasses.fields(cls) if not f.metadata}
        unknown = sorted(set(fields) - names)
        if unknown and unknown[0] == "connection_id":
            raise LeaseRequestError("connection_id is set by the connection a lease is asked"
                                    " of, not by its caller", option="connection_id")
        if unknown:
            raise LeaseRequestError(f"unknown lease option {unknown[0]!r} (options:"
                                    f" {', '.join(sorted(names))})", option=unknown[0])
        if isinstance(base, str):
            fields = {"kind": base, **fields}
        elif base is not None:
            return dataclasses.replace(base, **fields)  # type: ignore[arg-type]
        return cls(**fields)  # type: ignore[arg-type]


    def for_connection(self, connection_id: str) -> LeaseOptions:
        """These options, on a lease of the client connection ``connection_id``."""
        if self.connection_id == connection_id:
            return self
        return dataclasses.replace(self, connection_id=connection_id)


class ConnectionId:
    """A client connection object's identity: drawn when it is made, and drawn again in a
    child process after a fork (a connection is one process's, as a pika connection is)."""

    __slots__ = ("_pid", "_value")

    def __init__(self) -> None:
        self._pid, self._value = os.getpid(), secrets.token_hex(16)

    @property
    def value(self) -> str:
        if os.getpid() != self._pid:
            self._pid, self._value = os.getpid(), secrets.token_hex(16)
        return self._value


@functools.lru_cache(maxsize=256)
def broker_id(uri: str) -> str:
    """A client's broker URI without its credentials; a :class:`LeaseRequestError` if it is
    not one a client may name."""
    try:
        return BrokerURI.parse_client(uri).short
    except BrokerURIError as exc:
        raise LeaseRequestError(str(exc), option="broker") from exc

