"""Every ``[pool]`` setting and every ``[consumer:NAME]`` key, declared once.

Each is a field of :class:`PoolSettings` or :class:`ConsumerSettings`: its type (what the code
reads, checked by mypy), and its :func:`setting` (how the text converts, its default as the
config file writes it, its help, its environment variable).  The config loader, the
``kzpool serve`` flags and ``config.ini.example`` are derived from :data:`SETTINGS` and
:data:`CONSUMER_SETTINGS`, the tables read off those fields.  A value that does not convert
raises :class:`ValueError` with a message that the loader prefixes with the file, line and
key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .access import to_gids, to_uids
from .options import MAX_CONSUMER_TIMEOUT

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def to_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not a whole number") from None


def to_seconds(text: str) -> float:
    try:
        value = float(text.rstrip("s ") if text.strip().endswith("s") else text)
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("not a finite number of seconds")
    return value


def to_size(text: str) -> int:
    """Bytes from ``512M``, ``1G``, ``65536K`` or a bare number of MiB."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("not a size (a number of MiB, or with a K, M or G suffix)")
    number, unit = match.groups()
    return int(number) * _UNITS[(unit or "m")[0].lower()]


def to_level(text: str) -> str:
    level = text.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("not one of debug, info, warning, error")
    return level


def to_path(text: str) -> str:
    if not text.strip():
        raise ValueError("empty path")
    return os.path.abspath(text.strip())


def to_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError("not true or false")


def to_list(text: str) -> tuple[str, ...]:
    """Items one per line or separated by commas."""
    return tuple(item.strip() for line in text.splitlines() for item in line.split(",")
                 if item.strip())


def to_handler(text: str) -> str:
    module, _, attribute = text.strip().partition(":")
    if not module or not attribute or not all(p.isidentifier() for p in module.split(".")):
        raise ValueError("not module.path:callable")
    return text.strip()


def to_optional_path(text: str) -> str | None:
    """A path, or nothing for an empty value."""
    return os.path.abspath(text.strip()) if text.strip() else None


def to_tls_verify(text: str) -> str:
    if text.strip() not in ("verify_peer", "verify_none"):
        raise ValueError("not verify_peer or verify_none")
    return text.strip()


def to_lease_kind(text: str) -> str:
    if text.strip() not in ("float", "sticky"):
        raise ValueError("not float or sticky")
    return text.strip()


def at_least(minimum: float) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value < minimum:
            raise ValueError(f"must be at least {minimum:g}")

    return check


def above(minimum: float) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value <= minimum:
            raise ValueError(f"must be more than {minimum:g}")

    return check


def between(low: float, high: float) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g}")

    return check


@dataclass(frozen=True)
class Setting:
    """One setting: how its text converts and checks, its default text, its help."""

    name: str
    convert: Callable[[str], Any]
    default: str | None
    help: str
    check: Callable[[Any], None] | None = None
    env: str | None = None
    cli: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str) -> Any:
        """Convert and validate ``text``; ``ValueError`` says what is wrong with it."""
        value = self.convert(text)
        if self.check is not None:
            self.check(value)
        return value


def setting(convert: Callable[[str], Any], default: str | None, help: str,
            check: Callable[[Any], None] | None = None, env: str | None = None) -> Any:
    """A settings field: its :class:`Setting` rides in the field's metadata (named after the
    field when the table is read)."""
    return field(metadata={"setting": Setting("", convert, default, help, check, env)})


def _table(cls: type) -> tuple[Setting, ...]:
    return tuple(replace(f.metadata["setting"], name=f.name) for f in fields(cls))


