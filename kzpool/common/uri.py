"""Broker URIs: parsing, validation and the password-free forms used in titles, logs and status.

A URI may carry options in its query, as Kazoo's do (Erlang's ``amqp_uri``): the TLS ones
(:data:`TLS_OPTIONS`) and a few connection ones (:data:`CONNECTION_OPTIONS`).  Every option is
checked here, so a worker never meets one it cannot use; pika's own ``ssl_options`` (a Python
literal pika would evaluate) is refused.  A client's URI (a sticky lease naming a broker) is
parsed with :meth:`BrokerURI.parse_client`, which refuses every option: TLS files and
connection settings come from the pool's config only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .errors import BrokerURIError

SCHEMES = {"amqp": 5672, "amqps": 5671}
MASK = "***"  # a password as titles, logs and status show it
VERIFY = ("verify_peer", "verify_none")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.?$")
_SECRET_OPTION = re.compile(r"(?i)([?&;]password=)[^&;#]*")


def _path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    return value


def _number(low: int, high: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not value.isdigit() or not low <= int(value) <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return value
    return check


def _choice(value: str) -> str:
    if value not in VERIFY:
        raise ValueError("must be verify_peer or verify_none")
    return value


def _server_name(value: str) -> str:
    if value != "disable" and not _HOSTNAME.match(value):
        raise ValueError("must be a host name, or disable")
    return value


def _secret(value: str) -> str:
    if not value:
        raise ValueError("empty password")
    return value


TLS_OPTIONS: dict[str, Callable[[str], str]] = {
    "cacertfile": _path,  # CA certificates the broker's certificate is checked against
    "certfile": _path,  # the client certificate (PEM; may hold the key too)
    "keyfile": _path,  # its private key
    "password": _secret,  # the key's password, if it is encrypted
    "verify": _choice,  # verify_peer | verify_none
    "server_name_indication": _server_name,  # the name sent and checked; "disable": neither
    "depth": _number(0, 64),  # intermediate CAs allowed between the broker and the CA
}
CONNECTION_OPTIONS: dict[str, Callable[[str], str]] = {
    "heartbeat": _number(0, 65535),  # seconds; overrides [pool] heartbeat for this broker
    "channel_max": _number(1, 65535),
    "frame_max": _number(4096, 131072),
}
OPTIONS = {**TLS_OPTIONS, **CONNECTION_OPTIONS}
LITERAL_OPTIONS = ("ssl_options", "tcp_options", "client_properties")  # pika's, not ours


@dataclass(frozen=True)
class BrokerURI:
    """One broker, as written in the config.  ``uri`` keeps the credentials (and any key
    password): never log it.  ``options``: the validated query, in the order written."""

    uri: str
    scheme: str
    host: str
    port: int
    vhost: str
    user: str
    password: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> BrokerURI:
        """Parse and validate ``text``; raise :class:`BrokerURIError` naming the fault."""
        text = text.strip()
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise _bad(text, str(exc)) from exc
        if parts.scheme not in SCHEMES:
            raise _bad(text, f"scheme {parts.scheme!r} is not amqp or amqps")
        if not parts.hostname:
            raise _bad(text, "no host")
        if port == 0:
            raise _bad(text, "port 0")
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if "/" in path:
            raise _bad(text, f"vhost {path!r} must be one path segment (write '/' as %2F)")
        return cls(
            uri=text,
            scheme=parts.scheme,
            host=parts.hostname,
            port=port or SCHEMES[parts.scheme],
            vhost=unquote(path) if path else "/",
            user=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            options=_options(text, parts.scheme, parts.query),
        )

    @classmethod
    def parse_client(cls, text: str) -> BrokerURI:
        """A URI a client sent (a sticky lease's broker): as :meth:`parse`, and no options.

        TLS files, key passwords and connection options come from the pool's config only:
        a client may name a broker, never make the pool load a file.
        """
        uri = cls.parse(text)
        if uri.options:
            names = ", ".join(name for name, _ in uri.options)
            raise _bad(text, f"a lease's broker URI takes no options ({names}): TLS files and"
                             " connection options come from the pool's config")
        return uri

    def option(self, name: str) -> str | None:
        """The value of option ``name``, or ``None`` if the URI does not give it."""
        return next((value for key, value in self.options if key == name), None)

    @property
    def tls(self) -> bool:
        return self.scheme == "amqps"

    @property
    def masked(self) -> str:
        """The URI with its password replaced by ``***``, without options: safe for logs and
        status."""
        where = self.short[len(self.scheme) + 3:]
        return f"{self.scheme}://{quote(self.user, safe='')}:{MASK}@{where}"

    @property
    def short(self) -> str:
        """The URI without credentials or options: safe for process titles."""
        return f"{self.scheme}://{self.host}:{self.port}/{quote(self.vhost, safe='')}"


def _options(text: str, scheme: str, query: str) -> tuple[tuple[str, str], ...]:
    """The query's options, each known, given once and valid (else a named error)."""
    found: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _bad(text, "malformed query (write options as ?name=value&name=value)") from None
    for name, value in pairs:
        if name in LITERAL_OPTIONS:
            raise _bad(text, f"option {name!r} is pika's Python literal and is not accepted;"
                             " write TLS as cacertfile, certfile, keyfile, verify options")
        if name not in OPTIONS:
            raise _bad(text, f"unknown option {name!r} (known: {', '.join(OPTIONS)})")
        if name in found:
            raise _bad(text, f"option {name!r} given twice")
        if name in TLS_OPTIONS and scheme != "amqps":
            raise _bad(text, f"TLS option {name!r} on an amqp URI (use amqps)")
        try:
            found[name] = OPTIONS[name](value)
        except ValueError as exc:
            shown = MASK if name == "password" else value
            raise _bad(text, f"option {name}={shown!r}: {exc}") from None
    if "keyfile" in found and "certfile" not in found:
        raise _bad(text, "keyfile needs certfile (the certificate of that key)")
    if "password" in found and "certfile" not in found:
        raise _bad(text, "password (of the key) needs certfile and keyfile: the [pool]"
                         " tls_key takes no password")
    return tuple(found.items())


def mask(text: str) -> str:
    """Hide the password of a URI that may not even parse, and any key password in it."""
    text = _SECRET_OPTION.sub(lambda m: m.group(1) + MASK, text)
    base, question, query = text.partition("?")  # an @ in an option's file name stays
    head, sep, tail = base.rpartition("@")
    if not sep:
        return text
    scheme, _, creds = head.partition("://")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:{MASK}@{tail}{question}{query}"


def _bad(text: str, reason: str) -> BrokerURIError:
    return BrokerURIError(f"bad broker URI {mask(text)!r}: {reason}", uri=mask(text),
                          reason=reason)
