"""The consumer timeout a worker adds to a lease's consumes.

RabbitMQ takes a delivery back when its consumer keeps it unacked longer than a timeout:
the broker's ``consumer_timeout`` (30 minutes by default), a queue's (its
``x-consumer-timeout`` argument, or a policy), or a consumer's own (the
``x-consumer-timeout`` argument of ``basic.consume``, which wins over both where the
broker honours it: RabbitMQ 4.3 does; 3.10 and 4.0.5 ignore it, measured).  A kzpool
consumer keeps its heartbeats however long its callback computes, so the pool gives a
consume that names no timeout its own, long one (:class:`ConsumeTimeout`): the lease's
``consumer_timeout`` option, else ``[pool] consumer_timeout``; from RabbitMQ 3.12 (the
first said to honour it) on.  A consume that passes ``x-consumer-timeout`` keeps it, and so
does one of a queue that the lease declared with that argument.

From RabbitMQ 4.3 (here: from :data:`QUORUM_ONLY`), consumer timeouts apply to quorum
queues only, and the broker refuses the argument on a consume of any other queue (``406
PRECONDITION_FAILED - invalid arg 'x-consumer-timeout' ... of queue type
rabbit_classic_queue``, closing the channel).  A worker cannot ask a queue's type, so there
it adds the argument only to consumes of the quorum queues the lease declared itself
(``x-queue-type: quorum``); a consumer of a quorum queue declared elsewhere passes its own.
Pure logic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..common.options import LeaseOptions
from ..common.settings import PoolSettings

ARGUMENT = "x-consumer-timeout"
SINCE = (3, 12)  # the first RabbitMQ that honours the argument on a consume
# taken on a quorum queue's consume only: measured on 4.3.6 (4.0.5 takes it anywhere, and
# ignores it); 4.1 and 4.2, not measured, are treated as 4.3: a refusal closes the channel
QUORUM_ONLY = (4, 1)
_VERSION = re.compile(rb"^(\d+)\.(\d+)")


def broker_version(server_properties: Mapping[str, Any]) -> tuple[int, int] | None:
    """(major, minor) of the broker's ``version`` server property (``"4.3.6"``); ``None``
    if it does not say."""
    version = server_properties.get("version")
    if isinstance(version, str):
        version = version.encode()
    found = _VERSION.match(version) if isinstance(version, bytes) else None
    return (int(found.group(1)), int(found.group(2))) if found else None


def supported(server_properties: Mapping[str, Any]) -> bool:
    """Whether the broker honours ``x-consumer-timeout`` on a consume."""
    version = broker_version(server_properties)
    return version is not None and version >= SINCE


def seconds(options: LeaseOptions, settings: PoolSettings,
            server_properties: Mapping[str, Any]) -> float:
    """The timeout a lease's consumes get on a broker (0: none, the broker ignores it)."""
    if not supported(server_properties):
        return 0.0
    chosen = options.consumer_timeout
    return settings.consumer_timeout if chosen is None else chosen


def quorum_only(server_properties: Mapping[str, Any]) -> bool:
    """Whether the broker takes the argument on a quorum queue's consume only."""
    version = broker_version(server_properties)
    return version is not None and version >= QUORUM_ONLY


class ConsumeTimeout:
    """What one session adds to its consumes: ``seconds`` (0: nothing); ``quorum_only``:
    only to consumes of the quorum queues the lease declared."""

    __slots__ = ("milliseconds", "own", "quorum", "quorum_only")

    @classmethod
    def of(cls, options: LeaseOptions, settings: PoolSettings, connection: Any) -> ConsumeTimeout:
        """What a lease's consumes get on ``connection`` (its broker's server properties)."""
        properties = getattr(connection, "server_properties", None) or {}
        return cls(seconds(options, settings, properties), quorum_only(properties))

    def __init__(self, seconds: float, quorum_only: bool = False) -> None:
        self.milliseconds = round(seconds * 1000)
        self.quorum_only = quorum_only
        self.own: set[str] = set()  # declared by the lease with a timeout of their own
        self.quorum: set[str] = set()  # declared by the lease as quorum queues

    def declared(self, args: Mapping[str, Any]) -> None:
        """A ``queue_declare`` of the lease: one with ``x-consumer-timeout`` keeps its own."""
        arguments = args.get("arguments")
        if isinstance(arguments, Mapping):
            queue = str(args.get("queue", ""))
            if ARGUMENT in arguments:
                self.own.add(queue)
            if arguments.get("x-queue-type") == "quorum":
                self.quorum.add(queue)

    def arguments(self, queue: str, arguments: Any) -> Any:
        """A consume's arguments, with the pool's timeout added if it names none."""
        if not self.milliseconds or queue in self.own or (
                self.quorum_only and queue not in self.quorum):
            return arguments
        if arguments is None:
            return {ARGUMENT: self.milliseconds}
        if not isinstance(arguments, Mapping) or ARGUMENT in arguments:
            return arguments  # its own timeout (or what pika will refuse), as it is
        return {**arguments, ARGUMENT: self.milliseconds}