@dataclass(frozen=True)
class PoolSettings:
    """The ``[pool]`` values: ``settings.prechannels``."""

    socket: str = setting(
        to_path, "/run/kzpool/kzpool.sock",
        "Path of the lease socket that clients and `kzpool status` connect to.",
        env="KZPOOL_SOCKET")
    zone: str | None = setting(
        str, None, "Name of the local zone when [zone:NAME] sections are used.",
        env="KZPOOL_ZONE")
    prechannels: int = setting(
        to_int, "10", "Channels each connection opens ahead of time (Kazoo: 10).", at_least(0))
    connections_per_broker: int = setting(
        to_int, "1", "Connection workers per broker URI.", at_least(1))
    heartbeat: int = setting(
        to_int, "10",
        "AMQP heartbeat in seconds, kept by the connection workers; 0 disables.", at_least(0))
    connect_timeout: float = setting(
        to_seconds, "5", "Seconds allowed to open one broker connection.", above(0))
    startup_timeout: float = setting(
        to_seconds, "30",
        "Seconds `kzpool serve` waits for the local primary broker before giving up.",
        above(0))
    shutdown_timeout: float = setting(
        to_seconds, "10",
        "Seconds a graceful stop may take before what is left is killed.", above(0))
    reconnect_backoff_min: float = setting(
        to_seconds, "0.1", "First reconnect delay in seconds; it doubles after each failure.",
        above(0))
    reconnect_backoff_max: float = setting(
        to_seconds, "5",
        "Cap of the reconnect delay for brokers of the local zone (Kazoo: 5 s).", above(0))
    reconnect_backoff_max_remote: float = setting(
        to_seconds, "60",
        "Cap of the reconnect delay for brokers of remote zones (Kazoo: 60 s).", above(0))
    respawn_backoff_max: float = setting(
        to_seconds, "30", "Cap of the delay before a crashed worker is started again.",
        above(0))
    worker_timeout: float = setting(
        to_seconds, "10",
        "A worker silent this long (no report to the master) is killed and replaced.",
        above(0))
    worker_max_rss: int = setting(
        to_size, "256M",
        "A connection worker above this resident memory is replaced; 0 disables.",
        at_least(0))
    default_prefetch: int = setting(
        to_int, "1000",
        "Prefetch a lease's consumers get when the lease set no basic_qos: it bounds the"
        " deliveries a consumer has unacked at once (lease_buffer bounds their bytes);"
        " 0: unlimited.", at_least(0))
    # --- what a worker buffers on the way to its broker (kzpool/worker/turns.py) ---
    worker_buffer: int = setting(
        to_size, "64M",
        "Bytes a connection worker holds at once of what its leases send the broker (large"
        " publishes arriving, frames waiting for their turn), all leases together: past it"
        " a lease's next large publish waits in its own client; one always passes, so a"
        " message larger than this still goes, alone. Keep it well under worker_max_rss.",
        at_least(1))
    # what a worker holds toward one lease's client (kzpool.worker.outbox)
    lease_buffer: int = setting(
        to_size, "4M",
        "Bytes a worker holds for one lease that its client has not read (deliveries,"
        " auto_ack ones too, returns, answers), whatever the prefetch; past it that lease"
        " alone is held back: its consumers are cancelled at the broker and consume again,"
        " same tags, once the client has read. The leases of one worker hold a quarter of"
        " worker_max_rss at most, all together.", at_least(64 << 10))
    lease_buffer_grace: float = setting(
        to_seconds, "1800",
        "Seconds a lease held back by lease_buffer may go without its client reading"
        " anything; then its lease is closed, with LimitExceeded naming lease_buffer. Keep it"
        " above the longest a callback of your clients computes without reading.", above(0))
    consumer_timeout: float = setting(
        to_seconds, "86400",
        "Seconds a lease's consumer may keep a delivery unacked before the broker takes it"
        " back: the x-consumer-timeout the workers add to every consume that names none, on"
        " RabbitMQ 3.12 and later (a lease's consumer_timeout option overrides it); 0: add"
        " none, the broker's consumer_timeout (30 minutes by default) or the queue's applies.",
        between(0, MAX_CONSUMER_TIMEOUT))
    move_grace: float = setting(
        to_seconds, "30",
        "Seconds a lease the pool moves (fail-back to the primary) keeps its channel to"
        " settle the deliveries it holds, its consumers cancelled; what is still unsettled"
        " then goes back to its queue.", at_least(0))
    allow_users: frozenset[int] = setting(
        to_uids, "",
        "Users (names or uids) whose processes may use the lease socket; empty: the"
        " service's own user.")
    allow_groups: frozenset[int] = setting(
        to_gids, "",
        "Groups (names or gids) whose members may use the lease socket; empty: the"
        " service's own group.")
    max_leases_per_process: int = setting(
        to_int, "256",
        "Leases one client process may hold at once (bound to a channel or waiting for"
        " one); past it a lease request is refused with LimitExceeded.", at_least(1))
    max_leases_per_uid: int = setting(
        to_int, "4096",
        "Leases the processes of one user may hold at once, all together; past it a lease"
        " request is refused with LimitExceeded.", at_least(1))
    max_pending_per_peer: int = setting(
        to_int, "8",
        "Requests one connection to the pool's socket may have sent whose answers it has"
        " not read yet; past it that connection is dropped.", at_least(1))
    max_peers: int = setting(
        to_int, "4000",
        "Client connections the master and each connection worker serve at once (bound"
        " leases, waiting lease requests and unanswered ones included); past it, or at the"
        " process's file limit, new ones are refused and the others go on. The master"
        " raises its soft file limit to fit; systemd's LimitNOFILE must leave room.",
        at_least(1))
    hidden_brokers: int = setting(
        to_int, "0",
        "Brokers a sticky lease may name that the config does not list (each gets its own"
        " connection worker; one no lease uses is replaced first); 0: a sticky lease must"
        " name a broker of the config.", at_least(0))
    tls_ca: str | None = setting(
        to_optional_path, "",
        "CA certificate file (PEM) for amqps brokers that name no cacertfile of their own;"
        " empty: the system's CAs.")
    tls_cert: str | None = setting(
        to_optional_path, "",
        "Client certificate file (PEM) for amqps brokers that name no certfile of their own.")
    tls_key: str | None = setting(
        to_optional_path, "",
        "Key file of tls_cert (PEM, not encrypted); empty: the key is in tls_cert's file.")
    tls_verify: str = setting(
        to_tls_verify, "verify_peer",
        "verify_peer (check the broker's certificate against the CA, and its name) or"
        " verify_none, for amqps brokers that name no verify of their own.")
    metrics_port: int = setting(
        to_int, "0",
        "Serve Prometheus metrics on this TCP port (needs prometheus-client); 0: off.",
        at_least(0))
    metrics_address: str = setting(str, "127.0.0.1", "Address the metrics port listens on.")
    log_level: str = setting(to_level, "info", "One of debug, info, warning, error.")


