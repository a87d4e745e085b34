"""The kombu transport ``kzpool``: a kombu connection whose channels are leases of the pool.

Where the pool is: the URL's path (``kzpool:///run/kzpool/kzpool.sock``), else
``$KZPOOL_SOCKET``, else the default socket path (``kzpool://``).  The pool is on this
machine: a URL naming a host or credentials, or with a query, is refused (the pool's config
has the brokers and their credentials; heartbeats are its workers').

``transport_options`` (Celery: ``broker_transport_options``):

- each field of :class:`~kzpool.common.options.LeaseOptions`, by its name (``kind``,
  ``zone``, ``broker``, ``timeout``, and any field added later), for every lease of the
  connection, checked as the connection is made (a bad one is a ``LeaseRequestError``
  naming it, and not retried);
- ``confirm_publish``: publisher confirms, as for kombu's amqp transport;
- anything else is kombu's own (its retry policy: ``max_retries``, ``interval_start``, ...)
  or ignored, as py-amqp ignores what it does not know.

What Celery reads of a transport: ``driver_type`` is ``"amqp"`` (mingle, gossip, the topic
event exchange, quorum-queue detection), ``implements.asynchronous`` (the worker runs its
event loop, which polls :meth:`~kzpool.kombu.connection.Connection.fileno`), no heartbeats
(interval 0: the pool keeps them), and per-consumer QoS (``qos_semantics_matches_spec``:
RabbitMQ 4.3 denies global QoS, and a lease may move between brokers of different
versions).
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any, NamedTuple

import amqp.exceptions as amqp
from kombu.transport import base

from .. import __version__
from ..common.errors import LeaseRequestError
from ..common.options import LeaseOptions
from ..common.settings import client_socket
from . import connection as driver

LEASE_OPTIONS = tuple(f.name for f in dataclasses.fields(LeaseOptions))


class Settings(NamedTuple):
    """What a kombu connection asks of the pool."""

    socket: str
    options: LeaseOptions
    confirm_publish: bool


def settings_of(client: Any) -> Settings:
    """The settings of the kombu connection ``client``."""
    return Settings(socket_of(client), lease_options(client.transport_options or {}),
                    bool((client.transport_options or {}).get("confirm_publish")))


def socket_of(client: Any) -> str:
    """The pool's socket: the URL's path, ``$KZPOOL_SOCKET``, or the default path."""
    host = client.hostname or ""
    if "://" in host:  # the whole URL: the transport parses it (can_parse_url)
        path = _path_of(host)
    elif host not in ("", "localhost"):
        raise ValueError(f"kzpool transport: host {host!r}: the pool is reached through its"
                         " socket on this machine; give the socket's path instead:"
                         " kzpool:///run/kzpool/kzpool.sock")
    else:
        path = client.virtual_host if client.virtual_host not in (None, "", "/") else ""
    if path:
        return "/" + path.lstrip("/")
    return client_socket()


def _path_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "kzpool":
        raise ValueError(f"{url!r} is not a kzpool URL (kzpool:///path/to/kzpool.sock)")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a kzpool URL takes no query or fragment; give options"
                         " in transport_options")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r}: the pool is reached through its socket on this machine,"
                         " not through a host or with credentials; give the socket's path:"
                         " kzpool:///run/kzpool/kzpool.sock")
    return urllib.parse.unquote(parts.path)


def lease_options(transport_options: dict[str, Any]) -> LeaseOptions:
    """The lease options among ``transport_options`` (every field of LeaseOptions, by name)."""
    given = {k: v for k, v in transport_options.items() if k in LEASE_OPTIONS}
    try:
        return LeaseOptions.of(**given)
    except LeaseRequestError as exc:
        raise LeaseRequestError(f"kzpool transport_options: {exc}", **exc.fields) from exc


class Transport(base.Transport):
    """``kzpool://``: channels are leases of the pool on this machine."""

    Connection = driver.Connection

    can_parse_url = True  # the URL's path is the socket's: kombu's parsing would mangle it
    driver_type = "amqp"
    driver_name = "kzpool"
    implements = base.Transport.implements.extend(asynchronous=True, heartbeats=False)

    connection_errors = (amqp.ConnectionError, OSError)  # type: ignore[assignment]
    channel_errors = (amqp.ChannelError,)
    recoverable_connection_errors = (amqp.RecoverableConnectionError, amqp.MessageNacked,
                                     OSError)
    recoverable_channel_errors = (amqp.RecoverableChannelError,)

    def driver_version(self) -> str:
        return __version__

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        return uri if "://" in uri else "kzpool://"  # (a kzpool URL holds no secret)

    def establish_connection(self) -> driver.Connection:
        settings = settings_of(self.client)
        connection = driver.Connection(settings.socket, settings.options, settings.confirm_publish)
        connection.client = self.client
        return connection

    def close_connection(self, connection: driver.Connection) -> None:
        connection.client = None
        connection.close()

    def _collect(self, connection: driver.Connection | None) -> None:
        """kombu's after-fork cleanup and reconnect path: close, without a word to the pool
        in a forked child."""
        if connection is not None:
            connection.collect()

    def create_channel(self, connection: driver.Connection) -> Any:
        return connection.channel()

    def drain_events(self, connection: driver.Connection, timeout: float | None = None,
                     **_kwargs: Any) -> None:
        connection.drain_events(timeout)

    def verify_connection(self, connection: driver.Connection) -> bool:
        return connection.connected

    def register_with_event_loop(self, connection: driver.Connection, loop: Any) -> None:
        connection.register_with(loop, self.on_readable)

    def unregister_from_event_loop(self, connection: driver.Connection, loop: Any) -> None:
        connection.unregister()

    def get_heartbeat_interval(self, connection: driver.Connection) -> int:
        return 0  # the pool's workers keep the heartbeats

    def qos_semantics_matches_spec(self, connection: driver.Connection) -> bool:
        return True  # per-consumer prefetch: global QoS is denied on RabbitMQ 4.3

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {}
