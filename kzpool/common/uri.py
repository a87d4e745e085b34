"""Broker URIs: parsing, validation and the password-free forms used in titles, logs and status."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from .errors import BrokerURIError

SCHEMES = {"amqp": 5672, "amqps": 5671}
MASK = "***"  # a password as titles, logs and status show it


@dataclass(frozen=True)
class BrokerURI:
    """One broker, as written in the config.  ``uri`` keeps the credentials: never log it."""

    uri: str
    scheme: str
    host: str
    port: int
    vhost: str
    user: str
    password: str

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
        )

    @property
    def masked(self) -> str:
        """The URI with its password replaced by ``***``: safe for logs and status."""
        where = self.short[len(self.scheme) + 3:]
        return f"{self.scheme}://{quote(self.user, safe='')}:{MASK}@{where}"

    @property
    def short(self) -> str:
        """The URI without credentials: safe for process titles."""
        return f"{self.scheme}://{self.host}:{self.port}/{quote(self.vhost, safe='')}"


def mask(text: str) -> str:
    """Hide the password of a URI that may not even parse."""
    head, sep, tail = text.rpartition("@")
    if not sep:
        return text
    scheme, _, creds = head.partition("://")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:{MASK}@{tail}"


def _bad(text: str, reason: str) -> BrokerURIError:
    return BrokerURIError(f"bad broker URI {mask(text)!r}: {reason}", uri=mask(text),
                          reason=reason)