@dataclass(frozen=True)
class ConsumerSettings:
    """One ``[consumer:NAME]`` section: a Listener the pool runs in its own processes."""

    handler: str = setting(
        to_handler, None,
        "module.path:callable getting each message, or a kzpool.Listener subclass.")
    processes: int = setting(to_int, "1", "Consumer processes the pool forks for it.",
                             at_least(1))
    lease: str = setting(to_lease_kind, "float", "float, or sticky (with broker =).")
    broker: str | None = setting(str, None, "The broker URI of a sticky consumer.")
    queue: str = setting(str, None, "Queue name (default: the section's NAME).")
    exchange: str = setting(str, "", "Exchange the bindings bind to ('' = the default one).")
    exchange_type: str = setting(str, "topic", "Type of that exchange.")
    bindings: tuple[str, ...] = setting(to_list, "",
                                        "Routing keys, one per line or comma separated.")
    prefetch: int = setting(to_int, "10", "QoS prefetch of each process.", at_least(0))
    durable: bool = setting(to_bool, "false", "Declare the exchange and queue durable.")
    federate: bool = setting(
        to_bool, "false",
        "Consume the bindings on every other zone's brokers too: one federator per broker,"
        " on a queue named QUEUE-LOCALZONE there.")
    requeue_on_error: bool = setting(
        to_bool, "false",
        "A message whose handler raised goes back to the queue (else it is dropped).")
    max_messages: int = setting(to_int, "0",
                                "Recycle a process after this many messages; 0: never.",
                                at_least(0))
    max_rss: int = setting(to_size, "0", "Recycle a process above this RSS; 0: never.",
                           at_least(0))


SETTINGS = _table(PoolSettings)
BY_NAME = {s.name: s for s in SETTINGS}
CONSUMER_SETTINGS = _table(ConsumerSettings)
CONSUMER_BY_NAME = {s.name: s for s in CONSUMER_SETTINGS}


def client_socket(socket: str | None = None) -> str:
    """The pool's socket for a client: ``socket``, else ``$KZPOOL_SOCKET``, else the
    default path."""
    return socket or os.environ.get("KZPOOL_SOCKET") or str(BY_NAME["socket"].default)
