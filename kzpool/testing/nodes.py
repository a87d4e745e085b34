"""Which RabbitMQ nodes the tests and benches talk to, in one place.

``KZPOOL_TEST_RABBITMQ`` picks the RabbitMQ they run against:

- ``3`` (the default): the machine's RabbitMQ package (3.10 on Debian 12); the default
  broker is its node on 127.0.0.1:5672, the extra nodes run from the same install.
- ``4``: RabbitMQ 4.x from the chroot ``scripts/brokers.py rmq4 ensure`` makes (Debian sid:
  4.3); the default broker is a node of its own on 5720, started by the first test that
  needs it, and the extra nodes (failover, TLS, cluster) are 4.x nodes on their own ports,
  so a 4.x run and a 3.10 run can share the machine.

A node is ``(name, AMQP port)``; the TLS node has its TLS port too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "KZPOOL_TEST_RABBITMQ"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Layout:
    rabbitmq: int  # the major version: 3 (the machine's package) or 4 (the chroot's)
    default: tuple[str, int]  # the default broker
    default_is_machines: bool  # the machine's own node (never started nor stopped by tests)
    extra: tuple[str, int]  # the failover tests' node (stopped, killed, silenced)
    tls: tuple[str, int, int]  # name, AMQP port, TLS port (a client certificate required)
    cluster: tuple[tuple[str, int], ...]  # three nodes joined to the first


LAYOUTS = {
    3: Layout(3, ("rabbit@localhost", 5672), True, ("kzp1@localhost", 5701),
              ("kztls1@localhost", 5741, 5742),
              (("kzcl1@localhost", 5751), ("kzcl2@localhost", 5752), ("kzcl3@localhost", 5753))),
    4: Layout(4, ("kz4@localhost", 5720), False, ("kz4p1@localhost", 5721),
              ("kz4tls1@localhost", 5743, 5744),
              (("kz4cl1@localhost", 5754), ("kz4cl2@localhost", 5755), ("kz4cl3@localhost", 5756))),
}


def rabbitmq_version(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """The major version ``KZPOOL_TEST_RABBITMQ`` asks for: "3"/"3.10" (or unset), "4"/"4.3"."""
    value = environ.get(ENV, "").strip() or "3"
    major = value.partition(".")[0]
    if major not in ("3", "4"):
        raise ValueError(f"{ENV}={value!r}: 3 (the machine's RabbitMQ) or 4 (the 4.x chroot's)")
    return int(major)


LAYOUT = LAYOUTS[rabbitmq_version()]
DEFAULT_NODE, DEFAULT_PORT = LAYOUT.default


def default_uri(vhost: str = "%2F", user: str = "guest", password: str = "guest") -> str:
    """An AMQP URI of the default broker (``vhost`` as it goes in a URI)."""
    return f"amqp://{user}:{password}@{HOST}:{DEFAULT_PORT}/{vhost}"


DEFAULT_URI = default_uri()
DEFAULT_MASKED = default_uri(password="***")  # as kzpool shows it (status, titles, logs)
DEFAULT_HOSTPORT = f"{HOST}:{DEFAULT_PORT}"
